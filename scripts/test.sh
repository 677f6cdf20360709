#!/usr/bin/env bash
# Runs every check the project has: formatting, clippy (deny warnings) on the library and the
# bench crate, the library alone for every feature combination without dev-dependencies, the
# minimum Rust version against the dependency graph, the docs as docs.rs builds them, all
# tests with all features (unit, integration over real sockets, doc tests), and a
# `cargo publish --dry-run`. Installs what the checks need when it is missing (as root:
# Debian packages for etcd, protoc, redis-server and openssl; from crates.io: the s3s-fs S3 server and cargo-hack).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools from `cargo install` land here; look there before installing them again.
export PATH="$HOME/.cargo/bin:$PATH"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)   # etcd-client
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)   # ratelimit::RedisLimiter tests
command -v openssl >/dev/null 2>&1 || missing+=(openssl)   # RS256 test keys (tests/gateway_auth)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
    echo "installing s3s-fs (S3 server for the backup sink tests)" >&2
    cargo install --locked s3s-fs@0.14.1 --features binary
fi
if ! command -v cargo-hack >/dev/null 2>&1; then
    echo "installing cargo-hack (feature-combination checks)" >&2
    cargo install --locked cargo-hack@0.6.46
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
# At the root, cargo commands without -p act on the library only (`default-members`).
echo "== cargo clippy --all-targets --all-features -D warnings (library)" >&2
cargo clippy --all-targets --all-features -- -D warnings
# The bench crate without its `pingora` feature (pingora needs cmake and ~10 min to build);
# this also checks that every bench still compiles.
echo "== cargo clippy -p tower-patterns-bench --all-targets -D warnings" >&2
cargo clippy -p tower-patterns-bench --all-targets -- -D warnings
# The library as a dependency sees only its own [dependencies]: dev-dependencies unify
# features (tokio `full`) and once hid a missing `rt-multi-thread`.
# Each feature alone (what a user with only that feature compiles), then all of them
# together; the full powerset doubles with each of the 11 features and took too long on 2 cores.
echo "== cargo hack check --lib --each-feature --no-dev-deps" >&2
cargo hack check --lib --each-feature --exclude-features default --no-dev-deps
cargo hack check --lib --all-features --no-dev-deps
echo "== rust-version against the dependency graph" >&2
scripts/msrv-deps.sh
# As docs.rs builds it: all features and `--cfg docsrs` (feature badges). That needs a
# nightly rustdoc feature; RUSTC_BOOTSTRAP lets the stable toolchain here check it.
echo "== cargo doc (as docs.rs)" >&2
RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="--cfg docsrs -D warnings" cargo doc --no-deps --all-features
echo "== cargo test --all-features" >&2
cargo test --all-features
# Tests inside examples run only when the example is named: the gateway stack of
# `reverse_proxy --gateway` (examples/common/gateway.rs) over loopback.
echo "== cargo test --all-features --example reverse_proxy" >&2
cargo test --all-features --example reverse_proxy
# Packages the crate and builds it from the package, as crates.io would. `--allow-dirty`
# only lets a local run with uncommitted edits get here; CI is a clean clone.
echo "== cargo publish --dry-run" >&2
cargo publish --dry-run --allow-dirty
