#!/usr/bin/env bash
# Where meshd's per-packet time goes: perf profiles of M1's transmit thread (meshd-tx) and M2's
# receive thread (meshd-rx) in the fast lab while iperf3 sends UDP at 1 Gbit/s (1300-byte
# datagrams) and then one TCP stream from M1's pod to M2's, each sample put in one bucket:
# AEAD, the kernel's network stack, sleeping and waking, the TUN device, system call entry and
# exit, copies, checksums, kernel buffers, meshd's heap, locks and atomics, meshd's own code;
# and each thread's system calls and context switches per packet M1's TUN device passed it.
#
# usage: bench/profile.sh [--seconds S]     (MESHD_BIN_DIR picks the build; default: a release build)
# Needs root and perf (linux-perf); prints, per mode and thread, the share of samples in each bucket.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
seconds=4
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "--seconds takes a whole number of seconds above 0, not '$seconds'" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "profiling the lab needs root (network namespaces, perf)" >&2; exit 1; }
ensure_packages
command -v perf >/dev/null || install_debs linux-perf
ensure_cargo
release_bins
lab="$root/scripts/lab.sh"
work=$(mktemp -d)
cleanup() { "$lab" down --prefix bp >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"$lab" up --prefix bp --nodes 1 --m1 meshd --m2 meshd >"$work/lab.log" 2>&1 || {
  cat "$work/lab.log" >&2; echo "lab up failed (output above)" >&2; exit 1; }

# The thread named $2 of the meshd running in namespace $1.
thread_of() {
  local pid
  for pid in $(pgrep -x meshd); do
    if [ "$(ip netns identify "$pid" 2>/dev/null)" = "$1" ]; then
      grep -lx "$2" /proc/"$pid"/task/*/comm | head -1 | cut -d/ -f5
      return
    fi
  done
}
tx=$(thread_of bpm1gw meshd-tx) rx=$(thread_of bpm2gw meshd-rx)

# Shares of the samples in perf data file $1, by bucket (the first pattern a symbol matches).
buckets() {
  perf report -i "$1" --no-children --sort dso,symbol --stdio 2>/dev/null | python3 -c '
import re, sys
buckets = [
    ("AEAD (ChaCha20-Poly1305)", r"chacha20|poly1305|ring::aead|ring_core"),
    ("sleeping and waking", r"finish_task_switch|__schedule|\bschedule\b|_raw_spin_unlock_irqrestore|try_to_wake_up|pick_next|dequeue_task|enqueue_task|update_curr|psi_|__wake_up|ttwu|select_task_rq|do_poll|do_sys_poll|sys_poll|sys_ppoll|sched_|switch_mm|__switch_to|hrtimer"),
    ("system call entry and exit", r"do_syscall_64|entry_SYSCALL|syscall_exit|syscall_return|asynccancel|fdget|fput|__fget|exit_to_user_mode|x64_sys_call|__x86_return_thunk|__check_object_size|__virt_addr_valid|check_heap_object"),
    ("copies", r"_copy_to_iter|_copy_from_iter|memmove|memcpy|copy_user|skb_copy_datagram|rep_movs"),
    ("checksums", r"checksum|csum_partial|csum_|do_csum"),
    ("meshd heap (malloc, free)", r"\[\.\].*(malloc|_int_free|cfree|__libc_free|\bfree\b|tcache)"),
    ("kernel buffers (skb, slab)", r"kmem_cache|__alloc_skb|kfree|skb_release|slab_|page_frag|alloc_pages|__build_skb|kmalloc|__kmem"),
    ("locks and atomics", r"parking_lot|arc_swap|lock_slow|RawMutex|RawRwLock"),
    ("TUN device", r"\btun_|tun_rs::|vfs_read|vfs_write|ksys_read|ksys_write|sys_read|sys_write|\bread\b|\bwrite\b|__libc_read|__libc_write"),
    ("meshd own code", r"meshd::|boringtun::|hashbrown|core::|alloc::|std::|quinn_udp"),
]
shares = {}
for line in sys.stdin:
    m = re.match(r"\s+([0-9.]+)%\s+\S+\s+\[[.k]\]", line)
    if not m:
        continue
    name = next((n for n, p in buckets if re.search(p, line)), "kernel network stack (UDP, IP, routing, netfilter, veth)")
    shares[name] = shares.get(name, 0.0) + float(m.group(1))
for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
    print(f"  {share:5.1f} %  {name}")
'
}

# Packets M1's TUN device has handed to meshd (a TCP super-packet counts once).
tun_packets() { ip netns exec bpm1gw cat /sys/class/net/bpm1wg/statistics/tx_packets; }

# System calls and context switches in perf stat file $1, per packet of the window ($packets).
per_packet() {
  awk -F, -v n="$packets" '/raw_syscalls/ { s = $1 } /context-switches/ { c = $1 }
    END { if (n > 0) printf "%.2f system calls and %.2f sleeps per packet (%d packets)", s / n, c / n, n
          else printf "no packets passed M1'"'"'s TUN device in the window" }' "$1"
}

for mode in udp tcp; do
  case $mode in udp) args=(-u -b 1G -l 1300) ;; tcp) args=() ;; esac
  ip netns exec bpm2pod iperf3 -s -1 -D
  sleep 0.3
  ip netns exec bpm1pod iperf3 -c 10.245.1.10 -t $((seconds + 4)) "${args[@]}" >"$work/$mode.iperf" &
  sleep 2
  before=$(tun_packets)
  perf record -q -F 1999 -g -t "$tx" -o "$work/$mode-tx.data" -- sleep "$seconds" >/dev/null 2>&1 &
  perf record -q -F 1999 -g -t "$rx" -o "$work/$mode-rx.data" -- sleep "$seconds" >/dev/null 2>&1 &
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -t "$tx" -o "$work/$mode-tx.stat" -- sleep "$seconds" 2>/dev/null &
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -t "$rx" -o "$work/$mode-rx.stat" -- sleep "$seconds" 2>/dev/null &
  wait
  packets=$(( $(tun_packets) - before ))
  echo "== $mode: $(grep receiver "$work/$mode.iperf" | tr -s ' ')"
  echo "M1's meshd-tx: $(per_packet "$work/$mode-tx.stat")"; buckets "$work/$mode-tx.data"
  echo "M2's meshd-rx: $(per_packet "$work/$mode-rx.stat")"; buckets "$work/$mode-rx.data"
done
