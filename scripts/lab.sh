#!/usr/bin/env bash
# The two-cluster lab on one machine: network namespaces stand in for the clusters.
#
#   m1pod (10.244.1.10) -- m1gw ══ underlay 192.0.2.0/24 ══ m2gw -- m2pod (10.245.1.10)
#   (and IPv6: pods fd00:244::10 and fd00:245::10, underlay fd00:192::/64)
#
# Each gateway runs a WireGuard implementation (meshd by default) that routes the other cluster's
# pod CIDR through the tunnel. meshd also answers clusterset.local DNS on the gateway's pod-side
# address (10.24x.1.1:53) for the services in its exports file (web and headless db, see below)
# and those its peer exports (synced through the tunnel; M2 alone exports hello). Each pod serves
# HTTP on port 80, also at its cluster's service IPs (10.9x.0.10, M2's hello 10.97.0.20: the
# lab's stand-in for kube-proxy), and resolves names through its gateway's meshd.
#
# usage: scripts/lab.sh up|down|demo|status [--m1 IMPL] [--m2 IMPL] [--prefix P]
#   IMPL: meshd (default) | meshd-wg (meshd started empty, configured only with wg set)
#         | wireguard-go | boringtun | none (plain routing, no tunnel)
#   --prefix P  names every namespace and interface P..., so several labs can coexist (tests)
#   --nat       M2 is "behind NAT": M1 has no endpoint for it, M2 sends persistent keepalives
#   --no-offload  meshd without TUN offload (one packet per TUN read and write)
#   --ipv6-underlay  the gateways reach each other over IPv6 (endpoints [fd00:192::N]:51820)
#   --tx-threads N   meshd's transmit threads (TUN queues), default 1
#   --from-image IMAGE  run each meshd gateway from IMAGE (scripts/image.sh) with podman, given
#                    exactly what the rendered DaemonSet (kubectl kustomize deploy/overlays/mI)
#                    gives its pod: the gateway's namespace as the node's network, its security
#                    context, its volumes (meshd.toml and the key at /etc/meshd, /run, the TUN
#                    device), its command; DNS on 5353 with 53 redirected, as the meshd-dns
#                    Service maps it; meshctl run from the image
# env: MESHD_BIN_DIR  directory holding meshd (default: build target/release with cargo)
#      BORINGTUN_THREADS  threads for boringtun-cli (default 1)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"

action=${1:-}
[ -n "$action" ] && shift
M1=meshd M2=meshd P="" NAT=0 OFFLOAD=true UNDERLAY6=0 TX_THREADS=1 FROM_IMAGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --m1) M1=$2; shift 2 ;;
    --m2) M2=$2; shift 2 ;;
    --prefix) P=$2; shift 2 ;;
    --nat) NAT=1; shift ;;
    --no-offload) OFFLOAD=false; shift ;;
    --ipv6-underlay) UNDERLAY6=1; shift ;;
    --tx-threads) TX_THREADS=$2; shift 2 ;;
    --from-image) FROM_IMAGE=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
for impl in "$M1" "$M2"; do
  case "$impl" in meshd|meshd-wg|wireguard-go|boringtun|none) ;; *)
    echo "unknown implementation '$impl': use meshd, meshd-wg, wireguard-go, boringtun or none" >&2; exit 2 ;;
  esac
done
if [ -n "$FROM_IMAGE" ] && { [ "$M1" != meshd ] || [ "$M2" != meshd ]; }; then
  echo "--from-image runs meshd gateways: it needs --m1 meshd --m2 meshd" >&2; exit 2
fi
if [ "$M1" = none ] || [ "$M2" = none ]; then
  [ "$M1" = "$M2" ] || { echo "--m1 none needs --m2 none (plain routing has no tunnel)" >&2; exit 2; }
fi

state=/run/meshd-lab/${P:-default}
port=51820

ns() { echo "${P}$1"; }
in_ns() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }
log() { printf '[lab] %s\n' "$*" >&2; }

