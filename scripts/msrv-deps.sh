#!/usr/bin/env bash
# Checks that the declared `rust-version` can really be met by the dependency graph: in a
# scratch copy of the workspace, resolves a fresh lockfile with cargo's MSRV-aware resolver
# (`incompatible-rust-versions = "fallback"`: prefer the newest version whose own
# `rust-version` fits ours) and fails if any resolved package still declares a newer Rust.
#
# This is what a user on the minimum toolchain gets from an MSRV-aware cargo (1.84+). The
# committed Cargo.lock is not touched: it keeps the newest versions for the toolchain used
# here. Only one toolchain is available to this project, so compiling on the minimum Rust
# itself is not checked; std APIs newer than `rust-version` are caught by clippy's
# `incompatible_msrv` lint (on by default, denied by `-D warnings` in scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\([0-9.]*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$msrv" ] || { echo "no rust-version in Cargo.toml" >&2; exit 1; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tar --exclude=./target --exclude=./.git -cf - . | tar -xf - -C "$scratch"
rm -f "$scratch/Cargo.lock"
# The promise is the library's (its dependencies and dev-dependencies); the unpublished bench
# crate and its peers (pingora, criterion, ...) are left out of the resolve.
rm -rf "$scratch/bench"
sed -i 's/^members = \["bench"\]$/members = []/' "$scratch/Cargo.toml"
(cd "$scratch" && CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback cargo generate-lockfile -q)

# Every resolved package with its declared rust-version, e.g. `tonic 0.14.5 1.75`.
packages=$(cd "$scratch" && cargo metadata -q --format-version 1 --all-features --locked |
    grep -o '"name":"[^"]*","version":"[^"]*"\|"rust_version":"[^"]*"' || true)
too_new=$(awk -v msrv="$msrv" '
    function cmp(a, b,   x, y, i) {
        split(a, x, "."); split(b, y, ".")
        for (i = 1; i <= 3; i++) { if (x[i] + 0 != y[i] + 0) return (x[i] + 0 > y[i] + 0) ? 1 : -1 }
        return 0
    }
    /"name":/ { gsub(/"name":"|","version":"|"/, " "); pkg = $1 " " $2; next }
    /"rust_version":/ { gsub(/"rust_version":"|"/, ""); if (cmp($0, msrv) > 0) print pkg " needs Rust " $0 }
' <<<"$packages")
if [ -n "$too_new" ]; then
    echo "rust-version $msrv cannot be met even with an MSRV-aware resolve:" >&2
    echo "$too_new" >&2
    exit 1
fi
echo "every dependency resolves to a version supporting Rust $msrv" >&2
