//! `meshctl diagnose` and `meshctl resolve`: the checks, the DNS question, the explanation.
//!
//! The checks are pure functions of what meshctl gathered ([`Gathered`]: the admin API's answers,
//! the kernel's routes, a DNS answer, a `/metrics` scrape), so each can be tested alone; the
//! gathering is the small I/O part at the bottom. Every failing check says what to do.

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;
use meshd::admin::api::{ExportsResponse, PeerState, PeerView, StatusView, REJECT_AFTER_TIME};
use meshd::config::{check_overlaps, TUNNEL_OVERHEAD};
use meshd::discovery::catalog::{ClustersetView, ServiceType};
use meshd::node::{NodeView, Role};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

/// A catalog sync answer older than this is stale (a live peer answers every 20 s).
pub const SYNC_FRESH: Duration = Duration::from_secs(60);
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not applicable here (e.g. the DNS responder is off).
    Skip,
}

/// One line of the report: the check, its outcome, what was seen, and the fix when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    pub fix: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Pass,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn skip(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Skip,
        detail: detail.into(),
        fix: None,
    }
}

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct Gathered {
    pub status: StatusView,
    pub peers: Vec<PeerView>,
    pub exports: ExportsResponse,
    /// Kernel routes: (interface, prefix), or why they could not be read.
    pub routes: Result<Vec<(String, IpNet)>, String>,
    /// The answer to `dns-version.clusterset.local TXT`, or why there is none; `None`: DNS off.
    pub dns: Option<Result<DnsAnswer, String>>,
    /// A `/metrics` scrape, or why it failed; `None`: metrics off.
    pub metrics: Option<Result<String, String>>,
    /// Unix time now.
    pub now: u64,
}

/// Runs every check, in the order the report prints them.
pub fn run_checks(g: &Gathered) -> Vec<Check> {
    vec![
        admin(g),
        overlaps(g),
        mtu(g),
        handshakes(g),
        routes(g),
        dns(g),
        catalog_sync(g),
        metrics(g),
    ]
}

fn admin(g: &Gathered) -> Check {
    if g.status.health.live && g.status.health.ready {
        pass(
            "admin",
            format!(
                "meshd {} on {} answers; dataplane live, routes programmed",
                g.status.version, g.status.interface
            ),
        )
    } else {
        fail(
            "admin",
            format!("meshd answers but reports health {:?}", g.status.health),
            "a dataplane thread stopped or routes are not programmed: read meshd's log and restart it",
        )
    }
}

fn overlaps(g: &Gathered) -> Check {
    let mut owned: Vec<(String, IpNet)> = g
        .status
        .local_cidrs
        .iter()
        .map(|c| (format!("local cluster '{}'", g.status.cluster), *c))
        .collect();
    for p in &g.peers {
        owned.extend(
            p.allowed_cidrs
                .iter()
                .map(|c| (format!("peer '{}'", p.name), *c)),
        );
    }
    if let Err(overlap) = check_overlaps(&owned) {
        return fail(
            "cidr-overlap",
            overlap.to_string(),
            "pod and service CIDRs of joined clusters must not overlap: fix the peers' allowed_cidrs or local_cidrs (meshd refuses such a configuration at start; a peer added with `wg set` is not checked)",
        );
    }
    pass("cidr-overlap", format!("{} CIDRs, no overlap", owned.len()))
}

fn mtu(g: &Gathered) -> Check {
    let need = u32::from(g.status.mtu) + u32::from(TUNNEL_OVERHEAD);
    let narrow: Vec<String> = g
        .peers
        .iter()
        .filter(|p| p.mtu < g.status.mtu)
        .map(|p| format!("{} ({})", p.name, p.mtu))
        .collect();
    let smallest = g.peers.iter().map(|p| p.mtu).min().unwrap_or(g.status.mtu);
    if u32::from(g.status.underlay_mtu) < need {
        fail(
            "mtu",
            format!(
                "tunnel MTU {} + {TUNNEL_OVERHEAD} bytes of WireGuard overhead exceeds the underlay's {} ({}): larger packets get an ICMP too-big (or are fragmented), so each new destination first loses a packet to path MTU discovery",
                g.status.mtu, g.status.underlay_mtu, g.status.underlay
            ),
            format!(
                "set mtu = {} (or less) in meshd's config and restart it, or raise the underlay's MTU",
                g.status.underlay_mtu.saturating_sub(TUNNEL_OVERHEAD).min(smallest)
            ),
        )
    } else if !narrow.is_empty() {
        fail(
            "mtu",
            format!(
                "the route to {} carries smaller packets than the tunnel MTU {}: larger packets get an ICMP too-big (or are fragmented), so each new destination first loses a packet to path MTU discovery",
                narrow.join(", "),
                g.status.mtu
            ),
            format!("set mtu = {smallest} (or less) in meshd's config and restart it, or raise the MTU along the path"),
        )
    } else {
        pass(
            "mtu",
            format!(
                "tunnel MTU {} + {TUNNEL_OVERHEAD} fits the underlay's {} ({})",
                g.status.mtu, g.status.underlay_mtu, g.status.underlay
            ),
        )
    }
}

