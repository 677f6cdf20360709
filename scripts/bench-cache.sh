#!/usr/bin/env bash
# Edge cache benchmark (issue 15): cache-hit throughput of our `CacheLayer` (memory tier,
# examples/cache_server.rs) vs nginx `proxy_cache` serving the same objects from the same
# origin, and origin requests under a thundering herd, driven by wrk.
#
#   scripts/bench-cache.sh                        # WORKERS=1, 3 rounds of 5 s
#   WORKERS=2 ROUNDS=5 DURATION=10s scripts/bench-cache.sh
#   RESULTS=bench.txt scripts/bench-cache.sh       # also write the report to a file
#
# Fairness:
# - Same objects: a small one (1 KiB) and a 1 MiB one, from one nginx origin with
#   `Cache-Control: public, max-age=3600`; both caches are warmed and checked to answer
#   HIT (`X-Cache`), and the origin's access log must show one request per object per
#   cache over the whole run (every measured request was a hit).
# - Same budget: WORKERS per cache — ours `--workers N` (thread-per-core), nginx
#   worker_processes N. nginx `proxy_cache` keeps the object in a file (served from the
#   page cache with sendfile); ours keeps it in memory. Both are the products' defaults
#   for a hot object.
# - Noise: ROUNDS (>= 3) interleaved rounds, order rotated every round; medians and
#   ranges, ratios of medians from this one run.
#
# Thundering herd: HERD concurrent clients (wrk connections) ask for one object the origin
# (a small Python server) answers after 300 ms; the origin counts its requests. With
# coalescing (ours by default, nginx `proxy_cache_lock on`): exactly 1; without
# (`--no-coalescing`): one per client that arrived before the first fill.
#
# On a shared 2-core machine wrk, origin and cache share the cores: the figures are ratios
# under contention, not capacity.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-64}
HERD=${HERD:-200}
WRK_THREADS=${WRK_THREADS:-1}
RESULTS=${RESULTS:-/dev/null}

. scripts/lib/bench.sh

need nginx nginx-light
need wrk wrk
need python3 python3
need curl curl

# The origin: static files with a lifetime, every request logged.
mkdir -p "$work/www"
head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 > "$work/www/small"
head -c $((1 << 20)) /dev/urandom > "$work/www/big"
# nginx workers run as another user: mktemp's folder is 0700.
chmod -R a+rX "$work"
O=$(free_port)
nginx_start origin 1 "log_format p '\$request_uri'; server { listen 127.0.0.1:$O; access_log $work/origin.log p;
    location / { root $work/www; add_header Cache-Control 'public, max-age=3600'; } }"
wait_port "$O"

echo "building the release example..." >&2
cargo build --release -q --example cache_server
OURS=target/release/examples/cache_server

declare -A port pid rps_all err_all
port[ours]=$(free_port)
$OURS --workers "$WORKERS" --memory $((256 << 20)) --listen "127.0.0.1:${port[ours]}" \
    --origin "http://127.0.0.1:$O" >/dev/null 2>&1 &
pids+=($!); pid[ours]=$!
port[nginx]=$(free_port)
mkdir -p "$work/ngx-cache"
nginx_start nginx "$WORKERS" "proxy_cache_path $work/ngx-cache levels=1:2 keys_zone=edge:16m max_size=1g inactive=60m use_temp_path=off;
    upstream origin { server 127.0.0.1:$O; keepalive 64; }
    server { listen 127.0.0.1:${port[nginx]} reuseport;
        location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection '';
            proxy_cache edge; proxy_cache_lock on; add_header X-Cache \$upstream_cache_status; } }"
pid[nginx]=$last_pid
wait_port "${port[ours]}"; wait_port "${port[nginx]}"

# Warm both and check the second answer is a hit.
for n in ours nginx; do
    for obj in small big; do
        x=""
        for _ in $(seq 1 50); do # the first is the miss; a fill lands when its body ends
            x=$(curl -s -o /dev/null -D - "http://127.0.0.1:${port[$n]}/$obj" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache" {print $2}')
            [ "$x" = "HIT" ] && break
            sleep 0.1
        done
        [ "$x" = "HIT" ] || { echo "$n /$obj: X-Cache '$x', not HIT:" >&2; curl -s -o /dev/null -D - "http://127.0.0.1:${port[$n]}/$obj" >&2; exit 1; }
    done
done

bench() { # name obj
    local name=$1 obj=$2 url="http://127.0.0.1:${port[$1]}/$2"
    wrk -t"$WRK_THREADS" -c"$CONNS" -d1s "$url" >/dev/null 2>&1 # warm the connections
    wrk_parse "$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" "$url" 2>&1)"
    rps_all[$name,$obj]+="$wrk_rps "
    [ -n "$wrk_err" ] && err_all[$name,$obj]+="$wrk_err"
    printf '  %-6s /%-6s %10s req/s  %s\n' "$name" "$obj" "$wrk_rps" "$wrk_err" >&2
}

