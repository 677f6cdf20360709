#!/usr/bin/env bash
# Proxy-path benchmark, like for like: our proxy vs nginx and HAProxy in front of the same
# nginx backend, driven by wrk.
#
#   scripts/bench-proxy.sh                       # WORKER_SET="1 2", 3 rounds of 5 s
#   WORKER_SET="1" ROUNDS=5 DURATION=10s scripts/bench-proxy.sh
#   RESULTS=bench.txt scripts/bench-proxy.sh      # also write the report to a file
#   TLS=1 scripts/bench-proxy.sh                  # HTTPS termination (issue 13), see below
#
# Fairness (issue 12):
# - Same work: nginx and HAProxy add the X-Forwarded-For/-Proto/-Host headers our
#   `Forward` adds, keep the client's Host, and reuse upstream connections (keep-alive).
# - Same shape: single-upstream forwarding is compared with single-upstream peers
#   (ours: `reverse_proxy --direct`, Forward alone), balancing over 2 upstreams with
#   balancing (ours: round-robin `Balance` with retries and a replay layer).
# - Same budget: WORKERS per proxy — ours: `--workers N` (thread-per-core, one
#   current-thread runtime and SO_REUSEPORT listener per worker); nginx
#   worker_processes N; HAProxy nbthread N.
# - Noise: ROUNDS (>= 3) interleaved rounds, the order rotated every round; medians and
#   ranges are reported, ratios are of medians from this one run.
# - CPU: each proxy's utime+stime (itself and its child processes, from /proc/<pid>/stat)
#   over the measured interval, per 100k requests.
#
# TLS=1: HTTPS termination in front of the plaintext backend, single upstream only — ours
# (`reverse_proxy --direct --tls-cert/--tls-key`, rustls with ring), nginx `listen ... ssl`,
# HAProxy `bind ... ssl crt`, all with the same P-256 certificate made here by the openssl
# CLI, ALPN h2/http1.1 offered, X-Forwarded-Proto https. wrk speaks HTTP/1.1 over TLS with
# keep-alive, so the figures are mostly record encryption, not handshakes.
# OURS_EXTRA: extra arguments for ours-fwd, e.g. OURS_EXTRA=--no-balance to compare with
# the kernel's spreading of connections over the workers.
#
# Optional pinning as in ../shared/bench/many-core/run.sh: WRK_CORES, BE_CORES, PX_CORES
# (taskset lists). On a 2-core machine leave them unset and run it only when the machine
# is otherwise idle (load average well under 1): wrk, backend and proxy share the cores,
# so the figures are ratios under contention, not capacity.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
WORKER_SET=${WORKER_SET:-${WORKERS:-1 2}}
CONNS_PER_WORKER=${CONNS_PER_WORKER:-64}
WRK_THREADS=${WRK_THREADS:-1}
BE_WORKERS=${BE_WORKERS:-1}
RESULTS=${RESULTS:-/dev/null}
TLS=${TLS:-0}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "missing $1 (Debian: apt-get install -y $2)" >&2; exit 1; }
}
need nginx nginx-light
need haproxy haproxy
need wrk wrk
need python3 python3
[ "$TLS" = 1 ] && need openssl openssl

ulimit -n 65536 2>/dev/null || true

pin() { # cores-or-empty cmd... (foreground)
    local cores=$1; shift
    if [ -n "$cores" ]; then taskset -c "$cores" "$@"; else "$@"; fi
}
# In the background (`spawn_pinned ... &`): `exec` so that `$!` is the program itself
# (killed on exit, its CPU counted), not a subshell around it.
spawn_pinned() {
    local cores=$1; shift
    if [ -n "$cores" ]; then exec taskset -c "$cores" "$@"; else exec "$@"; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

log() { echo "$*" | tee -a "$RESULTS"; }

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listening on $1" >&2
    exit 1
}

# CPU ticks (utime+stime) of a process and its children (nginx workers); threads are
# included in a process's own figures.
ticks() {
    local t=0 p
    for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
        [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat")))
    done
    echo "$t"
}

nginx_start() { # name workers http-body
    mkdir -p "$work/$1"
    cat > "$work/$1/nginx.conf" <<CONF
worker_processes $2;
daemon off;
error_log $work/$1/error.log warn;
pid $work/$1/nginx.pid;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $work/$1/body;
    proxy_temp_path $work/$1/proxy;
    fastcgi_temp_path $work/$1/fastcgi;
    uwsgi_temp_path $work/$1/uwsgi;
    scgi_temp_path $work/$1/scgi;
    keepalive_requests 1000000;
    $3
}
CONF
    spawn_pinned "${4:-}" nginx -c "$work/$1/nginx.conf" -e "$work/$1/error.log" &
    pids+=($!)
    last_pid=$!
}