fn handshakes(g: &Gathered) -> Check {
    let bad: Vec<String> = g
        .peers
        .iter()
        .filter(|p| {
            p.status != PeerState::Up
                || p.last_handshake
                    .is_none_or(|t| g.now.saturating_sub(t) > REJECT_AFTER_TIME.as_secs())
        })
        .map(|p| format!("{} is {}: {}", p.name, p.status.as_str(), p.reason))
        .collect();
    if g.peers.is_empty() {
        skip("handshakes", "no peers configured")
    } else if bad.is_empty() {
        pass(
            "handshakes",
            format!("{} peer(s) up with a live session", g.peers.len()),
        )
    } else {
        fail(
            "handshakes",
            bad.join("; "),
            "check the peer's meshd is running, its endpoint is reachable over UDP (firewall, NAT: set persistent_keepalive on the side behind NAT) and both sides have each other's public key; see docs/troubleshooting.md",
        )
    }
}

fn routes(g: &Gathered) -> Check {
    let iface = &g.status.interface;
    let routes = match &g.routes {
        Ok(routes) => routes,
        Err(e) => return fail(
            "routes",
            format!("cannot read the kernel's routes: {e}"),
            "run meshctl diagnose in the node's network namespace (on the node, or in meshd's pod)"
                .to_string(),
        ),
    };
    let mut missing = Vec::new();
    for p in &g.peers {
        for cidr in &p.allowed_cidrs {
            let covered = routes
                .iter()
                .any(|(dev, net)| dev == iface && net.contains(cidr));
            if !covered {
                missing.push(format!("{cidr} (peer {})", p.name));
            }
        }
    }
    if missing.is_empty() {
        pass(
            "routes",
            format!("every peer CIDR is routed through {iface}"),
        )
    } else {
        fail(
            "routes",
            format!("no route through {iface} for {}", missing.join(", ")),
            format!("something removed meshd's routes: restart meshd (or `ip route add CIDR dev {iface}`), and look for another agent managing routes"),
        )
    }
}

fn dns(g: &Gathered) -> Check {
    match &g.dns {
        None => skip("dns", "the DNS responder is off (dns_listen = \"off\")"),
        Some(Ok(a)) if a.rcode == ResponseCode::NoError && a.records.iter().any(|r| r.contains("1.0.0")) => pass(
            "dns",
            format!("{} answers dns-version.clusterset.local", a.server),
        ),
        Some(Ok(a)) => fail(
            "dns",
            format!("{} answered {} {:?}", a.server, a.rcode, a.records),
            "the responder is not ready (SERVFAIL until the first catalog sync) or something else answers on dns_listen; read meshd's log",
        ),
        Some(Err(e)) => fail(
            "dns",
            e.clone(),
            "meshd's DNS responder does not answer: check dns_listen's address exists on this host and nothing blocks UDP 53 to it; read meshd's log",
        ),
    }
}

fn catalog_sync(g: &Gathered) -> Check {
    if g.exports.sync.is_empty() {
        return skip(
            "catalog-sync",
            "no peer has a tunnel_address: no catalogs are exchanged",
        );
    }
    let bad: Vec<String> = g
        .exports
        .sync
        .iter()
        .filter_map(|s| {
            let fresh = s
                .last_answer
                .is_some_and(|t| g.now.saturating_sub(t) <= SYNC_FRESH.as_secs());
            match (&s.last_error, fresh) {
                (Some(e), _) => Some(format!("{}: {e}", s.peer)),
                (None, false) => Some(format!(
                    "{}: no answer for over {}s",
                    s.peer,
                    SYNC_FRESH.as_secs()
                )),
                (None, true) => None,
            }
        })
        .collect();
    if bad.is_empty() {
        pass(
            "catalog-sync",
            format!("{} peer catalog(s) fresh", g.exports.sync.len()),
        )
    } else {
        fail(
            "catalog-sync",
            bad.join("; "),
            "the peer's meshd must be up and list this gateway's tunnel address as its peer's tunnel_address; both must use the same discovery_port",
        )
    }
}

