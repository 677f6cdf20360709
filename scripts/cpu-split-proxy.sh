#!/usr/bin/env bash
# Where a forwarded request's CPU goes, ours vs HAProxy (issue 12, session 15): user and
# system time, minor page faults and context switches per request, read from /proc/PID
# around each wrk run. `reverse_proxy --serve --direct --workers 1` and HAProxy 2.6
# `nbthread 1` (the forwarded-header configuration of scripts/bench-proxy.sh) in front of
# one nginx `return 200` backend, `wrk -t1 -c16`, rounds interleaved with the order
# swapped each round. Both proxies run at once, so a round compares them under the same
# load; on a shared machine the times are still noise, the page faults and context
# switches less so.
#
#   cargo build --release --example reverse_proxy
#   scripts/cpu-split-proxy.sh [BINARY]
#
# UPSTREAMS=2: the balanced case instead (issue 12's balancer row): the backend on two
# ports, ours `--serve` (round-robin `Balance` with retries and the replay layer) over
# both, HAProxy `balance roundrobin` over both.
# ROUNDS (default 4), DURATION (default 5s). PERF=1 also records a `perf record -e
# cpu-clock -g` profile of each proxy during the first round (this VM has no hardware
# counters; cpu-clock works), into /tmp/cpu-split-{ours,haproxy}.perf.data:
#   perf report -i /tmp/cpu-split-ours.perf.data --no-children --sort dso,sym -g none
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/examples/reverse_proxy}
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-5s}
RESULTS=/dev/null
. scripts/lib/bench.sh
need nginx nginx-light
need haproxy haproxy
need wrk wrk
need python3 python3
[ "${PERF:-0}" = 1 ] && need perf linux-perf

B=$(free_port); P=$(free_port); H=$(free_port)
if [ "${UPSTREAMS:-1}" = 2 ]; then
    B2=$(free_port)
    nginx_start backend 1 "server { listen 127.0.0.1:$B; listen 127.0.0.1:$B2; location / { return 200 'ok\n'; } }"
    wait_port "$B"
    "$BIN" --serve --workers 1 --listen "127.0.0.1:$P" --backends "http://127.0.0.1:$B,http://127.0.0.1:$B2" >/dev/null 2>&1 &
    ours=$!; pids+=($ours)
    haproxy_start hap 1 "$H" "127.0.0.1:$B" "127.0.0.1:$B2"
else
    nginx_start backend 1 "server { listen 127.0.0.1:$B; location / { return 200 'ok\n'; } }"
    wait_port "$B"
    "$BIN" --serve --direct --workers 1 --listen "127.0.0.1:$P" --backends "http://127.0.0.1:$B" >/dev/null 2>&1 &
    ours=$!; pids+=($ours)
    haproxy_start hap 1 "$H" "127.0.0.1:$B"
fi
hap=$last_pid
wait_port "$P"; wait_port "$H"
wrk -t1 -c16 -d2s "http://127.0.0.1:$P/" >/dev/null
wrk -t1 -c16 -d2s "http://127.0.0.1:$H/" >/dev/null

hz=$(getconf CLK_TCK)
# minflt utime stime (ticks), then voluntary and involuntary switches over all threads.
snap() {
    awk '{print $10, $14, $15}' "/proc/$1/stat"
    cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v, n}'
}
one() { # name pid port round
    local a b pp=""
    a=$(snap "$2")
    if [ "${PERF:-0}" = 1 ] && [ "$4" = 1 ]; then
        perf record -q -e cpu-clock -g -p "$2" -o "/tmp/cpu-split-$1.perf.data" -- sleep 3 >/dev/null 2>&1 &
        pp=$!
    fi
    local out
    out=$(wrk -t1 -c16 -d"$DURATION" "http://127.0.0.1:$3/")
    [ -n "$pp" ] && { wait "$pp" || true; }
    b=$(snap "$2")
    wrk_parse "$out"
    awk -v n="$wrk_total" -v hz="$hz" -v name="$1" -v rps="$wrk_rps" -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, /[ \n]+/); split(b, y, /[ \n]+/)
        printf "%-8s %8.0f req/s | per request: user %.2f us, system %.2f us, minflt %.4f, switches %.3f voluntary, %.3f involuntary\n",
            name, rps, (y[2] - x[2]) / hz * 1e6 / n, (y[3] - x[3]) / hz * 1e6 / n, (y[1] - x[1]) / n, (y[4] - x[4]) / n, (y[5] - x[5]) / n }'
}
log "cpu-split-proxy: load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds x $DURATION"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        one ours "$ours" "$P" "$r"; one haproxy "$hap" "$H" "$r"
    else
        one haproxy "$hap" "$H" "$r"; one ours "$ours" "$P" "$r"
    fi
done