# cluster facts: index -> pod CIDR, service CIDR, pod IP, gateway pod-side IP, underlay IP, tunnel IP
pod_cidr() { echo "10.24$((3 + $1)).0.0/16"; }
svc_cidr() { echo "10.9$((5 + $1)).0.0/16"; }
pod_ip() { echo "10.24$((3 + $1)).1.10"; }
gw_pod_ip() { echo "10.24$((3 + $1)).1.1"; }
underlay_ip() { echo "192.0.2.$1"; }
pod6_cidr() { echo "fd00:24$((3 + $1))::/64"; }
pod6_ip() { echo "fd00:24$((3 + $1))::10"; }
gw_pod6_ip() { echo "fd00:24$((3 + $1))::1"; }
underlay6_ip() { echo "fd00:192::$1"; }
# the address:port a gateway's peer reaches it at
endpoint_of() { if [ "$UNDERLAY6" = 1 ]; then echo "[$(underlay6_ip "$1")]:$port"; else echo "$(underlay_ip "$1"):$port"; fi; }
tunnel_ip() { echo "100.64.0.$1"; }
web_ip() { echo "10.9$((5 + $1)).0.10"; }
hello_ip() { echo "10.97.0.20"; }
svc_ips() { web_ip "$1"; [ "$1" = 2 ] && hello_ip; return 0; }
iface() { echo "${P}m$1wg"; }
other() { echo $((3 - $1)); }
impl_of() { if [ "$1" = 1 ]; then echo "$M1"; else echo "$M2"; fi; }

meshd_bin() {
  if [ -n "${MESHD_BIN_DIR:-}" ]; then
    echo "$MESHD_BIN_DIR"
  else
    ensure_cargo
    (cd "$root" && cargo build --release --quiet --bins) >&2
    echo "${CARGO_TARGET_DIR:-$root/target}/release"
  fi
}

# meshctl: the image's when the gateways run from one, else the one built here.
meshctl() {
  if [ -n "$FROM_IMAGE" ]; then
    podman run --rm -i --network none "$FROM_IMAGE" meshctl "$@"
  else
    "$(meshd_bin)/meshctl" "$@"
  fi
}

container() { echo "${P}m$1-meshd"; }

# kubectl for `kubectl kustomize`: the one on PATH, else the one deploy/validate.sh installs
# (running it once installs it, and checks the manifests the lab is about to use).
kubectl_bin() {
  local venv=${MESHD_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-$root/target}/.cache}/meshd/deploy-venv}
  if command -v kubectl >/dev/null 2>&1; then command -v kubectl; return; fi
  [ -x "$venv/bin/kubectl" ] || "$root/deploy/validate.sh" >&2
  echo "$venv/bin/kubectl"
}

# The rendered manifests of cluster i's overlay.
rendered() { "$(kubectl_bin)" kustomize "$root/deploy/overlays/m$1"; }

