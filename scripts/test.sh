#!/usr/bin/env bash
# Every check, as CI runs it: installs missing system packages, then fmt, ha-raft's
# layers, clippy, all tests with all features, and the docs. Starts nothing global:
# tests that need a server start their own on loopback and stop it.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need (etcd for the etcd backend's tests, protoc and its
# well-known types for the etcd backend's build, iproute2 for network namespaces).
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
# `ip` for the network-namespace tests (tests/netns_schedules.rs, ha-testkit's Lab).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# No incremental caches: this script builds once from scratch (CI's clean checkout), and
# the caches cost gigabytes of disk for nothing.
export CARGO_INCREMENTAL=0

echo "== fmt (${SECONDS}s in)"
cargo fmt --all --check
echo "== layers (${SECONDS}s in)"
# ha-raft's folders import only downwards, in no cycle (docs/architecture.md); the
# self-test shows each rule catches a planted violation.
./scripts/check-layers.sh
./scripts/check-layers.sh --self-test
echo "== clippy (${SECONDS}s in)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== test (${SECONDS}s in)"
# The process tests run the examples' binaries (tests/fenced_counter.rs): build them
# with the same features first, whatever target filter a developer adds below.
cargo build --workspace --all-features --examples
# Bounded: the suite takes about 13 minutes here; a hung test (libtest reports "has been
# running for over 60 seconds" and names it) fails the run instead of eating CI's limit.
# timeout signals its whole process group, so the test binaries go too.
timeout --kill-after=30s 40m cargo test --workspace --all-features
echo "== bench (quick) (${SECONDS}s in)"
# A few trials of every benchmark scenario, so ha-bench never rots; numbers from a
# debug build on a busy machine mean little (docs/benchmarks.md has a release run).
timeout --kill-after=30s 15m cargo run --quiet -p ha-bench --all-features -- --quick --out target/bench-quick.json
echo "== packaging (${SECONDS}s in)"
./scripts/check-msrv.sh
# Every published crate packages, with its protos and build script. Building each package
# from its tarball too (drop --no-verify) took 4.5 minutes here, more than CI's budget
# leaves; HA_PUBLISH_VERIFY=1 runs it, as a release should.
if [ -n "${HA_PUBLISH_VERIFY:-}" ]; then
  cargo publish --dry-run --workspace --allow-dirty
else
  cargo publish --dry-run --workspace --allow-dirty --no-verify
fi
# ha-raft compiles its gRPC protos in build.rs (etcd-client ships its own).
listed=$(cargo package --list --allow-dirty -p ha-raft)
grep -qx 'build.rs' <<<"$listed" || { echo "ha-raft packages no build.rs"; exit 1; }
grep -qx 'proto/ha_raft.proto' <<<"$listed" || { echo "ha-raft packages no proto"; exit 1; }
echo "== doc (${SECONDS}s in)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps
echo "== all checks passed (${SECONDS}s in)"
