#!/usr/bin/env bash
# Throughput under a handshake flood, in the two-cluster lab: iperf3 m1pod -> m2pod alone, then
# while an attacker on the underlay (192.0.2.50, beside the real gateways) sends M2's meshd
# handshake initiations with valid MAC1 and MAC2 (it got a cookie first) at --rate a second.
# Same lab, same run: the flooded median as a share of the undisturbed one.
#
# usage: bench/handshake-flood.sh [--runs N] [--seconds S] [--rate R] [--smoke]
#   --smoke   one 2-second run each way at the full rate (CI)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

runs=3 seconds=10 rate=20000
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --smoke) runs=1 seconds=2; shift ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "the lab needs root (network namespaces, TUN devices)" >&2; exit 1; }
ensure_packages
ensure_cargo
profile=release
if [ -n "${MESHD_BIN_DIR:-}" ]; then
  profile=$(basename "$MESHD_BIN_DIR")
else
  (cd "$root" && cargo build --release --quiet --bins)
  export MESHD_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/release"
fi
flags=()
[ "$profile" = release ] && flags=(--release)
(cd "$root" && cargo build "${flags[@]}" --quiet --example handshake_flood)
flood="${CARGO_TARGET_DIR:-$root/target}/$profile/examples/handshake_flood"

lab="$root/scripts/lab.sh"
state=/run/meshd-lab/hf
cleanup() { "$lab" down --prefix hf >/dev/null 2>&1 || true; }
trap cleanup EXIT
if ! "$lab" up --prefix hf --nodes 1 >/tmp/meshd-flood-lab.log 2>&1; then
  cat /tmp/meshd-flood-lab.log >&2
  echo "lab up failed (output above); rerun: $lab up --prefix hf --nodes 1" >&2
  exit 1
fi
# The attacker's address and its helpers' (which put M2 under load so that a cookie is issued).
ip netns exec hfm1gw ip addr add 192.0.2.50/24 dev ul0
helpers=()
for i in $(seq 100 139); do
  ip netns exec hfm1gw ip addr add "192.0.2.$i/24" dev ul0
  helpers+=("192.0.2.$i")
done

iperf() {
  ip netns exec hfm2pod iperf3 -s -1 -D
  sleep 0.3
  ip netns exec hfm1pod iperf3 -c 10.245.1.10 -f m -t "$seconds" |
    awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }'
}

alone=() flooded=()
for _ in $(seq "$runs"); do
  alone+=("$(iperf)")
  ip netns exec hfm1gw "$flood" 192.0.2.2:51820 "$(cat "$state/m2.pub")" 192.0.2.50 "${helpers[@]}" \
    -- "$rate" $((seconds + 2)) >/tmp/meshd-flood.out 2>&1 &
  pid=$!
  sleep 1
  flooded+=("$(iperf)")
  wait "$pid" || { cat /tmp/meshd-flood.out >&2; echo "the flood failed (output above)" >&2; exit 1; }
  echo "alone ${alone[-1]} Mbit/s, flooded ${flooded[-1]} Mbit/s; $(cat /tmp/meshd-flood.out)" >&2
done
limited=$(ip netns exec hfm2gw curl -s 127.0.0.1:9090/metrics |
  awk -F' ' '/^meshd_dropped_packets_total\{reason="rate_limited"\}/ {print $2}')

a=$(printf '%s\n' "${alone[@]}" | median)
f=$(printf '%s\n' "${flooded[@]}" | median)
printf '\niperf3 TCP m1pod -> m2pod, %s s x %s runs, flood %s/s valid-MAC2 initiations from one address\n' "$seconds" "$runs" "$rate"
printf '%-10s %s Mbit/s (median of: %s)\n' alone "$a" "${alone[*]}"
printf '%-10s %s Mbit/s (median of: %s)\n' flooded "$f" "${flooded[*]}"
awk -v a="$a" -v f="$f" 'BEGIN { if (a > 0) printf "flooded / alone: %.0f %%\n", 100 * f / a }'
echo "M2 dropped as rate_limited: ${limited:-0}"
