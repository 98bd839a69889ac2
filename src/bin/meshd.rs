//! The meshd daemon: loads the configuration, opens the TUN device and the WireGuard port, starts
//! the dataplane threads, then runs the control plane (routes, UAPI, the clusterset.local DNS
//! responder, SIGHUP reload) on tokio.

use anyhow::{Context, Result};
use clap::Parser;
use meshd::admin::metrics;
use meshd::admin::monitor::PeerMonitor;
use meshd::admin::server::{self as admin, Health};
use meshd::config::{Config, ConfigArgs, TUNNEL_OVERHEAD};
use meshd::control::routes::RouteTable;
use meshd::control::{spec_from_config, uapi, Controller};
use meshd::dataplane::{open_tun, Dataplane, Threads, TunSettings};
use meshd::discovery::clusterset::Clusterset;
use meshd::discovery::probe::Prober;
use meshd::discovery::sync::{self as catalog_sync, Followers, SyncErrors};
use meshd::discovery::{discovery_peers, exports, kubernetes, ExportCatalog};
use meshd::dns;
use meshd::node::election::Election;
use meshd::node::keeper::{Keeper, Prefixes};
use meshd::node::lease::Leadership;
use meshd::node::{NodeState, NodeView, Role};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Userspace WireGuard gateway joining Kubernetes clusters' pod networks.
#[derive(Debug, Parser)]
#[command(name = "meshd", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() {
    // Everything meshd creates (the admin and UAPI sockets, their directories) is for root
    // alone from the moment it exists, not after a chmod.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
                // hickory-server logs every query at info: counted instead (meshd_dns_queries_total);
                // kube-client warns of every dropped watch connection, which the watcher resumes.
                .unwrap_or_else(|_| "info,hickory_server=warn,kube_client=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("meshd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control plane runtime")?;
    let mut config = Config::load(&cli.config)?;
    let own_addresses = runtime
        .block_on(async {
            let handle = meshd::netlink::connect()?;
            meshd::netlink::addresses(&handle)
                .await
                .map(|found| found.into_iter().map(|(_, ip)| ip).collect::<Vec<_>>())
                .map_err(std::io::Error::other)
        })
        .context(
            "cannot read this node's addresses over netlink (to tell whether it is the gateway)",
        )?;
    let mut election = None;
    if config.gateway_address.is_none() && config.kubernetes {
        // The candidates (labelled nodes) elect the active gateway through the Lease; every
        // other node follows its holder.
        let found = runtime
            .block_on(async {
                let client = kubernetes::connect().await?;
                anyhow::Ok(Election::new(client, own_addresses.clone()).await?)
            })
            .context(
                "cannot tell which nodes are gateway candidates (kubernetes = true, no gateway_address)",
            )?;
        let directory = found.directory();
        tracing::info!(candidates = ?directory.candidates, node = %found.me(), candidate = directory.i_am_candidate(),
            "gateway candidates, from the Kubernetes API");
        if !directory.i_am_candidate() {
            return runtime.block_on(run_agent(cli.config, config, Some(found)));
        }
        config.gateway_address = found.my_address();
        election = Some(found);
    }
    let role = meshd::node::role(config.gateway_address, &own_addresses);
    if role == Role::RouteAgent {
        return runtime.block_on(run_agent(cli.config, config, None));
    }
    let catalog = exports::load(config.exports_file.as_deref(), &config.cluster, 1)?;
    if config.local_cidrs.is_empty() {
        tracing::warn!("no local_cidrs: decrypted packets are delivered to any destination, this node's own addresses included; set local_cidrs to this cluster's pod and service CIDRs");
    }
    let mtu = match config.mtu {
        Some(mtu) => mtu,
        None => {
            let (underlay, why) = runtime.block_on(meshd::netlink::underlay_mtu(&config.interface));
            let mtu = underlay.saturating_sub(TUNNEL_OVERHEAD);
            tracing::info!(underlay, mtu, source = %why, "tunnel MTU derived from the underlay");
            mtu
        }
    };
    let tun = open_tun(&TunSettings {
        name: config.interface.clone(),
        mtu,
        address: config.tunnel_address,
        offload: config.offload,
        multi_queue: config.tx_threads > 1,
    })
    .with_context(|| {
        format!(
            "cannot create TUN interface '{}' (needs root or CAP_NET_ADMIN and /dev/net/tun; is the name already taken?)",
            config.interface
        )
    })?;
    let ifindex = tun
        .if_index()
        .context("cannot read the TUN interface's index")?;
    let offload = tun.tcp_gso();
    let health = Health::new();
    health.watch_dataplane_threads();
    // A candidate starts as a standby: nothing in or out until it holds the Lease.
    let threads = Threads {
        queues: config.tx_threads,
        forwarding: election.is_none(),
        batch_scheduling: config.batch_scheduling,
    };
    let dataplane = Dataplane::start(tun, mtu, spec_from_config(&config), threads)?;
    tracing::info!(
        cluster = %config.cluster,
        interface = %config.interface,
        listen_port = dataplane.listen_port(),
        mtu,
        offload,
        tx_threads = config.tx_threads,
        batch_scheduling = config.batch_scheduling,
        gso_segments = dataplane.max_segments(),
        peers = config.peers.len(),
        public_key = %config.private_key.as_ref().map(|k| k.public_key().to_string()).unwrap_or_else(|| "(none yet: set one with `wg set`)".into()),
        "meshd is up"
    );

    runtime.block_on(control_plane(
        cli.config, config, catalog, dataplane, ifindex, mtu, health, election,
    ))
}

