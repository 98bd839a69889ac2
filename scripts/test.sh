#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Run as root on Debian:
# installs the packages it needs when missing, checks formatting and lints, smoke-runs the lab
# throughput, DNS and handshake-flood benchmarks and of each fuzz target, validates the
# Kubernetes manifests offline (deploy/validate.sh), builds the amd64 image (scripts/image.sh),
# then runs every test (unit, CLI, lab end-to-end, deploy configs, benchmark smoke runs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"

if [ "$(id -u)" -eq 0 ]; then
  ensure_packages
  # As root nothing may be skipped: a test that would skip fails instead (tests/support).
  export MESHD_NO_SKIP=1
elif [ -n "${CI:-}" ]; then
  echo "CI runs this suite as root: not root here, so the lab end-to-end tests would be skipped and a green run would not have exercised the dataplane" >&2
  exit 1
else
  echo "not root: the lab end-to-end tests will be SKIPPED (they need network namespaces and TUN); each says so as it passes" >&2
fi
ensure_cargo

# The build outputs (debug, static release, fuzz builds) and the image take about 6 GiB on a fresh
# checkout; a full disk otherwise surfaces as some test's ENOSPC halfway through.
target_dir="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target_dir"
free_gib=$(( $(df --output=avail -k "$target_dir" | tail -1) / 1048576 ))
if [ "$free_gib" -lt 10 ]; then
  echo "scripts/test.sh: only $free_gib GiB free on the filesystem of $target_dir; the suite needs about 10 GiB (build outputs, the image, fuzz builds): free some (for example 'cargo clean' in other checkouts) and run it again" >&2
  exit 1
fi
# CI builds once from scratch: incremental caches would only take disk.
[ -z "${CI:-}" ] || export CARGO_INCREMENTAL=0

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
RUSTDOCFLAGS='-D warnings' cargo doc --no-deps --quiet
cargo build --bins --quiet

if [ "$(id -u)" -eq 0 ]; then
  # A short run of the end-to-end benchmark (debug binaries; dependencies are optimised).
  MESHD_BIN_DIR="$target_dir/debug" bench/lab-throughput.sh --smoke --impls "none meshd wireguard-go"
  # And of the DNS benchmark: dnsperf against meshd's responder and knot, same answers checked first.
  MESHD_BIN_DIR="$target_dir/debug" bench/dns-qps.sh --smoke
  # And of the handshake flood: iperf3 alone and under 20,000 valid-MAC2 initiations a second.
  MESHD_BIN_DIR="$target_dir/debug" bench/handshake-flood.sh --smoke
fi

# The Kubernetes manifests, offline: rendered, schema-validated, policy-checked (deploy/validate.sh).
deploy/validate.sh

if [ "$(id -u)" -eq 0 ]; then
  # The amd64 image (static release binaries built here, no registry), which tests/image.rs runs
  # the lab from under the DaemonSet's security context.
  scripts/image.sh --offline --arch amd64
fi

# One iteration of each criterion benchmark (a smoke run) and of the OpenSSL references beside
# it, then the unit, CLI and lab tests.
cargo test --bench hot_path
bench/hot-path.sh --smoke
# Ten seconds of coverage-guided fuzzing per parser fed from the network (nightly, cargo-fuzz).
bench/fuzz.sh --smoke
cargo test --lib --bins --tests
