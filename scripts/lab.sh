#!/usr/bin/env bash
# The two-cluster lab on one machine: network namespaces stand in for the clusters' nodes.
#
#   M1 (3 nodes)                                          M2 (2 nodes)
#   m1pod   m1n2pod   m1n3pod                             m2pod   m2n2pod
#     |        |         |                                  |        |
#   m1gw ─── m1n2 ──── m1n3   (cluster bridge 172.18.1.0/24) m2gw ─── m2n2   (172.18.2.0/24)
#     ╚════════════ underlay 192.0.2.0/24 ═══════════════════╝
#
# Node k of cluster i has the pod /24 10.24x.k.0/24 (its pod at .10, the node at .1), routed
# between nodes as kindnet does, kindnet's masquerade rule (-s POD_CIDR ! -d POD_CIDR -j
# MASQUERADE) and strict reverse-path filtering (rp_filter=1). Node 1 is the gateway: it runs a WireGuard implementation (meshd by default) that
# routes the other cluster's CIDRs through the tunnel; on every other node meshd runs as route
# agent (the same configuration, gateway_address = 172.18.i.1). The gateway pods also have IPv6
# (fd00:244::10 and fd00:245::10, underlay fd00:192::/64). meshd answers clusterset.local DNS on
# the gateway's pod-side address (10.24x.1.1:53) for the services in its exports file (web and
# headless db, see below) and those its peer exports (synced through the tunnel; M2 alone exports
# hello, backed by the pod of M2's last node). Each pod serves HTTP on port 80, also at its
# cluster's service IPs (the lab's stand-in for kube-proxy), and resolves names through its
# gateway's meshd.
#
# usage: scripts/lab.sh up|down|demo|status [--nodes N|N1,N2] [--m1 IMPL] [--m2 IMPL] [--prefix P]
#   --nodes N1,N2  nodes of M1 and M2 (N: both); default 3,2 with M2 behind NAT (--nat);
#                  --nodes 1 is the fast two-node lab the tests use
#   IMPL: meshd (default) | meshd-wg (meshd started empty, configured only with wg set)
#         | wireguard-go | boringtun | none (plain routing, no tunnel); every implementation but
#         meshd gets the routes and masquerade exceptions an operator would add by hand
#   --prefix P  names every namespace and interface P..., so several labs can coexist (tests)
#   --route-mode auto|direct|vxlan  how meshd's route agents reach the gateway (default auto:
#               direct, the lab's nodes share a bridge)
#   --nat       M2 is "behind NAT": M1 has no endpoint for it, M2 sends persistent keepalives
#   --no-nat    not so, with the default topology
#   --no-offload  meshd without TUN offload (one packet per TUN read and write)
#   --no-batch-scheduling  meshd's packet threads under the default scheduling, not SCHED_BATCH
#   --ipv6-underlay  the gateways reach each other over IPv6 (endpoints [fd00:192::N]:51820)
#   --ha        M1's second node is a second gateway candidate: the underlay is a switch (its own
#               namespace, ulsw) that M1's first two nodes and M2's gateway share (m1n2 at
#               192.0.2.12); tests/ha.rs runs the election there (needs --nodes with N1 >= 2)
#   --tx-threads N   meshd's transmit threads (TUN queues), default 1
#   --overlap   M2 is a kind cluster left at its defaults: exactly M1's pod and service CIDRs
#               (10.244.0.0/16, 10.96.0.0/16; fd00:244::/64). Each cluster gets global ranges
#               (global_cidrs): M1 is 100.81.0.0/16 (pods), 100.91.0.0/16 (services),
#               fd00:f1::/64; M2 100.82.0.0/16, 100.92.0.0/16, fd00:f2::/64. Pods reach the other
#               cluster at its global addresses; meshd translates (meshd in both gateways only).
#               The demo adds a byte-exact transfer both ways, a UDP exchange, ping -M do at the
#               path MTU and traceroute
#   --from-image IMAGE  run each meshd gateway from IMAGE (scripts/image.sh) with podman, given
#                    exactly what the rendered DaemonSet (kubectl kustomize deploy/overlays/mI)
#                    gives its pod: the gateway's namespace as the node's network, its security
#                    context, its volumes (meshd.toml and the key at /etc/meshd, /run, the TUN
#                    device), its command; DNS on 5353 with 53 redirected, as the meshd-dns
#                    Service maps it; meshctl run from the image (needs --nodes 1)
# env: MESHD_BIN_DIR  directory holding meshd (default: build target/release with cargo)
#      BORINGTUN_THREADS  threads for boringtun-cli (default 1)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"

