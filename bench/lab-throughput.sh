#!/usr/bin/env bash
# End-to-end throughput in the two-cluster lab: the same iperf3 pod->pod run through meshd,
# boringtun-cli, Debian's wireguard-go and plain routing (no tunnel), in one run, on one machine.
#
# usage: bench/lab-throughput.sh [--runs N] [--seconds S] [--smoke] [--impls "meshd wireguard-go ..."]
#   --smoke   one 1-second run of each implementation that is installed (for CI; no installs)
# Prints a table of receiver throughput (Mbit/s): min / median / max of N runs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"

runs=3 seconds=10 smoke=0 impls="none meshd boringtun wireguard-go"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --smoke) smoke=1 runs=1 seconds=1; shift ;;
    --impls) impls=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "the lab needs root (network namespaces, TUN devices)" >&2; exit 1; }
ensure_packages
ensure_cargo
if [[ " $impls " == *" boringtun "* ]] && ! command -v boringtun-cli >/dev/null; then
  if [ "$smoke" = 1 ]; then
    echo "boringtun-cli not installed: left out of this smoke run (cargo install boringtun-cli)" >&2
    impls=${impls//boringtun/}
  else
    echo "installing boringtun-cli from crates.io (cargo install boringtun-cli)" >&2
    cargo install --quiet boringtun-cli
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
if [ -z "${MESHD_BIN_DIR:-}" ]; then
  (cd "$root" && cargo build --release --quiet --bins)
  export MESHD_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/release"
fi

lab="$root/scripts/lab.sh"
cleanup() { "$lab" down --prefix bn >/dev/null 2>&1 || true; }
trap cleanup EXIT

# median, min, max of the numbers on stdin
stats() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f %.0f %.0f", a[1], m, a[NR]}'; }

declare -A result
for impl in $impls; do
  if ! "$lab" up --prefix bn --m1 "$impl" --m2 "$impl" >/tmp/meshd-bench-lab.log 2>&1; then
    cat /tmp/meshd-bench-lab.log >&2
    echo "lab up with $impl failed (output above); rerun: $lab up --prefix bn --m1 $impl --m2 $impl" >&2
    exit 1
  fi
  samples=()
  for _ in $(seq "$runs"); do
    ip netns exec bnm2pod iperf3 -s -1 -D
    sleep 0.3
    mbps=$(ip netns exec bnm1pod iperf3 -c 10.245.1.10 -t "$seconds" -f m | awk '/receiver/ {print $(NF-2)}')
    samples+=("$mbps")
  done
  result[$impl]=$(printf '%s\n' "${samples[@]}" | stats)
  echo "$impl: ${samples[*]} Mbit/s" >&2
  "$lab" down --prefix bn >/dev/null 2>&1
done

printf '\niperf3 TCP, 1 stream, m1pod -> m2pod, %s s x %s runs (Mbit/s, receiver)\n' "$seconds" "$runs"
printf '%-14s %8s %8s %8s %10s\n' implementation min median max meshd-ratio
meshd_median=$(echo "${result[meshd]:-0 0 0}" | awk '{print $2}')
for impl in $impls; do
  read -r mn md mx <<<"${result[$impl]}"
  ratio=$(awk -v a="$meshd_median" -v b="$md" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
  printf '%-14s %8s %8s %8s %10s\n' "$impl" "$mn" "$md" "$mx" "$ratio"
done
