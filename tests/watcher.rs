//! The ServiceExport watcher (`meshd::discovery::kubernetes::run`) against an in-process API server
//! (tests/support/apiserver.rs) that speaks the real list/watch protocol with real k8s-openapi
//! objects; kube-rs runs unmodified. Each test starts its own server and watcher on 127.0.0.1.
//!
//! Timeouts only keep a broken watcher from hanging the suite: every wait polls for a state
//! with a generous deadline, and no assertion is about how long something took.

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::ApiServer;
use hickory_proto::rr::{Name, RecordType};
use k8s_openapi::api::core::v1::{Service, ServicePort as K8sPort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshd::discovery::catalog::{
    ClusterEntry, ClustersetView, ExportCatalog, ExportedService, PortProtocol, ServicePort,
    ServiceType,
};
use meshd::discovery::kubernetes;
use meshd::dns::answer::{answer, RecordData, Snapshot};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Liveness only: a state that never comes fails the test after this long.
const DEADLINE: Duration = Duration::from_secs(40);

// ---------- objects, as the Kubernetes API holds them ----------

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn ports(list: &[(Option<&str>, &str, i32)]) -> Option<Vec<K8sPort>> {
    Some(
        list.iter()
            .map(|(name, protocol, port)| K8sPort {
                name: name.map(str::to_string),
                protocol: Some(protocol.to_string()),
                port: *port,
                ..Default::default()
            })
            .collect(),
    )
}

/// A ClusterIP Service.
fn service(namespace: &str, name: &str, ips: &[&str], list: &[(Option<&str>, &str, i32)]) -> Value {
    serde_json::to_value(Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ips[0].into()),
            cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
            ports: ports(list),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}

fn headless_service(namespace: &str, name: &str, publish_not_ready: bool) -> Value {
    serde_json::to_value(Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some("None".into()),
            cluster_ips: Some(vec!["None".into()]),
            publish_not_ready_addresses: Some(publish_not_ready),
            ports: ports(&[(Some("pg"), "TCP", 5432)]),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}

fn external_name_service(namespace: &str, name: &str) -> Value {
    serde_json::to_value(Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("db.example.com".into()),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}

/// An IPv4 EndpointSlice of `service`: (address, hostname, ready).
fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    endpoints: &[(&str, Option<&str>, Option<bool>)],
) -> Value {
    let mut metadata = meta(namespace, name);
    metadata.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_string(),
        service.to_string(),
    )]));
    serde_json::to_value(EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(ip, hostname, ready)| K8sEndpoint {
                    addresses: vec![ip.to_string()],
                    hostname: hostname.map(str::to_string),
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    })
    .unwrap()
}

fn export(server: &ApiServer, namespace: &str, name: &str, created: &str) -> Value {
    json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceExport",
        "metadata": {"namespace": namespace, "name": name, "creationTimestamp": created},
    })
}

// ---------- the clusterset view, as the catalog sync would build it ----------

fn remote_service(namespace: &str, name: &str, port: u16, exported_at: &str) -> ExportedService {
    ExportedService {
        namespace: namespace.into(),
        name: name.into(),
        service_type: ServiceType::ClusterSetIP,
        ips: vec!["10.97.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: Some("http".into()),
            protocol: PortProtocol::Tcp,
            port,
            ..Default::default()
        }],
        endpoints: Vec::new(),
        exported_at: Some(exported_at.into()),
        ..Default::default()
    }
}

/// [`remote_service`], headless (no service IPs).
fn remote_headless(namespace: &str, name: &str, port: u16, exported_at: &str) -> ExportedService {
    ExportedService {
        service_type: ServiceType::Headless,
        ips: Vec::new(),
        ..remote_service(namespace, name, port, exported_at)
    }
}

fn view(remotes: Vec<(&str, Vec<ExportedService>)>) -> Arc<ClustersetView> {
    let remotes: BTreeMap<String, ClusterEntry> = remotes
        .into_iter()
        .map(|(cluster, services)| {
            (
                cluster.to_string(),
                ClusterEntry {
                    up: true,
                    catalog: Arc::new(ExportCatalog {
                        cluster: cluster.into(),
                        generation: 1,
                        services,
                    }),
                },
            )
        })
        .collect();
    Arc::new(ClustersetView::build(
        Arc::new(ExportCatalog {
            cluster: "m1".into(),
            generation: 0,
            services: Vec::new(),
        }),
        &remotes,
    ))
}

// ---------- the watcher under test ----------

struct Watcher {
    local: watch::Receiver<ExportCatalog>,
    /// `None` once the test dropped it.
    view: Option<watch::Sender<Arc<ClustersetView>>>,
    /// Whether the watcher writes (the active gateway's) or only reads (a standby's).
    writing: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), kubernetes::WatcherError>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the watcher of cluster m1 against `server`, with `view` as the clusterset view.
fn start(server: &ApiServer, view: Arc<ClustersetView>) -> Watcher {
    start_as(server, view, true)
}

/// [`start`], writing (the active gateway's watcher) or not (a standby's).
fn start_as(server: &ApiServer, view: Arc<ClustersetView>, write: bool) -> Watcher {
    // The watcher's log, shown for failing tests (MESHD_LOG=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let (local_tx, local) = watch::channel(ExportCatalog {
        cluster: "m1".into(),
        generation: 0,
        services: Vec::new(),
    });
    let (view_tx, view_rx) = watch::channel(view);
    let (writing, writing_rx) = watch::channel(write);
    let task = tokio::spawn(kubernetes::run(
        server.client(),
        "m1".into(),
        Vec::new(),
        local_tx,
        view_rx,
        writing_rx,
    ));
    Watcher {
        local,
        view: Some(view_tx),
        writing,
        task,
    }
}

impl Watcher {
    fn set_view(&self, view: Arc<ClustersetView>) {
        self.view.as_ref().unwrap().send_replace(view);
    }

