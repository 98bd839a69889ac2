//! meshctl: the command line for meshd: keys, joining clusters (`meshctl stanza`,
//! `meshctl secret`, `meshctl check-config`; the logic is in `join.rs` beside this file), and what a
//! running meshd serves on its admin socket: peers, exports, DNS explanations, diagnostics
//! (docs/meshctl.md).

mod diagnose;
mod join;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use diagnose::Outcome;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use join::{CheckConfigArgs, JoinError, SecretArgs, StanzaArgs};
use meshd::admin::api::{ExportsResponse, PeerState, PeerView, TranslationView};
use meshd::admin::client::AdminClient;
use meshd::defaults::ADMIN_SOCKET;
use meshd::discovery::catalog::ServiceType;
use meshd::keys::PrivateKey;
use meshd::node::{NodeView, Role};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often `meshctl peers --watch` refreshes.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Exit code: some peer is not up.
const EXIT_NOT_UP: u8 = 1;
/// Exit code: meshd could not be asked.
const EXIT_UNREACHABLE: u8 = 2;

/// Command-line tool for meshd.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new private key in base64 (as `wg genkey`); redirect it to a file with mode 0600.
    Genkey,
    /// Read a private key on standard input and print its public key (as `wg pubkey`).
    Pubkey,
    /// Show meshd's peers: endpoint, status, last handshake, traffic, allowed CIDRs.
    /// Exits 0 when every peer is up, 1 when any is not, 2 when meshd cannot be reached.
    Peers(PeersArgs),
    /// Show the clusterset: each cluster's catalog and sync state, and which cluster serves
    /// which exported service. Exits 2 when meshd cannot be reached.
    Exports(ExportsArgs),
    /// Ask meshd's DNS responder for NAME and explain the answer from the clusterset view.
    Resolve(ResolveArgs),
    /// Check this gateway: CIDR overlaps, MTU, handshakes, routes, DNS, catalog sync, metrics.
    /// Exits 0 when every check passes, 1 when any fails, 2 when meshd cannot be reached.
    Diagnose(SocketArgs),
    /// Print this cluster's [[peers]] stanza for the other cluster's meshd.toml: name, public key
    /// (derived from the private key file, which is never printed), endpoint, CIDRs, tunnel
    /// address. Exits 2 on refused input.
    Stanza(StanzaArgs),
    /// Write the Kubernetes Secret holding this cluster's private key to a new file (mode 0600)
    /// for `kubectl apply -f`; never to standard output. Exits 2 on refused input.
    Secret(SecretArgs),
    /// Check a meshd.toml, or the ConfigMap manifest holding it, as meshd checks it at start, and
    /// summarize it. Exits 0 when meshd would accept it, 2 when not (the error names the field).
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, clap::Args)]
struct SocketArgs {
    /// meshd's admin socket (its admin_socket setting).
    #[arg(long, env = "MESHD_ADMIN_SOCKET", default_value = ADMIN_SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ExportsArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Output format: table, or json (the admin API's GET /v1/exports).
    #[arg(long, short, value_enum, default_value_t = ExportsOutput::Table)]
    output: ExportsOutput,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportsOutput {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
struct ResolveArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The name to resolve, e.g. web.demo.svc.clusterset.local.
    name: String,
    /// The record type to ask for.
    #[arg(long = "type", short = 't', default_value = "A")]
    qtype: String,
}

#[derive(Debug, clap::Args)]
struct PeersArgs {
    /// meshd's admin socket (its admin_socket setting).
    #[arg(long, env = "MESHD_ADMIN_SOCKET", default_value = ADMIN_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Refresh every 2 s until interrupted.
    #[arg(long, short)]
    watch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// One row per peer.
    Table,
    /// The table plus public key and MTU.
    Wide,
    /// The admin API's JSON (schema in docs/meshctl.md).
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// As `wg genkey` does: a key written to a file that group or others can read is no secret, and
/// meshd will refuse it.
fn warn_if_stdout_is_readable_by_others() {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata("/proc/self/fd/1") else {
        return;
    };
    if meta.file_type().is_file() && meta.mode() & 0o077 != 0 {
        eprintln!(
            "meshctl: warning: writing a private key to a file that group or others can read (mode {:o}); meshd refuses such a key file: run `(umask 077; meshctl genkey > FILE)` or chmod 600 it",
            meta.mode() & 0o777
        );
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Genkey => {
            warn_if_stdout_is_readable_by_others();
            let key = PrivateKey::generate();
            writeln!(stdout, "{}", key.to_base64().as_str())?;
        }
        Command::Pubkey => {
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the private key from standard input")?;
            let key = PrivateKey::from_base64("the private key on standard input", &text)?;
            writeln!(stdout, "{}", key.public_key())?;
        }
        Command::Peers(args) => return peers(&args, &mut stdout),
        Command::Exports(args) => return exports(&args, &mut stdout),
        Command::Resolve(args) => return resolve(&args, &mut stdout),
        Command::Diagnose(args) => return diagnose(&args, &mut stdout),
        Command::Stanza(args) => match join::peer_stanza(&args) {
            Ok((stanza, notes)) => {
                for note in notes {
                    eprintln!("meshctl: note: {note}");
                }
                write!(stdout, "{}", stanza.to_toml())?;
            }
            Err(e) => return Ok(join_failed(&e)),
        },
        Command::Secret(args) => match join::write_secret(&args) {
            Ok(written) => write!(stdout, "{}", written.instructions())?,
            Err(e) => return Ok(join_failed(&e)),
        },
        Command::CheckConfig(args) => match join::check_config(&args) {
            Ok(config) => write!(
                stdout,
                "{}: meshd accepts it\n{}",
                args.config.display(),
                join::describe(&config)
            )?,
            Err(e) => return Ok(join_failed(&e)),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Reports a refused or failed `stanza` / `secret` and gives its exit code.
fn join_failed(e: &JoinError) -> ExitCode {
    eprintln!("meshctl: error: {e}");
    ExitCode::from(e.exit_code())
}

fn peers(args: &PeersArgs, out: &mut impl Write) -> Result<ExitCode> {
    let client = AdminClient::new(&args.socket);
    loop {
        let answer = client.peers();
        if args.watch {
            // Clear the screen and home the cursor, then redraw.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        let code = match answer {
            Ok(response) => {
                let agent = response
                    .node
                    .as_ref()
                    .is_some_and(|n| n.role == Role::RouteAgent);
                match args.output {
                    Output::Json => {
                        serde_json::to_writer_pretty(&mut *out, &response)?;
                        writeln!(out)?;
                    }
                    Output::Table | Output::Wide => {
                        let wide = args.output == Output::Wide;
                        if !agent {
                            write!(out, "{}", render_table(&response.peers, wide, unix_now()))?;
                        }
                        if let (true, Some(translation)) = (wide, &response.translation) {
                            write!(out, "{}", render_translation(translation))?;
                        }
                        if let Some(node) = &response.node {
                            write!(out, "{}", render_node(node))?;
                        }
                    }
                }
                // A route agent (a standby gateway candidate too) has no tunnel of its own:
                // its node's problems alone decide.
                let all_up = (agent || response.peers.iter().all(|p| p.status == PeerState::Up))
                    && response.node.as_ref().is_none_or(|n| n.problems.is_empty());
                if all_up {
                    0
                } else {
                    EXIT_NOT_UP
                }
            }
            Err(e) if args.watch => {
                writeln!(out, "meshctl: error: {e}")?;
                EXIT_UNREACHABLE
            }
            Err(e) => {
                eprintln!("meshctl: error: {e}");
                return Ok(ExitCode::from(EXIT_UNREACHABLE));
            }
        };
        out.flush()?;
        if !args.watch {
            return Ok(ExitCode::from(code));
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

/// Prints the error of an unreachable meshd and gives its exit code.
fn unreachable(e: impl std::fmt::Display) -> Result<ExitCode> {
    eprintln!("meshctl: error: {e}");
    Ok(ExitCode::from(EXIT_UNREACHABLE))
}

fn exports(args: &ExportsArgs, out: &mut impl Write) -> Result<ExitCode> {
    let answer = match AdminClient::new(&args.socket.socket).exports() {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    match args.output {
        ExportsOutput::Json => {
            serde_json::to_writer_pretty(&mut *out, &answer)?;
            writeln!(out)?;
        }
        ExportsOutput::Table => write!(out, "{}", render_exports(&answer, unix_now()))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The clusters (with their sync state) and the services (with the clusters serving them).
fn render_exports(answer: &ExportsResponse, now: u64) -> String {
    let view = &answer.view;
    let mut clusters = vec![["CLUSTER", "STATUS", "GENERATION", "SERVICES", "SYNC"]
        .map(String::from)
        .to_vec()];
    for (i, entry) in view.clusters.iter().enumerate() {
        let c = &entry.catalog;
        let sync = answer.sync.iter().find(|s| s.peer == c.cluster);
        clusters.push(vec![
            if i == 0 {
                format!("{} (local)", c.cluster)
            } else {
                c.cluster.clone()
            },
            if entry.up { "up" } else { "down" }.to_string(),
            c.generation.to_string(),
            c.services.len().to_string(),
            match sync {
                None => "-".to_string(),
                Some(s) => match &s.last_error {
                    Some(e) => format!("failing: {e}"),
                    None => format!("answered {}", ago(s.last_answer, now)),
                },
            },
        ]);
    }
    for s in answer
        .sync
        .iter()
        .filter(|s| !view.clusters.iter().any(|c| c.catalog.cluster == s.peer))
    {
        clusters.push(vec![
            s.peer.clone(),
            if s.reachable { "up" } else { "down" }.to_string(),
            "-".to_string(),
            "-".to_string(),
            format!(
                "no catalog yet{}",
                s.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ]);
    }
    let mut services: std::collections::BTreeMap<
        (String, String),
        Vec<&meshd::discovery::catalog::ExportedService>,
    > = std::collections::BTreeMap::new();
    let mut servers: std::collections::BTreeMap<(String, String), Vec<String>> =
        std::collections::BTreeMap::new();
    for entry in &view.clusters {
        for s in &entry.catalog.services {
            let key = (s.namespace.clone(), s.name.clone());
            services.entry(key.clone()).or_default().push(s);
            servers.entry(key).or_default().push(if entry.up {
                entry.catalog.cluster.clone()
            } else {
                format!("{} (down)", entry.catalog.cluster)
            });
        }
    }
    let mut rows = vec![[
        "SERVICE",
        "TYPE",
        "CLUSTERS",
        "ADDRESSES",
        "PORTS",
        "CONFLICT",
    ]
    .map(String::from)
    .to_vec()];
    for ((ns, name), list) in &services {
        let first = list[0];
        let addresses: Vec<String> = list
            .iter()
            .flat_map(|s| match s.service_type {
                ServiceType::ClusterSetIP => s.ips.clone(),
                ServiceType::Headless => s.ready_endpoints().map(|e| e.ip).collect(),
            })
            .map(|ip| ip.to_string())
            .collect();
        let ports: Vec<String> = first
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{}/{}/{}",
                    p.name.as_deref().unwrap_or("-"),
                    p.protocol,
                    p.port
                )
            })
            .collect();
        rows.push(vec![
            format!("{ns}/{name}"),
            format!("{:?}", first.service_type),
            servers[&(ns.clone(), name.clone())].join(", "),
            addresses.join(", "),
            ports.join(","),
            answer
                .conflicts
                .iter()
                .find(|c| c.namespace == *ns && c.name == *name)
                .map_or_else(
                    || "-".to_string(),
                    |c| {
                        if c.conflict {
                            format!("yes ({})", c.reason)
                        } else {
                            "no".to_string()
                        }
                    },
                ),
        ]);
    }
    let mut text = align(&clusters);
    text.push('\n');
    if services.is_empty() {
        text.push_str("no services are exported anywhere in the clusterset\n");
    } else {
        text.push_str(&align(&rows));
    }
    for c in answer.conflicts.iter().filter(|c| c.conflict) {
        text.push_str(&format!(
            "{}/{}: {}: {}\n",
            c.namespace, c.name, c.reason, c.message
        ));
    }
    if !view.loaded {
        text.push_str(
            "meshd has not finished its first catalog sync: DNS answers SERVFAIL until then\n",
        );
    }
    text
}

fn resolve(args: &ResolveArgs, out: &mut impl Write) -> Result<ExitCode> {
    let client = AdminClient::new(&args.socket.socket);
    let (status, exports) = match client.status().and_then(|s| Ok((s, client.exports()?))) {
        Ok(both) => both,
        Err(e) => return unreachable(e),
    };
    let qtype = RecordType::from_str(&args.qtype.to_ascii_uppercase()).map_err(|_| {
        anyhow::anyhow!(
            "--type '{}' is not a DNS record type; use A, AAAA, SRV or TXT",
            args.qtype
        )
    })?;
    let Some(listen) = status.dns_listen.as_deref() else {
        anyhow::bail!("meshd's DNS responder is off (dns_listen = \"off\"); turn it on to resolve clusterset.local names");
    };
    let server = diagnose::listen_target("dns_listen", listen).map_err(anyhow::Error::msg)?;
    let answer = diagnose::ask_dns(server, &args.name, qtype).map_err(anyhow::Error::msg)?;
    writeln!(
        out,
        ";; {} {} from meshd's DNS at {}: {}",
        args.name, qtype, answer.server, answer.rcode
    )?;
    for record in &answer.records {
        writeln!(out, "{record}")?;
    }
    if answer.records.is_empty() {
        writeln!(out, ";; no records")?;
    }
    writeln!(out, ";; why:")?;
    for line in diagnose::explain(&exports.view, &args.name) {
        writeln!(out, ";;   {line}")?;
    }
    Ok(
        if answer.rcode == ResponseCode::NoError && !answer.records.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_NOT_UP)
        },
    )
}

fn diagnose(args: &SocketArgs, out: &mut impl Write) -> Result<ExitCode> {
    let client = AdminClient::new(&args.socket);
    let peers = match client.peers() {
        Ok(peers) => peers,
        Err(e) => {
            writeln!(out, "FAIL  admin         {e}")?;
            return Ok(ExitCode::from(EXIT_UNREACHABLE));
        }
    };
    let agent = peers
        .node
        .as_ref()
        .is_some_and(|n| n.role == Role::RouteAgent);
    let mut checks = Vec::new();
    if !agent {
        let gathered = client.status().and_then(|status| {
            Ok(diagnose::Gathered {
                peers: peers.peers.clone(),
                exports: client.exports()?,
                routes: diagnose::kernel_routes(),
                dns: status.dns_listen.as_deref().map(|listen| {
                    diagnose::listen_target("dns_listen", listen).and_then(|server| {
                        diagnose::ask_dns(server, "dns-version.clusterset.local", RecordType::TXT)
                    })
                }),
                metrics: status.metrics_listen.as_deref().map(diagnose::scrape),
                now: unix_now(),
                status,
            })
        });
        match gathered {
            Ok(g) => checks.extend(diagnose::run_checks(&g)),
            Err(e) => {
                writeln!(out, "FAIL  admin         {e}")?;
                return Ok(ExitCode::from(EXIT_UNREACHABLE));
            }
        }
    }
    if let Some(node) = peers.node {
        checks.extend(diagnose::run_node_checks(&diagnose::NodeGathered {
            node,
            routes: diagnose::kernel_routes(),
            bypass: meshd::node::bypass::current().map_err(|e| e.to_string()),
            rp_filter: diagnose::rp_filters(),
        }));
    }
    for check in &checks {
        let mark = match check.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        writeln!(out, "{mark}  {:<12}  {}", check.name, check.detail)?;
        if let Some(fix) = &check.fix {
            writeln!(out, "      {:<12}  fix: {fix}", "")?;
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    if failed == 0 {
        writeln!(out, "all checks passed")?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(out, "{failed} check(s) failed")?;
        Ok(ExitCode::from(EXIT_NOT_UP))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `n` bytes in binary units, as `wg show` writes them: "0 B", "512 B", "1.50 KiB", "188.74 MiB".
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// How long ago `then` was: "12s ago", "5m3s ago", "2h1m ago", or "never".
fn ago(then: Option<u64>, now: u64) -> String {
    let Some(then) = then else {
        return "never".into();
    };
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

/// Rows as aligned columns (two spaces apart), the first row being the header.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The peers as an aligned table with a header row; `wide` adds the public key and MTU.
/// This node's part under the peer table (on a route agent, instead of it): its role, the
/// gateway, the masquerade bypass, a route agent's routes, and each problem with its fix.
/// The election line: who is the active gateway, since when, and what this node is.
fn render_election(e: &meshd::node::election::ElectionView) -> String {
    let since = e
        .since
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s as i64).ok())
        .map(|t| format!(" since {t}"))
        .unwrap_or_default();
    let me = match (e.active, e.candidate) {
        (true, _) => "the active gateway",
        (false, true) => "a standby gateway candidate",
        (false, false) => "a route agent (not a gateway candidate)",
    };
    let holder = match (&e.holder, e.holder_address) {
        (Some(_), _) if e.active => format!("holds the Lease{since}"),
        (Some(h), Some(a)) => format!("active gateway {h} ({a}){since}"),
        (Some(h), None) => format!("active gateway {h}{since}"),
        (None, _) => "no active gateway right now (hand-over or expiry)".to_string(),
    };
    format!(
        "election: {} is {me} · {holder} · {} transitions\n",
        e.node, e.transitions
    )
}

fn render_node(node: &NodeView) -> String {
    let gateway = match (node.role, node.gateway) {
        (Role::Gateway, Some(address)) => format!("gateway {address} (this node)"),
        (Role::Gateway, None) => {
            "gateway (this node; no gateway_address: the only one)".to_string()
        }
        (Role::RouteAgent, Some(address)) => format!("route agent; gateway {address}"),
        (Role::RouteAgent, None) => "route agent; gateway unknown".to_string(),
    };
    let bypass = &node.masquerade_bypass;
    let bypass = match (bypass.enabled, bypass.in_place, bypass.restored) {
        (false, _, _) => "off (masquerade_bypass = false)".to_string(),
        (true, false, _) => "MISSING".to_string(),
        (true, true, 0) => "in place".to_string(),
        (true, true, n) => format!("in place (written again {n} times)"),
    };
    let path = node
        .path
        .as_deref()
        .map(|p| format!(" · {p}"))
        .unwrap_or_default();
    let mut text = format!("node: {gateway}{path} · masquerade bypass: {bypass}\n");
    if let Some(election) = &node.election {
        text.push_str(&render_election(election));
    }
    if node.role == Role::RouteAgent {
        let mut rows = vec![vec![
            "ROUTE".to_string(),
            "VIA".to_string(),
            "STATE".to_string(),
        ]];
        rows.extend(node.routes.iter().map(|r| {
            vec![
                r.prefix.to_string(),
                r.via.to_string(),
                if r.in_place { "in place" } else { "MISSING" }.to_string(),
            ]
        }));
        text.push_str(&align(&rows));
    }
    for problem in &node.problems {
        text.push_str(&format!("problem: {problem}\n"));
    }
    text
}

/// This cluster's global ranges: which local range peers know by which global one, and how many
/// packets were translated each way.
fn render_translation(t: &TranslationView) -> String {
    let mut rows = vec![vec![
        "LOCAL".to_string(),
        "GLOBAL (as peers reach it)".to_string(),
    ]];
    rows.extend(
        t.global_cidrs
            .iter()
            .map(|c| vec![c.local.to_string(), c.global.to_string()]),
    );
    format!(
        "{}translated: {} packets out (local source to global), {} in (global destination to local)\n",
        align(&rows),
        t.outbound_packets,
        t.inbound_packets
    )
}

fn render_table(peers: &[PeerView], wide: bool, now: u64) -> String {
    let mut header = vec![
        "NAME",
        "ENDPOINT",
        "STATUS",
        "HANDSHAKE",
        "RTT",
        "RX",
        "TX",
        "RATE",
        "ALLOWED CIDRS",
    ];
    if wide {
        header.extend(["PUBLIC KEY", "MTU"]);
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for p in peers {
        let endpoint = match (&p.endpoint, p.endpoint_learned) {
            (None, _) => "(none)".to_string(),
            (Some(e), true) => format!("{e} (learned)"),
            (Some(e), false) => e.clone(),
        };
        let cidrs: Vec<String> = p.allowed_cidrs.iter().map(|c| c.to_string()).collect();
        let mut row = vec![
            p.name.clone(),
            endpoint,
            p.status.as_str().to_string(),
            ago(p.last_handshake, now),
            p.rtt_ms
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}ms")),
            human_bytes(p.rx_bytes),
            human_bytes(p.tx_bytes),
            format!(
                "{}/s in, {}/s out",
                human_bytes(p.rx_rate),
                human_bytes(p.tx_rate)
            ),
            cidrs.join(","),
        ];
        if wide {
            row.extend([p.public_key.clone(), p.mtu.to_string()]);
        }
        rows.push(row);
    }
    let mut text = align(&rows);
    for p in peers.iter().filter(|p| p.status != PeerState::Up) {
        text.push_str(&format!(
            "{} is {}: {}\n",
            p.name,
            p.status.as_str(),
            p.reason
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m2() -> PeerView {
        PeerView {
            name: "m2".into(),
            public_key: "n0PlabeYSPRAaj+L3VYH9mHjsEIfgmTPmaCqEzcpd2U=".into(),
            endpoint: Some("192.0.2.2:51820".into()),
            configured_endpoint: Some("192.0.2.2:51820".into()),
            endpoint_learned: false,
            status: PeerState::Up,
            reason: "handshake 12s ago, last packet received 1s ago".into(),
            last_handshake: Some(1_000_000 - 12),
            rx_bytes: 197_904_588,
            tx_bytes: 213_836_120,
            rx_rate: 1_572_864,
            tx_rate: 900,
            handshake_rtt_ms: Some(1),
            handshakes: 1,
            rtt_ms: Some(0.42),
            allowed_cidrs: vec![
                "10.245.0.0/16".parse().unwrap(),
                "10.97.0.0/16".parse().unwrap(),
            ],
            mtu: 1420,
        }
    }

    fn m3() -> PeerView {
        PeerView {
            name: "m3".into(),
            public_key: "xOvwhlzd6n0CSZbGl+jFXDTUBFeLD4XMf37QrkswW3U=".into(),
            endpoint: Some("198.51.100.7:40000".into()),
            configured_endpoint: None,
            endpoint_learned: true,
            status: PeerState::Down,
            reason: "no handshake for 200s".into(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 148,
            rx_rate: 0,
            tx_rate: 0,
            handshake_rtt_ms: None,
            handshakes: 0,
            rtt_ms: None,
            allowed_cidrs: vec!["10.246.0.0/16".parse().unwrap()],
            mtu: 1420,
        }
    }

    #[test]
    fn the_election_line_names_the_active_gateway_since_when_and_what_this_node_is() {
        use meshd::node::election::ElectionView;
        let gw = "172.18.1.1".parse().unwrap();
        let mut node = NodeView::new(Role::Gateway, Some(gw), true);
        node.masquerade_bypass.in_place = true;
        node.forwarding = true;
        let mut election = ElectionView {
            node: "m1-gw".into(),
            candidate: true,
            active: true,
            holder: Some("m1-gw".into()),
            holder_address: Some(gw),
            since: Some(1_796_000_000),
            transitions: 2,
        };
        node.election = Some(election.clone());
        node.find_problems();
        assert_eq!(
            render_node(&node).lines().nth(1),
            Some("election: m1-gw is the active gateway · holds the Lease since 2026-11-30T00:53:20Z · 2 transitions")
        );
        election.node = "m1-n2".into();
        election.active = false;
        node.election = Some(election.clone());
        assert_eq!(
            render_node(&node).lines().nth(1),
            Some("election: m1-n2 is a standby gateway candidate · active gateway m1-gw (172.18.1.1) since 2026-11-30T00:53:20Z · 2 transitions")
        );
        // Nobody holds it (a hand-over, or every candidate down): said, and a problem.
        election.holder = None;
        election.holder_address = None;
        election.candidate = false;
        node.election = Some(election);
        node.find_problems();
        let text = render_node(&node);
        assert!(
            text.contains("election: m1-n2 is a route agent (not a gateway candidate) · no active gateway right now"),
            "{text}"
        );
        assert!(
            text.contains("problem: no active gateway: no candidate holds the Lease meshd-gateway"),
            "{text}"
        );
    }

    #[test]
    fn the_node_line_names_role_gateway_bypass_and_problems() {
        let gw = "172.18.1.1".parse().unwrap();
        let mut node = NodeView::new(Role::Gateway, Some(gw), true);
        node.masquerade_bypass.in_place = true;
        assert_eq!(
            render_node(&node),
            "node: gateway 172.18.1.1 (this node) · masquerade bypass: in place\n"
        );
        let mut agent = NodeView::new(Role::RouteAgent, Some(gw), true);
        agent.routes.push(meshd::node::RouteView {
            prefix: "10.245.0.0/16".parse().unwrap(),
            via: gw,
            in_place: false,
        });
        agent.forwarding = true;
        agent.find_problems();
        let text = render_node(&agent);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "node: route agent; gateway 172.18.1.1 · masquerade bypass: MISSING"
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["ROUTE", "VIA", "STATE"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["10.245.0.0/16", "172.18.1.1", "MISSING"]
        );
        assert!(
            lines[3].starts_with("problem: the masquerade bypass is not in place"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("problem: no route for 10.245.0.0/16 via the gateway 172.18.1.1"),
            "{text}"
        );
    }

    #[test]
    fn the_table_has_one_aligned_row_per_peer() {
        let text = render_table(&[m2(), m3()], false, 1_000_000);
        let expected = "\
NAME  ENDPOINT                      STATUS  HANDSHAKE  RTT    RX          TX          RATE                        ALLOWED CIDRS
m2    192.0.2.2:51820               up      12s ago    0.4ms  188.74 MiB  203.93 MiB  1.50 MiB/s in, 900 B/s out  10.245.0.0/16,10.97.0.0/16
m3    198.51.100.7:40000 (learned)  down    never      -      0 B         148 B       0 B/s in, 0 B/s out         10.246.0.0/16
m3 is down: no handshake for 200s
";
        assert_eq!(text, expected);
    }

    #[test]
    fn the_wide_table_adds_key_and_mtu() {
        let text = render_table(&[m2()], true, 1_000_000);
        let expected = "\
NAME  ENDPOINT         STATUS  HANDSHAKE  RTT    RX          TX          RATE                        ALLOWED CIDRS               PUBLIC KEY                                    MTU
m2    192.0.2.2:51820  up      12s ago    0.4ms  188.74 MiB  203.93 MiB  1.50 MiB/s in, 900 B/s out  10.245.0.0/16,10.97.0.0/16  n0PlabeYSPRAaj+L3VYH9mHjsEIfgmTPmaCqEzcpd2U=  1420
";
        assert_eq!(text, expected);
    }

    #[test]
    fn ages_and_sizes_read_like_wg() {
        assert_eq!(ago(None, 100), "never");
        assert_eq!(ago(Some(88), 100), "12s ago");
        assert_eq!(ago(Some(0), 303), "5m3s ago");
        assert_eq!(ago(Some(0), 7260), "2h1m ago");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
    }
}