down() {
  if command -v podman >/dev/null 2>&1; then
    for i in 1 2; do podman rm -f -t 0 "$(container "$i")" >/dev/null 2>&1 || true; done
  fi
  for i in 1 2; do
    for n in gw pod; do
      local name; name=$(ns "m$i$n")
      if ip netns list | grep -qw "$name"; then
        # Processes keep a namespace alive: stop them first.
        for pid in $(ip netns pids "$name" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
        sleep 0.2
        for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$name" 2>/dev/null || true
      fi
    done
    rm -f "/var/run/wireguard/$(iface "$i").sock"
    rm -rf "/etc/netns/$(ns "m${i}pod")"
  done
  rm -rf "$state"
}

topology() {
  for i in 1 2; do
    ip netns add "$(ns "m${i}gw")"
    ip netns add "$(ns "m${i}pod")"
    in_ns "m${i}gw" ip link set lo up
    in_ns "m${i}pod" ip link set lo up
    # pod <-> gateway
    ip link add "${P}m${i}p" netns "$(ns "m${i}pod")" type veth peer name "${P}m${i}g" netns "$(ns "m${i}gw")"
    in_ns "m${i}pod" ip link set "${P}m${i}p" name eth0
    in_ns "m${i}pod" ip addr add "$(pod_ip "$i")/24" dev eth0
    in_ns "m${i}pod" ip link set eth0 up
    in_ns "m${i}pod" ip route add default via "$(gw_pod_ip "$i")"
    in_ns "m${i}pod" ip -6 addr add "$(pod6_ip "$i")/64" dev eth0 nodad
    in_ns "m${i}pod" ip -6 route add default via "$(gw_pod6_ip "$i")"
    in_ns "m${i}gw" ip link set "${P}m${i}g" name pod0
    in_ns "m${i}gw" ip addr add "$(gw_pod_ip "$i")/24" dev pod0
    in_ns "m${i}gw" ip -6 addr add "$(gw_pod6_ip "$i")/64" dev pod0 nodad
    in_ns "m${i}gw" ip link set pod0 up
    # the cluster's service IPs live on its pod (as kube-proxy would send them there)
    for svc in $(svc_ips "$i"); do in_ns "m${i}pod" ip addr add "$svc/32" dev lo; done
    in_ns "m${i}gw" ip route add "$(svc_cidr "$i")" via "$(pod_ip "$i")"
    # the pod's resolver is its gateway's meshd (ip netns exec bind-mounts this file)
    mkdir -p "/etc/netns/$(ns "m${i}pod")"
    echo "nameserver $(gw_pod_ip "$i")" >"/etc/netns/$(ns "m${i}pod")/resolv.conf"
    in_ns "m${i}gw" sysctl -qw net.ipv4.ip_forward=1
    in_ns "m${i}gw" sysctl -qw net.ipv6.conf.all.forwarding=1
  done
  # the underlay between the gateways
  ip link add "${P}ul1" netns "$(ns m1gw)" type veth peer name "${P}ul2" netns "$(ns m2gw)"
  for i in 1 2; do
    in_ns "m${i}gw" ip link set "${P}ul$i" name ul0
    in_ns "m${i}gw" ip addr add "$(underlay_ip "$i")/24" dev ul0
    in_ns "m${i}gw" ip -6 addr add "$(underlay6_ip "$i")/64" dev ul0 nodad
    in_ns "m${i}gw" ip link set ul0 up
  done
}

keys() {
  for i in 1 2; do
    (umask 077 && meshctl genkey >"$state/m$i.key")
    meshctl pubkey <"$state/m$i.key" >"$state/m$i.pub"
  done
}

# Cluster i exports web (ClusterSetIP 10.9x.0.10, port http/TCP/80) and the headless db (pg/TCP/5432,
# endpoint hostname db-0), both backed by its pod.
exports_file() {
  local i=$1
  cat >"$state/m$i.exports.toml" <<EXPORTS
[[services]]
namespace = "demo"
name = "web"
type = "ClusterSetIP"
ips = ["$(web_ip "$i")"]
ports = [{ name = "http", protocol = "TCP", port = 80 }]
endpoints = [{ ip = "$(pod_ip "$i")" }]

[[services]]
namespace = "demo"
name = "db"
type = "Headless"
ports = [{ name = "pg", protocol = "TCP", port = 5432 }]
endpoints = [{ ip = "$(pod_ip "$i")", hostname = "db-0" }]
EXPORTS
  if [ "$i" = 2 ]; then
    cat >>"$state/m$i.exports.toml" <<EXPORTS

[[services]]
namespace = "demo"
name = "hello"
ips = ["$(hello_ip)"]
ports = [{ name = "http", protocol = "TCP", port = 80 }]
endpoints = [{ ip = "$(pod_ip "$i")" }]
EXPORTS
  fi
}

# Each pod serves "hello from mI" over HTTP on port 80 (all its addresses).
web_servers() {
  for i in 1 2; do
    mkdir -p "$state/www$i"
    echo "hello from m$i" >"$state/www$i/index.html"
    in_ns "m${i}pod" python3 -m http.server 80 --bind 0.0.0.0 --directory "$state/www$i" >"$state/www$i.log" 2>&1 &
  done
  for i in 1 2; do
    for _ in $(seq 100); do
      [ -n "$(in_ns "m${i}pod" ss -Hltn 'sport = :80')" ] && continue 2
      sleep 0.1
    done
    log "the web server in m${i}pod did not start; its log:"; cat "$state/www$i.log" >&2; return 1
  done
}

meshd_config() {
  local i=$1 o endpoint keepalive=""; o=$(other "$1")
  exports_file "$i"
  endpoint="endpoint = \"$(endpoint_of "$o")\""
  if [ "$NAT" = 1 ]; then
    # M1 cannot reach M2 first; M2 keeps the path open.
    if [ "$i" = 1 ]; then endpoint="# no endpoint: m2 is behind NAT"; else keepalive="persistent_keepalive = 2"; fi
  fi
  cat >"$state/m$i.toml" <<CFG
cluster = "m$i"
interface = "$(iface "$i")"
private_key_file = "$state/m$i.key"
listen_port = $port
local_cidrs = ["$(pod_cidr "$i")", "$(svc_cidr "$i")", "$(pod6_cidr "$i")"]
tunnel_address = "$(tunnel_ip "$i")/24"
offload = $OFFLOAD
tx_threads = $TX_THREADS
exports_file = "$state/m$i.exports.toml"
dns_listen = "$(gw_pod_ip "$i"):53"
admin_socket = "$state/m$i.admin.sock"

[[peers]]
name = "m$o"
public_key = "$(cat "$state/m$o.pub")"
$endpoint
allowed_cidrs = ["$(pod_cidr "$o")", "$(svc_cidr "$o")", "$(pod6_cidr "$o")", "$(tunnel_ip "$o")/32"]
tunnel_address = "$(tunnel_ip "$o")"
$keepalive
CFG
}

start_meshd() {
  local i=$1 bin=$2
  meshd_config "$i"
  # Not through in_ns: $! must be meshd's own PID (ip netns exec execs it) for signals.
  ip netns exec "$(ns "m${i}gw")" "$bin/meshd" --config "$state/m$i.toml" >"$state/m$i.log" 2>&1 &
  echo $! >"$state/m$i.pid"
}

# meshd from $FROM_IMAGE in a container that gets what the DaemonSet's pod gets (read from the
# rendered manifest by scripts/pod-to-podman.py): the gateway's namespace is the node's network.
start_meshd_container() {
  local i=$1 name etc run dev line after=0 opts=() cmd=()
  name=$(container "$i") etc="$state/m$i.etc" run="$state/m$i.run" dev=$(iface "$i")
  meshd_config "$i"
  mkdir -p "$etc" "$run"
  # The ConfigMap's meshd.toml and the Secret's private.key, as the projected volume holds them;
  # the lab's exports file beside them (the lab has no Kubernetes API for the watcher).
  sed -e "s|$state/m$i.key|/etc/meshd/private.key|" \
      -e "s|$state/m$i.exports.toml|/etc/meshd/exports.toml|" \
      -e '/^admin_socket/d' -e 's|:53"$|:5353"|' "$state/m$i.toml" >"$etc/meshd.toml"
  install -m 0444 "$state/m$i.exports.toml" "$etc/exports.toml"
  install -m 0400 "$state/m$i.key" "$etc/private.key"
  chmod 0444 "$etc/meshd.toml"
  # Port 53 to meshd's 5353, as the meshd-dns Service maps it for CoreDNS.
  for proto in udp tcp; do
    in_ns "m${i}gw" iptables -t nat -A PREROUTING -d "$(gw_pod_ip "$i")" -p "$proto" --dport 53 -j REDIRECT --to-ports 5353
  done
  while IFS= read -r line; do
    if [ "$line" = "--" ]; then after=1
    elif [ "$after" = 1 ]; then cmd+=("$line")
    else opts+=("$line")
    fi
  done < <(rendered "$i" \
    | python3 "$here/pod-to-podman.py" --netns "$(ns "m${i}gw")" --volume config="$etc" --volume run="$run")
  podman run -d --name "$name" "${opts[@]}" "$FROM_IMAGE" "${cmd[@]}" >/dev/null
  podman inspect -f '{{.State.Pid}}' "$name" >"$state/m$i.pid"
  podman logs -f "$name" >"$state/m$i.log" 2>&1 &
  # The sockets where the host's tools look for them.
  for _ in $(seq 100); do [ -S "$run/wireguard/$dev.sock" ] && break; sleep 0.1; done
  [ -S "$run/wireguard/$dev.sock" ] || { log "meshd in $name did not start; its log:"; podman logs "$name" >&2; return 1; }
  mkdir -p /var/run/wireguard
  ln -sfn "$run/wireguard/$dev.sock" "/var/run/wireguard/$dev.sock"
  ln -sfn "$run/meshd/meshd.sock" "$state/m$i.admin.sock"
}

# The rendered DaemonSet's HTTP probes of gateway i answer 200 (as the kubelet would ask them).
probes_pass() {
  local i=$1 kind probe_port path code
  while read -r kind probe_port path; do
    for _ in $(seq 100); do
      code=$(in_ns "m${i}gw" curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$probe_port$path" || true)
      [ "$code" = 200 ] && break
      sleep 0.1
    done
    [ "$code" = 200 ] || { log "m$i: the $kind probe (:$probe_port$path) answers $code"; return 1; }
    log "m$i: $kind probe :$probe_port$path answers 200"
  done < <(rendered "$i" | python3 "$here/pod-to-podman.py" --probes)
}

# wireguard-go, boringtun-cli or an empty meshd, configured with wg and ip, as an operator would.
start_userspace() {
  local i=$1 impl=$2 bin=$3 o dev; o=$(other "$1"); dev=$(iface "$i")
  case "$impl" in
    meshd-wg)
      ip netns exec "$(ns "m${i}gw")" "$bin/meshd" --interface "$dev" --mtu 1420 >"$state/m$i.log" 2>&1 & ;;
    wireguard-go)
      ip netns exec "$(ns "m${i}gw")" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "$dev" >"$state/m$i.log" 2>&1 & ;;
    boringtun)
      command -v boringtun-cli >/dev/null || { echo "boringtun-cli not found: cargo install boringtun-cli" >&2; exit 1; }
      ip netns exec "$(ns "m${i}gw")" boringtun-cli --foreground --disable-drop-privileges --threads "${BORINGTUN_THREADS:-1}" "$dev" >"$state/m$i.log" 2>&1 & ;;
  esac
  echo $! >"$state/m$i.pid"
  for _ in $(seq 50); do [ -S "/var/run/wireguard/$dev.sock" ] && break; sleep 0.1; done
  in_ns "m${i}gw" wg set "$dev" listen-port $port private-key "$state/m$i.key" \
    peer "$(cat "$state/m$o.pub")" endpoint "$(endpoint_of "$o")" \
    allowed-ips "$(pod_cidr "$o"),$(svc_cidr "$o"),$(pod6_cidr "$o"),$(tunnel_ip "$o")/32"
  in_ns "m${i}gw" ip addr add "$(tunnel_ip "$i")/24" dev "$dev"
  in_ns "m${i}gw" ip link set "$dev" mtu 1420 up
  # meshd installs these routes itself; the others need them from the operator.
  in_ns "m${i}gw" ip route replace "$(pod_cidr "$o")" dev "$dev"
  in_ns "m${i}gw" ip route replace "$(svc_cidr "$o")" dev "$dev"
  in_ns "m${i}gw" ip -6 route replace "$(pod6_cidr "$o")" dev "$dev"
}