fn metrics(g: &Gathered) -> Check {
    match &g.metrics {
        None => skip("metrics", "metrics are off (metrics_listen = \"off\")"),
        Some(Ok(body)) if body.contains("meshd_build_info") => pass(
            "metrics",
            format!(
                "/metrics on {} answers",
                g.status.metrics_listen.as_deref().unwrap_or("?")
            ),
        ),
        Some(Ok(_)) => fail(
            "metrics",
            "/metrics answered without meshd's metrics",
            "another program answers on metrics_listen: give meshd a free address",
        ),
        Some(Err(e)) => fail(
            "metrics",
            e.clone(),
            "meshd's /metrics does not answer: check metrics_listen and that nothing blocks it",
        ),
    }
}

/// A DNS answer, as `meshctl resolve` and the `dns` check need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub server: SocketAddr,
    pub rcode: ResponseCode,
    /// Answer records in presentation form: `name TTL type data`.
    pub records: Vec<String>,
}

/// Where to reach a listen address that meshd reports for `setting` (`dns_listen`,
/// `metrics_listen`): a wildcard address means loopback.
pub fn listen_target(setting: &str, listen: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| format!("meshd reports {setting} '{listen}', which is not ip:port"))?;
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    })
}

/// Asks `server` one question over UDP.
pub fn ask_dns(server: SocketAddr, name: &str, qtype: RecordType) -> Result<DnsAnswer, String> {
    let qname = Name::from_str(name).map_err(|e| format!("'{name}' is not a DNS name: {e}"))?;
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.add_query(Query::query(qname, qtype));
    let bytes = msg
        .to_vec()
        .map_err(|e| format!("cannot encode the question: {e}"))?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket
        .set_read_timeout(Some(DNS_TIMEOUT))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(&bytes, server)
        .map_err(|e| format!("cannot send a DNS question to {server}: {e}"))?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).map_err(|e| {
        format!(
            "no DNS answer from {server} within {}s: {e}",
            DNS_TIMEOUT.as_secs()
        )
    })?;
    let reply = Message::from_vec(&buf[..n])
        .map_err(|e| format!("{server} answered something that is not DNS: {e}"))?;
    Ok(DnsAnswer {
        server,
        rcode: reply.metadata.response_code,
        records: reply
            .answers
            .iter()
            .map(|r| format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data))
            .collect(),
    })
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    u16::from_be_bytes(b)
}

/// `GET /metrics` from `addr` (a wildcard address means loopback).
pub fn scrape(listen: &str) -> Result<String, String> {
    let addr = listen_target("metrics_listen", listen)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an I/O runtime: {e}"))?;
    let answer = runtime.block_on(async {
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("cannot connect to /metrics on {addr}: timed out"))?
                .map_err(|e| format!("cannot connect to /metrics on {addr}: {e}"))?;
        meshd::http::client::get(
            stream,
            &addr.to_string(),
            "/metrics",
            &[],
            MAX_METRICS_BYTES,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| format!("no usable answer from /metrics on {addr}: {e}"))
    })?;
    match answer.status {
        200 => Ok(String::from_utf8_lossy(&answer.body).into_owned()),
        code => Err(format!("/metrics on {addr} answered {code}")),
    }
}

/// What the node checks look at, on any node: meshd's view of its node, and the kernel's.
#[derive(Debug, Clone)]
pub struct NodeGathered {
    pub node: NodeView,
    /// Kernel routes: (interface, prefix), or why they could not be read.
    pub routes: Result<Vec<(String, IpNet)>, String>,
    /// `nft list table inet meshd` now: `Ok(None)` when there is no such table.
    pub bypass: Result<Option<String>, String>,
    /// `net.ipv4.conf.<interface>.rp_filter` as the kernel applies it (the larger of the
    /// interface's and `all`'s), per interface.
    pub rp_filter: BTreeMap<String, u8>,
}

/// The checks of this node's part, in the order the report prints them: its role, forwarding,
/// the masquerade bypass, and on a route agent its routes and the reverse-path filter.
pub fn run_node_checks(g: &NodeGathered) -> Vec<Check> {
    let mut checks = vec![role(g), forwarding(g), bypass(g)];
    if g.node.role == Role::RouteAgent {
        checks.push(agent_routes(g));
        checks.push(rp_filter(g));
    }
    checks
}

