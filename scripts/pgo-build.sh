#!/usr/bin/env bash
# Builds `reverse_proxy` with profile-guided optimisation on top of the `production` profile
# (fat LTO, one codegen unit): an instrumented build, a training run of the proxy's own
# request paths under wrk (bare `Forward` with `--direct`, then the balancer over two
# upstreams), then a build that uses the recorded profile. Deployment choice, like the
# profile itself: the library does not need it. Output:
#   target/pgo-use/production/examples/reverse_proxy
# compare it with the plain production build in one run:
#   OURS_ALT=target/pgo-use/production/examples/reverse_proxy OURS_ALT_NAME=pgo scripts/bench-proxy.sh
#
# Needs rustup's `llvm-tools` component (its llvm-profdata matches rustc's LLVM; the
# distribution's usually does not): `rustup component add llvm-tools`.
# FEATURES: cargo features of both builds. The training runs the two plain paths only; a
# gateway (`--gateway`) or TLS deployment should add its own path to `train` below.
# TRAIN (default 8s): how long each path is trained. TRAIN_PATHS (default "direct balancer"):
# which paths; "direct" alone shows how a profile does on a path it was not trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=/dev/null
. scripts/lib/bench.sh
need nginx nginx-light
need wrk wrk

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    echo "no llvm-profdata in $sysroot: rustup component add llvm-tools" >&2
    exit 1
fi
TRAIN=${TRAIN:-8s}
TRAIN_PATHS=${TRAIN_PATHS:-direct balancer}
FEATURES=${FEATURES:-}
feat=()
[ -n "$FEATURES" ] && feat=(--features "$FEATURES")
data=$work/pgo

echo "instrumented build (target/pgo-gen)..." >&2
RUSTFLAGS="-Cprofile-generate=$data/raw" CARGO_TARGET_DIR=target/pgo-gen \
    cargo build -q --profile production --example reverse_proxy "${feat[@]}"
GEN=target/pgo-gen/production/examples/reverse_proxy

B1=$(free_port); B2=$(free_port)
nginx_start backend 1 "server { listen 127.0.0.1:$B1; listen 127.0.0.1:$B2; location / { return 200 'ok\n'; } }"
wait_port "$B1"; wait_port "$B2"

# One path at a time: the proxy runs, wrk loads it, SIGTERM lets it drain and exit, which
# writes its profile.
train() { # name args...
    local name=$1; shift
    local p; p=$(free_port)
    "$GEN" --serve --workers 1 --listen "127.0.0.1:$p" "$@" >/dev/null 2>&1 &
    local px=$!
    wait_port "$p"
    wrk -t1 -c64 -d"$TRAIN" "http://127.0.0.1:$p/" | grep Requests/sec | sed "s/^/  $name: /" >&2
    kill -TERM "$px"
    wait "$px" || true
}
echo "training ($TRAIN per path)..." >&2
for path in $TRAIN_PATHS; do
    case $path in
        direct) train direct --direct --backends "http://127.0.0.1:$B1" ;;
        balancer) train balancer --backends "http://127.0.0.1:$B1,http://127.0.0.1:$B2" ;;
        *) echo "TRAIN_PATHS: $path is not a path (direct, balancer)" >&2; exit 1 ;;
    esac
done

"$PROFDATA" merge -o "$data/merged.profdata" "$data"/raw
echo "optimised build (target/pgo-use)..." >&2
RUSTFLAGS="-Cprofile-use=$data/merged.profdata" CARGO_TARGET_DIR=target/pgo-use \
    cargo build -q --profile production --example reverse_proxy "${feat[@]}"
echo "target/pgo-use/production/examples/reverse_proxy"
