//! meshd's configuration: a TOML file, every field also settable by flag or environment.
//!
//! Parse, don't validate: the file becomes a [`ConfigFile`] (serde, unknown fields refused), the
//! flags a [`ConfigArgs`] (clap), and one step, [`Config::load`], merges them and turns the result
//! into a checked [`Config`] that the rest of meshd trusts. Every error names the field (and the
//! peer) at fault and says what to do.

use crate::dataplane::translate::{GlobalCidr, Translation};
use crate::keys::{KeyError, PrivateKey, PublicKey};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Default UDP port, as for every WireGuard implementation.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default TUN interface name.
pub const DEFAULT_INTERFACE: &str = "meshd0";
/// WireGuard's worst-case overhead, over IPv6: 40 (IPv6) + 8 (UDP) + 32 (WireGuard header, tag).
pub const TUNNEL_OVERHEAD: u16 = crate::dataplane::pmtu::V6_OVERHEAD;
/// Default address of the Prometheus `/metrics` endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";
/// Default address of the liveness/readiness probes (`/healthz`, `/readyz`).
pub const DEFAULT_HEALTH_LISTEN: &str = "0.0.0.0:9091";
/// The most transmit threads (TUN queues) we start.
pub const MAX_TX_THREADS: usize = 64;
/// The smallest tunnel MTU we accept: IPv4's minimum reassembly size.
pub const MIN_MTU: u16 = 576;
/// Default address of the `clusterset.local` DNS responder (UDP and TCP).
pub const DEFAULT_DNS_LISTEN: &str = "0.0.0.0:53";
/// Port on the tunnel address for the catalog sync (TCP) and the health probe (UDP).
pub const DEFAULT_DISCOVERY_PORT: u16 = 51821;
/// The longest DNS TTL we accept, in seconds: answers must follow failovers quickly.
pub const MAX_DNS_TTL: u32 = 3600;

/// The TOML file, as written by a user. See docs/configuration.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub cluster: Option<String>,
    pub interface: Option<String>,
    pub private_key_file: Option<PathBuf>,
    pub listen_port: Option<u16>,
    #[serde(default)]
    pub local_cidrs: Vec<String>,
    #[serde(default)]
    pub deliver_cidrs: Vec<String>,
    /// `LOCAL=GLOBAL` pairs: the global range each local range stands as in the clusterset.
    #[serde(default)]
    pub global_cidrs: Vec<String>,
    pub tunnel_address: Option<String>,
    pub mtu: Option<u16>,
    pub metrics_listen: Option<String>,
    pub admin_socket: Option<PathBuf>,
    pub health_listen: Option<String>,
    pub offload: Option<bool>,
    pub batch_scheduling: Option<bool>,
    pub tx_threads: Option<usize>,
    pub exports_file: Option<PathBuf>,
    pub kubernetes: Option<bool>,
    pub dns_listen: Option<String>,
    pub dns_ttl: Option<u32>,
    pub dns_rate_limit: Option<u32>,
    pub discovery_port: Option<u16>,
    pub gateway_address: Option<String>,
    pub masquerade_bypass: Option<bool>,
    pub route_mode: Option<String>,
    pub lease_duration_seconds: Option<u64>,
    pub lease_renew_deadline_ms: Option<u64>,
    pub lease_retry_ms: Option<u64>,
    #[serde(default)]
    pub peers: Vec<PeerFile>,
}

/// One `[[peers]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    /// Several addresses the peer may be at (the other cluster's gateway candidates), tried in
    /// turn while handshakes go unanswered; instead of `endpoint`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    pub persistent_keepalive: Option<u16>,
    pub tunnel_address: Option<String>,
}

/// Flags and environment variables; each overrides the file's field of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (re-read on SIGHUP).
    #[arg(long, env = "MESHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of this cluster, shown to peers and in `meshctl peers`.
    #[arg(long, env = "MESHD_CLUSTER")]
    pub cluster: Option<String>,
    /// Name of the TUN interface (also names the UAPI socket /var/run/wireguard/NAME.sock).
    #[arg(long, env = "MESHD_INTERFACE")]
    pub interface: Option<String>,
    /// File holding the private key in base64, as `wg genkey` or `meshctl genkey` writes it.
    #[arg(long, env = "MESHD_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,
    /// UDP port for WireGuard [default: 51820].
    #[arg(long, env = "MESHD_LISTEN_PORT")]
    pub listen_port: Option<u16>,
    /// This cluster's CIDRs (pods, services); replaces the file's list. Repeat or comma-separate.
    #[arg(long = "local-cidr", env = "MESHD_LOCAL_CIDRS", value_delimiter = ',')]
    pub local_cidrs: Vec<String>,
    /// More destinations peers may reach through this gateway, beyond local_cidrs (e.g. a LAN
    /// range meant to be shared); replaces the file's list. Repeat or comma-separate.
    #[arg(
        long = "deliver-cidr",
        env = "MESHD_DELIVER_CIDRS",
        value_delimiter = ','
    )]
    pub deliver_cidrs: Vec<String>,
    /// LOCAL=GLOBAL: peers know the local range LOCAL (one of local_cidrs, or inside one) by the
    /// global range GLOBAL of the same size, translated statelessly in the dataplane (for
    /// clusters whose ranges overlap); replaces the file's list. Repeat or comma-separate.
    #[arg(
        long = "global-cidr",
        env = "MESHD_GLOBAL_CIDRS",
        value_delimiter = ','
    )]
    pub global_cidrs: Vec<String>,
    /// Address of this gateway inside the tunnel, with prefix (e.g. 100.64.0.1/24).
    #[arg(long, env = "MESHD_TUNNEL_ADDRESS")]
    pub tunnel_address: Option<String>,
    /// Tunnel MTU [default: underlay MTU - 80].
    #[arg(long, env = "MESHD_MTU")]
    pub mtu: Option<u16>,
    /// TUN offload (TSO super-packets in, coalesced writes out) [default: true].
    #[arg(long, env = "MESHD_OFFLOAD")]
    pub offload: Option<bool>,
    /// Packet threads under SCHED_BATCH: woken by traffic, they do not preempt the programs
    /// receiving it [default: true].
    #[arg(long, env = "MESHD_BATCH_SCHEDULING")]
    pub batch_scheduling: Option<bool>,
    /// Threads encrypting TUN → UDP, each on its own TUN queue [default: 1].
    #[arg(long, env = "MESHD_TX_THREADS")]
    pub tx_threads: Option<usize>,
    /// Address for Prometheus `/metrics` [default: 0.0.0.0:9090]; "off" disables it.
    #[arg(long, env = "MESHD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Unix socket of the admin API that `meshctl peers` reads (mode 0600) [default: /run/meshd/meshd.sock].
    #[arg(long, env = "MESHD_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Address for the `/healthz` and `/readyz` probes [default: 0.0.0.0:9091]; "off" disables them.
    #[arg(long, env = "MESHD_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// TOML file of the services this cluster exports (re-read on SIGHUP); see docs/dns.md.
    #[arg(long, env = "MESHD_EXPORTS_FILE")]
    pub exports_file: Option<PathBuf>,
    /// Take this cluster's exports from the Kubernetes API (ServiceExport, Service, EndpointSlice;
    /// in-cluster config or KUBECONFIG) [default: false]; excludes --exports-file. See docs/kubernetes.md.
    #[arg(long, env = "MESHD_KUBERNETES", num_args = 0..=1, default_missing_value = "true")]
    pub kubernetes: Option<bool>,
    /// Address for the clusterset.local DNS responder, UDP and TCP [default: 0.0.0.0:53]; "off" disables it.
    #[arg(long, env = "MESHD_DNS_LISTEN")]
    pub dns_listen: Option<String>,
    /// TTL of DNS answers in seconds [default: 5].
    #[arg(long, env = "MESHD_DNS_TTL")]
    pub dns_ttl: Option<u32>,
    /// Identical UDP answers a second to one client prefix before response-rate limiting [default: 20]; 0 turns it off.
    #[arg(long, env = "MESHD_DNS_RATE_LIMIT")]
    pub dns_rate_limit: Option<u32>,
    /// Port on the tunnel address for the catalog sync (TCP) and the health probe (UDP) [default: 51821].
    #[arg(long, env = "MESHD_DISCOVERY_PORT")]
    pub discovery_port: Option<u16>,
    /// The gateway node's address (its InternalIP). Set: the node that has it is the gateway,
    /// every other node a route agent routing the remote CIDRs to it. Unset: this node is the gateway.
    #[arg(long, env = "MESHD_GATEWAY_ADDRESS")]
    pub gateway_address: Option<String>,
    /// Keep the CNI from masquerading traffic between local and remote CIDRs (nftables table
    /// inet meshd; needs the nft tool) [default: true].
    #[arg(long, env = "MESHD_MASQUERADE_BYPASS")]
    pub masquerade_bypass: Option<bool>,
    /// How route agents reach the gateway node: auto (direct when it is on their network,
    /// else VXLAN), direct or vxlan [default: auto].
    #[arg(long, env = "MESHD_ROUTE_MODE")]
    pub route_mode: Option<String>,
    /// How long the gateway Lease stands without renewal (whole seconds; default 3).
    #[arg(long, env = "MESHD_LEASE_DURATION_SECONDS")]
    pub lease_duration_seconds: Option<u64>,
    /// An active gateway that has not renewed its Lease for this long stops forwarding
    /// (milliseconds; default 2000, below the duration).
    #[arg(long, env = "MESHD_LEASE_RENEW_DEADLINE_MS")]
    pub lease_renew_deadline_ms: Option<u64>,
    /// How often the active gateway renews and a standby checks (milliseconds; default 500).
    #[arg(long, env = "MESHD_LEASE_RETRY_MS")]
    pub lease_retry_ms: Option<u64>,
    // The help is an attribute, not a doc comment: rustdoc would read its brackets as links.
    #[arg(
        long = "peer",
        env = "MESHD_PEERS",
        value_delimiter = ' ',
        help = "A peer, added to the file's: name=N,public-key=K[,endpoint=HOST:PORT]...[,allowed=CIDR]...[,keepalive=SECS][,tunnel-address=IP]. Repeat for several peers (space-separated in the environment)."
    )]
    pub peers: Vec<String>,
}