NAMES=(ours nginx)
log "bench-cache: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds x $DURATION, $CONNS conns, $WORKERS workers each"
for round in $(seq 1 "$ROUNDS"); do
    k=$(( (round - 1) % ${#NAMES[@]} ))
    order=("${NAMES[@]:$k}" "${NAMES[@]:0:$k}")
    echo "round $round: ${order[*]}" >&2
    for obj in small big; do
        for n in "${order[@]}"; do bench "$n" "$obj"; done
    done
done
origin_hits=$(wc -l < "$work/origin.log")
log ""
log "cache hits: median [min-max] req/s over $ROUNDS rounds (origin requests during the whole run: $origin_hits, expected 4 = 2 objects x 2 caches)"
log "$(printf '| %-6s | %-26s | %-26s |' cache 'small (1 KiB)' 'big (1 MiB)')"
for n in "${NAMES[@]}"; do
    read -r sm sl sh <<<"$(stats "${rps_all[$n,small]}")"
    read -r bm bl bh <<<"$(stats "${rps_all[$n,big]}")"
    log "$(printf '| %-6s | %8.0f [%6.0f-%6.0f] | %8.0f [%6.0f-%6.0f] |%s' "$n" "$sm" "$sl" "$sh" "$bm" "$bl" "$bh" \
        "${err_all[$n,small]:-}${err_all[$n,big]:-}")"
done
for obj in small big; do
    read -r a _ <<<"$(stats "${rps_all[ours,$obj]}")"
    read -r b _ <<<"$(stats "${rps_all[nginx,$obj]}")"
    log "$(awk -v a="$a" -v b="$b" -v o="$obj" 'BEGIN { printf "  ours vs nginx proxy_cache, /%s: %.2fx req/s\n", o, a/b }')"
done
kill "${pid[ours]}" "${pid[nginx]}" 2>/dev/null || true

# Thundering herd: a slow origin counting requests per path.
H=$(free_port)
cat > "$work/slow.py" <<'PY'
import sys, time, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
counts, lock = {}, threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/counts":
            body = repr(counts).encode()
        else:
            with lock: counts[self.path] = counts.get(self.path, 0) + 1
            time.sleep(0.3)
            body = b"x" * 4096
        self.send_response(200)
        self.send_header("Cache-Control", "public, max-age=3600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.request_queue_size = 1024
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$work/slow.py" "$H" &
pids+=($!)
wait_port "$H"
herd() { # name port path
    wrk -t1 -c"$HERD" -d2s "http://127.0.0.1:$2$3" >/dev/null 2>&1 || true
    local c
    c=$(curl -s "http://127.0.0.1:$H/counts" | python3 -c "import ast,sys; print(ast.literal_eval(sys.stdin.read()).get('$3', 0))")
    log "$(printf '  %-28s %4s origin requests for %s clients' "$1" "$c" "$HERD")"
}
log ""
log "thundering herd: $HERD concurrent clients, one cold object, origin answers after 300 ms"
for mode in coalescing no-coalescing; do
    p=$(free_port)
    flag=""; [ "$mode" = no-coalescing ] && flag="--no-coalescing"
    $OURS --workers "$WORKERS" --listen "127.0.0.1:$p" --origin "http://127.0.0.1:$H" $flag >/dev/null 2>&1 &
    pids+=($!); hp=$!
    wait_port "$p"
    herd "ours ($mode)" "$p" "/herd-$mode"
    kill "$hp" 2>/dev/null || true
done
p=$(free_port)
mkdir -p "$work/ngx-herd-cache"
nginx_start nginx-herd "$WORKERS" "proxy_cache_path $work/ngx-herd-cache keys_zone=herd:1m use_temp_path=off;
    server { listen 127.0.0.1:$p; location / { proxy_pass http://127.0.0.1:$H; proxy_cache herd; proxy_cache_lock on; } }"
wait_port "$p"
herd "nginx (proxy_cache_lock on)" "$p" "/herd-nginx"