/// Binds the discovery port on our tunnel address: UDP for the health probe, bound to the TUN
/// device `interface` so that only datagrams from the tunnel reach it, and TCP for the catalog
/// sync. The address may still be settling on the new TUN interface, hence a few tries.
async fn bind_discovery(
    addr: SocketAddr,
    interface: &str,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let probe_socket = || -> std::io::Result<tokio::net::UdpSocket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.bind_device(Some(interface.as_bytes()))?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        tokio::net::UdpSocket::from_std(socket.into())
    };
    let mut tries = 0;
    loop {
        let bound = async {
            Ok::<_, std::io::Error>((probe_socket()?, tokio::net::TcpListener::bind(addr).await?))
        }
        .await;
        match bound {
            Ok(b) => return Ok(b),
            Err(e) if tries < 20 && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot bind the discovery port {addr} (catalog sync TCP, health probe UDP): choose a free discovery_port (or --discovery-port)")
                })
            }
        }
    }
}

/// What only the active gateway runs besides the tunnel: the meshd-dns endpoint.
struct ActiveTasks {
    dns_endpoint: Option<tokio::task::JoinHandle<()>>,
}

impl ActiveTasks {
    fn start(config: &Config, client: Option<&kube::Client>) -> ActiveTasks {
        // In Kubernetes the meshd-dns Service's endpoint is the active gateway, written by it:
        // the DaemonSet runs on every node, and only the active gateway answers DNS.
        let dns_endpoint = match (client, config.gateway_address, config.dns_listen) {
            (Some(client), Some(address), Some(listen)) => Some(tokio::spawn(
                publish_dns_endpoint(client.clone(), address, listen.port()),
            )),
            _ => None,
        };
        ActiveTasks { dns_endpoint }
    }

    fn standby() -> ActiveTasks {
        ActiveTasks { dns_endpoint: None }
    }

    fn abort(&self) {
        if let Some(task) = &self.dns_endpoint {
            task.abort();
        }
    }
}

/// Writes the meshd-dns Service's endpoint now and every 30 s.
async fn publish_dns_endpoint(client: kube::Client, address: std::net::IpAddr, port: u16) {
    let mut failing = false;
    loop {
        match meshd::node::kubernetes::publish_dns(client.clone(), address, port).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(endpoint = %SocketAddr::new(address, port), "the meshd-dns Service's endpoint is written again");
            }
            Ok(()) => {}
            Err(e) => {
                failing = true;
                tracing::error!(error = %e, "cannot write the meshd-dns Service's endpoint (EndpointSlice meshd-dns-gateway): CoreDNS cannot reach this gateway's DNS until it is; meshd's Role needs create and patch on endpointslices (deploy/base/rbac.yaml)");
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
}

/// The gateway metrics of the election.
#[derive(Clone, Default)]
struct GatewayMetrics {
    active: prometheus_client::metrics::gauge::Gauge,
    transitions: prometheus_client::metrics::counter::Counter,
}

impl GatewayMetrics {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "meshd_gateway_active",
            "1 while this meshd is its cluster's active gateway (it forwards), 0 as a standby",
            self.active.clone(),
        );
        registry.register(
            "meshd_gateway_transitions",
            "How often this meshd became the active gateway or stopped being it",
            self.transitions.clone(),
        );
    }
}