    /// The first published catalog (generation ≥ 1) for which `check` holds.
    async fn catalog(
        &mut self,
        what: &str,
        check: impl Fn(&ExportCatalog) -> bool,
    ) -> ExportCatalog {
        let deadline = Instant::now() + DEADLINE;
        loop {
            {
                let catalog = self.local.borrow_and_update();
                if catalog.generation > 0 && check(&catalog) {
                    return catalog.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.local.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the watcher stopped while waiting for {what}"),
                Err(_) => panic!(
                    "no catalog with {what} within {DEADLINE:?}; last: {:#?}",
                    *self.local.borrow()
                ),
            }
        }
    }
}

/// Polls `check` until it holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// (status, reason) of a condition of a ServiceExport, as the server holds it.
fn condition(
    server: &ApiServer,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let export = server.get("ServiceExport", namespace, name)?;
    export["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// Whether a ServiceExport's condition `type_` is `status` and its reason and message pass
/// `check`.
fn condition_where(
    server: &ApiServer,
    (namespace, name): (&str, &str),
    (type_, status): (&str, &str),
    check: impl Fn(&str, &str) -> bool,
) -> bool {
    server
        .get("ServiceExport", namespace, name)
        .is_some_and(|e| {
            e["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["type"] == type_
                        && c["status"] == status
                        && check(
                            c["reason"].as_str().unwrap_or_default(),
                            c["message"].as_str().unwrap_or_default(),
                        )
                })
        })
}

fn has_condition(
    server: &ApiServer,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> bool {
    condition(server, ns, name, type_) == Some((status.to_string(), reason.to_string()))
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn endpoint_ips(service: &ExportedService) -> Vec<String> {
    service.endpoints.iter().map(|e| e.ip.to_string()).collect()
}

fn lists_of(server: &ApiServer, resource: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch() && r.path.ends_with(&format!("/{resource}")))
        .count()
}

fn watches_of(server: &ApiServer, resource: &str) -> Vec<apiserver::Request> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.is_watch() && r.path.ends_with(&format!("/{resource}")))
        .collect()
}

fn web(server: &ApiServer) {
    server.apply(service(
        "demo",
        "web",
        &["10.96.0.10"],
        &[(Some("http"), "TCP", 80), (Some("dns"), "UDP", 53)],
    ));
    server.apply(slice(
        "demo",
        "web",
        "web-abc12",
        &[
            ("10.244.1.10", None, Some(true)),
            ("10.244.1.11", None, None),
            ("10.244.1.12", None, Some(false)),
        ],
    ));
    server.apply(export(server, "demo", "web", "2026-03-01T00:00:00Z"));
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_cluster_ip_service_becomes_the_catalog_with_its_ready_endpoints() {
    let server = ApiServer::start().await;
    web(&server);
    // A Service nobody exports stays out of the catalog.
    server.apply(service(
        "demo",
        "private",
        &["10.96.0.99"],
        &[(None, "TCP", 80)],
    ));
    let mut watcher = start(&server, view(vec![]));

    let catalog = watcher
        .catalog("demo/web", |c| !c.services.is_empty())
        .await;
    assert_eq!(catalog.cluster, "m1");
    assert_eq!(catalog.generation, 1, "the first catalog is generation 1");
    assert_eq!(catalog.services.len(), 1, "{catalog:#?}");
    let web = &catalog.services[0];
    assert_eq!((web.namespace.as_str(), web.name.as_str()), ("demo", "web"));
    assert_eq!(web.service_type, ServiceType::ClusterSetIP);
    assert_eq!(web.ips, ips(&["10.96.0.10"]));
    assert_eq!(
        web.ports,
        [
            ServicePort {
                name: Some("http".into()),
                protocol: PortProtocol::Tcp,
                port: 80,
                ..Default::default()
            },
            ServicePort {
                name: Some("dns".into()),
                protocol: PortProtocol::Udp,
                port: 53,
                ..Default::default()
            },
        ]
    );
    // Ready and unknown readiness count; the not-ready endpoint does not.
    assert_eq!(endpoint_ips(web), ["10.244.1.10", "10.244.1.11"]);
    assert!(web.endpoints.iter().all(|e| e.ready));
    assert_eq!(web.exported_at.as_deref(), Some("2026-03-01T00:00:00Z"));

    eventually("Valid, Ready and Conflict on demo/web", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
            && has_condition(&server, "demo", "web", "Ready", "True", "Exported")
            && has_condition(&server, "demo", "web", "Conflict", "False", "NoConflicts")
    })
    .await;

    // An endpoint turning ready is one new generation.
    server.apply(slice(
        "demo",
        "web",
        "web-abc12",
        &[
            ("10.244.1.10", None, Some(true)),
            ("10.244.1.11", None, None),
            ("10.244.1.12", None, Some(true)),
        ],
    ));
    let catalog = watcher
        .catalog("three endpoints", |c| c.services[0].endpoints.len() == 3)
        .await;
    assert_eq!(catalog.generation, 2);

    // Nothing but the ServiceExport's status, ServiceImports and meshd's own MCS EndpointSlices
    // was written: never the Service's slices.
    for write in server.writes() {
        assert!(
            write.resource == "serviceexports/status"
                || write.resource.starts_with("serviceimports")
                || (write.resource == "endpointslices" && write.name.starts_with("meshd-")),
            "unexpected write {write:?}"
        );
    }
}

/// A standby gateway keeps the watches and the catalog warm (its DNS answers for this cluster's
/// services) but writes nothing; made active, it writes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reads_and_publishes_but_writes_only_once_active() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start_as(&server, view(vec![]), false);
    let catalog = watcher
        .catalog("demo/web", |c| !c.services.is_empty())
        .await;
    assert_eq!(catalog.services[0].name, "web");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        server.writes().is_empty(),
        "a standby wrote: {:?}",
        server.writes()
    );
    watcher.writing.send_replace(true);
    eventually("the active gateway's status on demo/web", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_service_exports_hostnames_and_honours_publish_not_ready_addresses() {
    let server = ApiServer::start().await;
    server.apply(headless_service("demo", "db", true));
    server.apply(slice(
        "demo",
        "db",
        "db-xyz",
        &[
            ("10.244.1.20", Some("db-0"), Some(true)),
            ("10.244.1.21", Some("db-1"), Some(false)),
        ],
    ));
    server.apply(export(&server, "demo", "db", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));

    let catalog = watcher.catalog("demo/db", |c| !c.services.is_empty()).await;
    let db = &catalog.services[0];
    assert_eq!(db.service_type, ServiceType::Headless);
    assert!(db.ips.is_empty());
    let endpoints: Vec<(String, Option<&str>, bool)> = db
        .endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.hostname.as_deref(), e.ready))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("10.244.1.20".into(), Some("db-0"), true),
            ("10.244.1.21".into(), Some("db-1"), true),
        ],
        "publishNotReadyAddresses publishes the not-ready db-1 too"
    );

    server.apply(headless_service("demo", "db", false));
    let catalog = watcher
        .catalog("db-1 withdrawn", |c| c.services[0].endpoints.len() == 1)
        .await;
    assert_eq!(
        catalog.services[0].endpoints[0].hostname.as_deref(),
        Some("db-0")
    );
    assert_eq!(catalog.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_a_missing_service_is_not_valid_until_the_service_appears() {
    let server = ApiServer::start().await;
    server.apply(export(&server, "demo", "web", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));

    let catalog = watcher.catalog("the first catalog", |_| true).await;
    assert!(catalog.services.is_empty(), "{catalog:#?}");
    eventually("Valid=False NoService", || {
        has_condition(&server, "demo", "web", "Valid", "False", "NoService")
            && has_condition(&server, "demo", "web", "Ready", "False", "Failed")
    })
    .await;
    let export_status = server.get("ServiceExport", "demo", "web").unwrap()["status"].clone();
    let valid = export_status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Valid")
        .unwrap()
        .clone();
    assert!(
        valid["message"]
            .as_str()
            .unwrap()
            .contains("no Service demo/web"),
        "{valid}"
    );
    assert!(condition(&server, "demo", "web", "Conflict").is_none());
    assert!(
        server.list("ServiceImport").is_empty(),
        "nothing is exported: nothing to import"
    );

    web(&server);
    let catalog = watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    assert_eq!(catalog.generation, 2);
    eventually("Valid=True once the Service exists", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
            && has_condition(&server, "demo", "web", "Ready", "True", "Exported")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Conformance: "Exporting an ExternalName service should set ServiceExport Valid condition to
/// False" (and no ServiceImport appears).
async fn mcs_exporting_an_external_name_service_sets_valid_false() {
    let server = ApiServer::start().await;
    server.apply(external_name_service("demo", "legacy-db"));
    server.apply(export(&server, "demo", "legacy-db", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));

    let catalog = watcher.catalog("the first catalog", |_| true).await;
    assert!(catalog.services.is_empty(), "{catalog:#?}");
    eventually("Valid=False InvalidServiceType", || {
        has_condition(
            &server,
            "demo",
            "legacy-db",
            "Valid",
            "False",
            "InvalidServiceType",
        )
    })
    .await;
    assert!(server.get("ServiceImport", "demo", "legacy-db").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Conformance: "A ClusterIP service exported on two clusters with conflicting ports should
/// apply the conflict resolution policy and report a Conflict condition on each ServiceExport".
async fn mcs_conflicting_ports_report_a_conflict_on_each_export_and_the_oldest_wins() {
    let server = ApiServer::start().await;
    server.apply(service(
        "demo",
        "web",
        &["10.96.0.10"],
        &[(Some("http"), "TCP", 8080)],
    ));
    server.apply(export(&server, "demo", "web", "2026-03-01T00:00:00Z"));
    // m2 exported demo/web a month earlier, on port 80.
    let mut watcher = start(
        &server,
        view(vec![(
            "m2",
            vec![remote_service("demo", "web", 80, "2026-02-01T00:00:00Z")],
        )]),
    );

    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("Conflict=True PortConflict on the younger export", || {
        has_condition(&server, "demo", "web", "Conflict", "True", "PortConflict")
    })
    .await;
    eventually("ServiceImport demo/web of both clusters", || {
        server.get("ServiceImport", "demo", "web").is_some_and(|i| {
            i["status"]["clusters"] == json!([{"cluster": "m1"}, {"cluster": "m2"}])
        })
    })
    .await;
    let import = server.get("ServiceImport", "demo", "web").unwrap();
    assert_eq!(
        import["spec"]["ports"],
        json!([{"name": "http", "protocol": "TCP", "port": 80}]),
        "the oldest export's ports"
    );
    // Still exported: the conflict decides the import's shape, not whether this cluster serves.
    assert!(has_condition(
        &server, "demo", "web", "Ready", "True", "Exported"
    ));

    // Now m2's export is the younger one: this cluster's wins, and its export is still marked.
    watcher.set_view(view(vec![(
        "m2",
        vec![remote_service("demo", "web", 80, "2026-04-01T00:00:00Z")],
    )]));
    eventually("the oldest export is in conflict too", || {
        condition_where(&server, ("demo", "web"), ("Conflict", "True"), |_, m| {
            m.contains("this cluster's, the oldest")
        })
    })
    .await;
    eventually("the import takes this cluster's ports", || {
        server.get("ServiceImport", "demo", "web").unwrap()["spec"]["ports"][0]["port"] == 8080
    })
    .await;
}

/// What clusterset.local DNS answers for `name` and `qtype` from `view`.
fn dns(view: ClustersetView, name: &str, qtype: RecordType) -> Vec<RecordData> {
    let snapshot = Snapshot::new(Arc::new(view));
    answer(&snapshot, &Name::from_ascii(name).unwrap(), qtype).records
}

/// The view with this cluster's `local` catalog and no remote cluster.
fn alone(local: ExportCatalog) -> ClustersetView {
    ClustersetView::build(Arc::new(local), &BTreeMap::new())
}

/// Conformance: "An IP should be allocated for a ClusterSetIP ServiceImport for each IP family"
/// (ips and ipFamilies of equal length, in the same order), "Exporting a ClusterIP service
/// should create a ServiceImport of type ClusterSetIP", and "The ports for a ClusterSetIP
/// ServiceImport should match those of the exported service"; the ips are what DNS answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_an_ip_is_allocated_for_a_cluster_set_ip_import_for_each_family_and_dns_answers_it() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    let local = watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("ServiceImport demo/web with its ip", || {
        server
            .get("ServiceImport", "demo", "web")
            .is_some_and(|i| i["spec"]["ips"] == json!(["10.96.0.10"]))
    })
    .await;
    let import = server.get("ServiceImport", "demo", "web").unwrap();
    assert_eq!(import["spec"]["type"], "ClusterSetIP");
    assert_eq!(import["spec"]["ipFamilies"], json!(["IPv4"]));
    assert_eq!(
        import["spec"]["ports"],
        json!([
            {"name": "http", "protocol": "TCP", "port": 80},
            {"name": "dns", "protocol": "UDP", "port": 53}
        ])
    );
    assert_eq!(
        dns(
            alone(local),
            "web.demo.svc.clusterset.local.",
            RecordType::A
        ),
        [RecordData::A("10.96.0.10".parse().unwrap())]
    );
}

/// Conformance: "The SessionAffinity for a ClusterSetIP ServiceImport should match the exported
/// service's SessionAffinity", and likewise its InternalTrafficPolicy and TrafficDistribution;
/// a port's appProtocol is copied with it ("The ports ... should match those of the exported
/// service"). A second cluster's export with another affinity is a SessionAffinityConflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_session_affinity_traffic_policy_and_distribution_match_the_exported_service() {
    let server = ApiServer::start().await;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "demo", "name": "hello"},
        "spec": {
            "type": "ClusterIP", "clusterIP": "10.96.0.42", "clusterIPs": ["10.96.0.42"],
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 42, "appProtocol": "kubernetes.io/h2c"}],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
            "internalTrafficPolicy": "Cluster",
            "trafficDistribution": "PreferClose",
        },
    }));
    server.apply(export(&server, "demo", "hello", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));
    let local = watcher
        .catalog("demo/hello", |c| c.services.len() == 1)
        .await;
    eventually("the ServiceImport with the Service's settings", || {
        server
            .get("ServiceImport", "demo", "hello")
            .is_some_and(|i| i["spec"]["sessionAffinity"] == "ClientIP")
    })
    .await;
    let spec = server.get("ServiceImport", "demo", "hello").unwrap()["spec"].clone();
    assert_eq!(
        spec["sessionAffinityConfig"],
        json!({"clientIP": {"timeoutSeconds": 10}})
    );
    assert_eq!(spec["internalTrafficPolicy"], "Cluster");
    assert_eq!(spec["trafficDistribution"], "PreferClose");
    assert_eq!(
        spec["ports"],
        json!([{"name": "tcp", "protocol": "TCP", "port": 42, "appProtocol": "kubernetes.io/h2c"}])
    );

    // m2 exports it a second later without affinity: both exports conflict, the oldest wins.
    let mut theirs = local.services[0].clone();
    theirs.exported_at = Some("2026-03-01T00:00:01Z".into());
    theirs.session_affinity = Some(meshd::discovery::catalog::SessionAffinity::NoAffinity);
    theirs.session_affinity_timeout = None;
    watcher.set_view(view(vec![("m2", vec![theirs])]));
    eventually("Conflict=True SessionAffinityConflict", || {
        has_condition(
            &server,
            "demo",
            "hello",
            "Conflict",
            "True",
            "SessionAffinityConflict",
        )
    })
    .await;
    assert_eq!(
        server.get("ServiceImport", "demo", "hello").unwrap()["spec"]["sessionAffinity"],
        "ClientIP"
    );
}

