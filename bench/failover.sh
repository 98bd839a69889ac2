#!/usr/bin/env bash
# Gateway failover gaps (docs/ha.md): runs the lab test tests/ha.rs N times and prints, for each
# way the active gateway goes away, the longest gap of each run and the median over the runs:
# ping every 50 ms both ways and an iperf3 TCP stream both ways between M1's worker pod and M2's
# pod (graceful stop, crash, links cut), the ping gap through a partition from the API server,
# and a crash with M2 behind NAT.
#
# usage: bench/failover.sh [--runs N]   (as root; default 3 runs)
#
# There is no other implementation to run beside meshd here (Submariner needs a Kubernetes API
# server and its broker); docs/ha.md sets the figures beside Submariner's documented defaults.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option: $1 (usage: bench/failover.sh [--runs N])" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench/failover.sh needs root (the lab's namespaces)" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$root"
cargo build --quiet --tests
for run in $(seq "$runs"); do
  MESHD_NO_SKIP=1 cargo test --quiet --test ha two_candidates -- --nocapture 2>&1 \
    | grep '^RESULT ' >"$out/run$run" || { echo "run $run failed: cargo test --test ha -- --nocapture shows why" >&2; exit 1; }
  echo "run $run:"; sed 's/^RESULT /  /' "$out/run$run"
done

# Durations as Rust prints them (2.4s, 350ms, 0ns) in milliseconds.
ms() { sed -E 's/([0-9.]+)ns$/\1 0.000001/; s/([0-9.]+)µs$/\1 0.001/; s/([0-9.]+)ms$/\1 1/; s/([0-9.]+)s$/\1 1000/' | awk '{printf "%.0f\n", $1 * $2}'; }

echo
echo "medians of $runs runs (ms):"
for what in "Graceful" "Crash" "LinksCut"; do
  line() { grep -h "^RESULT $what:" "$out"/run* | sed -E "s/.*ping ([^ ]+) \/ ([^,]+), iperf3 ([^ ]+) \/ (.+)$/\\$1/"; }
  printf '  %-9s ping there %5s  back %5s   iperf3 there %5s  back %5s\n' "$what" \
    "$(line 1 | ms | median)" "$(line 2 | ms | median)" "$(line 3 | ms | median)" "$(line 4 | ms | median)"
done
printf '  %-9s ping there %5s\n' "partition" \
  "$(grep -h '^RESULT partition:' "$out"/run* | sed -E 's/.*: //' | ms | median)"
nat() { grep -h '^RESULT crash, M2 behind NAT:' "$out"/run* | sed -E "s/.*ping ([^ ]+) \/ (.+)$/\\$1/"; }
printf '  %-9s ping there %5s  back %5s\n' "NAT crash" "$(nat 1 | ms | median)" "$(nat 2 | ms | median)"