/// This node's part for its current role: the gateway's (with its VXLAN end), or a route
/// agent's towards `gateway` (none yet: the bypass alone).
async fn start_keeper(
    config: &Config,
    role: Role,
    gateway: Option<std::net::IpAddr>,
    prefixes: &tokio::sync::watch::Receiver<Prefixes>,
    state: &NodeState,
) -> Result<Keeper> {
    Ok(Keeper::start(
        meshd::netlink::connect().context("cannot open a netlink socket for the node's routes")?,
        role,
        gateway,
        config.masquerade_bypass,
        config.route_mode,
        prefixes.clone(),
        state.clone(),
    )
    .await?)
}

#[allow(clippy::too_many_arguments)]
async fn control_plane(
    args: ConfigArgs,
    mut config: Config,
    catalog: ExportCatalog,
    dataplane: Arc<Dataplane>,
    ifindex: u32,
    mtu: u16,
    health: Arc<Health>,
    mut election: Option<Election>,
) -> Result<()> {
    let (mut probe_targets, mut sync_peers) = discovery_peers(&config);
    let prober = Prober::new(config.discovery_port, Vec::new());
    let clusterset = Clusterset::new(&config.cluster, prober.clone());
    let kube_client = if config.kubernetes {
        Some(kubernetes::connect()
            .await
            .context("cannot reach the Kubernetes API (kubernetes = true): run in a pod with a service account, or set KUBECONFIG")?)
    } else {
        None
    };
    let mut active = election.is_none();
    // The ServiceExport watcher runs on a standby too (warm watches, and DNS answers for this
    // cluster's services); only the active gateway writes statuses and ServiceImports.
    let (writing_tx, writing_rx) = tokio::sync::watch::channel(active);
    let mut kubernetes_task = if let Some(client) = kube_client.clone() {
        tracing::info!(cluster = %config.cluster, "local exports come from the Kubernetes API (ServiceExports)");
        tokio::spawn(kubernetes::run(
            client,
            config.cluster.clone(),
            config.local_cidrs.clone(),
            clusterset.local_sender().clone(),
            clusterset.subscribe(),
            writing_rx,
        ))
    } else {
        tracing::info!(
            cluster = %config.cluster,
            services = catalog.services.len(),
            exports_file = ?config.exports_file,
            "local exports loaded"
        );
        clusterset.local_sender().send_replace(catalog);
        tokio::spawn(futures::future::pending())
    };
    let mut active_tasks = if active {
        ActiveTasks::start(&config, kube_client.as_ref())
    } else {
        ActiveTasks::standby()
    };
    let view = clusterset.snapshot();
    let clusterset_task = tokio::spawn(clusterset.clone().run());
    let mut generation = 1;
    let dns_counters = Arc::new(dns::QueryCounters::default());
    let sync_errors = SyncErrors::default();
    let (mut discovery_task, mut followers) = match config.tunnel_address {
        Some(net) => {
            let addr = SocketAddr::new(net.addr(), config.discovery_port);
            let (udp, tcp) = bind_discovery(addr, &config.interface).await?;
            tracing::info!(listen = %addr, peers = sync_peers.len(), "catalog sync and health probe are up");
            clusterset.set_peers(&probe_targets);
            let mut followers = Followers::new(
                clusterset.clone(),
                prober.clone(),
                sync_errors.clone(),
                net.addr(),
                config.discovery_port,
            );
            // A standby probes and syncs nothing: its tunnel forwards nothing.
            if active {
                prober.set_targets(probe_targets.clone());
                followers.set_peers(sync_peers.clone());
            }
            let probe = prober.clone();
            let catalog = clusterset.local_catalog();
            let sync_prober = prober.clone();
            let translation = Arc::new(config.translation.clone());
            let task = tokio::spawn(async move {
                tokio::select! {
                    r = probe.run(udp) => r,
                    r = catalog_sync::serve(tcp, catalog, sync_prober, translation) => r,
                }
            });
            (task, Some(followers))
        }
        None => {
            if !sync_peers.is_empty() {
                tracing::warn!("peers have a tunnel_address but this gateway has none: no catalog sync and no health probe; set tunnel_address");
            }
            (tokio::spawn(futures::future::pending()), None)
        }
    };

    let mut health_task = serve_health(config.health_listen, &health).await?;
    let endpoints_task = tokio::spawn(next_endpoint_when_unreachable(
        prober.clone(),
        dataplane.clone(),
    ));

    let monitor = PeerMonitor::new(dataplane.clone(), prober.clone(), mtu);
    let sampler_task = tokio::spawn(monitor.clone().run_sampler());
    let node_state: NodeState = Arc::new(parking_lot::RwLock::new(NodeView::new(
        if active {
            Role::Gateway
        } else {
            Role::RouteAgent
        },
        config.gateway_address,
        config.masquerade_bypass,
    )));
    let (prefixes_tx, prefixes_rx) = tokio::sync::watch::channel(node_prefixes(&config));
    // A standby is a route agent until it knows the holder (the election says so at once).
    let mut keeper = Some(
        start_keeper(
            &config,
            if active {
                Role::Gateway
            } else {
                Role::RouteAgent
            },
            if active { config.gateway_address } else { None },
            &prefixes_rx,
            &node_state,
        )
        .await?,
    );
    let (controller, mut wanted) = Controller::new(dataplane);
    let routes = Arc::new(tokio::sync::Mutex::new(
        RouteTable::new(&config.interface, ifindex)
            .context("cannot open a netlink socket for routes")?,
    ));
    // Remote prefixes enter the tunnel only on the active gateway.
    let (routing_tx, mut routing) = tokio::sync::watch::channel(active);
    if active {
        routes
            .lock()
            .await
            .sync(&wanted.borrow_and_update())
            .await?;
    }
    health.routes_programmed();
    let route_task = {
        let routes = routes.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = wanted.changed() => if changed.is_err() { break },
                    changed = routing.changed() => if changed.is_err() { break },
                }
                let prefixes = if *routing.borrow_and_update() {
                    wanted.borrow_and_update().clone()
                } else {
                    Vec::new()
                };
                if let Err(e) = routes.lock().await.sync(&prefixes).await {
                    tracing::error!(error = %e, "route update failed; traffic to that prefix will not enter the tunnel until it is fixed");
                }
            }
        })
    };

    let gateway_metrics = GatewayMetrics::default();
    gateway_metrics.active.set(i64::from(active));
    let mut metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for metrics on {addr}: set metrics_listen (or --metrics-listen) to a free address, or \"off\"")
            })?;
            let mut registry = metrics::registry(
                controller.dataplane().clone(),
                dns_counters.clone(),
                monitor.clone(),
            );
            prober.register_metrics(&mut registry);
            registry.register_collector(Box::new(metrics::ClustersetCollector::new(view.clone())));
            sync_errors.register(&mut registry);
            gateway_metrics.register(&mut registry);
            tokio::spawn(metrics::serve(listener, registry))
        }
        None => tokio::spawn(futures::future::pending()),
    };

    let mut dns_task = match config.dns_listen {
        Some(addr) => {
            let (thread, local) = dns::spawn(
                addr,
                view.clone(),
                config.dns_ttl,
                config.dns_rate_limit,
                dns_counters.clone(),
            )
            .await?;
            tracing::info!(listen = %local, ttl = config.dns_ttl, rate_limit = config.dns_rate_limit, "clusterset.local DNS responder is up");
            tokio::spawn(thread.stopped())
        }
        None => tokio::spawn(futures::future::pending()),
    };

    let admin_listener = admin::bind_admin_socket(&config.admin_socket)?;
    let admin_router = admin::admin_router(
        monitor,
        health,
        clusterset.clone(),
        admin::Identity {
            cluster: config.cluster.clone(),
            interface: config.interface.clone(),
            local_cidrs: config.local_cidrs.clone(),
            mtu,
            dns_listen: config.dns_listen,
            metrics_listen: config.metrics_listen,
        },
        node_state.clone(),
    );
    let mut admin_task = tokio::spawn(admin::serve_admin(admin_listener, admin_router));
    tracing::info!(socket = %config.admin_socket.display(), "admin API is up");

    let socket = uapi::socket_path(&config.interface);
    let mut uapi_task = tokio::spawn(uapi::serve(socket.clone(), controller.clone()));

    let mut running_election = election.as_ref().map(|e| e.run_candidate(config.lease));
    let mut leadership = running_election
        .as_ref()
        .map(|r| r.leadership.clone())
        .unwrap_or_else(|| tokio::sync::watch::channel(Default::default()).1);
    // The gateway a standby routes to (the Lease holder's address).
    let mut routed_to: Option<std::net::IpAddr> = None;

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let result = loop {
        tokio::select! {
            changed = leadership.changed(), if running_election.is_some() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the gateway election stopped"));
                }
                let now: Leadership = leadership.borrow_and_update().clone();
                let Some(election) = election.as_mut() else { continue };
                if now.active && !active {
                    // Taking over: this node's part as the gateway, the routes into the
                    // tunnel, then the dataplane on (it handshakes with every peer).
                    active = true;
                    gateway_metrics.active.set(1);
                    gateway_metrics.transitions.inc();
                    tracing::info!(node = %election.me(), "active gateway: taking over the tunnel");
                    if let Some(k) = keeper.take() { k.hand_over().await; }
                    keeper = start_keeper(&config, Role::Gateway, config.gateway_address, &prefixes_rx, &node_state).await
                        .map_err(|e| tracing::error!(error = %e, "cannot put the gateway's part of the node in place")).ok();
                    routing_tx.send_replace(true);
                    if let Err(e) = routes.lock().await.sync(&controller.dataplane().spec().routed_prefixes()).await {
                        tracing::error!(error = %e, "cannot route the remote prefixes into the tunnel");
                    }
                    controller.dataplane().set_forwarding(true);
                    active_tasks = ActiveTasks::start(&config, kube_client.as_ref());
                    writing_tx.send_replace(true);
                    if let Some(followers) = followers.as_mut() {
                        prober.set_targets(probe_targets.clone());
                        followers.set_peers(sync_peers.clone());
                    }
                } else if !now.active && active {
                    // Fenced or handed over: stop forwarding first, then the rest.
                    controller.dataplane().set_forwarding(false);
                    active = false;
                    gateway_metrics.active.set(0);
                    gateway_metrics.transitions.inc();
                    tracing::warn!(node = %election.me(), "no longer the active gateway: standing by");
                    routing_tx.send_replace(false);
                    if let Err(e) = routes.lock().await.sync(&[]).await {
                        tracing::error!(error = %e, "cannot take the remote prefixes out of the tunnel");
                    }
                    writing_tx.send_replace(false);
                    active_tasks.abort();
                    active_tasks = ActiveTasks::standby();
                    if let Some(followers) = followers.as_mut() {
                        prober.set_targets(Vec::new());
                        followers.set_peers(Vec::new());
                    }
                    routed_to = None;
                }
                // A standby routes like an agent, to the holder.
                let follow = (!active).then_some((&mut routed_to, &mut keeper));
                follow_holder(&config, election, &now, follow, &prefixes_rx, &node_state).await;
            }
            _ = hangup.recv() => {
                // Reading files, resolving endpoint names and reconciling the dataplane block:
                // off the runtime, so that the health port and catalog sync keep answering.
                let reloaded = {
                    let (args, running, controller, clusterset) =
                        (args.clone(), config.clone(), controller.clone(), clusterset.clone());
                    let next_generation = generation + 1;
                    tokio::task::spawn_blocking(move || {
                        let new = reload(&args, &running, &controller)?;
                        if !running.kubernetes {
                            reload_exports(&new, next_generation, &clusterset);
                        }
                        Some(new)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "SIGHUP: the reload failed; keeping the running configuration");
                        None
                    })
                };
                if let Some(new) = reloaded {
                    prefixes_tx.send_replace(node_prefixes(&new));
                    if !config.kubernetes {
                        generation += 1;
                    }
                    (probe_targets, sync_peers) = discovery_peers(&new);
                    if let Some(followers) = followers.as_mut() {
                        clusterset.set_peers(&probe_targets);
                        if active {
                            prober.set_targets(probe_targets.clone());
                            followers.set_peers(sync_peers.clone());
                        }
                    }
                    config.peers = new.peers;
                }
            }
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            r = &mut uapi_task => {
                break match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("UAPI socket {} failed", socket.display()))),
                    Err(e) => Err(anyhow::anyhow!("UAPI task panicked: {e}")),
                };
            }
            r = &mut admin_task => {
                break Err(ended(format!("the admin API on {}", config.admin_socket.display()), r))
            }
            r = &mut metrics_task => break Err(ended("the metrics server", r)),
            r = &mut health_task => break Err(ended("the health probe server", r)),
            r = &mut kubernetes_task => break Err(ended("the ServiceExport watcher", r)),
            r = &mut discovery_task => break Err(ended("the catalog sync and health probe", r)),
            r = &mut dns_task => {
                break match r {
                    Ok(e) => Err(anyhow::Error::new(e).context("the DNS responder failed")),
                    Err(e) => Err(anyhow::anyhow!("DNS task panicked: {e}")),
                };
            }
        }
    };
    // A graceful stop hands over at once: forwarding off, the routes out of the tunnel, the
    // Lease released (a standby takes it through its watch).
    controller.dataplane().set_forwarding(false);
    route_task.abort();
    if active && running_election.is_some() {
        if let Err(e) = routes.lock().await.sync(&[]).await {
            tracing::error!(error = %e, "cannot take the remote prefixes out of the tunnel");
        }
    }
    if let Some(running) = running_election.take() {
        running.stop().await;
    }
    drop(followers);
    endpoints_task.abort();
    kubernetes_task.abort();
    active_tasks.abort();
    discovery_task.abort();
    clusterset_task.abort();
    metrics_task.abort();
    health_task.abort();
    dns_task.abort();
    admin_task.abort();
    sampler_task.abort();
    // The sockets go first: while the node's part is taken away, meshctl says "not running".
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&config.admin_socket);
    if let Some(keeper) = keeper {
        keeper.stop().await;
    }
    tracing::info!("meshd stopped");
    result
}