wait_for_tunnel() {
  for _ in $(seq 100); do
    if in_ns m1pod ping -c1 -W1 "$(pod_ip 2)" >/dev/null 2>&1; then return 0; fi
    for i in 1 2; do
      if [ -f "$state/m$i.pid" ] && ! kill -0 "$(cat "$state/m$i.pid")" 2>/dev/null; then
        log "gateway m$i ($(impl_of "$i")) exited; its log:"; cat "$state/m$i.log" >&2; return 1
      fi
    done
    sleep 0.2
  done
  log "no traffic across the tunnel after 20 s; gateway logs:"
  cat "$state"/m*.log >&2 || true
  return 1
}

up() {
  ensure_packages
  local bin=""
  if [ -n "$FROM_IMAGE" ]; then
    ensure_image_tools
    ensure_debs iptables
    use_containers_conf
    podman image exists "$FROM_IMAGE" || { echo "no image $FROM_IMAGE: build it with scripts/image.sh --offline --arch amd64" >&2; exit 1; }
  else
    bin=$(meshd_bin)  # meshctl makes the keys for every implementation
    MESHD_BIN_DIR=$bin
  fi
  down
  mkdir -p "$state"
  echo "$M1 $M2" >"$state/impls"
  topology
  if [ "$M1" = none ]; then
    in_ns m1gw ip route add "$(pod_cidr 2)" via "$(underlay_ip 2)"
    in_ns m2gw ip route add "$(pod_cidr 1)" via "$(underlay_ip 1)"
    in_ns m1gw ip route add "$(svc_cidr 2)" via "$(underlay_ip 2)"
    in_ns m2gw ip route add "$(svc_cidr 1)" via "$(underlay_ip 1)"
    in_ns m1gw ip -6 route add "$(pod6_cidr 2)" via "$(underlay6_ip 2)"
    in_ns m2gw ip -6 route add "$(pod6_cidr 1)" via "$(underlay6_ip 1)"
  else
    keys
    for i in 1 2; do
      case "$(impl_of "$i")" in
        meshd) if [ -n "$FROM_IMAGE" ]; then start_meshd_container "$i"; else start_meshd "$i" "$bin"; fi ;;
        *) start_userspace "$i" "$(impl_of "$i")" "$bin" ;;
      esac
    done
  fi
  web_servers
  wait_for_tunnel
  if [ -n "$FROM_IMAGE" ]; then probes_pass 1; probes_pass 2; fi
  log "lab up: m1 ($M1) <-> m2 ($M2); state in $state"
}