# The headers our Forward sets, the same way: X-Forwarded-For appended, -Proto and -Host
# set (Host as sent, port included), Host kept, hop-by-hop Connection removed (keep-alive
# upstream). Checked against an echo backend: the three send the same values (HAProxy
# appends its X-Forwarded-For as a second header line, which means the same).
NGINX_PROXY='proxy_pass http://be; proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;'

haproxy_start() { # name workers port servers...
    local name=$1 workers=$2 port=$3; shift 3
    {
        cat <<CONF
global
    nbthread $workers
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
    option forwardfor
frontend fe
    bind 127.0.0.1:$port$HAP_SSL
    http-request set-header X-Forwarded-Proto $SCHEME
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be
backend be
    balance roundrobin
CONF
        local i=0
        for s in "$@"; do i=$((i + 1)); echo "    server s$i $s"; done
    } > "$work/$name.cfg"
    spawn_pinned "${PX_CORES:-}" haproxy -f "$work/$name.cfg" -q &
    pids+=($!)
    last_pid=$!
}

B1=$(free_port); B2=$(free_port)
nginx_start backend "$BE_WORKERS" "server { listen 127.0.0.1:$B1 reuseport; listen 127.0.0.1:$B2 reuseport; location / { return 200 'ok\n'; } }" "${BE_CORES:-}"
wait_port "$B1"; wait_port "$B2"

echo "building the release example..." >&2
if [ "$TLS" = 1 ]; then
    cargo build --release -q --features tls --example reverse_proxy
else
    cargo build --release -q --example reverse_proxy
fi
OURS=target/release/examples/reverse_proxy

SCHEME=http OURS_TLS=() NGX_SSL='' NGINX_TLS='' HAP_SSL=''
if [ "$TLS" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
    cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"
    SCHEME=https
    OURS_TLS=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem")
    NGX_SSL=' ssl http2'
    NGINX_TLS="ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem; ssl_session_cache shared:SSL:10m;"
    HAP_SSL=" ssl crt $work/haproxy.pem alpn h2,http/1.1"
fi

declare -A port pid
declare -A rps_all p99_all cpu_all err_all

start_proxies() { # workers
    local w=$1
    port[ours-fwd]=$(free_port)
    spawn_pinned "${PX_CORES:-}" $OURS --serve --direct --workers "$w" --listen "127.0.0.1:${port[ours-fwd]}" \
        --backends "http://127.0.0.1:$B1" "${OURS_TLS[@]}" ${OURS_EXTRA:-} >/dev/null 2>&1 &
    pids+=($!); pid[ours-fwd]=$!
    port[nginx-fwd]=$(free_port)
    nginx_start "ngx-fwd-$w" "$w" "upstream be { server 127.0.0.1:$B1; keepalive 256; }
    server { listen 127.0.0.1:${port[nginx-fwd]}$NGX_SSL reuseport; $NGINX_TLS location / { $NGINX_PROXY } }" "${PX_CORES:-}"
    pid[nginx-fwd]=$last_pid
    port[haproxy-fwd]=$(free_port)
    haproxy_start "hap-fwd-$w" "$w" "${port[haproxy-fwd]}" "127.0.0.1:$B1"
    pid[haproxy-fwd]=$last_pid
    if [ "$TLS" = 1 ]; then
        for n in "${!port[@]}"; do wait_port "${port[$n]}"; done
        return
    fi
    port[ours-bal]=$(free_port)
    spawn_pinned "${PX_CORES:-}" $OURS --serve --workers "$w" --listen "127.0.0.1:${port[ours-bal]}" \
        --backends "http://127.0.0.1:$B1,http://127.0.0.1:$B2" >/dev/null 2>&1 &
    pids+=($!); pid[ours-bal]=$!
    port[nginx-bal]=$(free_port)
    nginx_start "ngx-bal-$w" "$w" "upstream be { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 256; }
    server { listen 127.0.0.1:${port[nginx-bal]} reuseport; location / { $NGINX_PROXY } }" "${PX_CORES:-}"
    pid[nginx-bal]=$last_pid
    port[haproxy-bal]=$(free_port)
    haproxy_start "hap-bal-$w" "$w" "${port[haproxy-bal]}" "127.0.0.1:$B1" "127.0.0.1:$B2"
    pid[haproxy-bal]=$last_pid
    for n in "${!port[@]}"; do wait_port "${port[$n]}"; done
}

stop_proxies() {
    for n in "${!pid[@]}"; do kill "${pid[$n]}" 2>/dev/null || true; done
    sleep 1
}

to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); print v } else { sub(/s/,"",v); print v*1000 } }'; }

