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

B=$(free_port)
nginx_start backend 1 "server { listen 127.0.0.1:$B; location / { return 200 'ok\n'; } }"
wait_port "$B"
callgrind_proxy "$B" "$BIN" "$OUTF" "--direct"
echo "requests $wrk_total, instructions $cg_total, per request $((cg_total / wrk_total))${wrk_err:+, wrk: $wrk_err}"
echo "profile: $OUTF"