status() {
  for i in 1 2; do
    [ -S "/var/run/wireguard/$(iface "$i").sock" ] && in_ns "m${i}gw" wg show "$(iface "$i")"
  done
}

demo() {
  trap 'down' EXIT
  trap 'exit 130' INT TERM
  up
  echo
  echo "== ping m1pod -> m2pod and back"
  in_ns m1pod ping -c 3 -i 0.2 "$(pod_ip 2)"
  in_ns m2pod ping -c 3 -i 0.2 "$(pod_ip 1)"
  echo
  echo "== iperf3 TCP m1pod -> m2pod (5 s)"
  in_ns m2pod iperf3 -s -1 -D
  sleep 0.3
  in_ns m1pod iperf3 -c "$(pod_ip 2)" -t 5 -f m | tail -4
  echo
  echo "== iperf3 TCP m2pod -> m1pod (5 s)"
  in_ns m1pod iperf3 -s -1 -D
  sleep 0.3
  in_ns m2pod iperf3 -c "$(pod_ip 1)" -t 5 -f m | tail -4
  echo
  echo "== wg show (standard WireGuard tooling against meshd)"
  status
  if [ "$M1" = meshd ] && [ "$M2" = meshd ]; then
    local name=hello.demo.svc.clusterset.local answer=""
    echo
    echo "== clusterset.local DNS: m1pod asks M1's meshd for $name (exported by M2 only)"
    for _ in $(seq 100); do
      answer=$(in_ns m1pod dig +short +time=1 +tries=1 @"$(gw_pod_ip 1)" "$name" A) && [ -n "$answer" ] && break
      sleep 0.2
    done
    [ -n "$answer" ] || { log "M1's meshd never learned $name from M2; logs:"; cat "$state"/m*.log >&2; exit 1; }
    in_ns m1pod dig +noall +answer @"$(gw_pod_ip 1)" "$name" A
    echo
    echo "== curl http://$name/ from m1pod (its resolver is M1's meshd)"
    in_ns m1pod curl -sS --max-time 5 "http://$name/"
    echo
    echo "== meshctl peers on M1"
    if [ -n "$FROM_IMAGE" ]; then
      podman exec "$(container 1)" meshctl peers
    else
      meshctl peers --socket "$state/m1.admin.sock"
    fi
  fi
  echo
  echo "lab demo passed: pods in 10.244.0.0/16 and 10.245.0.0/16 reach each other through meshd"
}

case "$action" in
  up) up ;;
  down) down; log "lab down" ;;
  demo) demo ;;
  status) status ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