fn role(g: &NodeGathered) -> Check {
    match (g.node.role, g.node.gateway) {
        (Role::Gateway, Some(address)) => {
            pass("node", format!("the gateway ({address}, this node)"))
        }
        (Role::Gateway, None) => pass(
            "node",
            "the gateway (no gateway_address: the only node meshd runs on)",
        ),
        (Role::RouteAgent, Some(address)) => {
            pass("node", format!("route agent; the gateway is {address}"))
        }
        (Role::RouteAgent, None) => fail(
            "node",
            "route agent without a gateway",
            "set gateway_address, or label the gateway node meshd.io/gateway=true",
        ),
    }
}

fn forwarding(g: &NodeGathered) -> Check {
    if g.node.forwarding {
        pass("forwarding", "net.ipv4.ip_forward = 1")
    } else {
        fail(
            "forwarding",
            "net.ipv4.ip_forward = 0: this node does not route pod traffic to or from the other clusters",
            "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d/ to keep it)",
        )
    }
}

fn bypass(g: &NodeGathered) -> Check {
    if !g.node.masquerade_bypass.enabled {
        return skip(
            "bypass",
            "masquerade_bypass = false: meshd leaves the CNI's masquerading alone",
        );
    }
    match &g.bypass {
        Ok(Some(table)) if table.contains("snat ip to ip saddr") => pass(
            "bypass",
            format!(
                "table inet meshd keeps cross-cluster sources (written again {} times since start)",
                g.node.masquerade_bypass.restored
            ),
        ),
        Ok(_) => fail(
            "bypass",
            format!(
                "no masquerade bypass (nft list table inet meshd): the CNI rewrites pod sources to this node's address and the other cluster drops them as bad_source{}",
                g.node.masquerade_bypass.error.as_deref().map(|e| format!("; meshd says: {e}")).unwrap_or_default()
            ),
            "meshd writes it back within 3 s when it runs; if it stays missing, read meshd's log (is nft installed? does the kernel have nf_tables NAT?)",
        ),
        Err(e) => fail("bypass", format!("cannot read the nftables ruleset: {e}"), "run meshctl diagnose as root on the node (or in meshd's pod, which has nft)"),
    }
}

/// The interface of the longest-prefix route to `ip`.
fn route_dev(routes: &[(String, IpNet)], ip: IpAddr) -> Option<&str> {
    routes
        .iter()
        .filter(|(_, net)| net.contains(&ip))
        .max_by_key(|(_, net)| net.prefix_len())
        .map(|(dev, _)| dev.as_str())
}

fn agent_routes(g: &NodeGathered) -> Check {
    let Some(gateway) = g.node.gateway else {
        return skip("routes", "no gateway to route to");
    };
    let routes = match &g.routes {
        Ok(routes) => routes,
        Err(e) => return fail(
            "routes",
            format!("cannot read the kernel's routes: {e}"),
            "run meshctl diagnose in the node's network namespace (on the node, or in meshd's pod)",
        ),
    };
    // The interface meshd's routes leave by: the one the gateway is on, or meshd-vx.
    let to_gateway = g
        .node
        .route_interface
        .as_deref()
        .or_else(|| route_dev(routes, gateway));
    let missing: Vec<String> = g
        .node
        .routes
        .iter()
        .filter(|r| {
            !routes
                .iter()
                .any(|(dev, net)| *net == r.prefix && Some(dev.as_str()) == to_gateway)
        })
        .map(|r| r.prefix.to_string())
        .collect();
    if missing.is_empty() {
        pass(
            "routes",
            format!(
                "{} remote CIDR(s) routed to the gateway {gateway} via {}",
                g.node.routes.len(),
                to_gateway.unwrap_or("?")
            ),
        )
    } else {
        fail(
            "routes",
            format!("no route to the gateway {gateway} for {}: pods on this node cannot reach those CIDRs", missing.join(", ")),
            "meshd puts its routes back within 3 s; if they stay missing, is the gateway on this node's network (ip route get GATEWAY shows no 'via')? read meshd's log",
        )
    }
}

