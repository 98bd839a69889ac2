#!/usr/bin/env bash
# End-to-end throughput in the two-cluster lab: the same iperf3 pod->pod runs through meshd,
# boringtun-cli (1 thread), Debian's wireguard-go and plain routing (no tunnel), in one run, on
# one machine.
#
# usage: bench/lab-throughput.sh [--runs N] [--seconds S] [--smoke] [--impls "meshd ..."]
#                                [--modes "tcp1 tcp4 udp"] [--udp-rate 1G] [--workers]
#   --workers  two nodes per cluster: from the pod of M1's second node (a route agent) to the
#              pod of M2's second node, across both gateways (default: gateway pod to pod)
#   tcp1: TCP, 1 stream   tcp4: TCP, 4 streams   udp: UDP at --udp-rate, 1300-byte datagrams
#   pps64, pps512, pps1300: UDP datagrams of that size, as fast as iperf3 sends (-b 0);
#              reported as datagrams received per second (the small-packet cost)
#   --impls also takes meshd-overlap: meshd in the --overlap lab (both clusters on the same
#              CIDRs, every packet translated to and from global ranges), to set beside meshd
#   --smoke   one 1-second tcp1 run of each implementation that is installed (CI; no installs)
# Prints, per mode, receiver Mbit/s (min / median / max of N runs), meshd's median divided by
# each implementation's, and whole-machine CPU-seconds per GB moved (median); for UDP the loss.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

runs=3 seconds=10 smoke=0 impls="none meshd boringtun wireguard-go" modes="tcp1 tcp4 udp" rate=1G
nodes=1 client=bnm1pod server=bnm2pod server_ip=10.245.1.10
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --smoke) smoke=1 runs=1 seconds=1 modes=tcp1; shift ;;
    --impls) impls=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --udp-rate) rate=$2; shift 2 ;;
    --workers) nodes=2 client=bnm1n2pod server=bnm2n2pod server_ip=10.245.2.10; shift ;;
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

# Busy CPU time of the whole machine so far, in clock ticks.
busy_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }
hz=$(getconf CLK_TCK)

# One iperf3 run; prints "Mbit/s cpu-seconds-per-GB loss%" (pps modes: datagrams received a
# second in place of Mbit/s, and CPU-seconds per million datagrams).
measure() {
  local mode=$1 target=$2 args out before after
  case "$mode" in
    tcp1) args=(-t "$seconds") ;;
    tcp4) args=(-t "$seconds" -P 4) ;;
    udp) args=(-t "$seconds" -u -b "$rate" -l 1300) ;;
    pps*) args=(-t "$seconds" -u -b 0 -l "${mode#pps}") ;;
  esac
  ip netns exec "$server" iperf3 -s -1 -D
  sleep 0.3
  before=$(busy_ticks)
  out=$(ip netns exec "$client" iperf3 -c "$target" -f m "${args[@]}")
  after=$(busy_ticks)
  local line
  if [ "$mode" = tcp4 ]; then line=$(grep 'SUM.*receiver' <<<"$out"); else line=$(grep 'receiver' <<<"$out" | tail -1); fi
  awk -v line="$line" -v ticks=$((after - before)) -v hz="$hz" -v secs="$seconds" -v mode="$mode" 'BEGIN {
    n = split(line, f, " "); mbps = 0; loss = "-"; received = 0
    for (i = 1; i <= n; i++) {
      if (f[i] == "Mbits/sec") mbps = f[i-1]
      if (f[i] ~ /^[0-9]+\/[0-9]+$/) { split(f[i], lt, "/"); received = lt[2] - lt[1] }
    }
    if (match(line, /\(([0-9.e+-]+)%\)/)) loss = substr(line, RSTART + 1, RLENGTH - 3) "%"
    if (mode ~ /^pps/) {
      pps = received / secs
      printf "%d %.2f %s\n", pps, (received > 0 ? ticks / hz / (received / 1e6) : 0), loss
      exit
    }
    gb = mbps * secs / 8000
    printf "%s %.1f %s\n", mbps, (gb > 0 ? ticks / hz / gb : 0), loss
  }'
}


declare -A mbps cpu loss
for impl in $impls; do
  # meshd-overlap: meshd with both clusters on the same CIDRs; M2's pod is reached at its
  # global address (M2's pods are 100.82.0.0/16 to M1).
  lab_impl=$impl extra=() target=$server_ip
  if [ "$impl" = meshd-overlap ]; then
    lab_impl=meshd extra=(--overlap) target=100.82.${server_ip#10.245.}
  fi
  if ! "$lab" up --prefix bn --nodes "$nodes" --m1 "$lab_impl" --m2 "$lab_impl" "${extra[@]}" >/tmp/meshd-bench-lab.log 2>&1; then
    cat /tmp/meshd-bench-lab.log >&2
    echo "lab up with $impl failed (output above); rerun: $lab up --prefix bn --nodes $nodes --m1 $lab_impl --m2 $lab_impl ${extra[*]}" >&2
    exit 1
  fi
  for mode in $modes; do
    samples=() cpus=() losses=()
    for _ in $(seq "$runs"); do
      read -r m c l < <(measure "$mode" "$target")
      samples+=("$m") cpus+=("$c") losses+=("$l")
    done
    mbps[$impl.$mode]=$(printf '%s\n' "${samples[@]}" | sort -n | tr '\n' ' ')
    cpu[$impl.$mode]=$(printf '%s\n' "${cpus[@]}" | median)
    loss[$impl.$mode]=${losses[*]}
    echo "$impl $mode: ${samples[*]} (Mbit/s; pps modes: datagrams/s); CPU ${cpus[*]}; loss ${losses[*]}" >&2
  done
  "$lab" down --prefix bn >/dev/null 2>&1
done

for mode in $modes; do
  unit="receiver Mbit/s" per=CPU-s/GB
  case "$mode" in pps*) unit="datagrams received a second" per=CPU-s/M ;; esac
  printf '\n%s: iperf3 %s -> %s, %s s x %s runs (%s)\n' "$mode" "${client#bn}" "${server#bn}" "$seconds" "$runs" "$unit"
  printf '%-14s %8s %8s %8s %12s %10s %s\n' implementation min median max meshd-ratio "$per" loss
  meshd_median=$(values "${mbps[meshd.$mode]:-0}" | median)
  for impl in $impls; do
    read -r -a s <<<"${mbps[$impl.$mode]}"
    md=$(printf '%s\n' "${s[@]}" | median)
    ratio=$(awk -v a="$meshd_median" -v b="$md" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    printf '%-14s %8s %8s %8s %12s %10s %s\n' "$impl" "${s[0]}" "$md" "${s[-1]}" "$ratio" "${cpu[$impl.$mode]}" "${loss[$impl.$mode]}"
  done
done