/// Conformance: "Only labels and annotations specified as exported in the ServiceExport should be
/// propagated to the ServiceImport", and "A service exported on two clusters with conflicting
/// annotations and labels should apply the conflict resolution policy and report a Conflict
/// condition on each ServiceExport". An older peer's exported labels cannot take meshd's mark
/// off the import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_only_exported_labels_and_annotations_reach_the_service_import() {
    let server = ApiServer::start().await;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "demo", "name": "hello",
                     "labels": {"dummy-svc": "dummy"}, "annotations": {"dummy-svc": "dummy"}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.42", "clusterIPs": ["10.96.0.42"],
                 "ports": [{"name": "tcp", "protocol": "TCP", "port": 42}]},
    }));
    server.apply(json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceExport",
        "metadata": {"namespace": "demo", "name": "hello", "creationTimestamp": "2026-03-01T00:00:00Z",
                     "labels": {"dummy-svcexport": "dummy"}},
        "spec": {"exportedLabels": {"dummy-label": "true", "bad label!": "x"},
                 "exportedAnnotations": {"dummy-annotation": "true"}},
    }));
    let mut watcher = start(&server, view(vec![]));
    let local = watcher
        .catalog("demo/hello", |c| c.services.len() == 1)
        .await;
    eventually("the ServiceImport with the exported metadata", || {
        server
            .get("ServiceImport", "demo", "hello")
            .is_some_and(|i| i["metadata"]["labels"]["dummy-label"] == "true")
    })
    .await;
    let import = server.get("ServiceImport", "demo", "hello").unwrap();
    assert_eq!(
        import["metadata"]["labels"],
        json!({"app.kubernetes.io/managed-by": "meshd", "dummy-label": "true"})
    );
    assert_eq!(
        import["metadata"]["annotations"],
        json!({"dummy-annotation": "true"})
    );
    // The invalid key is left out, and the Valid condition says so.
    eventually("Valid names the left-out label", || {
        condition_where(&server, ("demo", "hello"), ("Valid", "True"), |_, m| {
            m.contains("exportedLabels \"bad label!\"")
        })
    })
    .await;

    // m2 exports it a second later with other metadata: conflict on this export too, and the
    // older export's metadata stays.
    let mut theirs = local.services[0].clone();
    theirs.exported_at = Some("2026-03-01T00:00:01Z".into());
    theirs.exported_labels = BTreeMap::from([("dummy-label2".into(), "true".into())]);
    theirs.exported_annotations = BTreeMap::from([("dummy-annotation2".into(), "true".into())]);
    watcher.set_view(view(vec![("m2", vec![theirs.clone()])]));
    eventually("Conflict=True for labels and annotations", || {
        has_condition(
            &server,
            "demo",
            "hello",
            "Conflict",
            "True",
            "AnnotationsConflict,LabelsConflict",
        )
    })
    .await;
    let import = server.get("ServiceImport", "demo", "hello").unwrap();
    assert_eq!(import["metadata"]["labels"]["dummy-label"], "true");
    assert!(import["metadata"]["labels"].get("dummy-label2").is_none());

    // Now m2's export is the older, and claims meshd's mark for someone else: its labels
    // replace this cluster's, the mark stays meshd's.
    theirs.exported_at = Some("2026-02-01T00:00:00Z".into());
    theirs
        .exported_labels
        .insert("app.kubernetes.io/managed-by".into(), "someone-else".into());
    watcher.set_view(view(vec![("m2", vec![theirs])]));
    eventually("m2's metadata on the import", || {
        server
            .get("ServiceImport", "demo", "hello")
            .is_some_and(|i| {
                i["metadata"]["labels"]
                    == json!({"app.kubernetes.io/managed-by": "meshd", "dummy-label2": "true"})
                    && i["metadata"]["annotations"] == json!({"dummy-annotation2": "true"})
            })
    })
    .await;
}