action=${1:-}
[ -n "$action" ] && shift
M1=meshd M2=meshd P="" NAT="" OFFLOAD=true BATCH=true UNDERLAY6=0 TX_THREADS=1 FROM_IMAGE="" NODES="" ROUTE_MODE=auto HA=0 OVERLAP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --m1) M1=$2; shift 2 ;;
    --m2) M2=$2; shift 2 ;;
    --prefix) P=$2; shift 2 ;;
    --nat) NAT=1; shift ;;
    --ha) HA=1; shift ;;
    --overlap) OVERLAP=1; shift ;;
    --no-nat) NAT=0; shift ;;
    --nodes) NODES=$2; shift 2 ;;
    --route-mode) ROUTE_MODE=$2; shift 2 ;;
    --no-offload) OFFLOAD=false; shift ;;
    --no-batch-scheduling) BATCH=false; shift ;;
    --ipv6-underlay) UNDERLAY6=1; shift ;;
    --tx-threads) TX_THREADS=$2; shift 2 ;;
    --from-image) FROM_IMAGE=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
# The default topology: M1 = 3 nodes, M2 = 2 nodes behind NAT.
if [ -z "$NODES" ]; then NODES=3,2; NAT=${NAT:-1}; fi
NAT=${NAT:-0}
case "$NODES" in
  [1-9]) N1=$NODES N2=$NODES ;;
  [1-9],[1-9]) N1=${NODES%,*} N2=${NODES#*,} ;;
  *) echo "--nodes '$NODES': give N or N1,N2, each 1-9" >&2; exit 2 ;;
esac
for impl in "$M1" "$M2"; do
  case "$impl" in meshd|meshd-wg|wireguard-go|boringtun|none) ;; *)
    echo "unknown implementation '$impl': use meshd, meshd-wg, wireguard-go, boringtun or none" >&2; exit 2 ;;
  esac
done
if [ -n "$FROM_IMAGE" ] && { [ "$M1" != meshd ] || [ "$M2" != meshd ]; }; then
  echo "--from-image runs meshd gateways: it needs --m1 meshd --m2 meshd" >&2; exit 2
fi
if [ -n "$FROM_IMAGE" ] && [ "$N1$N2" != 11 ]; then
  echo "--from-image runs the gateways only: it needs --nodes 1" >&2; exit 2
fi
if [ "$HA" = 1 ] && { [ "$N1" -lt 2 ] || [ "$UNDERLAY6" = 1 ]; }; then
  echo "--ha needs a second M1 node (--nodes N1,N2 with N1 >= 2) and an IPv4 underlay" >&2; exit 2