fn rp_filter(g: &NodeGathered) -> Check {
    let (Some(gateway), Ok(routes)) = (g.node.gateway, &g.routes) else {
        return skip("rp_filter", "no gateway or no routes to look at");
    };
    let Some(inbound) = route_dev(routes, gateway) else {
        return fail(
            "rp_filter",
            format!("no route to the gateway {gateway}"),
            "this node must reach the gateway node's address: check its network",
        );
    };
    let strict = g.rp_filter.get(inbound).copied() == Some(1);
    let crossed: Vec<String> = g
        .node
        .routes
        .iter()
        .filter_map(|r| {
            let back = route_dev(routes, r.prefix.addr())?;
            (back != inbound).then(|| format!("{} (the route back leaves by {back})", r.prefix))
        })
        .collect();
    match (strict, crossed.is_empty()) {
        (true, false) => fail(
            "rp_filter",
            format!(
                "this node cannot reach the other clusters: their packets arrive from the gateway on {inbound}, but the routes back to {} do not leave by it, and rp_filter=1 on {inbound} drops them",
                crossed.join(", ")
            ),
            format!("sysctl -w net.ipv4.conf.{inbound}.rp_filter=2 (loose, on that interface only), or route the remote CIDRs to the gateway by {inbound}"),
        ),
        (false, false) => pass(
            "rp_filter",
            format!(
                "rp_filter={} on {inbound}: the other clusters' packets arrive there while the routes back leave by {}, which only strict filtering (1) would drop",
                g.rp_filter.get(inbound).copied().unwrap_or(0),
                g.node.route_interface.as_deref().unwrap_or("another interface")
            ),
        ),
        (_, true) => pass(
            "rp_filter",
            format!(
                "rp_filter={} on {inbound}: packets from the other clusters arrive where the routes back to them leave",
                g.rp_filter.get(inbound).copied().unwrap_or(0)
            ),
        ),
    }
}

