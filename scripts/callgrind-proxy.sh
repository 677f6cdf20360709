#!/usr/bin/env bash
# User-space instructions per forwarded request (issue 12), load-independent: callgrind
# around `reverse_proxy --serve --direct --workers 1` in front of an nginx `return 200`
# backend, instrumentation on only for a `wrk -t1 -c16` run after a 2 s warm-up, total
# instructions divided by the requests wrk counted.
#
#   cargo build --release --example reverse_proxy   # [profile.release] keeps debug = 1
#   scripts/callgrind-proxy.sh [BINARY] [OUTFILE]
#   callgrind_annotate --inclusive=yes OUTFILE       # by function
#
# BINARY defaults to target/release/examples/reverse_proxy, OUTFILE to a file in /tmp.
# DURATION (default 5s): the measured wrk run (under valgrind: a few thousand requests).
# PRELOAD: a shared library preloaded into the proxy only (e.g. an allocator,
# PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2), to measure its share.
# CG_FLAGS: more callgrind options, e.g. CG_FLAGS="--cache-sim=yes --branch-sim=yes" for the
# instruction-cache misses and branch mispredicts (callgrind_annotate shows them per function).
# FLAGS (default --direct): the proxy's flags; FLAGS= (empty) measures the balancer.
# UPSTREAMS (default 1): the backend nginx listens on this many ports, all passed to
# --backends (UPSTREAMS=2 FLAGS= is the balanced case of issue 12, bench-proxy's ours-bal).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/examples/reverse_proxy}
OUTF=${2:-$(mktemp /tmp/callgrind-proxy.XXXXXX)}
DURATION=${DURATION:-5s}
RESULTS=/dev/null
. scripts/lib/bench.sh
need valgrind valgrind
need nginx nginx-light
need wrk wrk
need python3 python3

FLAGS=${FLAGS---direct}
B=$(free_port)
listen="listen 127.0.0.1:$B;"
BACKEND_URLS="http://127.0.0.1:$B"
for _ in $(seq 2 "${UPSTREAMS:-1}"); do
    b=$(free_port)
    listen="$listen listen 127.0.0.1:$b;"
    BACKEND_URLS="$BACKEND_URLS,http://127.0.0.1:$b"
done
nginx_start backend 1 "server { $listen location / { return 200 'ok\n'; } }"
wait_port "$B"
callgrind_proxy "$B" "$BIN" "$OUTF" "$FLAGS"
echo "requests $wrk_total, instructions $cg_total, per request $((cg_total / wrk_total))${wrk_err:+, wrk: $wrk_err}"
echo "profile: $OUTF"