/// Conformance: "Exporting a service should create an MCS EndpointSlice in the service's
/// namespace in each cluster with the required MCS labels. Unexporting should delete the
/// EndpointSlice." and the slice half of "A DNS query of the <hostname>.<clusterid>.<service>.
/// <ns>.svc.clusterset.local domain for a headless StatefulSet service should return the
/// requested pod's endpoint address": the cluster id on the slice names the DNS answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_exporting_a_service_creates_mcs_endpoint_slices_and_unexporting_deletes_them() {
    let server = ApiServer::start().await;
    web(&server);
    let mut db = remote_headless("demo", "db", 5432, "2026-01-01T00:00:00Z");
    db.endpoints = vec![meshd::discovery::catalog::Endpoint {
        ip: "10.245.1.20".parse().unwrap(),
        hostname: Some("db-0".into()),
        ready: true,
    }];
    let remotes = view(vec![("m2", vec![db])]);
    let mut watcher = start(&server, remotes.clone());
    let local = watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    let mcs_slices = |server: &ApiServer| -> BTreeMap<String, Value> {
        server
            .list("EndpointSlice")
            .into_iter()
            .filter(|s| {
                !s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"].is_null()
            })
            .map(|s| (s["metadata"]["name"].as_str().unwrap().to_string(), s))
            .collect()
    };
    eventually("an MCS EndpointSlice per exporting cluster", || {
        mcs_slices(&server).len() == 2
    })
    .await;
    let slices = mcs_slices(&server);
    let ours = &slices["meshd-m1-web-ipv4"];
    assert_eq!(ours["metadata"]["namespace"], "demo");
    assert_eq!(ours["addressType"], "IPv4");
    let labels = &ours["metadata"]["labels"];
    assert_eq!(labels["multicluster.kubernetes.io/service-name"], "web");
    assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "m1");
    assert_ne!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert!(labels.get("kubernetes.io/service-name").is_none());
    let addresses: Vec<&str> = ours["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["addresses"][0].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["10.244.1.10", "10.244.1.11"]);
    // The headless slice from m2: its cluster id and hostname are a DNS name for its address.
    let theirs = &slices["meshd-m2-db-ipv4"];
    let cluster = theirs["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
        .as_str()
        .unwrap();
    let endpoint = &theirs["endpoints"][0];
    let name = format!(
        "{}.{cluster}.db.demo.svc.clusterset.local.",
        endpoint["hostname"].as_str().unwrap()
    );
    let mut view_now = (*remotes).clone();
    view_now.clusters[0].catalog = Arc::new(local);
    assert_eq!(
        dns(view_now, &name, RecordType::A),
        [RecordData::A(
            endpoint["addresses"][0].as_str().unwrap().parse().unwrap()
        )]
    );

    server.delete("ServiceExport", "demo", "web");
    eventually("this cluster's slice deleted with its export", || {
        let slices = mcs_slices(&server);
        !slices.contains_key("meshd-m1-web-ipv4") && slices.contains_key("meshd-m2-db-ipv4")
    })
    .await;
}

/// Conformance: "Exporting a headless service should create a ServiceImport of type Headless"
/// and "No clusterset IP should be allocated for a Headless ServiceImport"; its ipFamilies are
/// those of the endpoints DNS answers with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_a_headless_import_has_no_ips_and_names_the_families_dns_answers() {
    let server = ApiServer::start().await;
    server.apply(headless_service("demo", "db", false));
    server.apply(slice(
        "demo",
        "db",
        "db-x1",
        &[("10.244.1.20", Some("db-0"), Some(true))],
    ));
    server.apply(export(&server, "demo", "db", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));
    let local = watcher.catalog("demo/db", |c| c.services.len() == 1).await;
    eventually("ServiceImport demo/db with its families", || {
        server
            .get("ServiceImport", "demo", "db")
            .is_some_and(|i| i["spec"]["ipFamilies"] == json!(["IPv4"]))
    })
    .await;
    let import = server.get("ServiceImport", "demo", "db").unwrap();
    assert_eq!(import["spec"]["type"], "Headless");
    assert!(import["spec"].get("ips").is_none(), "{import}");
    assert_eq!(
        dns(alone(local), "db.demo.svc.clusterset.local.", RecordType::A),
        [RecordData::A("10.244.1.20".parse().unwrap())]
    );
}

