#!/usr/bin/env bash
# Proxy-path benchmark, like for like: our proxy vs nginx and HAProxy in front of the same
# nginx backend, driven by wrk.
#
#   scripts/bench-proxy.sh                       # WORKER_SET="1 2", 3 rounds of 5 s
#   WORKER_SET="1" ROUNDS=5 DURATION=10s scripts/bench-proxy.sh
#   RESULTS=bench.txt scripts/bench-proxy.sh      # also write the report to a file
#   TLS=1 scripts/bench-proxy.sh                  # HTTPS termination (issue 13), see below
#   GATEWAY=1 scripts/bench-proxy.sh              # the API gateway stack (issue 14), see below
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
#   over the measured interval, per 100k requests, and the kernel's part (stime) alone.
#
# TLS=1: HTTPS termination in front of the plaintext backend, single upstream only — ours
# (`reverse_proxy --direct --tls-cert/--tls-key`, rustls with ring), nginx `listen ... ssl`,
# HAProxy `bind ... ssl crt`, all with the same P-256 certificate made here by the openssl
# CLI, ALPN h2/http1.1 offered, X-Forwarded-Proto https. wrk speaks HTTP/1.1 over TLS with
# keep-alive, so the figures are mostly record encryption, not handshakes.
# GATEWAY=1: what the API gateway stack of issue 14 costs a real gateway process, single
# upstream only. Ours bare (`reverse_proxy --direct`: Forward alone), ours
# `--direct --gateway` (rate limit, API key, request trace, Prometheus metrics, bulkhead,
# breaker over the same Forward) and ours `--gateway` over the balancer with that one
# backend (the whole stack of issue 14's bar), from one binary built with the gateway's
# features; nginx and HAProxy forwarding as the usual reference. wrk sends the API key to
# every proxy (the others forward it as one more header). Besides the table: the gateway's
# CPU per request over the bare one's (issue 14's bar: <= 1.15x), and its own count of
# proxied requests from /metrics.
# OURS_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2: in the plain mode two more rows,
# ours-fwd-pl and ours-bal-pl, the same binaries with that library preloaded
# (LD_PRELOAD): the allocator is the deploying binary's choice, not the library's, so
# the glibc rows stay the headline and these show what a different malloc changes, in the
# same run, against the same peers. With GATEWAY=1 it preloads all of ours (bare and
# gateways alike), so the gateway's ratio is taken under one allocator.
# PROFILE (default production: fat LTO, one codegen unit, see Cargo.toml): the cargo profile
# ours is built with, as a deployment would build it. OURS_RELEASE=1: in the plain mode two
# more rows, ours-fwd-rel and ours-bal-rel, the same code built with the plain `release`
# profile, against the same peers in the same run. OURS_ALT=<binary> (with OURS_ALT_NAME,
# default alt): the same two rows for any other build of the example, e.g. the PGO build
# of scripts/pgo-build.sh (OURS_ALT_NAME=pgo: rows ours-fwd-pgo and ours-bal-pgo).
# OURS_ALT_RUSTFLAGS="...": the same two rows for ours built here with the same profile and
# these compiler flags (in target/alt-rustflags; OURS_ALT_NAME defaults to flags), e.g.
# OURS_ALT_RUSTFLAGS="-C llvm-args=-inline-threshold=1000" (docs/BENCHMARKS.md, session 19).
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
GATEWAY=${GATEWAY:-0}
# The gateway's key, sent by wrk; any visible-ASCII string.
API_KEY=${API_KEY:-bench-key-0123456789abcdef0123456789abcdef}

. scripts/lib/bench.sh

need nginx nginx-light
need haproxy haproxy
need wrk wrk
need python3 python3
[ "$TLS" = 1 ] && need openssl openssl
if [ "$TLS" = 1 ] && [ "$GATEWAY" = 1 ]; then
    echo "TLS=1 and GATEWAY=1 are separate runs" >&2
    exit 1
fi
[ "$GATEWAY" = 1 ] && need curl curl

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

