#!/usr/bin/env bash
# Instructions per request of the gateway bench's cases (issue 14), load-independent and
# repeatable: callgrind around `bench/benches/gateway.rs`'s fixed workload
# (`GATEWAY_RUN=<case> GATEWAY_N=<n>`, backend on its own thread), the main thread
# (client + gateway) only, (Ir at n = 3000 − Ir at n = 1000) / 2000.
#
#   cargo bench -p tower-patterns-bench --bench gateway --no-run
#   scripts/callgrind-gateway.sh [BINARY] [CASE...]
#
# BINARY defaults to the newest target/release/deps/gateway-*; CASE to every case.
# Printed per case: the total, and the total less glibc malloc's own instructions.
# Both have quanta's one-time TSC calibration (the Prometheus recorder's clock, a
# time-bounded loop of 4-6 M instructions, different in every process) subtracted:
# without that, the two-n difference moves by ±1 000-2 500 per request between runs.
# What remains repeats exactly for one binary run from one folder (about ±50 between
# folders: the environment's size moves the stack); the malloc share still moves by a few
# hundred with the allocator's state (see docs/BENCHMARKS.md, session 14).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-$(ls -t target/release/deps/gateway-* | grep -v '\.d$' | head -1)}
shift || true
CASES=${*:-bare_forward breaker_balance gateway_stack gateway_stack_auth_ratelimit trace metrics bulkhead auth ratelimit}
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
command -v callgrind_annotate >/dev/null || { echo "needs callgrind_annotate" >&2; exit 1; }
BIN=$(realpath "$BIN")
work=$(mktemp -d /tmp/callgrind-gateway.XXXXXX)
trap 'rm -rf "$work"' EXIT
for c in $CASES; do
    for n in 1000 3000; do
        # Run from the scratch folder: criterion must not write into the tree.
        (cd "$work" && GATEWAY_BACKEND=thread GATEWAY_RUN=$c GATEWAY_N=$n \
            valgrind --tool=callgrind --separate-threads=yes \
            --callgrind-out-file="$work/$c.$n.%p" "$BIN" nothing --bench >/dev/null 2>&1)
    done
done
python3 - "$work" $CASES <<'PY'
import glob, os, re, subprocess, sys
work, cases = sys.argv[1], sys.argv[2:]
def count(case, n):
    # The main thread's file (`-01`) of the run; the largest if there are several.
    f = max(glob.glob(f"{work}/{case}.{n}.*-01"), key=os.path.getsize)
    ann = lambda inc: subprocess.run(["callgrind_annotate", f"--inclusive={inc}", "--threshold=100",
                                      "--show-percs=no", f], capture_output=True, text=True).stdout
    total = quanta = 0
    for l in ann("yes").split("\n"):
        m = re.match(r"\s*([\d,]+)\s", l)
        if m and "PROGRAM TOTALS" in l:
            total = int(m.group(1).replace(",", ""))
        elif m and "quanta" in l:
            quanta = max(quanta, int(m.group(1).replace(",", "")))
    mal = 0
    for l in ann("no").split("\n"):
        m = re.match(r"\s*([\d,]+)\s+(\S.*)$", l)
        if m and re.search(r"malloc/(malloc|arena)\.c:", m.group(2)):
            mal += int(m.group(1).replace(",", ""))
    return total - quanta, total - quanta - mal
print(f"{'case':32} {'instructions/request':>22} {'less malloc internals':>22}")
for c in cases:
    (a, am), (b, bm) = count(c, 1000), count(c, 3000)
    print(f"{c:32} {(b - a) / 2000:22.0f} {(bm - am) / 2000:22.0f}")
PY