/// Conformance: "A ClusterIP service exported on two clusters should expose the union of the
/// constituent service ports and raise a conflict" (here this cluster's export is the older).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_two_exports_expose_the_union_of_their_ports_and_raise_a_conflict() {
    let server = ApiServer::start().await;
    server.apply(service(
        "demo",
        "hello",
        &["10.96.0.42"],
        &[(Some("tcp"), "TCP", 42), (Some("udp"), "UDP", 42)],
    ));
    server.apply(export(&server, "demo", "hello", "2026-03-01T00:00:00Z"));
    let mut theirs = remote_service("demo", "hello", 42, "2026-03-01T00:00:02Z");
    theirs.ports = vec![
        ServicePort {
            name: Some("tcp".into()),
            protocol: PortProtocol::Tcp,
            port: 42,
            ..Default::default()
        },
        ServicePort {
            name: Some("stcp".into()),
            protocol: PortProtocol::Sctp,
            port: 142,
            ..Default::default()
        },
    ];
    let mut watcher = start(&server, view(vec![("m2", vec![theirs])]));
    watcher
        .catalog("demo/hello", |c| c.services.len() == 1)
        .await;
    eventually("Conflict=True PortConflict on the older export", || {
        has_condition(&server, "demo", "hello", "Conflict", "True", "PortConflict")
    })
    .await;
    eventually("the union of the ports", || {
        server
            .get("ServiceImport", "demo", "hello")
            .is_some_and(|i| {
                i["spec"]["ports"]
                    == json!([
                        {"name": "tcp", "protocol": "TCP", "port": 42},
                        {"name": "udp", "protocol": "UDP", "port": 42},
                        {"name": "stcp", "protocol": "SCTP", "port": 142}
                    ])
            })
    })
    .await;
}

