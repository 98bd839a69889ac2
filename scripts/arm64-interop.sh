#!/usr/bin/env bash
# The arm64 meshd of the image (what Apple-silicon homelabs run) against an amd64 peer: builds
# the arm64 image offline (scripts/image.sh), takes its meshd, and runs it under qemu-user as
# gateway M2 of the lab while M1 runs this machine's own build. Checks a handshake, ping both
# ways, a short iperf3 (slow under emulation; correctness is the point) and clusterset.local DNS
# answered by the arm64 meshd and across the tunnel. Apart from scripts/test.sh: the arm64 cross
# build costs as much as the whole suite's own build.
#
# usage: scripts/arm64-interop.sh [--prefix P]   (as root)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"
prefix=a6
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "the lab needs root (network namespaces, TUN devices)" >&2; exit 1; }
ensure_packages
ensure_image_tools
ensure_arm64_cross
use_containers_conf

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
image="meshd:$version-arm64"
"$here/image.sh" --offline --arch arm64
work=$(mktemp -d)
lab() { "$here/lab.sh" "$@" --prefix "$prefix"; }
trap 'lab down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
id=$(podman create --platform linux/arm64 "$image")
podman cp "$id:/usr/local/bin/meshd" "$work/meshd"
podman rm "$id" >/dev/null
echo "== the image's arm64 meshd under qemu-user: $(qemu-aarch64-static "$work/meshd" --version)"

lab up --nodes 1
state=/run/meshd-lab/$prefix
ns() { echo "$prefix$1"; }
# M2's gateway: the arm64 meshd, same configuration, under qemu-user.
for pid in $(ip netns pids "$(ns m2gw)"); do
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = meshd ] && kill "$pid"
done
sleep 0.5
ip netns exec "$(ns m2gw)" qemu-aarch64-static "$work/meshd" --config "$state/m2.toml" >"$state/m2.log" 2>&1 &
echo $! >"$state/m2.pid"
for _ in $(seq 300); do
  ip netns exec "$(ns m1pod)" ping -c1 -W1 10.245.1.10 >/dev/null 2>&1 && break
  sleep 0.2
done

echo "== handshake (wg show on M2, the arm64 meshd)"
ip netns exec "$(ns m2gw)" wg show "${prefix}m2wg" latest-handshakes
handshake=$(ip netns exec "$(ns m2gw)" wg show "${prefix}m2wg" latest-handshakes | awk '{print $2}')
[ "${handshake:-0}" -gt 0 ] || { echo "no handshake with the arm64 meshd; its log:" >&2; cat "$state/m2.log" >&2; exit 1; }
echo "== ping m1pod (amd64 side) -> m2pod (arm64 side) and back"
ip netns exec "$(ns m1pod)" ping -c 3 -i 0.2 10.245.1.10
ip netns exec "$(ns m2pod)" ping -c 3 -i 0.2 10.244.1.10
echo "== iperf3 TCP m1pod -> m2pod, 3 s, through the arm64 meshd under emulation"
ip netns exec "$(ns m2pod)" iperf3 -s -1 -D
sleep 0.3
ip netns exec "$(ns m1pod)" iperf3 -c 10.245.1.10 -t 3 -f m | tail -4
echo "== DNS: m2pod asks the arm64 meshd for web (M1's export, learned through the tunnel)"
answer=""
for _ in $(seq 150); do
  answer=$(ip netns exec "$(ns m2pod)" dig +short +time=2 +tries=1 @10.245.1.1 web.demo.svc.clusterset.local A | sort | tr '\n' ' ') || true
  case "$answer" in *10.96.0.10*) break ;; esac
  sleep 0.2
done
echo "$answer"
case "$answer" in *10.96.0.10*) ;; *) echo "the arm64 meshd did not answer M1's web; its log:" >&2; cat "$state/m2.log" >&2; exit 1 ;; esac
echo "== DNS: m1pod asks M1 (amd64) for hello (exported by the arm64 side)"
for _ in $(seq 150); do
  answer=$(ip netns exec "$(ns m1pod)" dig +short +time=2 +tries=1 @10.244.1.1 hello.demo.svc.clusterset.local A) || true
  [ "$answer" = 10.97.0.20 ] && break
  sleep 0.2
done
echo "$answer"
[ "$answer" = 10.97.0.20 ] || { echo "M1 did not learn hello from the arm64 meshd" >&2; exit 1; }
echo
echo "arm64 interop passed: the image's arm64 meshd under qemu-user and an amd64 meshd"
