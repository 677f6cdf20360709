#!/usr/bin/env bash
# Runs every check the project has: formatting, clippy (deny warnings), all tests with all
# features (unit, integration over real sockets, doc tests), and the docs build.
# Installs what the tests need when it is missing (as root: Debian packages for etcd and
# protoc, and the s3s-fs S3 server from crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)   # etcd-client
command -v cmake >/dev/null 2>&1 || missing+=(cmake)                # zlib-ng under the bench-pingora feature
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
    echo "installing s3s-fs (S3 server for the backup sink tests)" >&2
    cargo install --locked s3s-fs@0.14.1 --features binary
fi
export PATH="$HOME/.cargo/bin:$PATH"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets --all-features -D warnings" >&2
cargo clippy --all-targets --all-features -- -D warnings
echo "== cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
echo "== cargo test --all-features" >&2
cargo test --all-features