B1=$(free_port); B2=$(free_port)
nginx_start backend "$BE_WORKERS" "server { listen 127.0.0.1:$B1 reuseport; listen 127.0.0.1:$B2 reuseport; location / { return 200 'ok\n'; } }" "${BE_CORES:-}"
wait_port "$B1"; wait_port "$B2"

PROFILE=${PROFILE:-production}
echo "building the example with the $PROFILE profile..." >&2
if [ "$TLS" = 1 ]; then
    cargo build --profile "$PROFILE" -q --features tls --example reverse_proxy
elif [ "$GATEWAY" = 1 ]; then
    # One binary for the bare and the gateway runs: the same code but for the stack.
    cargo build --profile "$PROFILE" -q --features metrics,auth,rate-limit --example reverse_proxy
else
    cargo build --profile "$PROFILE" -q --example reverse_proxy
fi
# cargo's folder for the `dev` profile is `debug`; every other profile has its own name.
OUT_DIR=$PROFILE
[ "$PROFILE" = dev ] && OUT_DIR=debug
OURS=target/$OUT_DIR/examples/reverse_proxy
# The extra rows' binary (OURS_RELEASE=1 or OURS_ALT) and their names' suffix.
ALT=${OURS_ALT:-} ALT_NAME=${OURS_ALT_NAME:-alt} ALT_WHAT="the build $ALT"
if [ "${OURS_RELEASE:-0}" = 1 ]; then
    ALT=target/release/examples/reverse_proxy ALT_NAME=rel ALT_WHAT="the plain release profile"
fi
if [ "$GATEWAY" = 1 ] || [ "$TLS" = 1 ]; then
    ALT=''
elif [ -n "${OURS_ALT_RUSTFLAGS:-}" ]; then
    # Its own target folder: other RUSTFLAGS rebuild every crate, and the default folder
    # keeps the plain build for the next run.
    echo "building the -${OURS_ALT_NAME:-flags} rows with RUSTFLAGS=\"$OURS_ALT_RUSTFLAGS\"..." >&2
    RUSTFLAGS="$OURS_ALT_RUSTFLAGS" CARGO_TARGET_DIR=target/alt-rustflags \
        cargo build --profile "$PROFILE" -q --example reverse_proxy
    ALT=target/alt-rustflags/$OUT_DIR/examples/reverse_proxy ALT_NAME=${OURS_ALT_NAME:-flags}
    ALT_WHAT="the $PROFILE profile built with RUSTFLAGS=\"$OURS_ALT_RUSTFLAGS\""
fi
if [ "${OURS_RELEASE:-0}" = 1 ] && [ -n "$ALT" ]; then
    cargo build --release -q --example reverse_proxy
fi
if [ -n "$ALT" ] && [ ! -x "$ALT" ]; then
    echo "OURS_ALT=$ALT: not an executable file" >&2
    exit 1
fi

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
declare -A rps_all p99_all cpu_all sys_all err_all