fi
if [ "$OVERLAP" = 1 ] && { [ "$M1" != meshd ] || [ "$M2" != meshd ] || [ -n "$FROM_IMAGE" ]; }; then
  echo "--overlap needs meshd in both gateways (--m1 meshd --m2 meshd, no --from-image): only meshd translates addresses" >&2; exit 2
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
# the second octet of cluster i's pod and service CIDRs (kind's defaults for both with --overlap)
pod_octet() { if [ "$OVERLAP" = 1 ]; then echo 244; else echo $((243 + $1)); fi; }
svc_octet() { if [ "$OVERLAP" = 1 ]; then echo 96; else echo $((95 + $1)); fi; }
pod_cidr() { echo "10.$(pod_octet "$1").0.0/16"; }
svc_cidr() { echo "10.$(svc_octet "$1").0.0/16"; }
pod_ip() { echo "10.$(pod_octet "$1").1.10"; }
gw_pod_ip() { echo "10.$(pod_octet "$1").1.1"; }
underlay_ip() { echo "192.0.2.$1"; }
pod6_cidr() { echo "fd00:$(pod_octet "$1")::/64"; }
pod6_ip() { echo "fd00:$(pod_octet "$1")::10"; }
gw_pod6_ip() { echo "fd00:$(pod_octet "$1")::1"; }
# --overlap: cluster i's global ranges, as global_cidrs entries and as its peer routes them
global_cidrs_of() { echo "\"$(pod_cidr "$1")=100.8$1.0.0/16\", \"$(svc_cidr "$1")=100.9$1.0.0/16\", \"$(pod6_cidr "$1")=fd00:f$1::/64\""; }
remote_cidrs() {
  if [ "$OVERLAP" = 1 ]; then echo "100.8$1.0.0/16 100.9$1.0.0/16 fd00:f$1::/64"
  else echo "$(pod_cidr "$1") $(svc_cidr "$1") $(pod6_cidr "$1")"; fi
}
# address $2 of cluster $1 as the other cluster reaches it (its global form with --overlap)
reach() {
  local a=$2
  if [ "$OVERLAP" != 1 ]; then echo "$a"; return; fi
  case "$a" in
    10.244.*) echo "100.8$1.${a#10.244.}" ;;
    10.96.*) echo "100.9$1.${a#10.96.}" ;;
    fd00:244::*) echo "fd00:f$1::${a#fd00:244::}" ;;
    *) echo "$a" ;;
  esac
}
underlay6_ip() { echo "fd00:192::$1"; }
# the address:port a gateway's peer reaches it at
endpoint_of() { if [ "$UNDERLAY6" = 1 ]; then echo "[$(underlay6_ip "$1")]:$port"; else echo "$(underlay_ip "$1"):$port"; fi; }
tunnel_ip() { echo "100.64.0.$1"; }
web_ip() { echo "10.$(svc_octet "$1").0.10"; }
hello_ip() { echo "10.$(svc_octet 2).0.20"; }
svc_ips() { web_ip "$1"; [ "$1" = 2 ] && [ "$N2" = 1 ] && hello_ip; return 0; }
iface() { echo "${P}m$1wg"; }
other() { echo $((3 - $1)); }
nodes_of() { if [ "$1" = 1 ]; then echo "$N1"; else echo "$N2"; fi; }
# node k of cluster i: its namespace and its pod's (unprefixed), its pod's IP, its own address
# on the pod side and on the cluster bridge
node_ns() { if [ "$2" = 1 ]; then echo "m$1gw"; else echo "m$1n$2"; fi; }
pod_ns() { if [ "$2" = 1 ]; then echo "m$1pod"; else echo "m$1n$2pod"; fi; }
node_pod_ip() { echo "10.$(pod_octet "$1").$2.10"; }
node_pod_gw() { echo "10.$(pod_octet "$1").$2.1"; }
node_ip() { echo "172.18.$1.$2"; }
# the pod on cluster i's last node (a non-gateway node when it has several)
last_pod_ns() { pod_ns "$1" "$(nodes_of "$1")"; }
last_pod_ip() { node_pod_ip "$1" "$(nodes_of "$1")"; }
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

# Every namespace of this lab, whatever its topology was.
lab_namespaces() {
  ip netns list | awk '{print $1}' | grep -E "^${P}(m[12](gw|pod|sw|n[0-9]|n[0-9]pod)|ulsw)\$" || true
}

down() {
  if command -v podman >/dev/null 2>&1; then
    for i in 1 2; do podman rm -f -t 0 "$(container "$i")" >/dev/null 2>&1 || true; done
  fi
  local name
  for name in $(lab_namespaces); do
    # Processes keep a namespace alive: stop them first (meshd takes its routes and table away).
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for name in $(lab_namespaces); do
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$name" 2>/dev/null || true
    rm -rf "/etc/netns/$name"
  done
  for i in 1 2; do rm -f "/var/run/wireguard/$(iface "$i").sock"; done
  rm -rf "$state"
}