/// Conformance: "A service exported on two clusters with conflicting headlessness should apply
/// the conflict resolution policy and report a Conflict condition on the ServiceExport".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_conflicting_headlessness_reports_a_conflict_and_the_oldest_type_wins() {
    let server = ApiServer::start().await;
    web(&server);
    let theirs = remote_headless("demo", "web", 80, "2026-03-01T00:00:02Z");
    let mut watcher = start(&server, view(vec![("m2", vec![theirs])]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("Conflict=True TypeConflict", || {
        condition_where(&server, ("demo", "web"), ("Conflict", "True"), |r, _| {
            r.starts_with("TypeConflict")
        })
    })
    .await;
    eventually("the import keeps the oldest export's type", || {
        server
            .get("ServiceImport", "demo", "web")
            .is_some_and(|i| i["spec"]["type"] == "ClusterSetIP")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_imports_cover_the_clusterset_and_go_with_the_last_export() {
    let server = ApiServer::start().await;
    web(&server);
    // Not meshd's: never touched, even though m2 exports a service of that name.
    server.apply(json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceImport",
        "metadata": {"namespace": "demo", "name": "legacy"},
        "spec": {"type": "Headless", "ports": [{"port": 1}]},
    }));
    // meshd's, left from an export that is gone: deleted.
    server.apply(json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceImport",
        "metadata": {"namespace": "demo", "name": "stale", "labels": {"app.kubernetes.io/managed-by": "meshd"}},
        "spec": {"type": "ClusterSetIP", "ports": [{"port": 1}]},
    }));
    let remotes = vec![
        (
            "m2",
            vec![
                remote_service("demo", "db", 5432, "2026-01-01T00:00:00Z"),
                remote_service("demo", "legacy", 80, "2026-01-01T00:00:00Z"),
            ],
        ),
        (
            "m3",
            vec![remote_service("shop", "api", 443, "2026-01-01T00:00:00Z")],
        ),
    ];
    let mut watcher = start(&server, view(remotes));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;

    let managed = |server: &ApiServer| -> BTreeMap<String, Value> {
        server
            .list("ServiceImport")
            .into_iter()
            .filter(|i| i["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshd")
            .map(|i| {
                (
                    format!(
                        "{}/{}",
                        i["metadata"]["namespace"].as_str().unwrap(),
                        i["metadata"]["name"].as_str().unwrap()
                    ),
                    i["status"]["clusters"].clone(),
                )
            })
            .collect()
    };
    eventually(
        "ServiceImports for demo/web, demo/db and shop/api only",
        || {
            managed(&server)
                == BTreeMap::from([
                    ("demo/db".to_string(), json!([{"cluster": "m2"}])),
                    ("demo/web".to_string(), json!([{"cluster": "m1"}])),
                    ("shop/api".to_string(), json!([{"cluster": "m3"}])),
                ])
        },
    )
    .await;
    let db = server.get("ServiceImport", "demo", "db").unwrap();
    assert_eq!(
        db["spec"],
        json!({"type": "ClusterSetIP", "ports": [{"name": "http", "protocol": "TCP", "port": 5432}]})
    );

    // m2 stops exporting db; this cluster unexports web.
    watcher.set_view(view(vec![
        (
            "m2",
            vec![remote_service("demo", "legacy", 80, "2026-01-01T00:00:00Z")],
        ),
        (
            "m3",
            vec![remote_service("shop", "api", 443, "2026-01-01T00:00:00Z")],
        ),
    ]));
    server.delete("ServiceExport", "demo", "web");
    watcher
        .catalog("no service", |c| c.services.is_empty())
        .await;
    eventually("only shop/api is left", || {
        managed(&server) == BTreeMap::from([("shop/api".to_string(), json!([{"cluster": "m3"}]))])
    })
    .await;

    let legacy = server
        .get("ServiceImport", "demo", "legacy")
        .expect("the unmanaged import stays");
    assert_eq!(legacy["spec"]["type"], "Headless");
    assert!(
        server.writes().iter().all(|w| w.name != "legacy"),
        "meshd wrote to a ServiceImport it does not manage: {:?}",
        server.writes()
    );
    let deletes: Vec<String> = server
        .writes_to("serviceimports")
        .into_iter()
        .filter(|w| w.verb == "delete")
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    assert_eq!(deletes.len(), 3, "{deletes:?}");
    for gone in ["demo/stale", "demo/db", "demo/web"] {
        assert!(deletes.contains(&gone.to_string()), "{deletes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_deleted_mid_watch_withdraws_its_services() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "cart",
        &["10.96.0.20"],
        &[(None, "TCP", 8080)],
    ));
    server.apply(slice(
        "shop",
        "cart",
        "cart-1",
        &[("10.244.2.10", None, Some(true))],
    ));
    server.apply(export(&server, "shop", "cart", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));
    watcher
        .catalog("both services", |c| c.services.len() == 2)
        .await;
    eventually("both imports", || server.list("ServiceImport").len() == 2).await;

    let requests_before = server.requests().len();
    server.delete_namespace("demo");
    let catalog = watcher
        .catalog("demo withdrawn", |c| c.services.len() == 1)
        .await;
    assert_eq!(catalog.services[0].name, "cart");
    assert_eq!(
        catalog.generation, 2,
        "the namespace's deletion is one change"
    );
    // The namespace's ServiceImport went with it; no write tried to bring it back.
    let imports: Vec<String> = server
        .list("ServiceImport")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(imports, ["cart"]);
    let writes_to_demo: Vec<_> = server.requests()[requests_before..]
        .iter()
        .filter(|r| r.method != "GET" && r.path.contains("/namespaces/demo/"))
        .cloned()
        .collect();
    assert!(writes_to_demo.is_empty(), "{writes_to_demo:?}");

    // m2 exports a service in the namespace this cluster no longer has: the create is refused
    // (404) and retried, and succeeds once the namespace is back, with no other change to wake
    // the watcher.
    watcher.set_view(view(vec![(
        "m2",
        vec![remote_service("demo", "api", 80, "2026-01-01T00:00:00Z")],
    )]));
    let refused_creates = |server: &ApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| {
                r.method == "POST"
                    && r.path.ends_with("/namespaces/demo/serviceimports")
                    && r.status == 404
            })
            .count()
    };
    eventually("a create in the deleted namespace", || {
        refused_creates(&server) >= 1
    })
    .await;
    assert!(server.get("ServiceImport", "demo", "api").is_none());
    server.create_namespace("demo");
    eventually("the import created on a retry", || {
        server.get("ServiceImport", "demo", "api").is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_error_event_relists_and_the_catalog_is_right_afterwards() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    let lists_before = lists_of(&server, "endpointslices");

    // A change whose event is compacted away: only a new list can show it.
    server.apply_unwatched(slice(
        "demo",
        "web",
        "web-abc12",
        &[
            ("10.244.1.10", None, Some(true)),
            ("10.244.1.99", None, Some(true)),
        ],
    ));
    server.compact();
    server.expire_watches();

    let catalog = watcher
        .catalog("the endpoint only a relist shows", |c| {
            endpoint_ips(&c.services[0]) == ["10.244.1.10", "10.244.1.99"]
        })
        .await;
    assert_eq!(catalog.generation, 2);
    assert!(
        lists_of(&server, "endpointslices") > lists_before,
        "no relist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_from_a_compacted_version_gets_410_and_relists() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    let lists_before = lists_of(&server, "services");

    // The connections drop; while the watcher cannot reconnect, the Service changes and the
    // history is compacted, so its resumed watch is from a version the server no longer has.
    server.hold_watches(true);
    server.drop_watches();
    server.apply(service(
        "demo",
        "web",
        &["10.96.0.10"],
        &[(Some("http"), "TCP", 8080)],
    ));
    server.compact();
    server.hold_watches(false);

    let catalog = watcher
        .catalog("port 8080", |c| c.services[0].ports[0].port == 8080)
        .await;
    assert_eq!(catalog.services[0].ports.len(), 1);
    assert!(
        lists_of(&server, "services") > lists_before,
        "no relist after 410"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_connection_resumes_from_its_resource_version() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("a watch of EndpointSlices is open", || {
        !watches_of(&server, "endpointslices").is_empty()
    })
    .await;
    let watches_before = watches_of(&server, "endpointslices").len();
    let lists_before = lists_of(&server, "endpointslices");
    // A bookmark may move the watch's resourceVersion up to now (if it arrives before the drop).
    let bookmark = server.bookmark();

    server.hold_watches(true);
    server.drop_watches();
    let changed_at = server.apply(slice(
        "demo",
        "web",
        "web-abc12",
        &[
            ("10.244.1.10", None, Some(true)),
            ("10.244.1.50", None, Some(true)),
        ],
    ));
    server.hold_watches(false);

    let catalog = watcher
        .catalog("the endpoint added while disconnected", |c| {
            endpoint_ips(&c.services[0]) == ["10.244.1.10", "10.244.1.50"]
        })
        .await;
    assert_eq!(catalog.generation, 2);
    assert_eq!(
        lists_of(&server, "endpointslices"),
        lists_before,
        "a dropped connection must resume the watch, not list again"
    );
    let resumed = &watches_of(&server, "endpointslices")[watches_before..];
    assert!(!resumed.is_empty(), "no new watch after the drop");
    let from: u64 = resumed[0].query["resourceVersion"].parse().unwrap();
    assert!(
        from > 100 && from <= bookmark && from < changed_at,
        "resumed from {from}; bookmark {bookmark}, the change {changed_at}"
    );
    assert_eq!(
        resumed[0]
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true")
    );

    // And it keeps following later events.
    server.delete("EndpointSlice", "demo", "web-abc12");
    watcher
        .catalog("no endpoints", |c| c.services[0].endpoints.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_that_changes_no_export_keeps_the_generation_and_writes_no_status_twice() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(export(&server, "demo", "ghost", "2026-03-01T00:00:00Z"));
    let mut watcher = start(&server, view(vec![]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("both statuses written", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
            && has_condition(&server, "demo", "ghost", "Valid", "False", "NoService")
    })
    .await;
    let status_writes = server.writes_to("serviceexports/status").len();
    assert_eq!(
        status_writes,
        2,
        "one status write per export: {:?}",
        server.writes()
    );

    // Behind the watches' back, ghost's Service appears as an ExternalName one: the catalog is
    // unchanged, but ghost's status must change, which shows that the relist was taken in.
    server.apply_unwatched(external_name_service("demo", "ghost"));
    server.compact();
    server.expire_watches();
    eventually("ghost's new status after the relist", || {
        has_condition(
            &server,
            "demo",
            "ghost",
            "Valid",
            "False",
            "InvalidServiceType",
        )
    })
    .await;
    assert_eq!(
        watcher.local.borrow().generation,
        1,
        "an unchanged catalog keeps its generation"
    );

    // Changes to endpoints publish new catalogs but write no status.
    server.apply(slice(
        "demo",
        "web",
        "web-abc12",
        &[("10.244.1.10", None, Some(true))],
    ));
    let catalog = watcher
        .catalog("one endpoint", |c| c.services[0].endpoints.len() == 1)
        .await;
    assert_eq!(catalog.generation, 2);
    assert_eq!(
        server.writes_to("serviceexports/status").len(),
        status_writes + 1,
        "only ghost's status changed: {:?}",
        server.writes_to("serviceexports/status")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_status_write_keeps_the_catalog_and_is_retried() {
    let server = ApiServer::start().await;
    server.forbid("patch", "serviceexports/status");
    web(&server);
    let mut watcher = start(&server, view(vec![]));

    let catalog = watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    assert_eq!(catalog.generation, 1);
    eventually("a refused status patch", || {
        server.requests().iter().any(|r| {
            r.method == "PATCH" && r.path.ends_with("/serviceexports/web/status") && r.status == 403
        })
    })
    .await;
    assert!(condition(&server, "demo", "web", "Valid").is_none());
    assert_eq!(
        watcher.local.borrow().services.len(),
        1,
        "the catalog stands"
    );

    server.allow("patch", "serviceexports/status");
    eventually("the status written on a retry", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
    })
    .await;
    assert_eq!(watcher.local.borrow().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_mcs_crds_the_cluster_exports_nothing_until_they_are_installed() {
    let server = ApiServer::start_without_mcs().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    let catalog = watcher.catalog("the empty catalog", |_| true).await;
    assert_eq!(catalog.generation, 1);
    assert!(catalog.services.is_empty());
    assert_eq!(
        lists_of(&server, "services"),
        0,
        "nothing is watched without the CRDs"
    );

    server.install_mcs(apiserver::MCS_VERSION_ALPHA);
    let catalog = watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    assert_eq!(catalog.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_is_used_where_the_crds_serve_it() {
    let server = ApiServer::start_serving(apiserver::MCS_VERSION_BETA).await;
    web(&server);
    let mut watcher = start(
        &server,
        view(vec![(
            "m2",
            vec![remote_service("demo", "db", 5432, "2026-01-01T00:00:00Z")],
        )]),
    );
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("status and imports written through v1beta1", || {
        has_condition(&server, "demo", "web", "Valid", "True", "Valid")
            && server.list("ServiceImport").len() == 2
    })
    .await;
    let mcs_paths: Vec<String> = server
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p.contains("multicluster.x-k8s.io"))
        .collect();
    assert!(
        mcs_paths
            .iter()
            .filter(|p| !p.ends_with("/v1alpha1"))
            .all(|p| p.contains("/v1beta1")),
        "{mcs_paths:#?}"
    );
    let import = server.get("ServiceImport", "demo", "db").unwrap();
    assert_eq!(import["apiVersion"], "multicluster.x-k8s.io/v1beta1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_one_generation_and_the_watcher_stops_with_the_view() {
    let server = ApiServer::start().await;
    web(&server);
    let mut watcher = start(&server, view(vec![]));
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;

    server.apply(service(
        "demo",
        "api",
        &["10.96.0.30"],
        &[(Some("grpc"), "TCP", 9000)],
    ));
    server.apply(slice(
        "demo",
        "api",
        "api-1",
        &[("10.244.1.30", None, Some(true))],
    ));
    server.apply(export(&server, "demo", "api", "2026-03-02T00:00:00Z"));
    let catalog = watcher
        .catalog("demo/api with its endpoint", |c| {
            c.services.len() == 2
                && c.services[0].name == "api"
                && c.services[0].endpoints.len() == 1
        })
        .await;
    assert_eq!(catalog.generation, 2, "one burst, one generation");

    drop(watcher.view.take());
    let stopped = tokio::time::timeout(DEADLINE, &mut watcher.task)
        .await
        .expect("run returns once the view's sender is gone");
    assert!(stopped.unwrap().is_ok());
}

/// The ClusterRole's and the Role's rules in deploy/base/rbac.yaml as (verb, resource) pairs. The file keeps
/// each rule's lists in flow style (`verbs: ["get", "list"]`), which is all this reads.
fn granted() -> std::collections::BTreeSet<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let list = |line: &str, key: &str| -> Option<Vec<String>> {
        let rest = line.trim().trim_start_matches("- ").strip_prefix(key)?;
        Some(
            rest.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    };
    let mut pairs = std::collections::BTreeSet::new();
    let roles: Vec<&str> = text
        .split("\n---\n")
        .filter(|doc| doc.contains("\nkind: ClusterRole\n") || doc.contains("\nkind: Role\n"))
        .collect();
    assert_eq!(
        roles.len(),
        2,
        "a ClusterRole and a Role in deploy/base/rbac.yaml"
    );
    let mut resources = Vec::new();
    for line in roles.iter().flat_map(|r| r.lines()) {
        if let Some(r) = list(line, "resources:") {
            resources = r;
        } else if let Some(verbs) = list(line, "verbs:") {
            for resource in &resources {
                for verb in &verbs {
                    pairs.insert((verb.clone(), resource.clone()));
                }
            }
        }
    }
    pairs
}

/// A Node as the API serves it: `labels` and one InternalIP (`None`: no addresses).
fn node(name: &str, gateway: bool, internal_ip: Option<&str>) -> Value {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {}
    });
    if gateway {
        node["metadata"]["labels"]["meshd.io/gateway"] = json!("true");
    }
    if let Some(ip) = internal_ip {
        node["status"]["addresses"] = json!([
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": ip}
        ]);
    }
    node
}

/// Every node's meshd reads the same directory: the candidates are the nodes labelled
/// meshd.io/gateway=true, each at its InternalIP, and this node is the one holding one of our
/// addresses; no candidate, or one without an address, is an error that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candidates_are_the_labelled_nodes_at_their_internal_ips() {
    use meshd::node::kubernetes::{directory, GatewayError};
    let server = ApiServer::start().await;
    let own: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "172.18.0.4".parse().unwrap()];
    server.apply(node("worker-1", false, Some("172.18.0.3")));
    let none = directory(server.client(), &own).await.unwrap_err();
    assert!(matches!(none, GatewayError::NoneLabelled), "{none}");
    assert!(
        none.to_string()
            .contains("kubectl label node NODE meshd.io/gateway=true"),
        "{none}"
    );

    server.apply(node("m1-control-plane", true, None));
    let e = directory(server.client(), &own).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("m1-control-plane (labelled meshd.io/gateway=true) has no valid InternalIP"),
        "{e}"
    );

    server.apply(node("m1-control-plane", true, Some("172.18.0.2")));
    let found = directory(server.client(), &own).await.unwrap();
    assert_eq!(found.candidates, vec!["m1-control-plane".to_string()]);
    assert_eq!(
        found.addresses["m1-control-plane"].to_string(),
        "172.18.0.2"
    );
    assert_eq!(found.me, None, "no node has one of our addresses yet");
    assert!(!found.i_am_candidate());
    // A second labelled node, ours: both are candidates, and we are one of them.
    server.apply(node("m1-worker", true, Some("172.18.0.4")));
    let found = directory(server.client(), &own).await.unwrap();
    assert_eq!(found.candidates, vec!["m1-control-plane", "m1-worker"]);
    assert_eq!(found.me.as_deref(), Some("m1-worker"));
    assert!(found.i_am_candidate());
    assert_eq!(found.addresses["worker-1"].to_string(), "172.18.0.3");

    server.forbid("list", "nodes");
    let e = directory(server.client(), &own).await.unwrap_err();
    assert!(e.to_string().contains("needs get/list on nodes"), "{e}");
}

/// A labelled node whose InternalIP is not an address (a broken or hostile API answer) is no
/// candidate: the lookup says so instead of routing to something made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_with_a_malformed_address_is_refused() {
    use meshd::node::kubernetes::{directory, GatewayError};
    let server = ApiServer::start().await;
    for garbage in [
        "not-an-ip",
        "172.18.0.2/24",
        "",
        "999.1.1.1",
        "172.18.0.2\n10.0.0.1",
    ] {
        server.apply(node("m1-control-plane", true, Some(garbage)));
        let e = directory(server.client(), &[]).await.unwrap_err();
        assert!(
            matches!(e, GatewayError::NoAddress { .. }),
            "{garbage:?}: {e}"
        );
    }
}

/// The gateway writes the meshd-dns Service's one endpoint: created, then patched when it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_publishes_the_dns_services_endpoint() {
    use meshd::node::kubernetes::{publish_dns, DNS_SERVICE, DNS_SLICE};
    let server = ApiServer::start().await;
    publish_dns(server.client(), "172.18.0.2".parse().unwrap(), 5353)
        .await
        .unwrap();
    let slice = server.get("EndpointSlice", "default", DNS_SLICE).unwrap();
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        DNS_SERVICE
    );
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["172.18.0.2"]));
    assert_eq!(
        slice["ports"],
        json!([
            {"name": "dns-udp", "port": 5353, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}
        ])
    );
    publish_dns(server.client(), "172.18.0.4".parse().unwrap(), 5353)
        .await
        .unwrap();
    let slice = server.get("EndpointSlice", "default", DNS_SLICE).unwrap();
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["172.18.0.4"]));
    server.forbid("patch", "endpointslices");
    assert!(
        publish_dns(server.client(), "172.18.0.2".parse().unwrap(), 5353)
            .await
            .is_err()
    );
}