start_proxies() { # workers
    local w=$1
    port[ours-fwd]=$(free_port)
    # With GATEWAY=1, OURS_PRELOAD applies to every one of ours (see the top).
    local pre=""
    [ "$GATEWAY" = 1 ] && pre=${OURS_PRELOAD:-}
    LD_PRELOAD=$pre spawn_pinned "${PX_CORES:-}" $OURS --serve --direct --workers "$w" --listen "127.0.0.1:${port[ours-fwd]}" \
        --backends "http://127.0.0.1:$B1" "${OURS_TLS[@]}" ${OURS_EXTRA:-} >/dev/null 2>&1 &
    pids+=($!); pid[ours-fwd]=$!
    port[nginx-fwd]=$(free_port)
    nginx_start "ngx-fwd-$w" "$w" "upstream be { server 127.0.0.1:$B1; keepalive 256; }
    server { listen 127.0.0.1:${port[nginx-fwd]}$NGX_SSL reuseport; $NGINX_TLS location / { $NGINX_PROXY } }" "${PX_CORES:-}"
    pid[nginx-fwd]=$last_pid
    port[haproxy-fwd]=$(free_port)
    haproxy_start "hap-fwd-$w" "$w" "${port[haproxy-fwd]}" "127.0.0.1:$B1"
    pid[haproxy-fwd]=$last_pid
    if [ "$GATEWAY" = 1 ]; then
        port[ours-gw]=$(free_port)
        LD_PRELOAD=$pre spawn_pinned "${PX_CORES:-}" $OURS --serve --direct --gateway --api-key "$API_KEY" --workers "$w" \
            --listen "127.0.0.1:${port[ours-gw]}" --backends "http://127.0.0.1:$B1" ${OURS_EXTRA:-} >/dev/null 2>&1 &
        pids+=($!); pid[ours-gw]=$!
        port[ours-gw-bal]=$(free_port)
        LD_PRELOAD=$pre spawn_pinned "${PX_CORES:-}" $OURS --serve --gateway --api-key "$API_KEY" --workers "$w" \
            --listen "127.0.0.1:${port[ours-gw-bal]}" --backends "http://127.0.0.1:$B1" ${OURS_EXTRA:-} >/dev/null 2>&1 &
        pids+=($!); pid[ours-gw-bal]=$!
        for n in "${!port[@]}"; do wait_port "${port[$n]}"; done
        # Measure the proxied path, not a refusal: 200 with the key, 401 without.
        for n in ours-gw ours-gw-bal; do
            local with without
            with=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $API_KEY" "http://127.0.0.1:${port[$n]}/")
            without=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${port[$n]}/")
            if [ "$with" != 200 ] || [ "$without" != 401 ]; then
                echo "$n: $with with the key, $without without (expected 200 and 401)" >&2
                exit 1
            fi
        done
        return
    fi
    if [ "$TLS" = 1 ]; then
        for n in "${!port[@]}"; do wait_port "${port[$n]}"; done
        return
    fi
    port[ours-bal]=$(free_port)
    spawn_pinned "${PX_CORES:-}" $OURS --serve --workers "$w" --listen "127.0.0.1:${port[ours-bal]}" \
        --backends "http://127.0.0.1:$B1,http://127.0.0.1:$B2" >/dev/null 2>&1 &
    pids+=($!); pid[ours-bal]=$!
    if [ -n "${OURS_PRELOAD:-}" ]; then
        port[ours-fwd-pl]=$(free_port)
        LD_PRELOAD=$OURS_PRELOAD spawn_pinned "${PX_CORES:-}" $OURS --serve --direct --workers "$w" \
            --listen "127.0.0.1:${port[ours-fwd-pl]}" --backends "http://127.0.0.1:$B1" ${OURS_EXTRA:-} >/dev/null 2>&1 &
        pids+=($!); pid[ours-fwd-pl]=$!
        port[ours-bal-pl]=$(free_port)
        LD_PRELOAD=$OURS_PRELOAD spawn_pinned "${PX_CORES:-}" $OURS --serve --workers "$w" \
            --listen "127.0.0.1:${port[ours-bal-pl]}" --backends "http://127.0.0.1:$B1,http://127.0.0.1:$B2" >/dev/null 2>&1 &
        pids+=($!); pid[ours-bal-pl]=$!
    fi
    if [ -n "$ALT" ]; then
        port[ours-fwd-$ALT_NAME]=$(free_port)
        spawn_pinned "${PX_CORES:-}" "$ALT" --serve --direct --workers "$w" \
            --listen "127.0.0.1:${port[ours-fwd-$ALT_NAME]}" --backends "http://127.0.0.1:$B1" ${OURS_EXTRA:-} >/dev/null 2>&1 &
        pids+=($!); pid[ours-fwd-$ALT_NAME]=$!
        port[ours-bal-$ALT_NAME]=$(free_port)
        spawn_pinned "${PX_CORES:-}" "$ALT" --serve --workers "$w" \
            --listen "127.0.0.1:${port[ours-bal-$ALT_NAME]}" --backends "http://127.0.0.1:$B1,http://127.0.0.1:$B2" >/dev/null 2>&1 &
        pids+=($!); pid[ours-bal-$ALT_NAME]=$!
    fi
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
    if [ "$GATEWAY" = 1 ]; then
        # The gateway's own count: every measured request went through its stack.
        for n in ours-gw ours-gw-bal; do
            log "  $n /metrics: $(curl -s -H "x-api-key: $API_KEY" "http://127.0.0.1:${port[$n]}/metrics" |
                awk '/^tower_patterns_requests_total/ { r = $2 } /^tower_patterns_request_failures_total/ { f += $2 }
                    END { printf "%s proxied requests, %d failures", r, f }')"
        done
    fi
    for n in "${!pid[@]}"; do kill "${pid[$n]}" 2>/dev/null || true; done
    sleep 1
}