# Node k of cluster i with its pod behind a veth, as kindnet sets them up, and kindnet's
# masquerade rule.
make_node() {
  local i=$1 k=$2 nn pn; nn=$(node_ns "$i" "$k") pn=$(pod_ns "$i" "$k")
  ip netns add "$(ns "$nn")"
  ip netns add "$(ns "$pn")"
  in_ns "$nn" ip link set lo up
  in_ns "$pn" ip link set lo up
  ip link add "${P}m${i}p$k" netns "$(ns "$pn")" type veth peer name "${P}m${i}g$k" netns "$(ns "$nn")"
  in_ns "$pn" ip link set "${P}m${i}p$k" name eth0
  in_ns "$pn" ip addr add "$(node_pod_ip "$i" "$k")/24" dev eth0
  in_ns "$pn" ip link set eth0 up
  in_ns "$pn" ip route add default via "$(node_pod_gw "$i" "$k")"
  in_ns "$nn" ip link set "${P}m${i}g$k" name pod0
  in_ns "$nn" ip addr add "$(node_pod_gw "$i" "$k")/24" dev pod0
  in_ns "$nn" ip link set pod0 up
  in_ns "$nn" sysctl -qw net.ipv4.ip_forward=1
  # strict reverse-path filtering, as RHEL-family nodes have it: the strictest case meshd meets
  in_ns "$nn" sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
  if [ "$k" = 1 ]; then
    in_ns "$pn" ip -6 addr add "$(pod6_ip "$i")/64" dev eth0 nodad
    in_ns "$pn" ip -6 route add default via "$(gw_pod6_ip "$i")"
    in_ns "$nn" ip -6 addr add "$(gw_pod6_ip "$i")/64" dev pod0 nodad
    in_ns "$nn" sysctl -qw net.ipv6.conf.all.forwarding=1
  fi
  # the pod's resolver is its cluster's gateway meshd (ip netns exec bind-mounts this file)
  mkdir -p "/etc/netns/$(ns "$pn")"
  echo "nameserver $(gw_pod_ip "$i")" >"/etc/netns/$(ns "$pn")/resolv.conf"
  # kindnet's masquerade: pod traffic leaving the pod CIDR takes the node's address
  in_ns "$nn" iptables -t nat -A POSTROUTING -s "$(pod_cidr "$i")" ! -d "$(pod_cidr "$i")" -j MASQUERADE
}

# Cluster i's nodes on one bridge (in a namespace of its own), each node's pod /24 routed to it.
cluster_network() {
  local i=$1 n; n=$(nodes_of "$1")
  ip netns add "$(ns "m${i}sw")"
  in_ns "m${i}sw" ip link add br0 type bridge
  in_ns "m${i}sw" ip link set br0 up
  for k in $(seq "$n"); do
    local nn; nn=$(node_ns "$i" "$k")
    ip link add "${P}m${i}e$k" netns "$(ns "$nn")" type veth peer name "${P}m${i}s$k" netns "$(ns "m${i}sw")"
    in_ns "m${i}sw" ip link set "${P}m${i}s$k" master br0 up
    in_ns "$nn" ip link set "${P}m${i}e$k" name eth0
    in_ns "$nn" ip addr add "$(node_ip "$i" "$k")/24" dev eth0
    in_ns "$nn" ip link set eth0 up
  done
  for k in $(seq "$n"); do
    for j in $(seq "$n"); do
      [ "$j" = "$k" ] && continue
      in_ns "$(node_ns "$i" "$k")" ip route add "10.$(pod_octet "$i").$j.0/24" via "$(node_ip "$i" "$j")"
    done
    # the service CIDR: kube-proxy's stand-in is the gateway node's route to its pod
    [ "$k" = 1 ] || in_ns "$(node_ns "$i" "$k")" ip route add "$(svc_cidr "$i")" via "$(node_ip "$i" 1)"
  done
}