/// When a peer stops answering the health probe, moves it to its next endpoint at once
/// ([`Dataplane::try_next_endpoint`]; peers with one endpoint are left to WireGuard's timers).
async fn next_endpoint_when_unreachable(prober: Arc<Prober>, dataplane: Arc<Dataplane>) {
    let mut changes = prober.changes();
    let mut reachable: std::collections::HashMap<meshd::keys::PublicKey, bool> =
        std::collections::HashMap::new();
    while changes.changed().await.is_ok() {
        for peer in dataplane.spec().peers {
            let now = prober.reachable(&peer.public_key);
            let was = reachable.insert(peer.public_key, now);
            if was == Some(true) && !now {
                if let Some(next) = dataplane.try_next_endpoint(&peer.public_key) {
                    tracing::info!(peer = %peer.name, endpoint = %next,
                        "the peer stopped answering the health probe: trying its next endpoint");
                }
            }
        }
    }
}

/// Shows the election `now` on this node and, given `routing` (the gateway this node routes
/// to and its keeper: a route agent, or a standby candidate), routes to the Lease holder when
/// it changed. During a hand-over (no holder) the routes stay: the old gateway may still be the
/// best guess, and the new one replaces them as soon as it is known.
async fn follow_holder(
    config: &Config,
    election: &mut Election,
    now: &Leadership,
    routing: Option<(&mut Option<std::net::IpAddr>, &mut Option<Keeper>)>,
    prefixes: &tokio::sync::watch::Receiver<Prefixes>,
    state: &NodeState,
) {
    let address = match &now.holder {
        Some(h) => election.address_of(h).await,
        None => None,
    };
    if let Some((routed_to, keeper)) = routing {
        if address.is_some() && address != *routed_to {
            tracing::info!(holder = ?now.holder, gateway = ?address, "the active gateway changed: routing to it");
            if let Some(k) = keeper.take() {
                k.hand_over().await;
            }
            *keeper = start_keeper(config, Role::RouteAgent, address, prefixes, state)
                .await
                .map_err(|e| tracing::error!(error = %e, "cannot route to the active gateway"))
                .ok();
            *routed_to = address;
        }
    }
    let mut shown = state.write();
    shown.election = Some(election.view(now, address));
    shown.find_problems();
}