# Every proxy gets the gateway's key header in GATEWAY mode (the others forward it).
WRK_HDR=()
[ "$GATEWAY" = 1 ] && WRK_HDR=(-H "x-api-key: $API_KEY")

bench() { # name workers conns
    local name=$1 w=$2 conns=$3 url="$SCHEME://127.0.0.1:${port[$1]}/"
    pin "${WRK_CORES:-}" wrk -t"$WRK_THREADS" -c"$conns" -d1s "${WRK_HDR[@]}" "$url" >/dev/null 2>&1 # warm the pools
    local u0 s0 u1 s1 out cpu sys
    read -r u0 s0 <<<"$(ticks_split "${pid[$name]}")"
    out=$(pin "${WRK_CORES:-}" wrk -t"$WRK_THREADS" -c"$conns" -d"$DURATION" --latency "${WRK_HDR[@]}" "$url" 2>&1)
    read -r u1 s1 <<<"$(ticks_split "${pid[$name]}")"
    wrk_parse "$out"
    # CPU-seconds per 100k requests, user + kernel, and the kernel's part of it alone:
    # with equal syscalls per request, a gap in the kernel part points at what the
    # sockets carry or how often the process sleeps, not at user-space code.
    read -r cpu sys <<<"$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" -v n="$wrk_total" \
        'BEGIN { if (n > 0) printf "%.2f %.2f", (u + s) / hz / n * 100000, s / hz / n * 100000; else print "nan nan" }')"
    rps_all[$name,$w]+="$wrk_rps "
    p99_all[$name,$w]+="$wrk_p99 "
    cpu_all[$name,$w]+="$cpu "
    sys_all[$name,$w]+="$sys "
    [ -n "$wrk_err" ] && err_all[$name,$w]+="$wrk_err"
    printf '  %-12s %10s req/s  p99 %7s ms  cpu-s/100k %5s (kernel %5s)  %s\n' "$name" "$wrk_rps" "$wrk_p99" "$cpu" "$sys" "$wrk_err" >&2
}

# One line of ratios of medians, a / b, for workers w.
ratio() { # a b w
    local a=$1 b=$2 w=$3 arps ap99 acpu brps bp99 bcpu asys bsys
    read -r arps _ <<<"$(stats "${rps_all[$a,$w]}")"
    read -r ap99 _ <<<"$(stats "${p99_all[$a,$w]}")"
    read -r acpu _ <<<"$(stats "${cpu_all[$a,$w]}")"
    read -r brps _ <<<"$(stats "${rps_all[$b,$w]}")"
    read -r bp99 _ <<<"$(stats "${p99_all[$b,$w]}")"
    read -r bcpu _ <<<"$(stats "${cpu_all[$b,$w]}")"
    read -r asys _ <<<"$(stats "${sys_all[$a,$w]}")"
    read -r bsys _ <<<"$(stats "${sys_all[$b,$w]}")"
    log "$(awk -v a="$arps" -v b="$brps" -v pa="$ap99" -v pb="$bp99" -v ca="$acpu" -v cb="$bcpu" -v sa="$asys" -v sb="$bsys" -v n="$a" -v m="$b" \
        'function r(x, y) { return y > 0 ? sprintf("%.2fx", x / y) : "n/a" }
         BEGIN { printf "  %-11s vs %-12s req/s %s  p99 %s  cpu/req %s (user %s, kernel %s)\n", n, m, r(a, b), r(pa, pb), r(ca, cb), r(ca - sa, cb - sb), r(sa, sb) }')"
}