/// The watcher and the gateway lookup are meshd's Kubernetes API clients: the ClusterRole must
/// grant what they use and nothing more (a later API client adds its rules here and to the
/// exemptions below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rbac_grants_exactly_what_meshd_uses() {
    let server = ApiServer::start().await;
    web(&server);
    // m2's older export on port 80: the import is created with port 80 ...
    let mut watcher = start(
        &server,
        view(vec![(
            "m2",
            vec![remote_service("demo", "web", 8080, "2026-02-01T00:00:00Z")],
        )]),
    );
    watcher.catalog("demo/web", |c| c.services.len() == 1).await;
    eventually("the import with m2's port", || {
        server
            .get("ServiceImport", "demo", "web")
            .is_some_and(|i| i["spec"]["ports"][0]["port"] == 8080 && !i["status"].is_null())
    })
    .await;
    // ... patched to this cluster's when m2 withdraws, and deleted when this cluster does too.
    watcher.set_view(view(vec![("m2", vec![])]));
    eventually("the import with this cluster's ports", || {
        server.get("ServiceImport", "demo", "web").is_some_and(|i| {
            i["spec"]["ports"][0]["port"] == 80 && i["spec"]["ports"].as_array().unwrap().len() == 2
        })
    })
    .await;
    server.delete("ServiceExport", "demo", "web");
    eventually("the import deleted", || {
        server.get("ServiceImport", "demo", "web").is_none()
    })
    .await;

    server.apply(node("m1-control-plane", true, Some("172.18.0.2")));
    meshd::node::kubernetes::directory(server.client(), &[])
        .await
        .unwrap();
    // The election: watch the Lease, take it (create), renew it (update), release it (update).
    {
        use meshd::node::lease::{self, Candidate, Leadership, LeaseSettings, LEASE_NAME};
        let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::default_namespaced(server.client());
        let (seen, observer) = lease::observe(api.clone(), LEASE_NAME);
        let (out, mut view) = watch::channel(Leadership::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(
            Candidate::new(api, "m1-control-plane".into(), LeaseSettings::default())
                .run(seen, out, stop_rx),
        );
        view.wait_for(|l| l.active).await.unwrap();
        tokio::time::sleep(LeaseSettings::default().retry * 2).await;
        stop.send(()).unwrap();
        task.await.unwrap();
        observer.abort();
    }
    for _ in 0..2 {
        meshd::node::kubernetes::publish_dns(server.client(), "172.18.0.2".parse().unwrap(), 5353)
            .await
            .unwrap();
    }

    let used: std::collections::BTreeSet<(String, String)> = server
        .requests()
        .into_iter()
        .filter_map(|r| r.rbac)
        .collect();
    let granted = granted();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "meshd uses {missing:?}, which deploy/base/rbac.yaml does not grant"
    );
    // Beyond what it used here, only `get` (read-only, used when a create finds the object
    // already there) is granted.
    let unused: Vec<_> = granted
        .difference(&used)
        .filter(|(verb, resource)| verb != "get" || resource.ends_with("/status"))
        .collect();
    assert!(
        unused.is_empty(),
        "deploy/base/rbac.yaml grants {unused:?}, which meshd never uses"
    );
}