/// The probes on `listen` (none: a task that never ends).
async fn serve_health(
    listen: Option<SocketAddr>,
    health: &Arc<Health>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    Ok(match listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for the health probes on {addr}: set health_listen (or --health-listen) to a free address, or \"off\"")
            })?;
            tokio::spawn(admin::serve_health(listener, health.clone()))
        }
        None => tokio::spawn(futures::future::pending()),
    })
}

/// Why meshd stops when one of its tasks ended: it stopped, failed, or panicked.
fn ended<S: std::fmt::Display, E: std::error::Error + Send + Sync + 'static>(
    what: S,
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("{what} stopped"),
        Ok(Err(e)) => anyhow::Error::new(e).context(format!("{what} failed")),
        Err(e) => anyhow::anyhow!("{what} panicked: {e}"),
    }
}

/// The prefixes of this node's part: this cluster's, and every peer's remote CIDRs.
fn node_prefixes(config: &Config) -> Prefixes {
    Prefixes {
        local: config
            .local_cidrs
            .iter()
            .chain(&config.deliver_cidrs)
            .copied()
            .collect(),
        remote: meshd::node::remote_prefixes(&config.peers),
    }
}

/// meshd on a node that is not the gateway: the route agent. It routes the remote CIDRs to the
/// gateway node (`gateway_address`, or the holder of the gateway Lease when `election` is
/// given) and keeps the masquerade bypass, with no tunnel, DNS or catalog of its own; it
/// serves the probes and an admin API that `meshctl peers` reads.
async fn run_agent(args: ConfigArgs, config: Config, mut election: Option<Election>) -> Result<()> {
    let mut gateway = config.gateway_address;
    if let Some(e) = &election {
        // One candidate is the gateway whether or not it holds the Lease yet (or runs a meshd
        // that does not elect): route to it at once; the Lease's holder decides from then on.
        if let [only] = e.directory().candidates.as_slice() {
            gateway = e.directory().addresses.get(only).copied();
            tracing::info!(candidate = %only, gateway = ?gateway, "one gateway candidate: routing to it until the Lease names a holder");
        }
    }
    match (&election, gateway) {
        (Some(e), _) => tracing::info!(cluster = %config.cluster, node = %e.me(),
            "this node is not a gateway candidate: running as route agent, routing to the holder of the gateway Lease"),
        (None, Some(gw)) => tracing::info!(cluster = %config.cluster, gateway = %gw,
            "this node is not the gateway ({gw} is not one of its addresses): running as route agent"),
        (None, None) => anyhow::bail!("a route agent needs gateway_address"),
    }
    if config.metrics_listen.is_some() {
        tracing::info!("route agent: /metrics is served by the gateway node's meshd only");
    }
    let state: NodeState = Arc::new(parking_lot::RwLock::new(NodeView::new(
        Role::RouteAgent,
        gateway,
        config.masquerade_bypass,
    )));
    let (prefixes_tx, prefixes_rx) = tokio::sync::watch::channel(node_prefixes(&config));
    let mut keeper =
        Some(start_keeper(&config, Role::RouteAgent, gateway, &prefixes_rx, &state).await?);
    let running_election = election.as_ref().map(Election::run_follower);
    let mut leadership = running_election
        .as_ref()
        .map(|r| r.leadership.clone())
        .unwrap_or_else(|| tokio::sync::watch::channel(Leadership::default()).1);
    let health = Health::new();
    health.routes_programmed();
    let mut health_task = serve_health(config.health_listen, &health).await?;
    let admin_listener = admin::bind_admin_socket(&config.admin_socket)?;
    let mut admin_task = tokio::spawn(admin::serve_admin(
        admin_listener,
        admin::agent_router(state.clone()),
    ));
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let result = loop {
        tokio::select! {
            changed = leadership.changed(), if running_election.is_some() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the gateway Lease watch stopped"));
                }
                let now = leadership.borrow_and_update().clone();
                let Some(election) = election.as_mut() else { continue };
                follow_holder(&config, election, &now, Some((&mut gateway, &mut keeper)), &prefixes_rx, &state).await;
            }
            _ = hangup.recv() => {
                let args = args.clone();
                match tokio::task::spawn_blocking(move || Config::load(&args)).await {
                    Ok(Ok(new)) => {
                        if new.gateway_address.is_some() && new.gateway_address != config.gateway_address {
                            tracing::warn!("SIGHUP: a changed gateway_address takes effect only after a restart (it may change this node's role)");
                        }
                        prefixes_tx.send_replace(node_prefixes(&new));
                        tracing::info!("SIGHUP: configuration reloaded");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: the reload failed; keeping the running configuration"),
                }
            }
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            r = &mut admin_task => {
                break Err(ended(format!("the admin API on {}", config.admin_socket.display()), r))
            }
            r = &mut health_task => break Err(ended("the health probe server", r)),
        }
    };
    if let Some(running) = running_election {
        running.stop().await;
    }
    admin_task.abort();
    health_task.abort();
    let _ = std::fs::remove_file(&config.admin_socket);
    if let Some(keeper) = keeper {
        keeper.stop().await;
    }
    tracing::info!("meshd (route agent) stopped");
    result
}