# The table's rows, and the pairs compared ("a:b" is a / b).
NAMES=(ours-fwd nginx-fwd haproxy-fwd ours-bal nginx-bal haproxy-bal)
PAIRS=(ours-fwd:nginx-fwd ours-fwd:haproxy-fwd ours-bal:nginx-bal ours-bal:haproxy-bal)
MODE=""
if [ "$TLS" = 1 ]; then
    NAMES=(ours-fwd nginx-fwd haproxy-fwd)
    PAIRS=(ours-fwd:nginx-fwd ours-fwd:haproxy-fwd)
    MODE=" (TLS termination)"
elif [ "$GATEWAY" = 1 ]; then
    NAMES=(ours-fwd ours-gw ours-gw-bal nginx-fwd haproxy-fwd)
    PAIRS=(ours-gw:ours-fwd ours-gw-bal:ours-fwd ours-fwd:nginx-fwd ours-fwd:haproxy-fwd ours-gw:haproxy-fwd)
    MODE=" (API gateway stack, wrk sends x-api-key${OURS_PRELOAD:+; all of ours with $OURS_PRELOAD preloaded})"
elif [ -n "${OURS_PRELOAD:-}" ]; then
    [ -r "$OURS_PRELOAD" ] || { echo "OURS_PRELOAD=$OURS_PRELOAD: not a readable file" >&2; exit 1; }
    NAMES+=(ours-fwd-pl ours-bal-pl)
    PAIRS+=(ours-fwd-pl:haproxy-fwd ours-bal-pl:haproxy-bal ours-fwd-pl:ours-fwd)
    MODE=" (ours also with $OURS_PRELOAD preloaded: the -pl rows)"
fi
if [ -n "$ALT" ]; then
    NAMES+=(ours-fwd-$ALT_NAME ours-bal-$ALT_NAME)
    PAIRS+=(ours-fwd-$ALT_NAME:haproxy-fwd ours-bal-$ALT_NAME:haproxy-bal ours-fwd-$ALT_NAME:ours-fwd ours-bal-$ALT_NAME:ours-bal)
    MODE+=" (ours built with $PROFILE; the -$ALT_NAME rows with $ALT_WHAT)"
else
    MODE+=" (ours built with the $PROFILE profile)"
fi
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
    log ""
    log "workers=$w, conns=$conns: median [min-max] over $ROUNDS rounds"
    log "$(printf '| %-12s | %-26s | %-20s | %-18s | %-18s |' proxy 'req/s' 'p99 ms' 'cpu-s per 100k' 'of it in the kernel')"
    for n in "${NAMES[@]}"; do
        read -r rm rl rh <<<"$(stats "${rps_all[$n,$w]}")"
        read -r pm pl ph <<<"$(stats "${p99_all[$n,$w]}")"
        read -r cm cl ch <<<"$(stats "${cpu_all[$n,$w]}")"
        read -r sm sl sh <<<"$(stats "${sys_all[$n,$w]}")"
        log "$(printf '| %-12s | %8.0f [%6.0f-%6.0f] | %5.2f [%5.2f-%5.2f] | %4.2f [%4.2f-%4.2f] | %4.2f [%4.2f-%4.2f] |%s' \
            "$n" "$rm" "$rl" "$rh" "$pm" "$pl" "$ph" "$cm" "$cl" "$ch" "$sm" "$sl" "$sh" "${err_all[$n,$w]:+ errors: ${err_all[$n,$w]}}")"
    done
    log "ratios of medians (req/s higher is better, p99 and CPU lower is better):"
    for pair in "${PAIRS[@]}"; do ratio "${pair%%:*}" "${pair#*:}" "$w"; done
    stop_proxies
done