/// How a route agent sends the remote clusters' traffic to the gateway node.
/// How the gateway Lease is held (see [`crate::node::lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a holder's record stands without renewal (whole seconds, as the Lease keeps it).
    pub duration: std::time::Duration,
    /// A holder that has not renewed for this long stops being active (fencing).
    pub renew_deadline: std::time::Duration,
    /// How often a holder renews and a standby checks for expiry.
    pub retry: std::time::Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            duration: std::time::Duration::from_secs(3),
            renew_deadline: std::time::Duration::from_secs(2),
            retry: std::time::Duration::from_millis(500),
        }
    }
}

impl LeaseSettings {
    /// Checks the settings' order (retry < renew deadline < duration); the error names the
    /// settings and the rule.
    pub fn check(&self) -> Result<(), String> {
        if self.duration.as_secs() == 0 || self.duration.subsec_nanos() != 0 {
            return Err(format!(
                "lease_duration_seconds must be whole seconds, at least 1 (got {:?})",
                self.duration
            ));
        }
        if self.renew_deadline >= self.duration {
            return Err(format!(
                "lease_renew_deadline_ms ({:?}) must be shorter than lease_duration_seconds ({:?}): a holder that cannot renew must stop forwarding before its Lease expires",
                self.renew_deadline, self.duration
            ));
        }
        if self.retry.is_zero() || self.retry >= self.renew_deadline {
            return Err(format!(
                "lease_retry_ms ({:?}) must be above zero and shorter than lease_renew_deadline_ms ({:?}), so that a holder renews more than once per deadline",
                self.retry, self.renew_deadline
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteMode {
    /// Direct when the gateway node is on this node's network (no `via` on the route to it),
    /// VXLAN otherwise.
    #[default]
    Auto,
    /// Always routed via the gateway node's address.
    Direct,
    /// Always through a VXLAN interface to the gateway node (`meshd-vx`).
    Vxlan,
}

/// A configuration error: which input is at fault and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid meshd TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error("{a_owner} CIDR {a} overlaps {b_owner} CIDR {b}: every address must route to exactly one cluster; remove or narrow one of them{}", overlap_hint(*local_and_peer))]
    Overlap {
        a_owner: String,
        a: IpNet,
        b_owner: String,
        b: IpNet,
        /// The overlap is between this cluster and a peer: global ranges can keep both.
        local_and_peer: bool,
    },
    #[error("{a} and {b} have the same public key: each peer needs its own key; fix one of them")]
    DuplicateKey { a: String, b: String },
}

/// How two clusters that really use the same ranges can still join.
fn overlap_hint(local_and_peer: bool) -> &'static str {
    if local_and_peer {
        ", or, when both clusters really use these ranges (a kind cluster left at its defaults uses 10.244.0.0/16 and 10.96.0.0/16), give each cluster global ranges with global_cidrs = [\"LOCAL=GLOBAL\", ...] and the peer's global ranges in its allowed_cidrs (docs/overlap.md)"
    } else {
        ""
    }
}

fn field(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A checked peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    /// The first (or only) endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Every endpoint of `endpoints`, tried in turn (empty with `endpoint` alone).
    pub endpoints: Vec<SocketAddr>,
    pub allowed_cidrs: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// The peer gateway's own address inside the tunnel: meshd syncs catalogs with it and probes
    /// it. `None`: a plain WireGuard peer (no catalog, no probe).
    pub tunnel_address: Option<IpAddr>,
}

/// The checked configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    pub interface: String,
    /// `None` only for an empty device that waits for `wg set ... private-key`.
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub local_cidrs: Vec<IpNet>,
    /// Destinations beyond `local_cidrs` that decrypted packets may reach.
    pub deliver_cidrs: Vec<IpNet>,
    /// The global ranges local ranges stand as (`global_cidrs`); empty: no translation.
    pub translation: Translation,
    pub tunnel_address: Option<IpNet>,
    /// `None`: derive from the underlay (its MTU minus [`TUNNEL_OVERHEAD`]).
    pub mtu: Option<u16>,
    /// `None`: metrics are off.
    pub metrics_listen: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    /// `None`: the probes are off.
    pub health_listen: Option<SocketAddr>,
    pub offload: bool,
    /// The packet threads (`meshd-tx`, `meshd-rx`) run under SCHED_BATCH.
    pub batch_scheduling: bool,
    pub tx_threads: usize,
    /// `None`: this cluster exports nothing, unless `kubernetes` is set.
    pub exports_file: Option<PathBuf>,
    /// True: the local catalog comes from the Kubernetes API (the ServiceExport watcher,
    /// `crate::discovery::kubernetes`); never together with `exports_file`.
    pub kubernetes: bool,
    /// `None`: the DNS responder is off.
    pub dns_listen: Option<SocketAddr>,
    pub dns_ttl: u32,
    /// Identical UDP answers a second per client prefix; 0: no response-rate limiting.
    pub dns_rate_limit: u32,
    pub discovery_port: u16,
    /// `None`: this node is the cluster's gateway; `Some`: the gateway node's address (this
    /// node is the gateway if it has it, a route agent otherwise; see [`crate::node`]).
    pub gateway_address: Option<IpAddr>,
    /// Write the masquerade bypass ([`crate::node::bypass`]).
    pub masquerade_bypass: bool,
    /// How route agents reach the gateway node ([`crate::node::vxlan`]).
    pub route_mode: RouteMode,
    /// The gateway election's Lease settings (with `kubernetes = true` and no
    /// `gateway_address`).
    pub lease: LeaseSettings,
    pub peers: Vec<PeerConfig>,
}

/// Parses one CIDR, refusing host bits so that a typo does not silently widen a route.
pub fn parse_cidr(what: &str, text: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = text.trim().parse().map_err(|_| {
        field(
            what,
            format!(
                "'{text}' is not a CIDR; write an address and prefix length such as 10.244.0.0/16"
            ),
        )
    })?;
    if net.trunc() != net {
        return Err(field(
            what,
            format!("'{text}' has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn parse_cidrs(what: &str, texts: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| parse_cidr(&format!("{what}[{i}]"), t))
        .collect()
}

/// A listen address setting: `address:port`, or "off" for `None`; `default` when unset.
fn listen_address(
    what: &str,
    text: Option<String>,
    default: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.unwrap_or_else(|| default.to_string());
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        field(
            what,
            format!("'{text}' is not an address:port such as {default} (or \"off\")"),
        )
    })
}

/// Resolves `host:port` (a name or an address); the first address wins.
pub fn resolve_endpoint(what: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let mut addrs = text.to_socket_addrs().map_err(|e| {
        field(
            what,
            format!("'{text}' is not a reachable host:port ({e}); write e.g. 192.0.2.2:51820"),
        )
    })?;
    addrs
        .next()
        .ok_or_else(|| field(what, format!("'{text}' resolves to no address")))
}

/// Parses a peer's `tunnel_address`: one address (no prefix) inside the peer's allowed CIDRs, so
/// that the catalog sync and the probe to it enter the tunnel to that peer.
fn parse_peer_tunnel_address(
    label: &str,
    text: &str,
    allowed: &[IpNet],
) -> Result<IpAddr, ConfigError> {
    let what = format!("{label}.tunnel_address");
    let addr: IpAddr = text.trim().parse().map_err(|_| {
        field(
            &what,
            format!("'{text}' is not an IP address; write the peer gateway's tunnel address without a prefix, e.g. 100.64.0.2"),
        )
    })?;
    if !allowed.iter().any(|net| net.contains(&addr)) {
        return Err(field(
            &what,
            format!("{addr} is not inside the peer's allowed_cidrs; add {addr}/32 (or its tunnel subnet) to them"),
        ));
    }
    Ok(addr)
}

/// Parses a `--peer` value: comma-separated key=value pairs.
pub fn parse_peer_spec(text: &str) -> Result<PeerFile, ConfigError> {
    let what = format!("--peer '{text}'");
    let mut name = None;
    let mut public_key = None;
    let mut endpoints = Vec::new();
    let mut allowed = Vec::new();
    let mut keepalive = None;
    let mut tunnel_address = None;
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            field(&what, format!("'{part}' is not key=value; keys are name, public-key, endpoint, allowed, keepalive, tunnel-address"))
        })?;
        match key {
            "name" => name = Some(value.to_string()),
            "public-key" => public_key = Some(value.to_string()),
            "endpoint" => endpoints.push(value.to_string()),
            "allowed" => allowed.push(value.to_string()),
            "tunnel-address" => tunnel_address = Some(value.to_string()),
            "keepalive" => {
                keepalive = Some(value.parse().map_err(|_| {
                    field(&what, format!("keepalive '{value}' is not a number of seconds (0-65535)"))
                })?)
            }
            other => {
                return Err(field(
                    &what,
                    format!("unknown key '{other}'; keys are name, public-key, endpoint, allowed, keepalive, tunnel-address"),
                ))
            }
        }
    }
    // One endpoint= is the endpoint; several are the endpoints, tried in turn.
    let endpoint = match endpoints.len() {
        1 => endpoints.pop(),
        _ => None,
    };
    Ok(PeerFile {
        name: name.ok_or_else(|| field(&what, "name=... is missing"))?,
        public_key: public_key.ok_or_else(|| field(&what, "public-key=... is missing"))?,
        endpoint,
        endpoints,
        allowed_cidrs: allowed,
        persistent_keepalive: keepalive,
        tunnel_address,
    })
}

/// Parses `global_cidrs` (`LOCAL=GLOBAL` each): LOCAL must lie within `local_cidrs`.
fn parse_global_cidrs(texts: &[String], local_cidrs: &[IpNet]) -> Result<Translation, ConfigError> {
    let mut cidrs = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let at = format!("global_cidrs[{i}]");
        let Some((local, global)) = text.split_once('=') else {
            return Err(field(
                at,
                format!("'{text}' is not LOCAL=GLOBAL; write e.g. \"10.244.0.0/16=100.82.0.0/16\""),
            ));
        };
        let parse = |what: &str, t: &str| {
            t.trim().parse::<IpNet>().map_err(|_| {
                field(
                    &at,
                    format!("{what} '{t}' is not a CIDR; write LOCAL=GLOBAL, e.g. \"10.244.0.0/16=100.82.0.0/16\""),
                )
            })
        };
        let (local, global) = (parse("LOCAL", local)?, parse("GLOBAL", global)?);
        if !local_cidrs.iter().any(|l| l.contains(&local)) {
            return Err(field(
                at,
                format!("{local} is not one of local_cidrs (nor inside one); map this cluster's own ranges"),
            ));
        }
        cidrs.push(GlobalCidr::new(local, global).map_err(|problem| field(&at, problem))?);
    }
    Translation::new(cidrs).map_err(|problem| field("global_cidrs", problem))
}

