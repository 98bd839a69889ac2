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
# each implementation's, whole-machine CPU-seconds per GB moved and the tunnel processes' own
# ("tunnel": both gateways' meshd, wireguard-go or boringtun-cli; pps modes: per million
# datagrams received), medians; for UDP the loss,
# and where the lost datagrams went (summed over the runs), from counters along the path:
#   before the tunnel: between the sending pod and M1's TUN device (M1's forwarding)
#   TUN queue full: M1's TUN device dropped them, its queue full (the tunnel read too slowly)
#   meshd M1: taken from the TUN device, never sent to the peer (meshd's drops)
#   wire / M2 socket: sent by M1's meshd, never received by M2's (M2's UDP socket full)
#   meshd M2 / M2: received by M2's meshd, never reached the receiving pod
#   receiver socket: reached the receiving pod, dropped there for a full socket buffer
#   (the three meshd columns are one "in the tunnel" column for the other implementations)
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
release_bins

lab="$root/scripts/lab.sh"
cleanup() { "$lab" down --prefix bn >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Busy CPU time of the whole machine so far, in clock ticks.
busy_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }
# CPU time of the tunnel's own processes (both gateways' meshd, wireguard-go or boringtun-cli)
# so far, in clock ticks: what the tunnel costs, apart from the pods and the kernel's forwarding.
tunnel_ticks() {
  local pid total=0 stat
  for pid in $(pgrep -x meshd; pgrep -x wireguard-go; pgrep -x boringtun-cli); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    stat=${stat##*) }
    read -r -a f <<<"$stat"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)

# The receiving-side UDP counters of namespace $1 named by the other arguments, space separated.
udp_counters() {
  local netns=$1; shift
  ip netns exec "$netns" awk -v want="$*" '/^Udp:/ {
    if (!header) { for (i = 2; i <= NF; i++) col[$i] = i; header = 1; next }
    n = split(want, w, " "); for (k = 1; k <= n; k++) printf "%s ", $(col[w[k]]); exit
  }' /proc/net/snmp
}
# The sum of the samples of metric $2 on the meshd in namespace $1 (0 when there is none).
metric_sum() {
  ip netns exec "$1" curl -s --max-time 2 http://127.0.0.1:9090/metrics 2>/dev/null |
    awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%d ", s }'
}
# Counters along the path, in this order: datagrams the sending pod sent, M1's TUN device's
# packets taken and dropped (queue full), M1's meshd datagrams to the peer, M2's meshd
# datagrams from the peer, the receiving pod's datagrams delivered and dropped for a full
# buffer.
path_counters() {
  local stats=/sys/class/net/bnm1wg/statistics
  udp_counters "$client" OutDatagrams
  if ip netns exec bnm1gw test -e "$stats"; then
    ip netns exec bnm1gw cat "$stats/tx_packets" "$stats/tx_dropped" | tr '\n' ' '
  else
    printf '0 0 '
  fi
  metric_sum bnm1gw meshd_peer_tx_packets_total
  metric_sum bnm2gw meshd_peer_rx_packets_total
  udp_counters "$server" InDatagrams RcvbufErrors
  echo
}

# Two comma-separated counter lists combined element by element: $1 + $3 × $2 ($3: 1 or -1).
combine() {
  awk -v a="$1" -v b="$2" -v k="$3" 'BEGIN {
    n = split(b, y, ","); split(a, x, ",")
    for (i = 1; i <= n; i++) printf "%s%d", (i > 1 ? "," : ""), x[i] + k * y[i]
  }'
}

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
  local path_before path_after
  path_before=$(path_counters)
  local tunnel_before tunnel_after
  tunnel_before=$(tunnel_ticks)
  before=$(busy_ticks)
  out=$(ip netns exec "$client" iperf3 -c "$target" -f m "${args[@]}")
  after=$(busy_ticks)
  tunnel_after=$(tunnel_ticks)
  sleep 0.2
  path_after=$(path_counters)
  local line
  if [ "$mode" = tcp4 ]; then line=$(grep 'SUM.*receiver' <<<"$out"); else line=$(grep 'receiver' <<<"$out" | tail -1); fi
  local path
  path_after=${path_after% } path_before=${path_before% }
  path=$(combine "${path_after// /,}" "${path_before// /,}" -1)
  awk -v line="$line" -v ticks=$((after - before)) -v hz="$hz" -v secs="$seconds" -v mode="$mode" -v path="$path" -v tticks=$((tunnel_after - tunnel_before)) 'BEGIN {
    n = split(line, f, " "); mbps = 0; loss = "-"; received = 0
    for (i = 1; i <= n; i++) {
      if (f[i] == "Mbits/sec") mbps = f[i-1]
      if (f[i] ~ /^[0-9]+\/[0-9]+$/) { split(f[i], lt, "/"); received = lt[2] - lt[1] }
    }
    if (match(line, /\(([0-9.e+-]+)%\)/)) loss = substr(line, RSTART + 1, RLENGTH - 3) "%"
    if (mode ~ /^pps/) {
      pps = received / secs
      m = received / 1e6
      printf "%d %.2f %.2f %s %s\n", pps, (m > 0 ? ticks / hz / m : 0), (m > 0 ? tticks / hz / m : 0), loss, path
      exit
    }
    gb = mbps * secs / 8000
    printf "%s %.1f %.2f %s %s\n", mbps, (gb > 0 ? ticks / hz / gb : 0), (gb > 0 ? tticks / hz / gb : 0), loss, path
  }'
}


