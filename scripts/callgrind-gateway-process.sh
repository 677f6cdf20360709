#!/usr/bin/env bash
# User-space instructions per request of the gateway *as a process* (issue 14), the
# method of scripts/callgrind-proxy.sh: callgrind around `reverse_proxy --serve
# --workers 1 MODE` in front of an nginx `return 200` backend, instrumentation on only
# for a `wrk -t1 -c16` run (sending the API key) after a 2 s warm-up, total instructions
# divided by the requests wrk counted. Unlike scripts/callgrind-gateway.sh (the
# in-process criterion workload) this includes the server side, the Prometheus upkeep
# thread and nothing of the backend.
#
#   cargo build --release --features metrics,auth,rate-limit --example reverse_proxy
#   scripts/callgrind-gateway-process.sh [BINARY]
#   callgrind_annotate --inclusive=yes /tmp/callgrind-gw-process.*/MODE.RUN   # by function
#
# Modes: direct (`--direct`, bare Forward), balancer (no flag), gateway (`--direct
# --gateway`), gateway-balancer (`--gateway`); RUNS (default 2) runs each, DURATION
# (default 5s) the measured run. The profiles stay in the printed folder.
# The exporter's upkeep runs every 5 s: the measured window holds one, which also drains
# the samples of the (faster, uninstrumented) warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/examples/reverse_proxy}
DURATION=${DURATION:-5s}
RUNS=${RUNS:-2}
RESULTS=/dev/null
KEY=bench-key-0123456789
. scripts/lib/bench.sh
need valgrind valgrind
need nginx nginx-light
need wrk wrk
need python3 python3
out_dir=$(mktemp -d /tmp/callgrind-gw-process.XXXXXX)

B=$(free_port)
nginx_start backend 1 "server { listen 127.0.0.1:$B; location / { return 200 'ok\n'; } }"
wait_port "$B"
declare -A FLAGS=(
    [direct]="--direct"
    [balancer]=""
    [gateway]="--direct --gateway --api-key $KEY"
    [gateway-balancer]="--gateway --api-key $KEY"
)
for run in $(seq 1 "$RUNS"); do
    for mode in direct balancer gateway gateway-balancer; do
        outf="$out_dir/$mode.$run"
        callgrind_proxy "$B" "$BIN" "$outf" "${FLAGS[$mode]}" -H "x-api-key: $KEY"
        printf '%-17s run %s: requests %6s, per request %6s%s\n' "$mode" "$run" "$wrk_total" \
            "$((cg_total / wrk_total))" "${wrk_err:+ (wrk: $wrk_err)}"
    done
done
echo "profiles: $out_dir"