topology() {
  for i in 1 2; do
    for k in $(seq "$(nodes_of "$i")"); do make_node "$i" "$k"; done
    [ "$(nodes_of "$i")" = 1 ] || cluster_network "$i"
    # the cluster's service IPs live on its gateway's pod (as kube-proxy would send them there)
    for svc in $(svc_ips "$i"); do in_ns "m${i}pod" ip addr add "$svc/32" dev lo; done
    in_ns "m${i}gw" ip route add "$(svc_cidr "$i")" via "$(pod_ip "$i")"
  done
  if [ "$N2" != 1 ]; then
    # M2's hello is served by the pod of its last node
    local host; host=$(node_ns 2 "$N2")
    in_ns "$(last_pod_ns 2)" ip addr add "$(hello_ip)/32" dev lo
    in_ns "$host" ip route add "$(hello_ip)/32" via "$(last_pod_ip 2)"
    in_ns m2gw ip route add "$(hello_ip)/32" via "$(node_ip 2 "$N2")"
  fi
  if [ "$HA" = 1 ]; then
    ha_underlay
    return
  fi
  # the underlay between the gateways
  ip link add "${P}ul1" netns "$(ns m1gw)" type veth peer name "${P}ul2" netns "$(ns m2gw)"
  for i in 1 2; do
    in_ns "m${i}gw" ip link set "${P}ul$i" name ul0
    in_ns "m${i}gw" ip addr add "$(underlay_ip "$i")/24" dev ul0
    in_ns "m${i}gw" ip -6 addr add "$(underlay6_ip "$i")/64" dev ul0 nodad
    in_ns "m${i}gw" ip link set ul0 up
  done
}

