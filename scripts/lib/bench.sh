# Shared pieces of the wrk benchmarks (scripts/bench-proxy.sh, scripts/bench-cache.sh):
# tool checks, ports, processes started and cleaned up, nginx instances, wrk's output read
# into numbers, CPU ticks, medians. Sourced, not run: `. "$(dirname "$0")/lib/bench.sh"`.
# Expects `set -euo pipefail` and RESULTS (a file or /dev/null) from the caller.

need() { # command debian-package
    command -v "$1" >/dev/null 2>&1 || { echo "missing $1 (Debian: apt-get install -y $2)" >&2; exit 1; }
}

ulimit -n 65536 2>/dev/null || true

# Optional pinning (taskset lists, e.g. WRK_CORES=0-1); empty: no pinning.
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

# A scratch folder and the background processes, both gone on exit.
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

# CPU ticks of a process and its children (nginx workers), split by where they were spent:
# "utime stime" (user space, kernel); threads are included in a process's own figures.
ticks_split() {
    local u=0 s=0 p a b
    for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
        [ -r "/proc/$p/stat" ] || continue
        read -r a b <<<"$(awk '{print $14, $15}' "/proc/$p/stat")"
        u=$((u + a)) s=$((s + b))
    done
    echo "$u $s"
}

nginx_start() { # name workers http-body [cores]; sets last_pid
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

# wrk's latency figure ("812.00us", "3.04ms", "1.20s") in milliseconds.
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); print v } else { sub(/s/,"",v); print v*1000 } }'; }

# Reads one wrk report (with --latency for the p99) into wrk_rps, wrk_p99 (ms, "nan"
# without --latency), wrk_total (requests) and wrk_err (its error lines, or empty).
wrk_parse() {
    local out=$1 p99
    wrk_rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    if [ -n "$p99" ]; then wrk_p99=$(to_ms "$p99"); else wrk_p99=nan; fi
    wrk_total=$(awk '/requests in/ {print $1}' <<<"$out")
    wrk_err=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ' || true)
}

# "median min max" of a list of numbers.
stats() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'; }

# HAProxy with the forwarded headers our `Forward` adds (`X-Forwarded-For` appended,
# `-Proto`, `-Host`), upstream connections kept alive, round robin over the servers given;
# `HAP_SSL` (bind options) and `SCHEME` for TLS termination. Sets last_pid.
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
    bind 127.0.0.1:$port${HAP_SSL:-}
    http-request set-header X-Forwarded-Proto ${SCHEME:-http}
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

# Callgrind around one `reverse_proxy --serve --workers 1 FLAGS` process in front of the
# backend on port $1: instrumentation on only for a `wrk -t1 -c16` run of $DURATION after
# a 2 s warm-up; sets cg_total (instructions) and the wrk_* figures. Arguments: backend
# port, binary, callgrind output file, the proxy's flags (one word list), then wrk's extra
# arguments (headers). LD_PRELOAD is passed to the proxy only.
callgrind_proxy() { # backend-port binary outfile "flags" [wrk args...]
    local be=$1 bin=$2 outf=$3 flags=$4 port vg out
    shift 4
    port=$(free_port)
    # shellcheck disable=SC2086 # the flags are words
    # shellcheck disable=SC2086 # CG_FLAGS are words (e.g. "--cache-sim=yes --branch-sim=yes")
    LD_PRELOAD=${PRELOAD:-} valgrind --tool=callgrind ${CG_FLAGS:-} --instr-atstart=no --callgrind-out-file="$outf" \
        "$bin" --serve $flags --workers 1 --listen "127.0.0.1:$port" --backends "${BACKEND_URLS:-http://127.0.0.1:$be}" \
        >/dev/null 2>"$work/valgrind.log" &
    vg=$!; pids+=($vg)
    wait_port "$port"
    wrk -t1 -c16 "$@" -d2s "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -i on "$vg" >/dev/null 2>&1
    out=$(wrk -t1 -c16 "$@" -d"$DURATION" "http://127.0.0.1:$port/")
    callgrind_control -i off "$vg" >/dev/null 2>&1
    wrk_parse "$out"
    kill -INT "$vg"; wait "$vg" 2>/dev/null || true
    cg_total=$(callgrind_annotate "$outf" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
}
