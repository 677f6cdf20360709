#!/usr/bin/env bash
# Proxy-path benchmark: our proxy examples vs nginx and HAProxy in front of the same
# backend, driven by wrk in one run. Prints req/s and p99 per proxy and the ratios.
#
#   scripts/bench-proxy.sh                 # 5 s per proxy, 64 connections
#   DURATION=10s CONNS=128 scripts/bench-proxy.sh
#
# Everything runs on 127.0.0.1 on free ports and is stopped on exit. The backend is an
# nginx `return 200` server (one worker), so the backend is never the bottleneck and every
# proxy faces the same one. Peers run one worker/thread (nginx worker_processes 1, HAProxy
# nbthread 1); ours runs with THREADS tokio workers (default 1, the same budget).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}
WRK_THREADS=${WRK_THREADS:-1}

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
        else
            echo "missing $1: apt-get install -y $2" >&2
            exit 1
        fi
    fi
}
need nginx nginx-light
need haproxy haproxy
need wrk wrk

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listening on $1" >&2
    exit 1
}

nginx_conf() { # $1 name, $2 server block(s)
    mkdir -p "$work/$1"
    cat > "$work/$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
error_log $work/$1/error.log warn;
pid $work/$1/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/$1/body;
    proxy_temp_path $work/$1/proxy;
    fastcgi_temp_path $work/$1/fastcgi;
    uwsgi_temp_path $work/$1/uwsgi;
    scgi_temp_path $work/$1/scgi;
    keepalive_requests 1000000;
    $2
}
CONF
    nginx -c "$work/$1/nginx.conf" -e "$work/$1/error.log" &
    pids+=($!)
}

B1=$(free_port); B2=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$B1; listen 127.0.0.1:$B2; location / { return 200 'ok\n'; } }"
wait_port "$B1"; wait_port "$B2"

echo "building release examples..." >&2
examples=(--example reverse_proxy_min)
[ -f examples/reverse_proxy.rs ] && examples+=(--example reverse_proxy)
cargo build --release -q "${examples[@]}"

declare -A ports
ports[ours-forward]=$(free_port)
TOKIO_WORKER_THREADS=$THREADS target/release/examples/reverse_proxy_min --serve \
    --listen 127.0.0.1:${ports[ours-forward]} --upstream http://127.0.0.1:$B1 2>/dev/null &
pids+=($!)
if [ -f examples/reverse_proxy.rs ]; then
    ports[ours-balancer]=$(free_port)
    TOKIO_WORKER_THREADS=$THREADS target/release/examples/reverse_proxy --serve \
        --listen 127.0.0.1:${ports[ours-balancer]} \
        --backends http://127.0.0.1:$B1,http://127.0.0.1:$B2 2>/dev/null &
    pids+=($!)
fi

ports[nginx]=$(free_port)
nginx_conf proxy "upstream be { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 64; }
    server { listen 127.0.0.1:${ports[nginx]};
        location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

ports[haproxy]=$(free_port)
cat > "$work/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:${ports[haproxy]}
    default_backend be
backend be
    balance roundrobin
    server b1 127.0.0.1:$B1
    server b2 127.0.0.1:$B2
CONF
haproxy -f "$work/haproxy.cfg" -q &
pids+=($!)

for name in "${!ports[@]}"; do wait_port "${ports[$name]}"; done

declare -A rps p99
order=(ours-forward)
[ -n "${ports[ours-balancer]:-}" ] && order+=(ours-balancer)
order+=(nginx haproxy)
for name in "${order[@]}"; do
    url="http://127.0.0.1:${ports[$name]}/"
    wrk -t"$WRK_THREADS" -c"$CONNS" -d1s "$url" >/dev/null 2>&1 # warm the pools
    out=$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency "$url")
    rps[$name]=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99[$name]=$(awk '$1=="99%" {print $2}' <<<"$out")
    errors=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
    printf '%-14s %10s req/s   p99 %8s  %s\n' "$name" "${rps[$name]}" "${p99[$name]}" "$errors"
done

to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); print v } else { sub(/s/,"",v); print v*1000 } }'; }
echo
for ours in ours-forward ours-balancer; do
    [ -n "${rps[$ours]:-}" ] || continue
    for peer in nginx haproxy; do
        awk -v a="${rps[$ours]}" -v b="${rps[$peer]}" -v pa="$(to_ms "${p99[$ours]}")" -v pb="$(to_ms "${p99[$peer]}")" \
            -v n="$ours" -v m="$peer" \
            'BEGIN { printf "%s/%s: throughput %.2fx, p99 %.2fx (%.2f ms vs %.2f ms)\n", n, m, a/b, pa/pb, pa, pb }'
    done
done