/// Re-reads the configuration on SIGHUP and applies what can change at runtime; returns the
/// new configuration when it was accepted.
fn reload(args: &ConfigArgs, running: &Config, controller: &Controller) -> Option<Config> {
    let mut config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one");
            return None;
        }
    };
    if config.translation != running.translation {
        // The dataplane and the catalogs served to peers must agree on one mapping, and peers
        // learn new global ranges only from a new stanza: the running ranges stay until a
        // restart, and the new peers must not overlap them.
        tracing::warn!("SIGHUP: global_cidrs changes take effect only after a restart; the running global ranges stay");
        config.translation = running.translation.clone();
        let owned: Vec<(String, ipnet::IpNet)> = running
            .translation
            .cidrs()
            .iter()
            .map(|c| (format!("global_cidrs of '{}'", running.cluster), c.global))
            .chain(config.peers.iter().flat_map(|p| {
                p.allowed_cidrs
                    .iter()
                    .map(move |c| (format!("peer '{}'", p.name), *c))
            }))
            .collect();
        if let Err(e) = meshd::config::check_overlaps(&owned) {
            tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one");
            return None;
        }
    }
    if config.interface != running.interface
        || config.tunnel_address != running.tunnel_address
        || config.mtu != running.mtu
        || config.offload != running.offload
        || config.batch_scheduling != running.batch_scheduling
        || config.tx_threads != running.tx_threads
        || config.dns_listen != running.dns_listen
        || config.dns_ttl != running.dns_ttl
        || config.dns_rate_limit != running.dns_rate_limit
    {
        tracing::warn!(
            "SIGHUP: interface, tunnel_address, mtu, offload, batch_scheduling, tx_threads, dns_listen, dns_ttl and dns_rate_limit changes take effect only after a restart"
        );
    }
    match controller.apply(spec_from_config(&config)) {
        Ok(()) => {
            tracing::info!(peers = config.peers.len(), "SIGHUP: configuration reloaded");
            Some(config)
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one");
            None
        }
    }
}

/// Re-reads the exports file named by the reloaded configuration and publishes the new local
/// catalog; a refused file keeps the running one.
fn reload_exports(config: &Config, generation: u64, clusterset: &Clusterset) {
    match exports::load(config.exports_file.as_deref(), &config.cluster, generation) {
        Ok(catalog) => {
            tracing::info!(
                services = catalog.services.len(),
                generation,
                "SIGHUP: exports reloaded"
            );
            clusterset.local_sender().send_replace(catalog);
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: exports file refused; DNS keeps answering from the running catalog")
        }
    }
}