/// Checks that no two owners' CIDRs overlap, naming both on failure.
pub fn check_overlaps(owned: &[(String, IpNet)]) -> Result<(), ConfigError> {
    for (i, (a_owner, a)) in owned.iter().enumerate() {
        for (b_owner, b) in &owned[i + 1..] {
            if a.contains(&b.network()) || b.contains(&a.network()) {
                let local_and_peer = [a_owner, b_owner]
                    .iter()
                    .any(|o| o.starts_with("local cluster"))
                    && [a_owner, b_owner].iter().any(|o| o.starts_with("peer"));
                return Err(ConfigError::Overlap {
                    a_owner: a_owner.clone(),
                    a: *a,
                    b_owner: b_owner.clone(),
                    b: *b,
                    local_and_peer,
                });
            }
        }
    }
    Ok(())
}

fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

impl Config {
    /// Reads the file named by `args.config` (if any), applies the flags and checks the result.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        Self::from_parts(file, args)
    }

    /// Merges a parsed file with flags (flags win) and validates everything.
    pub fn from_parts(file: ConfigFile, args: &ConfigArgs) -> Result<Self, ConfigError> {
        let interface = args
            .interface
            .clone()
            .or(file.interface)
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        if !valid_interface_name(&interface) {
            return Err(field(
                "interface",
                format!("'{interface}' is not a Linux interface name: use 1-15 letters, digits, '-', '_' or '.'"),
            ));
        }
        let cluster = args
            .cluster
            .clone()
            .or(file.cluster)
            .unwrap_or_else(|| interface.clone());
        if cluster.is_empty() || cluster.contains(char::is_whitespace) {
            return Err(field(
                "cluster",
                format!("'{cluster}' must be a non-empty name without spaces"),
            ));
        }

        let key_file = args.private_key_file.clone().or(file.private_key_file);
        let private_key = match key_file {
            Some(path) => Some(PrivateKey::from_file(&path)?),
            None => None,
        };

        let listen_port = args
            .listen_port
            .or(file.listen_port)
            .unwrap_or(DEFAULT_LISTEN_PORT);

        let local_texts = if args.local_cidrs.is_empty() {
            file.local_cidrs
        } else {
            args.local_cidrs.clone()
        };
        let local_cidrs = parse_cidrs("local_cidrs", &local_texts)?;
        let deliver_texts = if args.deliver_cidrs.is_empty() {
            file.deliver_cidrs
        } else {
            args.deliver_cidrs.clone()
        };
        let deliver_cidrs = parse_cidrs("deliver_cidrs", &deliver_texts)?;
        if local_cidrs.is_empty() && !deliver_cidrs.is_empty() {
            return Err(field(
                "deliver_cidrs",
                "set without local_cidrs: give this cluster's pod and service CIDRs in local_cidrs too (without local_cidrs meshd checks no destination at all)",
            ));
        }

        let global_texts = if args.global_cidrs.is_empty() {
            file.global_cidrs
        } else {
            args.global_cidrs.clone()
        };
        let translation = parse_global_cidrs(&global_texts, &local_cidrs)?;

        let tunnel_address = match args.tunnel_address.clone().or(file.tunnel_address) {
            Some(text) => Some(text.trim().parse::<IpNet>().map_err(|_| {
                field(
                    "tunnel_address",
                    format!("'{text}' is not an address with prefix; write e.g. 100.64.0.1/24"),
                )
            })?),
            None => None,
        };

        let mtu = args.mtu.or(file.mtu);
        if let Some(mtu) = mtu {
            if mtu < MIN_MTU {
                return Err(field(
                    "mtu",
                    format!("{mtu} is below the minimum of {MIN_MTU}; leave it unset to use the underlay MTU - {TUNNEL_OVERHEAD}"),
                ));
            }
        }

        let metrics_listen = listen_address(
            "metrics_listen",
            args.metrics_listen.clone().or(file.metrics_listen),
            DEFAULT_METRICS_LISTEN,
        )?;

        let health_listen = listen_address(
            "health_listen",
            args.health_listen.clone().or(file.health_listen),
            DEFAULT_HEALTH_LISTEN,
        )?;

        let admin_socket = args
            .admin_socket
            .clone()
            .or(file.admin_socket)
            .unwrap_or_else(|| PathBuf::from(crate::defaults::ADMIN_SOCKET));
        if admin_socket.as_os_str().is_empty() || admin_socket.is_dir() {
            return Err(field(
                "admin_socket",
                format!(
                    "'{}' is not a socket path; write a file path such as {}",
                    admin_socket.display(),
                    crate::defaults::ADMIN_SOCKET
                ),
            ));
        }

        let tx_threads = args.tx_threads.or(file.tx_threads).unwrap_or(1);
        if !(1..=MAX_TX_THREADS).contains(&tx_threads) {
            return Err(field(
                "tx_threads",
                format!("{tx_threads} is outside 1-{MAX_TX_THREADS}; one per core is the most that helps"),
            ));
        }

        let dns_listen = listen_address(
            "dns_listen",
            args.dns_listen.clone().or(file.dns_listen),
            DEFAULT_DNS_LISTEN,
        )?;
        let dns_ttl = args
            .dns_ttl
            .or(file.dns_ttl)
            .unwrap_or(crate::defaults::DNS_TTL);
        if dns_ttl > MAX_DNS_TTL {
            return Err(field(
                "dns_ttl",
                format!("{dns_ttl} s is above the maximum of {MAX_DNS_TTL} s; keep it short (default {}) so answers follow failovers", crate::defaults::DNS_TTL),
            ));
        }

        let exports_file = args.exports_file.clone().or(file.exports_file);
        let kubernetes = args.kubernetes.or(file.kubernetes).unwrap_or(false);
        if let (true, Some(path)) = (kubernetes, &exports_file) {
            return Err(field(
                "kubernetes",
                format!(
                    "kubernetes = true and exports_file = \"{}\" both name the local catalog's source; drop exports_file (or --exports-file) to take exports from the Kubernetes API, or drop kubernetes (or --kubernetes) to keep the file",
                    path.display()
                ),
            ));
        }

        let mut peer_files: Vec<(String, PeerFile)> = file
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("peers[{i}]"), p))
            .collect();
        for spec in &args.peers {
            peer_files.push((format!("--peer '{spec}'"), parse_peer_spec(spec)?));
        }

        let own_public = private_key.as_ref().map(PrivateKey::public_key);
        let mut peers = Vec::with_capacity(peer_files.len());
        let mut names = BTreeSet::new();
        let mut keys: BTreeMap<PublicKey, String> = BTreeMap::new();
        let mut owned: Vec<(String, IpNet)> = local_cidrs
            .iter()
            .map(|c| (format!("local cluster '{cluster}'"), *c))
            .chain(
                deliver_cidrs
                    .iter()
                    .map(|c| (format!("deliver_cidrs of '{cluster}'"), *c)),
            )
            .chain(
                translation
                    .cidrs()
                    .iter()
                    .map(|c| (format!("global_cidrs of '{cluster}'"), c.global)),
            )
            .collect();
        for (what, peer) in peer_files {
            let label = format!("{what} ({})", peer.name);
            if peer.name.is_empty() || peer.name.contains(char::is_whitespace) {
                return Err(field(
                    format!("{what}.name"),
                    "must be a non-empty name without spaces",
                ));
            }
            if !names.insert(peer.name.clone()) {
                return Err(field(
                    format!("{what}.name"),
                    format!(
                        "peer name '{}' is used twice; give each peer its own name",
                        peer.name
                    ),
                ));
            }
            let public_key =
                PublicKey::from_base64(&format!("{label}.public_key"), &peer.public_key)?;
            if Some(public_key) == own_public {
                return Err(field(
                    format!("{label}.public_key"),
                    "is this gateway's own public key; use the other cluster's key (`meshctl pubkey` on its private key)",
                ));
            }
            if let Some(other) = keys.insert(public_key, label.clone()) {
                return Err(ConfigError::DuplicateKey { a: other, b: label });
            }
            if peer.endpoint.is_some() && !peer.endpoints.is_empty() {
                return Err(field(
                    format!("{label}.endpoints"),
                    "set endpoint (one address) or endpoints (several, tried in turn), not both",
                ));
            }
            let mut endpoints = Vec::new();
            for (i, e) in peer.endpoints.iter().enumerate() {
                let address = resolve_endpoint(&format!("{label}.endpoints[{i}]"), e)?;
                if !endpoints.contains(&address) {
                    endpoints.push(address);
                }
            }
            let endpoint = match peer.endpoint.as_deref() {
                Some(e) => Some(resolve_endpoint(&format!("{label}.endpoint"), e)?),
                None => endpoints.first().copied(),
            };
            let allowed_cidrs =
                parse_cidrs(&format!("{label}.allowed_cidrs"), &peer.allowed_cidrs)?;
            let tunnel_address = peer
                .tunnel_address
                .as_deref()
                .map(|text| parse_peer_tunnel_address(&label, text, &allowed_cidrs))
                .transpose()?;
            owned.extend(
                allowed_cidrs
                    .iter()
                    .map(|c| (format!("peer '{}'", peer.name), *c)),
            );
            peers.push(PeerConfig {
                name: peer.name,
                public_key,
                endpoint,
                endpoints,
                allowed_cidrs,
                persistent_keepalive: peer.persistent_keepalive.filter(|k| *k > 0),
                tunnel_address,
            });
        }
        check_overlaps(&owned)?;

        let gateway_address = match args.gateway_address.clone().or(file.gateway_address) {
            Some(text) => Some(text.trim().parse::<IpAddr>().map_err(|_| {
                field(
                    "gateway_address",
                    format!("'{text}' is not an IP address; write the gateway node's InternalIP, e.g. 172.18.0.2 (kubectl get node NAME -o wide)"),
                )
            })?),
            None => None,
        };

        let route_mode = match args.route_mode.clone().or(file.route_mode).as_deref() {
            None | Some("auto") => RouteMode::Auto,
            Some("direct") => RouteMode::Direct,
            Some("vxlan") => RouteMode::Vxlan,
            Some(other) => {
                return Err(field(
                    "route_mode",
                    format!(
                        "'{other}' is not a route mode: write auto (the default), direct or vxlan"
                    ),
                ))
            }
        };
        if route_mode == RouteMode::Vxlan && gateway_address.is_some_and(|a| a.is_ipv6()) {
            return Err(field(
                "route_mode",
                "vxlan needs an IPv4 gateway_address (meshd's VXLAN overlay is IPv4): use direct, or the gateway's IPv4 address",
            ));
        }

        if private_key.is_none() && (args.config.is_some() || !peers.is_empty()) {
            return Err(field(
                "private_key_file",
                "is required: set private_key_file in the config file or --private-key-file; create a key with `meshctl genkey > /etc/meshd/private.key`",
            ));
        }

        let defaults = LeaseSettings::default();
        let lease = LeaseSettings {
            duration: std::time::Duration::from_secs(
                args.lease_duration_seconds
                    .or(file.lease_duration_seconds)
                    .unwrap_or(defaults.duration.as_secs()),
            ),
            renew_deadline: std::time::Duration::from_millis(
                args.lease_renew_deadline_ms
                    .or(file.lease_renew_deadline_ms)
                    .unwrap_or(defaults.renew_deadline.as_millis() as u64),
            ),
            retry: std::time::Duration::from_millis(
                args.lease_retry_ms
                    .or(file.lease_retry_ms)
                    .unwrap_or(defaults.retry.as_millis() as u64),
            ),
        };
        lease.check().map_err(|problem| {
            field(
                "lease_duration_seconds, lease_renew_deadline_ms, lease_retry_ms",
                problem,
            )
        })?;

        Ok(Config {
            cluster,
            interface,
            private_key,
            listen_port,
            local_cidrs,
            deliver_cidrs,
            translation,
            tunnel_address,
            mtu,
            metrics_listen,
            admin_socket,
            health_listen,
            offload: args.offload.or(file.offload).unwrap_or(true),
            batch_scheduling: args
                .batch_scheduling
                .or(file.batch_scheduling)
                .unwrap_or(true),
            tx_threads,
            exports_file,
            kubernetes,
            dns_listen,
            dns_ttl,
            dns_rate_limit: args
                .dns_rate_limit
                .or(file.dns_rate_limit)
                .unwrap_or(crate::defaults::DNS_RATE_LIMIT),
            discovery_port: args
                .discovery_port
                .or(file.discovery_port)
                .unwrap_or(DEFAULT_DISCOVERY_PORT),
            gateway_address,
            masquerade_bypass: args
                .masquerade_bypass
                .or(file.masquerade_bypass)
                .unwrap_or(true),
            route_mode,
            lease,
            peers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Fixture {
        dir: tempfile::TempDir,
        key_path: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("private.key");
        let mut f = std::fs::File::create(&key_path).unwrap();
        writeln!(f, "{}", PrivateKey::generate().to_base64().as_str()).unwrap();
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Fixture { dir, key_path }
    }

    fn pubkey() -> String {
        PrivateKey::generate().public_key().to_base64()
    }

    fn load(fx: &Fixture, body: &str) -> Result<Config, ConfigError> {
        let path = fx.dir.path().join("meshd.toml");
        let text = format!("private_key_file = \"{}\"\n{body}", fx.key_path.display());
        std::fs::write(&path, text).unwrap();
        Config::load(&ConfigArgs {
            config: Some(path),
            ..Default::default()
        })
    }

    fn m2_peer(key: &str, cidrs: &str) -> String {
        format!(
            "[[peers]]\nname = \"m2\"\npublic_key = \"{key}\"\nendpoint = \"192.0.2.2:51820\"\nallowed_cidrs = [{cidrs}]\n"
        )
    }

    #[test]
    fn reference_config_loads_with_defaults() {
        let fx = fixture();
        let key = pubkey();
        let cfg = load(
            &fx,
            &format!(
                "cluster = \"m1\"\nlocal_cidrs = [\"10.244.0.0/16\", \"10.96.0.0/16\"]\ntunnel_address = \"100.64.0.1/24\"\n{}",
                m2_peer(&key, "\"10.245.0.0/16\", \"10.97.0.0/16\", \"100.64.0.2/32\"")
            ),
        )
        .unwrap();
        assert_eq!(cfg.cluster, "m1");
        assert_eq!(cfg.interface, DEFAULT_INTERFACE);
        assert_eq!(cfg.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(cfg.mtu, None);
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(
            cfg.peers[0].endpoint,
            Some("192.0.2.2:51820".parse().unwrap())
        );
        assert_eq!(cfg.peers[0].allowed_cidrs.len(), 3);
        assert_eq!(cfg.peers[0].public_key.to_base64(), key);
    }

    #[test]
    fn flags_override_file_fields_and_add_peers() {
        let fx = fixture();
        let path = fx.dir.path().join("meshd.toml");
        std::fs::write(
            &path,
            format!(
                "private_key_file = \"{}\"\nlisten_port = 1000\nlocal_cidrs = [\"10.1.0.0/16\"]\n",
                fx.key_path.display()
            ),
        )
        .unwrap();
        let key = pubkey();
        let cfg = Config::load(&ConfigArgs {
            config: Some(path),
            listen_port: Some(2000),
            local_cidrs: vec!["10.244.0.0/16".into()],
            mtu: Some(1380),
            peers: vec![format!(
                "name=m2,public-key={key},endpoint=127.0.0.1:51821,allowed=10.245.0.0/16,allowed=10.97.0.0/16,keepalive=25"
            )],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.listen_port, 2000);
        assert_eq!(
            cfg.local_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(cfg.mtu, Some(1380));
        assert_eq!(cfg.peers[0].persistent_keepalive, Some(25));
        assert_eq!(cfg.peers[0].allowed_cidrs.len(), 2);
    }

    fn err_text(r: Result<Config, ConfigError>) -> String {
        r.expect_err("config should be refused").to_string()
    }

    #[test]
    fn missing_key_file_names_path_and_fix() {
        let fx = fixture();
        let cfg = fx.dir.path().join("meshd.toml");
        std::fs::write(&cfg, "private_key_file = \"/nonexistent/key\"\n").unwrap();
        let text = err_text(Config::load(&ConfigArgs {
            config: Some(cfg),
            ..Default::default()
        }));
        assert!(text.contains("/nonexistent/key"), "{text}");
        assert!(text.contains("meshctl genkey"), "{text}");
    }

    #[test]
    fn absent_private_key_is_refused_with_a_config_file() {
        let fx = fixture();
        let cfg = fx.dir.path().join("meshd.toml");
        std::fs::write(&cfg, "cluster = \"m1\"\n").unwrap();
        let text = err_text(Config::load(&ConfigArgs {
            config: Some(cfg),
            ..Default::default()
        }));
        assert!(text.starts_with("private_key_file: is required"), "{text}");
    }

    #[test]
    fn malformed_private_key_names_the_file() {
        let fx = fixture();
        std::fs::write(&fx.key_path, "hello\n").unwrap();
        let text = err_text(load(&fx, ""));
        assert!(text.contains("private.key"), "{text}");
        assert!(text.contains("not a WireGuard key"), "{text}");
    }

    /// A key file that group or others can read is refused, with the chmod that fixes it.
    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let fx = fixture();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&fx.key_path, std::fs::Permissions::from_mode(mode)).unwrap();
            let text = err_text(load(&fx, ""));
            assert!(text.contains("readable by group or others"), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
        }
        std::fs::set_permissions(&fx.key_path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&fx, "").is_ok());
    }

    #[test]
    fn malformed_peer_key_names_the_peer() {
        let fx = fixture();
        let text = err_text(load(&fx, &m2_peer("AAAA", "\"10.245.0.0/16\"")));
        assert!(text.contains("peers[0] (m2).public_key"), "{text}");
    }

    #[test]
    fn invalid_cidrs_name_the_field() {
        let fx = fixture();
        let text = err_text(load(&fx, &m2_peer(&pubkey(), "\"10.245.0.0/33\"")));
        assert!(text.contains("peers[0] (m2).allowed_cidrs[0]"), "{text}");
        assert!(text.contains("not a CIDR"), "{text}");
        let text = err_text(load(&fx, "local_cidrs = [\"10.244.1.0/16\"]\n"));
        assert!(text.contains("local_cidrs[0]"), "{text}");
        assert!(text.contains("did you mean 10.244.0.0/16"), "{text}");
    }

    #[test]
    fn overlapping_peers_name_both() {
        let fx = fixture();
        let body = format!(
            "{}[[peers]]\nname = \"m3\"\npublic_key = \"{}\"\nallowed_cidrs = [\"10.245.1.0/24\"]\n",
            m2_peer(&pubkey(), "\"10.245.0.0/16\""),
            pubkey()
        );
        let text = err_text(load(&fx, &body));
        assert!(text.contains("peer 'm2' CIDR 10.245.0.0/16"), "{text}");
        assert!(text.contains("peer 'm3' CIDR 10.245.1.0/24"), "{text}");
    }

    #[test]
    fn peer_overlapping_local_cluster_names_both() {
        let fx = fixture();
        let body = format!(
            "cluster = \"m1\"\nlocal_cidrs = [\"10.244.0.0/16\"]\n{}",
            m2_peer(&pubkey(), "\"10.244.0.0/24\"")
        );
        let text = err_text(load(&fx, &body));
        assert!(
            text.contains("local cluster 'm1' CIDR 10.244.0.0/16"),
            "{text}"
        );
        assert!(text.contains("peer 'm2' CIDR 10.244.0.0/24"), "{text}");
        // The fix for clusters that really share ranges is named.
        assert!(text.contains("global_cidrs"), "{text}");
        // Two peers overlapping each other get no such hint: one of them is wrong.
        let body = format!(
            "{}[[peers]]\nname = \"m3\"\npublic_key = \"{}\"\nallowed_cidrs = [\"10.245.1.0/24\"]\n",
            m2_peer(&pubkey(), "\"10.245.0.0/16\""),
            pubkey()
        );
        assert!(!err_text(load(&fx, &body)).contains("global_cidrs"));
    }

    #[test]
    fn global_ranges_let_clusters_with_the_same_ranges_join() {
        let fx = fixture();
        // M1 and a kind cluster at its defaults: both 10.244.0.0/16 and 10.96.0.0/16.
        let body = format!(
            "cluster = \"m1\"\nlocal_cidrs = [\"10.244.0.0/16\", \"10.96.0.0/16\"]\nglobal_cidrs = [\"10.244.0.0/16=100.81.0.0/16\", \"10.96.0.0/16=100.91.0.0/16\"]\n{}",
            m2_peer(&pubkey(), "\"100.82.0.0/16\", \"100.92.0.0/16\"")
        );
        let config = load(&fx, &body).unwrap();
        assert_eq!(config.translation.cidrs().len(), 2);
        assert_eq!(
            config.translation.global("10.96.0.10".parse().unwrap()),
            "100.91.0.10".parse::<IpAddr>().unwrap()
        );
        let with = |globals: &str, peer: &str| {
            err_text(load(
                &fx,
                &format!(
                    "cluster = \"m1\"\nlocal_cidrs = [\"10.244.0.0/16\", \"10.96.0.0/16\"]\nglobal_cidrs = [{globals}]\n{}",
                    m2_peer(&pubkey(), peer)
                ),
            ))
        };
        // A global range that is a peer's, or this cluster's own local range, is refused.
        let text = with("\"10.244.0.0/16=100.82.0.0/16\"", "\"100.82.0.0/16\"");
        assert!(
            text.contains("global_cidrs of 'm1' CIDR 100.82.0.0/16") && text.contains("peer 'm2'"),
            "{text}"
        );
        let text = with("\"10.244.0.0/16=10.96.0.0/16\"", "\"100.82.0.0/16\"");
        assert!(
            text.contains("global_cidrs of 'm1' CIDR 10.96.0.0/16"),
            "{text}"
        );
        // Malformed pairs name the entry and the form.
        let text = with("\"10.244.0.0/16\"", "\"100.82.0.0/16\"");
        assert!(
            text.contains("global_cidrs[0]") && text.contains("LOCAL=GLOBAL"),
            "{text}"
        );
        let text = with("\"10.244.0.0/16=100.81.0.0/24\"", "\"100.82.0.0/16\"");
        assert!(text.contains("prefix length"), "{text}");
        let text = with("\"10.250.0.0/16=100.81.0.0/16\"", "\"100.82.0.0/16\"");
        assert!(text.contains("not one of local_cidrs"), "{text}");
    }

    #[test]
    fn duplicate_public_keys_name_both_peers() {
        let fx = fixture();
        let key = pubkey();
        let body = format!(
            "{}[[peers]]\nname = \"m3\"\npublic_key = \"{key}\"\nallowed_cidrs = [\"10.246.0.0/16\"]\n",
            m2_peer(&key, "\"10.245.0.0/16\"")
        );
        let text = err_text(load(&fx, &body));
        assert!(
            text.contains("peers[0] (m2) and peers[1] (m3) have the same public key"),
            "{text}"
        );
    }

    #[test]
    fn own_key_as_peer_is_refused() {
        let fx = fixture();
        let own = PrivateKey::from_file(&fx.key_path)
            .unwrap()
            .public_key()
            .to_base64();
        let text = err_text(load(&fx, &m2_peer(&own, "\"10.245.0.0/16\"")));
        assert!(text.contains("own public key"), "{text}");
    }

    #[test]
    fn unknown_fields_and_bad_types_are_refused_with_the_file_name() {
        let fx = fixture();
        let text = err_text(load(&fx, "listen_prot = 5\n"));
        assert!(text.contains("meshd.toml"), "{text}");
        assert!(text.contains("listen_prot"), "{text}");
        let text = err_text(load(&fx, "listen_port = 70000\n"));
        assert!(text.contains("listen_port"), "{text}");
    }

    #[test]
    fn settings_must_fence_before_expiry() {
        assert_eq!(LeaseSettings::default().check(), Ok(()));
        let bad = |d: u64, r: u64, t: u64| LeaseSettings {
            duration: std::time::Duration::from_millis(d),
            renew_deadline: std::time::Duration::from_millis(r),
            retry: std::time::Duration::from_millis(t),
        };
        assert!(bad(3000, 3000, 500)
            .check()
            .unwrap_err()
            .contains("lease_renew_deadline_ms"));
        assert!(bad(3000, 2000, 2000)
            .check()
            .unwrap_err()
            .contains("lease_retry_ms"));
        assert!(bad(2500, 2000, 500)
            .check()
            .unwrap_err()
            .contains("whole seconds"));
        assert!(bad(0, 0, 0).check().unwrap_err().contains("at least 1"));
    }

    #[test]
    fn endpoints_list_the_other_clusters_gateways_in_order() {
        let fx = fixture();
        let peer = |line: &str| {
            format!(
                "[[peers]]\nname = \"m2\"\npublic_key = \"{}\"\n{line}\n",
                pubkey()
            )
        };
        let cfg = load(
            &fx,
            &peer("endpoints = [\"192.0.2.1:51820\", \"192.0.2.12:51820\", \"192.0.2.1:51820\"]"),
        )
        .unwrap();
        let p = &cfg.peers[0];
        assert_eq!(p.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            p.endpoints,
            vec![
                "192.0.2.1:51820".parse::<SocketAddr>().unwrap(),
                "192.0.2.12:51820".parse().unwrap()
            ],
            "in order, a repeat dropped"
        );
        let text = err_text(load(
            &fx,
            &peer("endpoint = \"192.0.2.1:51820\"\nendpoints = [\"192.0.2.12:51820\"]"),
        ));
        assert!(
            text.starts_with("peers[0] (m2).endpoints: set endpoint (one address) or endpoints"),
            "{text}"
        );
        let text = err_text(load(
            &fx,
            &peer("endpoints = [\"192.0.2.1:51820\", \"nowhere\"]"),
        ));
        assert!(text.contains("peers[0] (m2).endpoints[1]"), "{text}");
        let spec = parse_peer_spec(&format!(
            "name=m2,public-key={},endpoint=192.0.2.1:51820,endpoint=192.0.2.12:51820",
            pubkey()
        ))
        .unwrap();
        assert_eq!((spec.endpoint, spec.endpoints.len()), (None, 2));
    }

    #[test]
    fn bad_endpoint_mtu_and_interface_are_refused() {
        let fx = fixture();
        let body = "[[peers]]\nname = \"m2\"\npublic_key = \"KEY\"\nendpoint = \"192.0.2.2\"\n"
            .replace("KEY", &pubkey());
        let text = err_text(load(&fx, &body));
        assert!(text.contains("peers[0] (m2).endpoint"), "{text}");
        let text = err_text(load(&fx, "mtu = 100\n"));
        assert!(text.starts_with("mtu: 100 is below"), "{text}");
        let text = err_text(load(&fx, "interface = \"much-too-long-name\"\n"));
        assert!(text.starts_with("interface:"), "{text}");
        let text = err_text(load(&fx, "metrics_listen = \"9090\"\n"));
        assert!(text.starts_with("metrics_listen:"), "{text}");
        let cfg = load(&fx, "metrics_listen = \"off\"\n").unwrap();
        assert_eq!(cfg.metrics_listen, None);
        let text = err_text(load(&fx, "health_listen = \"9091\"\n"));
        assert!(text.starts_with("health_listen:"), "{text}");
        let text = err_text(load(&fx, "admin_socket = \"\"\n"));
        assert!(text.starts_with("admin_socket:"), "{text}");
        let cfg = load(&fx, "").unwrap();
        assert_eq!(cfg.admin_socket, Path::new("/run/meshd/meshd.sock"));
        assert_eq!(cfg.health_listen, Some("0.0.0.0:9091".parse().unwrap()));
        let cfg = load(
            &fx,
            "health_listen = \"off\"\nadmin_socket = \"/tmp/m.sock\"\n",
        )
        .unwrap();
        assert_eq!(cfg.health_listen, None);
        assert_eq!(cfg.admin_socket, Path::new("/tmp/m.sock"));
        for bad in ["tx_threads = 0\n", "tx_threads = 65\n"] {
            let text = err_text(load(&fx, bad));
            assert!(text.starts_with("tx_threads:"), "{text}");
        }
        assert_eq!(load(&fx, "tx_threads = 4\n").unwrap().tx_threads, 4);
    }

    #[test]
    fn dns_fields_have_defaults_and_are_checked() {
        let fx = fixture();
        let cfg = load(&fx, "").unwrap();
        assert_eq!(cfg.dns_listen, Some("0.0.0.0:53".parse().unwrap()));
        assert_eq!(cfg.dns_ttl, 5);
        assert_eq!(cfg.exports_file, None);
        let cfg = load(
            &fx,
            "dns_listen = \"off\"\ndns_ttl = 30\nexports_file = \"/etc/meshd/exports.toml\"\n",
        )
        .unwrap();
        assert_eq!(cfg.dns_listen, None);
        assert_eq!(cfg.dns_ttl, 30);
        assert_eq!(
            cfg.exports_file.as_deref(),
            Some(Path::new("/etc/meshd/exports.toml"))
        );
        let text = err_text(load(&fx, "dns_listen = \"53\"\n"));
        assert!(text.starts_with("dns_listen: '53' is not"), "{text}");
        let text = err_text(load(&fx, "dns_ttl = 86400\n"));
        assert!(text.starts_with("dns_ttl: 86400 s is above"), "{text}");
    }

    #[test]
    fn kubernetes_is_off_by_default_and_excludes_the_exports_file() {
        let fx = fixture();
        assert!(!load(&fx, "").unwrap().kubernetes);
        let cfg = load(&fx, "kubernetes = true\n").unwrap();
        assert!(cfg.kubernetes);
        assert_eq!(cfg.exports_file, None);
        let text = err_text(load(
            &fx,
            "kubernetes = true\nexports_file = \"/etc/meshd/exports.toml\"\n",
        ));
        assert!(text.starts_with("kubernetes: "), "{text}");
        assert!(text.contains("/etc/meshd/exports.toml"), "{text}");
        assert!(text.contains("drop exports_file"), "{text}");
        assert!(text.contains("drop kubernetes"), "{text}");
        // A flag overrides the file, either way.
        let path = fx.dir.path().join("meshd.toml");
        let with_args = |kubernetes, exports_file: Option<&str>| {
            Config::load(&ConfigArgs {
                config: Some(path.clone()),
                kubernetes,
                exports_file: exports_file.map(PathBuf::from),
                ..Default::default()
            })
        };
        std::fs::write(
            &path,
            format!(
                "private_key_file = \"{}\"\nkubernetes = true\n",
                fx.key_path.display()
            ),
        )
        .unwrap();
        assert!(!with_args(Some(false), Some("/x.toml")).unwrap().kubernetes);
        let text = err_text(with_args(None, Some("/x.toml")));
        assert!(text.contains("/x.toml"), "{text}");
        assert!(with_args(None, None).unwrap().kubernetes);
    }

    #[test]
    fn the_kubernetes_flag_needs_no_value() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: ConfigArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("meshd").chain(args.iter().copied()))
                .unwrap()
                .config
                .kubernetes
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--kubernetes"]), Some(true));
        assert_eq!(parse(&["--kubernetes", "false"]), Some(false));
        assert_eq!(parse(&["--kubernetes=true"]), Some(true));
    }

    #[test]
    fn duplicate_names_and_bad_peer_specs_are_refused() {
        let fx = fixture();
        let body = format!(
            "{}{}",
            m2_peer(&pubkey(), "\"10.245.0.0/16\""),
            m2_peer(&pubkey(), "\"10.246.0.0/16\"")
        );
        assert!(err_text(load(&fx, &body)).contains("used twice"));
        let e = parse_peer_spec("name=m2,colour=blue")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key 'colour'"), "{e}");
        let e = parse_peer_spec("name=m2").unwrap_err().to_string();
        assert!(e.contains("public-key=... is missing"), "{e}");
    }

    #[test]
    fn gateway_address_is_an_address_and_the_bypass_is_on_by_default() {
        let fx = fixture();
        let config = load(&fx, "gateway_address = \"172.18.1.1\"\n").unwrap();
        assert_eq!(config.gateway_address, Some("172.18.1.1".parse().unwrap()));
        assert!(config.masquerade_bypass);
        let config = load(&fx, "masquerade_bypass = false\n").unwrap();
        assert_eq!(config.gateway_address, None);
        assert!(!config.masquerade_bypass);
        assert_eq!(config.route_mode, RouteMode::Auto);
        let config = load(&fx, "route_mode = \"vxlan\"\n").unwrap();
        assert_eq!(config.route_mode, RouteMode::Vxlan);
        assert_eq!(config.lease, LeaseSettings::default());
        let config = load(
            &fx,
            "lease_duration_seconds = 10\nlease_renew_deadline_ms = 7000\nlease_retry_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(config.lease.duration, std::time::Duration::from_secs(10));
        assert_eq!(
            config.lease.renew_deadline,
            std::time::Duration::from_secs(7)
        );
        let refused = load(&fx, "lease_renew_deadline_ms = 3000\n")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("lease_renew_deadline")
                && refused.contains("shorter than lease_duration"),
            "{refused}"
        );
        let e = err_text(load(&fx, "route_mode = \"tunnel\"\n"));
        assert!(
            e.contains("route_mode") && e.contains("auto (the default), direct or vxlan"),
            "{e}"
        );
        let e = err_text(load(
            &fx,
            "gateway_address = \"fd00::1\"\nroute_mode = \"vxlan\"\n",
        ));
        assert!(e.contains("IPv4 gateway_address"), "{e}");
        let e = err_text(load(&fx, "gateway_address = \"node-1\"\n"));
        assert!(
            e.contains("gateway_address") && e.contains("'node-1'") && e.contains("InternalIP"),
            "{e}"
        );
    }

    #[test]
    fn empty_device_needs_no_key() {
        let cfg = Config::from_parts(
            ConfigFile::default(),
            &ConfigArgs {
                interface: Some("wg7".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(cfg.private_key.is_none());
        assert!(cfg.peers.is_empty());
        assert_eq!(cfg.cluster, "wg7");
    }
}