bench() { # name workers conns
    local name=$1 w=$2 conns=$3 url="$SCHEME://127.0.0.1:${port[$1]}/"
    pin "${WRK_CORES:-}" wrk -t"$WRK_THREADS" -c"$conns" -d1s "$url" >/dev/null 2>&1 # warm the pools
    local t0 t1 out
    t0=$(ticks "${pid[$name]}")
    out=$(pin "${WRK_CORES:-}" wrk -t"$WRK_THREADS" -c"$conns" -d"$DURATION" --latency "$url" 2>&1)
    t1=$(ticks "${pid[$name]}")
    local rps p99 total err cpu
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    err=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ' || true)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$total" \
        'BEGIN { if (n > 0) printf "%.2f", d / hz / n * 100000; else print "nan" }')
    rps_all[$name,$w]+="$rps "
    p99_all[$name,$w]+="$p99 "
    cpu_all[$name,$w]+="$cpu "
    [ -n "$err" ] && err_all[$name,$w]+="$err"
    printf '  %-12s %10s req/s  p99 %7s ms  cpu-s/100k %5s  %s\n' "$name" "$rps" "$p99" "$cpu" "$err" >&2
}

# "median min max" of a list of numbers.
stats() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'; }

NAMES=(ours-fwd nginx-fwd haproxy-fwd ours-bal nginx-bal haproxy-bal)
KINDS=(fwd bal)
[ "$TLS" = 1 ] && NAMES=(ours-fwd nginx-fwd haproxy-fwd) KINDS=(fwd)
MODE=""; [ "$TLS" = 1 ] && MODE=" (TLS termination)"
log "bench-proxy$MODE: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds x $DURATION, $CONNS_PER_WORKER conns per worker, backend nginx x$BE_WORKERS"
for w in $WORKER_SET; do
    start_proxies "$w"
    conns=$((CONNS_PER_WORKER * w))
    for round in $(seq 1 "$ROUNDS"); do
        # Rotate the order every round so no proxy always runs first (or last).
        k=$(( (round - 1) % ${#NAMES[@]} ))
        order=("${NAMES[@]:$k}" "${NAMES[@]:0:$k}")
        echo "workers=$w round $round: ${order[*]}" >&2
        for n in "${order[@]}"; do bench "$n" "$w" "$conns"; done
    done
    stop_proxies
    log ""
    log "workers=$w, conns=$conns: median [min-max] over $ROUNDS rounds"
    log "$(printf '| %-11s | %-26s | %-20s | %-18s |' proxy 'req/s' 'p99 ms' 'cpu-s per 100k')"
    for n in "${NAMES[@]}"; do
        read -r rm rl rh <<<"$(stats "${rps_all[$n,$w]}")"
        read -r pm pl ph <<<"$(stats "${p99_all[$n,$w]}")"
        read -r cm cl ch <<<"$(stats "${cpu_all[$n,$w]}")"
        log "$(printf '| %-11s | %8.0f [%6.0f-%6.0f] | %5.2f [%5.2f-%5.2f] | %4.2f [%4.2f-%4.2f] |%s' \
            "$n" "$rm" "$rl" "$rh" "$pm" "$pl" "$ph" "$cm" "$cl" "$ch" "${err_all[$n,$w]:+ errors: ${err_all[$n,$w]}}")"
    done
    log "ratios of medians (ours / peer; req/s higher is better, p99 and CPU lower is better):"
    for kind in "${KINDS[@]}"; do
        read -r orps _ <<<"$(stats "${rps_all[ours-$kind,$w]}")"
        read -r op99 _ <<<"$(stats "${p99_all[ours-$kind,$w]}")"
        read -r ocpu _ <<<"$(stats "${cpu_all[ours-$kind,$w]}")"
        for peer in nginx haproxy; do
            read -r prps _ <<<"$(stats "${rps_all[$peer-$kind,$w]}")"
            read -r pp99 _ <<<"$(stats "${p99_all[$peer-$kind,$w]}")"
            read -r pcpu _ <<<"$(stats "${cpu_all[$peer-$kind,$w]}")"
            log "$(awk -v a="$orps" -v b="$prps" -v pa="$op99" -v pb="$pp99" -v ca="$ocpu" -v cb="$pcpu" \
                -v n="ours-$kind" -v m="$peer-$kind" \
                'BEGIN { printf "  %-9s vs %-12s req/s %.2fx  p99 %.2fx  cpu/req %.2fx\n", n, m, a/b, pa/pb, ca/cb }')"
        done
    done
done