/// The reverse-path filter the kernel applies on each interface: the larger of its own and
/// `all`'s setting.
pub fn rp_filters() -> BTreeMap<String, u8> {
    let read = |dev: &str| -> u8 {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let all = read("all");
    std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name != "all" && name != "default")
                .map(|name| {
                    let value = read(&name).max(all);
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The largest /metrics page read (meshd's is a few kilobytes per peer).
const MAX_METRICS_BYTES: usize = 16 << 20;

/// The kernel's routes (main table, IPv4 and IPv6) in this network namespace: (interface,
/// prefix).
pub fn kernel_routes() -> Result<Vec<(String, IpNet)>, String> {
    meshd::netlink::main_routes_blocking().map_err(|e| e.to_string())
}

/// What a `clusterset.local` name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameParts {
    pub namespace: String,
    pub service: String,
    /// The cluster a `<hostname>.<cluster>.<svc>...` name names.
    pub cluster: Option<String>,
    /// `<hostname>.<cluster>.<svc>...`: one headless endpoint.
    pub hostname: Option<String>,
    /// `_<port>._<proto>.<svc>...`: an SRV name.
    pub port: Option<(String, String)>,
}

/// Splits `[host.cluster.]svc.ns.svc.clusterset.local` or `_port._proto.svc.ns.svc...`
/// (`cluster.svc.ns.svc...` is no name: the MCS DNS specification says it must not be answered).
pub fn parse_name(name: &str) -> Option<NameParts> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = name.strip_suffix(".svc.clusterset.local")?;
    let labels: Vec<&str> = rest.split('.').collect();
    let (prefix, ns_svc) = labels.split_at(labels.len().checked_sub(2)?);
    let mut parts = NameParts {
        service: ns_svc[0].to_string(),
        namespace: ns_svc[1].to_string(),
        cluster: None,
        hostname: None,
        port: None,
    };
    match prefix {
        [] => {}
        [port, proto] if port.starts_with('_') && proto.starts_with('_') => {
            parts.port = Some((port[1..].to_string(), proto[1..].to_string()))
        }
        [host, cluster] => {
            parts.hostname = Some(host.to_string());
            parts.cluster = Some(cluster.to_string());
        }
        _ => return None,
    }
    Some(parts)
}

/// Explains, from the clusterset view, what meshd's answer for `name` is made of.
pub fn explain(view: &ClustersetView, name: &str) -> Vec<String> {
    if !view.loaded {
        return vec![
            "meshd has not finished its first catalog sync: it answers SERVFAIL until then".into(),
        ];
    }
    if name
        .trim_end_matches('.')
        .eq_ignore_ascii_case("dns-version.clusterset.local")
    {
        return vec!["the MCS DNS specification version meshd implements".into()];
    }
    let Some(parts) = parse_name(name) else {
        return vec![format!(
            "'{name}' is not a service name meshd knows the form of: <svc>.<ns>.svc.clusterset.local, <hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local or _<port>._<proto>.<svc>.<ns>.svc.clusterset.local (names outside clusterset.local are REFUSED; <cluster>.<svc>.<ns>.svc.clusterset.local is NXDOMAIN, as the MCS DNS specification asks)"
        )];
    };
    let mut lines = Vec::new();
    let mut exporters = 0;
    for entry in &view.clusters {
        let catalog = &entry.catalog;
        let Some(s) = catalog
            .services
            .iter()
            .find(|s| s.namespace == parts.namespace && s.name == parts.service)
        else {
            continue;
        };
        exporters += 1;
        let local = std::ptr::eq(entry, &view.clusters[0]);
        let ready = s.ready_endpoints().count();
        let what = match s.service_type {
            ServiceType::ClusterSetIP => format!(
                "ClusterSetIP {}",
                s.ips
                    .iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ServiceType::Headless => "Headless".to_string(),
        };
        let verdict = if parts
            .cluster
            .as_deref()
            .is_some_and(|c| c != catalog.cluster)
        {
            "not asked for (the name names another cluster)".to_string()
        } else if !entry.up {
            "left out: its gateway does not answer the health probe through the tunnel".to_string()
        } else if ready == 0 {
            "left out: no ready endpoints".to_string()
        } else {
            "in the answer".to_string()
        };
        lines.push(format!(
            "cluster {}{}: {what}, {ready} ready endpoint(s), generation {}: {verdict}",
            catalog.cluster,
            if local { " (local)" } else { "" },
            catalog.generation
        ));
    }
    if exporters == 0 {
        let mut others: Vec<String> = view
            .clusters
            .iter()
            .flat_map(|c| c.catalog.services.iter())
            .filter(|s| s.namespace == parts.namespace)
            .map(|s| s.name.clone())
            .collect();
        others.sort();
        others.dedup();
        lines.push(format!(
            "no cluster exports {}/{} (NXDOMAIN); exported in namespace {}: {}",
            parts.namespace,
            parts.service,
            parts.namespace,
            if others.is_empty() {
                "nothing".to_string()
            } else {
                others.join(", ")
            }
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd::admin::api::HealthView;
    use meshd::discovery::catalog::{ClusterEntry, Endpoint, ExportCatalog, ExportedService};
    use meshd::discovery::clusterset::SyncStatus;

    const NOW: u64 = 1_800_000_000;

    fn peer() -> PeerView {
        PeerView {
            name: "m2".into(),
            public_key: "k".into(),
            endpoint: Some("192.0.2.2:51820".into()),
            configured_endpoint: Some("192.0.2.2:51820".into()),
            endpoint_learned: false,
            status: PeerState::Up,
            reason: "fine".into(),
            last_handshake: Some(NOW - 10),
            rx_bytes: 1,
            tx_bytes: 1,
            rx_rate: 0,
            tx_rate: 0,
            handshake_rtt_ms: None,
            handshakes: 0,
            rtt_ms: Some(0.3),
            allowed_cidrs: vec![
                "10.245.0.0/16".parse().unwrap(),
                "100.64.0.2/32".parse().unwrap(),
            ],
            mtu: 1420,
        }
    }

    fn view() -> ClustersetView {
        let svc = |ip: &str, ep: &str| ExportedService {
            namespace: "demo".into(),
            name: "web".into(),
            service_type: ServiceType::ClusterSetIP,
            ips: vec![ip.parse().unwrap()],
            ports: vec![],
            exported_at: None,
            endpoints: vec![Endpoint {
                ip: ep.parse().unwrap(),
                hostname: None,
                ready: true,
            }],
            ..Default::default()
        };
        ClustersetView {
            loaded: true,
            clusters: vec![
                ClusterEntry {
                    up: true,
                    catalog: std::sync::Arc::new(ExportCatalog {
                        cluster: "m1".into(),
                        generation: 1,
                        services: vec![svc("10.96.0.10", "10.244.1.10")],
                    }),
                },
                ClusterEntry {
                    up: false,
                    catalog: std::sync::Arc::new(ExportCatalog {
                        cluster: "m2".into(),
                        generation: 3,
                        services: vec![svc("10.97.0.10", "10.245.1.10")],
                    }),
                },
            ],
        }
    }

    fn healthy() -> Gathered {
        Gathered {
            status: StatusView {
                cluster: "m1".into(),
                interface: "m1wg".into(),
                listen_port: 51820,
                public_key: None,
                version: "0.1.0".into(),
                health: HealthView {
                    live: true,
                    ready: true,
                },
                local_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                mtu: 1420,
                underlay_mtu: 1500,
                underlay: "interface ul0".into(),
                dns_listen: Some("10.244.1.1:53".into()),
                metrics_listen: Some("0.0.0.0:9090".into()),
            },
            peers: vec![peer()],
            exports: ExportsResponse {
                conflicts: vec![],
                view: view(),
                sync: vec![SyncStatus {
                    peer: "m2".into(),
                    generation: Some(3),
                    services: 1,
                    reachable: true,
                    last_answer: Some(NOW - 5),
                    last_error: None,
                }],
            },
            routes: Ok(vec![
                ("m1wg".into(), "10.245.0.0/16".parse().unwrap()),
                ("m1wg".into(), "100.64.0.0/24".parse().unwrap()),
            ]),
            dns: Some(Ok(DnsAnswer {
                server: "10.244.1.1:53".parse().unwrap(),
                rcode: ResponseCode::NoError,
                records: vec!["dns-version.clusterset.local. 5 TXT \"1.0.0\"".into()],
            })),
            metrics: Some(Ok("meshd_build_info{version=\"0.1.0\"} 1".into())),
            now: NOW,
        }
    }

    fn outcome(g: &Gathered, name: &str) -> Outcome {
        run_checks(g)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .outcome
    }

    fn healthy_agent() -> NodeGathered {
        let gw: IpAddr = "172.18.1.1".parse().unwrap();
        let mut node = NodeView::new(Role::RouteAgent, Some(gw), true);
        node.forwarding = true;
        node.masquerade_bypass.in_place = true;
        node.routes.push(meshd::node::RouteView {
            prefix: "10.245.0.0/16".parse().unwrap(),
            via: gw,
            in_place: true,
        });
        NodeGathered {
            node,
            routes: Ok(vec![
                ("eth0".into(), "172.18.1.0/24".parse().unwrap()),
                ("eth0".into(), "10.245.0.0/16".parse().unwrap()),
                ("pod0".into(), "10.244.3.0/24".parse().unwrap()),
            ]),
            bypass: Ok(Some(
                "table inet meshd {\n ip saddr @local4 ip daddr @remote4 snat ip to ip saddr\n}"
                    .into(),
            )),
            rp_filter: [("eth0".to_string(), 1), ("pod0".to_string(), 1)].into(),
        }
    }

    fn node_outcome(g: &NodeGathered, name: &str) -> (Outcome, String) {
        let c = run_node_checks(g)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap();
        (
            c.outcome,
            format!("{} / fix: {}", c.detail, c.fix.unwrap_or_default()),
        )
    }

    #[test]
    fn a_healthy_route_agent_passes_every_node_check() {
        let checks = run_node_checks(&healthy_agent());
        assert_eq!(
            checks.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["node", "forwarding", "bypass", "routes", "rp_filter"]
        );
        for c in checks {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
    }

    #[test]
    fn each_node_fault_fails_its_check_with_the_fix() {
        let mut g = healthy_agent();
        g.node.forwarding = false;
        let (o, text) = node_outcome(&g, "forwarding");
        assert_eq!(o, Outcome::Fail);
        assert!(text.contains("sysctl -w net.ipv4.ip_forward=1"), "{text}");

        let mut g = healthy_agent();
        g.bypass = Ok(None);
        g.node.masquerade_bypass.error = Some("cannot run nft".into());
        let (o, text) = node_outcome(&g, "bypass");
        assert_eq!(o, Outcome::Fail);
        assert!(
            text.contains("bad_source") && text.contains("cannot run nft"),
            "{text}"
        );
        g.node.masquerade_bypass.enabled = false;
        assert_eq!(node_outcome(&g, "bypass").0, Outcome::Skip);

        let mut g = healthy_agent();
        g.routes
            .as_mut()
            .unwrap()
            .retain(|(_, net)| net.to_string() != "10.245.0.0/16");
        let (o, text) = node_outcome(&g, "routes");
        assert_eq!(o, Outcome::Fail);
        assert!(text.contains("10.245.0.0/16"), "{text}");

        // The remote CIDRs routed out of another interface than the one the gateway is on:
        // strict rp_filter there drops the answers.
        let mut g = healthy_agent();
        g.routes = Ok(vec![
            ("eth0".into(), "172.18.1.0/24".parse().unwrap()),
            ("vx0".into(), "10.245.0.0/16".parse().unwrap()),
        ]);
        let (o, text) = node_outcome(&g, "rp_filter");
        assert_eq!(o, Outcome::Fail);
        assert!(
            text.contains("rp_filter=1 on eth0")
                && text.contains("sysctl -w net.ipv4.conf.eth0.rp_filter=2"),
            "{text}"
        );
        g.rp_filter.insert("eth0".into(), 2);
        assert_eq!(node_outcome(&g, "rp_filter").0, Outcome::Pass);

        // A gateway has no agent checks.
        let mut g = healthy_agent();
        g.node.role = Role::Gateway;
        assert_eq!(run_node_checks(&g).len(), 3);
    }

    #[test]
    fn a_healthy_gateway_passes_everything() {
        for c in run_checks(&healthy()) {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
    }

    #[test]
    fn each_fault_fails_its_check() {
        let mut g = healthy();
        g.peers[0]
            .allowed_cidrs
            .push("10.244.5.0/24".parse().unwrap());
        assert_eq!(outcome(&g, "cidr-overlap"), Outcome::Fail);

        let mut g = healthy();
        g.status.underlay_mtu = 1400;
        assert_eq!(outcome(&g, "mtu"), Outcome::Fail);

        let mut g = healthy();
        g.peers[0].mtu = 1340;
        let check = run_checks(&g)
            .into_iter()
            .find(|c| c.name == "mtu")
            .unwrap();
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.detail.contains("m2 (1340)"), "{check:?}");
        assert!(
            check
                .fix
                .as_deref()
                .unwrap_or("")
                .contains("set mtu = 1340"),
            "{check:?}"
        );

        let mut g = healthy();
        g.peers[0].status = PeerState::Down;
        assert_eq!(outcome(&g, "handshakes"), Outcome::Fail);
        let mut g = healthy();
        g.peers[0].last_handshake = Some(NOW - 181);
        assert_eq!(outcome(&g, "handshakes"), Outcome::Fail);

        let mut g = healthy();
        g.routes = Err("netlink: permission denied".into());
        assert_eq!(outcome(&g, "routes"), Outcome::Fail);
        let mut g = healthy();
        g.routes.as_mut().unwrap().remove(0);
        let c = run_checks(&g)
            .into_iter()
            .find(|c| c.name == "routes")
            .unwrap();
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("10.245.0.0/16 (peer m2)"), "{c:?}");

        let mut g = healthy();
        g.dns = Some(Err("no DNS answer".into()));
        assert_eq!(outcome(&g, "dns"), Outcome::Fail);
        g.dns = None;
        assert_eq!(outcome(&g, "dns"), Outcome::Skip);

        let mut g = healthy();
        g.exports.sync[0].last_answer = Some(NOW - 61);
        assert_eq!(outcome(&g, "catalog-sync"), Outcome::Fail);
        let mut g = healthy();
        g.exports.sync[0].last_error = Some("connection refused".into());
        assert_eq!(outcome(&g, "catalog-sync"), Outcome::Fail);

        let mut g = healthy();
        g.metrics = Some(Err("refused".into()));
        assert_eq!(outcome(&g, "metrics"), Outcome::Fail);

        let mut g = healthy();
        g.status.health.ready = false;
        assert_eq!(outcome(&g, "admin"), Outcome::Fail);
    }

    #[test]
    fn names_split_into_their_parts() {
        let p = parse_name("web.demo.svc.clusterset.local.").unwrap();
        assert_eq!((p.service.as_str(), p.namespace.as_str()), ("web", "demo"));
        let p = parse_name("db-0.m1.db.demo.svc.clusterset.local").unwrap();
        assert_eq!(p.hostname.as_deref(), Some("db-0"));
        assert_eq!(p.cluster.as_deref(), Some("m1"));
        let p = parse_name("_http._tcp.web.demo.svc.clusterset.local").unwrap();
        assert_eq!(p.port, Some(("http".into(), "tcp".into())));
        assert_eq!(parse_name("example.com"), None);
        assert_eq!(parse_name("m1.web.demo.svc.clusterset.local"), None);
        assert_eq!(parse_name("a.b.c.web.demo.svc.clusterset.local"), None);
    }

    #[test]
    fn explanations_name_the_clusters_and_why() {
        let lines = explain(&view(), "web.demo.svc.clusterset.local");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("cluster m1 (local): ClusterSetIP 10.96.0.10"),
            "{lines:?}"
        );
        assert!(lines[0].ends_with("in the answer"), "{lines:?}");
        assert!(
            lines[1].contains("does not answer the health probe"),
            "{lines:?}"
        );
        let lines = explain(&view(), "api.demo.svc.clusterset.local");
        assert_eq!(
            lines,
            vec!["no cluster exports demo/api (NXDOMAIN); exported in namespace demo: web"]
        );
    }
}