# Where the lost datagrams went, from the summed path counters of a mode's runs ($1: the
# implementation, $2: the sums, comma separated, in path_counters's order).
where_lost() {
  awk -v impl="$1" -v c="$2" '
  function pct(x) { return sprintf("%.2f%%", 100 * x / sent) }
  BEGIN {
    split(c, v, ","); sent = v[1]; tun = v[2]; full = v[3]; mtx = v[4]; mrx = v[5]
    delivered = v[6]; rcvbuf = v[7]
    if (sent <= 0) { print "no datagrams counted"; exit }
    printf "lost %s: ", pct(sent - delivered)
    if (impl == "none") {
      printf "between the pods %s, receiver socket %s\n", pct(sent - delivered - rcvbuf), pct(rcvbuf)
      exit
    }
    printf "before the tunnel %s, TUN queue full %s, ", pct(sent - tun - full), pct(full)
    if (impl ~ /^meshd/)
      printf "meshd M1 %s, wire / M2 socket %s, meshd M2 / M2 %s, ", pct(tun - mtx), pct(mtx - mrx), pct(mrx - delivered - rcvbuf)
    else
      printf "in the tunnel %s, ", pct(tun - delivered - rcvbuf)
    printf "receiver socket %s\n", pct(rcvbuf)
  }'
}

declare -A mbps cpu tunnel loss paths
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
    samples=() cpus=() tunnels=() losses=() sums=""
    for _ in $(seq "$runs"); do
      read -r m c t l p < <(measure "$mode" "$target")
      samples+=("$m") cpus+=("$c") tunnels+=("$t") losses+=("$l")
      sums=$(combine "$sums" "$p" 1)
    done
    paths[$impl.$mode]=$sums
    mbps[$impl.$mode]=$(printf '%s\n' "${samples[@]}" | sort -n | tr '\n' ' ')
    cpu[$impl.$mode]=$(printf '%s\n' "${cpus[@]}" | median)
    tunnel[$impl.$mode]=$(printf '%s\n' "${tunnels[@]}" | median)
    loss[$impl.$mode]=${losses[*]}
    echo "$impl $mode: ${samples[*]} (Mbit/s; pps modes: datagrams/s); CPU ${cpus[*]}; tunnel CPU ${tunnels[*]}; loss ${losses[*]}" >&2
  done
  "$lab" down --prefix bn >/dev/null 2>&1
done

for mode in $modes; do
  unit="receiver Mbit/s" per=CPU-s/GB
  case "$mode" in pps*) unit="datagrams received a second" per=CPU-s/M ;; esac
  printf '\n%s: iperf3 %s -> %s, %s s x %s runs (%s)\n' "$mode" "${client#bn}" "${server#bn}" "$seconds" "$runs" "$unit"
  printf '%-14s %8s %8s %8s %12s %10s %10s %s\n' implementation min median max meshd-ratio "$per" "tunnel" loss
  meshd_median=$(values "${mbps[meshd.$mode]:-0}" | median)
  for impl in $impls; do
    read -r -a s <<<"${mbps[$impl.$mode]}"
    md=$(printf '%s\n' "${s[@]}" | median)
    ratio=$(awk -v a="$meshd_median" -v b="$md" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    printf '%-14s %8s %8s %8s %12s %10s %10s %s\n' "$impl" "${s[0]}" "$md" "${s[-1]}" "$ratio" "${cpu[$impl.$mode]}" "${tunnel[$impl.$mode]}" "${loss[$impl.$mode]}"
  done
  case "$mode" in
    udp|pps*)
      for impl in $impls; do
        printf '  %-12s %s\n' "$impl" "$(where_lost "$impl" "${paths[$impl.$mode]}")"
      done ;;
  esac
done