# --ha: the underlay is a switch; both gateways and M1's second node (a second candidate) on it.
ha_underlay() {
  ip netns add "$(ns ulsw)"
  in_ns ulsw ip link add br0 type bridge
  in_ns ulsw ip link set br0 up
  local node address n=0
  for node in m1gw:"$(underlay_ip 1)" m2gw:"$(underlay_ip 2)" m1n2:192.0.2.12; do
    address=${node#*:} node=${node%%:*} n=$((n + 1))
    ip link add "${P}ul$n" netns "$(ns "$node")" type veth peer name "${P}us$n" netns "$(ns ulsw)"
    in_ns ulsw ip link set "${P}us$n" master br0 up
    in_ns "$node" ip link set "${P}ul$n" name ul0
    in_ns "$node" ip addr add "$address/24" dev ul0
    in_ns "$node" ip link set ul0 up
  done
}

# What an operator adds by hand for an implementation that is not meshd: routes from the other
# nodes to the gateway, and exceptions to the masquerade rule for the other cluster's CIDRs.
operator_routes() {
  local i=$1 o; o=$(other "$1")
  for k in $(seq "$(nodes_of "$i")"); do
    local nn; nn=$(node_ns "$i" "$k")
    for remote in "$(pod_cidr "$o")" "$(svc_cidr "$o")"; do
      in_ns "$nn" iptables -t nat -I POSTROUTING 1 -s "$(pod_cidr "$i")" -d "$remote" -j RETURN
      [ "$k" = 1 ] || in_ns "$nn" ip route add "$remote" via "$(node_ip "$i" 1)"
    done
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
endpoints = [{ ip = "$(last_pod_ip 2)" }]
EXPORTS
  fi
}

# Each pod serves "hello from mI" (the gateway's) or "hello from mInK" over HTTP on port 80
# (all its addresses).
web_servers() {
  local i k pn name
  for i in 1 2; do
    for k in $(seq "$(nodes_of "$i")"); do
      pn=$(pod_ns "$i" "$k") name=m$i; [ "$k" = 1 ] || name=m${i}n$k
      mkdir -p "$state/www-$pn"
      echo "hello from $name" >"$state/www-$pn/index.html"
      in_ns "$pn" python3 -m http.server 80 --bind 0.0.0.0 --directory "$state/www-$pn" >"$state/www-$pn.log" 2>&1 &
    done
  done
  for i in 1 2; do
    for k in $(seq "$(nodes_of "$i")"); do
      pn=$(pod_ns "$i" "$k")
      for _ in $(seq 100); do
        [ -n "$(in_ns "$pn" ss -Hltn 'sport = :80')" ] && continue 2
        sleep 0.1
      done
      log "the web server in $pn did not start; its log:"; cat "$state/www-$pn.log" >&2; return 1
    done
  done
}

meshd_config() {
  local i=$1 o endpoint keepalive="" gateway="" globals="" allowed=""; o=$(other "$1")
  if [ "$OVERLAP" = 1 ]; then globals="global_cidrs = [$(global_cidrs_of "$i")]"; fi
  for net in $(remote_cidrs "$o") "$(tunnel_ip "$o")/32"; do allowed="$allowed${allowed:+, }\"$net\""; done
  # Several nodes: every node reads this file; the one with this address is the gateway.
  [ "$(nodes_of "$i")" = 1 ] || gateway="gateway_address = \"$(node_ip "$i" 1)\"
route_mode = \"$ROUTE_MODE\""
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
batch_scheduling = $BATCH
tx_threads = $TX_THREADS
exports_file = "$state/m$i.exports.toml"
dns_listen = "$(gw_pod_ip "$i"):53"
admin_socket = "$state/m$i.admin.sock"
$gateway
$globals

[[peers]]
name = "m$o"
public_key = "$(cat "$state/m$o.pub")"
$endpoint
allowed_cidrs = [$allowed]
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

# meshd as route agent on every other node of cluster i, from the gateway's configuration file.
start_agents() {
  local i=$1 bin=$2 k nn
  for k in $(seq 2 "$(nodes_of "$i")"); do
    nn=$(node_ns "$i" "$k")
    ip netns exec "$(ns "$nn")" "$bin/meshd" --config "$state/m$i.toml" \
      --admin-socket "$state/$nn.admin.sock" >"$state/$nn.log" 2>&1 &
    echo $! >"$state/$nn.pid"
  done
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

# The first ping from pod $2 (namespace) to $3 that passes, within 20 s; a meshd that exited
# fails it at once, with its log.
wait_for_ping() {
  local what=$1 from=$2 to=$3 f
  for _ in $(seq 100); do
    if in_ns "$from" ping -c1 -W1 "$to" >/dev/null 2>&1; then return 0; fi
    for f in "$state"/*.pid; do
      [ -f "$f" ] || continue
      if ! kill -0 "$(cat "$f")" 2>/dev/null; then
        local who; who=$(basename "$f" .pid)
        log "the process behind $f exited; its log:"
        cat "$state/$who.log" >&2; return 1
      fi
    done
    sleep 0.2
  done
  log "no $what after 20 s ($from -> $to); logs:"
  tail -n 20 "$state"/*.log >&2 || true
  return 1
}

wait_for_tunnel() {
  wait_for_ping "traffic across the tunnel" m1pod "$(reach 2 "$(pod_ip 2)")"
  if [ "$N1" != 1 ] || [ "$N2" != 1 ]; then
    wait_for_ping "traffic between non-gateway nodes' pods" "$(last_pod_ns 1)" "$(reach 2 "$(last_pod_ip 2)")"
  fi
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
    operator_routes 1
    operator_routes 2
  else
    keys
    for i in 1 2; do
      case "$(impl_of "$i")" in
        meshd) if [ -n "$FROM_IMAGE" ]; then start_meshd_container "$i"; else start_meshd "$i" "$bin"; start_agents "$i" "$bin"; fi ;;
        *) start_userspace "$i" "$(impl_of "$i")" "$bin"; operator_routes "$i" ;;
      esac
    done
  fi
  web_servers
  wait_for_tunnel
  if [ -n "$FROM_IMAGE" ]; then probes_pass 1; probes_pass 2; fi
  log "lab up: m1 ($M1, $N1 node(s)) <-> m2 ($M2, $N2 node(s)$([ "$NAT" = 1 ] && echo ', behind NAT')); state in $state"
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
  # From a pod on M1's last node to one on M2's last node: with several nodes, neither is the
  # gateway's, so the traffic crosses the route agents, the masquerade bypass and both gateways.
  local a b an bn
  a=$(last_pod_ns 1) b=$(last_pod_ns 2) an=$(reach 1 "$(last_pod_ip 1)") bn=$(reach 2 "$(last_pod_ip 2)")
  if [ "$OVERLAP" = 1 ]; then
    echo
    echo "== overlapping clusters: both use $(pod_cidr 1) and $(svc_cidr 1); $a is $(last_pod_ip 1) in M1, $an to M2; $b is $(last_pod_ip 2) in M2, $bn to M1"
  fi
  echo
  echo "== ping $a ($an) -> $b ($bn) and back"
  in_ns "$a" ping -c 3 -i 0.2 "$bn"
  in_ns "$b" ping -c 3 -i 0.2 "$an"
  echo
  echo "== iperf3 TCP $a -> $b (5 s)"
  in_ns "$b" iperf3 -s -1 -D
  sleep 0.3
  in_ns "$a" iperf3 -c "$bn" -t 5 -f m | tail -4
  echo
  echo "== iperf3 TCP $b -> $a (5 s)"
  in_ns "$a" iperf3 -s -1 -D
  sleep 0.3
  in_ns "$b" iperf3 -c "$an" -t 5 -f m | tail -4
  echo
  echo "== wg show (standard WireGuard tooling against meshd)"
  status
  if [ "$M1" = meshd ] && [ "$M2" = meshd ]; then
    local name=hello.demo.svc.clusterset.local answer=""
    echo
    echo "== clusterset.local DNS: $a asks M1's meshd for $name (exported by M2 only)"
    for _ in $(seq 100); do
      answer=$(in_ns "$a" dig +short +time=1 +tries=1 @"$(gw_pod_ip 1)" "$name" A) && [ -n "$answer" ] && break
      sleep 0.2
    done
    [ -n "$answer" ] || { log "M1's meshd never learned $name from M2; logs:"; cat "$state"/m*.log >&2; exit 1; }
    in_ns "$a" dig +noall +answer @"$(gw_pod_ip 1)" "$name" A
    echo
    echo "== curl http://$name/ from $a (its resolver is M1's meshd; M2's $b serves it)"
    in_ns "$a" curl -sS --max-time 5 "http://$name/"
    [ "$OVERLAP" = 1 ] && overlap_demo "$a" "$b" "$an" "$bn"
    echo
    echo "== meshctl peers on M1's gateway"
    if [ -n "$FROM_IMAGE" ]; then
      podman exec "$(container 1)" meshctl peers
    elif [ "$OVERLAP" = 1 ]; then
      meshctl peers -o wide --socket "$state/m1.admin.sock"
    else
      meshctl peers --socket "$state/m1.admin.sock"
    fi
    if [ "$N1" != 1 ]; then
      echo
      echo "== meshctl peers on $(node_ns 1 "$N1") (a route agent)"
      meshctl peers --socket "$state/$(node_ns 1 "$N1").admin.sock"
    fi
  fi
  echo
  if [ "$OVERLAP" = 1 ]; then
    echo "lab demo passed: pods of two clusters that both use $(pod_cidr 1) reach each other through meshd's translation"
  else
    echo "lab demo passed: pods in $(pod_cidr 1) and $(pod_cidr 2) reach each other through meshd"
  fi
}

# --overlap: what crosses only if translation is right, from pod a (M1) to pod b (M2) and back.
overlap_demo() {
  local a=$1 b=$2 an=$3 bn=$4 target out sum_there sum_back
  echo
  echo "== byte-exact bulk transfer: 32 MiB each way over HTTP, sha256 compared"
  head -c 33554432 /dev/urandom >"$state/www-$b/bulk.bin"
  cp "$state/www-$b/bulk.bin" "$state/www-$a/bulk.bin"
  sum_there=$(in_ns "$a" curl -sS --max-time 60 "http://$bn/bulk.bin" | sha256sum | cut -d' ' -f1)
  sum_back=$(in_ns "$b" curl -sS --max-time 60 "http://$an/bulk.bin" | sha256sum | cut -d' ' -f1)
  local want; want=$(sha256sum <"$state/www-$b/bulk.bin" | cut -d' ' -f1)
  echo "sent $want; $a got $sum_there; $b got $sum_back"
  [ "$sum_there" = "$want" ] && [ "$sum_back" = "$want" ] || { log "bulk transfer corrupted"; return 1; }
  echo
  echo "== UDP exchange: $a -> $b:7000, the reply says whom $b saw"
  in_ns "$b" python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7000))
for _ in range(20):
    data, peer = s.recvfrom(100)
    s.sendto(data + b" seen by m2 from " + peer[0].encode(), peer)' &
  local server=$!
  out=$(in_ns "$a" python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(20):
    s.sendto(b"hello from m1", (sys.argv[1], 7000))
    try:
        print(s.recvfrom(100)[0].decode()); break
    except socket.timeout:
        pass' "$bn")
  kill "$server" 2>/dev/null || true
  echo "$out"
  [ "$out" = "hello from m1 seen by m2 from $an" ] || { log "UDP exchange: expected the reply to name $an"; return 1; }
  echo
  echo "== IPv6: m1pod ($(reach 1 "$(pod6_ip 1)")) -> m2pod ($(reach 2 "$(pod6_ip 2)")), both fd00:244::10 at home"
  in_ns m1pod ping -6 -c 2 -i 0.2 "$(reach 2 "$(pod6_ip 2)")" | grep -E "bytes from|packet loss"
  # M2's gateway pod behind a 1380-byte link: the frag-needed its node sends comes back through
  # both translations, and the caller's next packets fit.
  target=$(reach 2 "$(pod_ip 2)")
  echo
  echo "== ping -M do from $a to $target (M2's gateway pod, its link narrowed to 1380 bytes)"
  in_ns m2gw ip link set pod0 mtu 1380
  out=$(in_ns "$a" ping -M do -c 1 -W 2 -s 1392 "$target" 2>&1 || true)
  echo "$out" | grep -E "mtu|bytes from" || true
  echo "$out" | grep -q "mtu = 1380" || { in_ns m2gw ip link set pod0 mtu 1500; log "no frag-needed with mtu 1380 reached $a:"; echo "$out" >&2; return 1; }
  in_ns "$a" ping -M do -c 2 -i 0.2 -s 1352 "$target" | grep -E "bytes from|packet loss"
  in_ns m2gw ip link set pod0 mtu 1500
  echo
  echo "== traceroute from $a to $target"
  out=$(in_ns "$a" traceroute -n -q 1 -w 1 "$target")
  echo "$out"
  echo "$out" | tail -1 | grep -q " $target " || { log "traceroute did not reach $target"; return 1; }
  echo "$out" | grep -q " $(tunnel_ip 2) " || { log "traceroute did not show M2's gateway ($(tunnel_ip 2))"; return 1; }
  echo
  echo "== meshctl exports on M1's gateway: its own services at local addresses, M2's at global ones"
  meshctl exports --socket "$state/m1.admin.sock"
  echo
  echo "== packets translated (M1's gateway, /metrics)"
  in_ns m1gw curl -sS --max-time 2 http://127.0.0.1:9090/metrics | grep '^meshd_translated_packets_total'
}

case "$action" in
  up) up ;;
  down) down; log "lab down" ;;
  demo) demo ;;
  status) status ;;
  *) sed -n '2,46p' "$0" >&2; exit 2 ;;
esac
