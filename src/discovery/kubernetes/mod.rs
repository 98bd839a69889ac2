//! The ServiceExport watcher: this cluster's [`ExportCatalog`] from the Kubernetes API, the MCS
//! status conditions on each ServiceExport, and the ServiceImports of the clusterset.
//!
//! [`run`] is the whole of it, one task. It finds which version of the MCS API the cluster serves
//! (`multicluster.x-k8s.io` v1beta1, else v1alpha1, each resource on its own), then keeps four
//! reflectors (kube-runtime's watcher: list, then watch with bookmarks; a new list after
//! `410 Gone`; a resumed watch after a dropped connection; back-off on errors) over ServiceExports,
//! Services, EndpointSlices and ServiceImports in all namespaces. Once all four have listed, and
//! after every burst of changes (gathered for [`DEBOUNCE`]) or change of the clusterset view, one
//! pass:
//!
//! 1. decides every export (`local`) and publishes the catalog on `local` when it differs from
//!    the last one, with the next generation (the first is 1);
//! 2. writes `Valid`, `Ready` and `Conflict` (`clusterset`) on each ServiceExport whose
//!    conditions differ from those wanted (`status`);
//! 3. creates, updates and deletes the ServiceImports it manages (label
//!    `app.kubernetes.io/managed-by: meshd`) so that there is one per service exported anywhere
//!    in the view, never touching one it does not manage;
//! 4. likewise the MCS EndpointSlices of those services (`slices`): one per exporting cluster
//!    and IP family.
//!
//! Kubernetes holds the truth and this task holds only caches of it, so nothing is lost when the
//! task restarts. A refused write (RBAC, a missing namespace, an unreachable API server) is logged
//! once with what to do and retried every [`RETRY`]; the catalog already published stands.
//! What this module does not do: answer DNS (the view goes to `crate::dns`), talk to peers (the
//! catalog sync owns the view's remote entries), or decide which gateway of a cluster is active.

mod clusterset;
mod local;
mod slices;
mod status;
mod writes;

use crate::discovery::catalog::{ClustersetView, ExportCatalog, ExportConflict, ExportedService};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ResourceExt};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

/// The MCS API group.
pub const GROUP: &str = "multicluster.x-k8s.io";
/// The versions of [`GROUP`] meshd speaks, preferred first.
pub const VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// The label (and value) on every ServiceImport meshd manages; it touches no other.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshd");
/// How long a burst of changes is gathered before one pass, so that one change is one generation.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often refused writes, and the discovery of a missing MCS API, are retried.
pub const RETRY: Duration = Duration::from_secs(10);

/// Why the watcher stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    #[error("the {resource} watch of the ServiceExport watcher stopped ({why}); this is a bug in meshd: restart it and report the log")]
    WatchStopped { resource: &'static str, why: String },
    #[error("cannot configure the Kubernetes client ({0}); run meshd in a pod (in-cluster config) or point KUBECONFIG at a kubeconfig, or set kubernetes = false and use exports_file")]
    Connect(#[source] kube::Error),
}

/// A client from the in-cluster configuration, else `KUBECONFIG` (or `~/.kube/config`).
pub async fn connect() -> Result<Client, WatcherError> {
    Client::try_default().await.map_err(WatcherError::Connect)
}

/// The `Conflict` condition of each of the local cluster's exports in `view` (its first
/// cluster), by the same rule the watcher writes to the ServiceExports: the oldest export wins.
pub fn conflicts(view: &ClustersetView) -> Vec<ExportConflict> {
    let Some(local) = view.clusters.first() else {
        return Vec::new();
    };
    let cluster = local.catalog.cluster.as_str();
    let all = clusterset::exporters(cluster, &local.catalog.services, view);
    local
        .catalog
        .services
        .iter()
        .map(|ours| {
            let verdict = clusterset::conflict(
                cluster,
                ours,
                &all[&(ours.namespace.as_str(), ours.name.as_str())],
            );
            ExportConflict {
                namespace: ours.namespace.clone(),
                name: ours.name.clone(),
                conflict: verdict.status,
                reason: verdict.reason.to_string(),
                message: verdict.message,
            }
        })
        .collect()
}

/// The API resources of ServiceExport and ServiceImport, in the versions the cluster serves.
#[derive(Debug, Clone)]
struct McsResources {
    exports: ApiResource,
    imports: ApiResource,
}

/// Runs the ServiceExport watcher of cluster `cluster` against `client` until `view`'s sender is
/// dropped (then `Ok`).
///
/// Publishes this cluster's catalog on `local` (`send_replace`, generations 1, 2, ...; only when
/// it changed) and reads the clusterset `view`, whose entries other than `cluster` are the remote
/// exports that decide `Conflict` and the ServiceImports. ServiceImports are written only once
/// the view is loaded; a cluster missing from the view has its ServiceImports withdrawn, so the
/// view should keep a peer whose tunnel is down (with `up: false`) rather than drop it.
///
/// Writes (statuses, ServiceImports) only while `writing` is true: a standby gateway keeps its
/// watches and catalog warm, and only the active one writes.
///
/// Errors of the API (unreachable, forbidden, the MCS CRDs not installed) are logged and retried,
/// never returned: they must not take down the tunnel. `Err` means an internal watch stopped.
pub async fn run(
    client: Client,
    cluster: String,
    local_cidrs: Vec<ipnet::IpNet>,
    local: watch::Sender<ExportCatalog>,
    mut view: watch::Receiver<Arc<ClustersetView>>,
    mut writing: watch::Receiver<bool>,
) -> Result<(), WatcherError> {
    let span = tracing::info_span!("kubernetes", cluster = %cluster);
    async move {
        let mut catalog = Publisher {
            local,
            cluster: cluster.clone(),
            generation: 0,
            published: None,
        };
        let Some(mcs) = discover(&client, &mut view, &mut catalog).await else {
            return Ok(());
        };
        tracing::info!(
            serviceexports = %mcs.exports.api_version,
            serviceimports = %mcs.imports.api_version,
            "watching ServiceExports, Services, EndpointSlices and ServiceImports in all namespaces"
        );
        let changed = Arc::new(Notify::new());
        let mut watches = JoinSet::new();
        let stores = Stores {
            exports: reflect(
                &mut watches,
                Api::all_with(client.clone(), &mcs.exports),
                mcs.exports.clone(),
                "serviceexports",
                &changed,
            ),
            services: reflect(
                &mut watches,
                Api::<Service>::all(client.clone()),
                (),
                "services",
                &changed,
            ),
            slices: reflect(
                &mut watches,
                Api::<EndpointSlice>::all(client.clone()),
                (),
                "endpointslices",
                &changed,
            ),
            imports: reflect(
                &mut watches,
                Api::all_with(client.clone(), &mcs.imports),
                mcs.imports.clone(),
                "serviceimports",
                &changed,
            ),
        };
        tokio::select! {
            ready = stores.ready() => if !ready {
                // A store lost its writer: its watch task ended, which join_next names.
                return Err(watch_stopped(watches.join_next().await));
            },
            stopped = watches.join_next() => return Err(watch_stopped(stopped)),
            _ = view_closed(&mut view) => return Ok(()),
        }
        tracing::info!("initial lists done");
        let mut pass = writes::Pass::new(client, cluster, local_cidrs, mcs.exports, mcs.imports);
        loop {
            let snapshot = view.borrow_and_update().clone();
            let write = *writing.borrow_and_update();
            pass.run(&stores, &snapshot, &mut catalog, write).await;
            let retry = write && pass.needs_retry();
            tokio::select! {
                _ = changed.notified() => {}
                changed = writing.changed() => if changed.is_err() { return Ok(()) },
                closed = view.changed() => if closed.is_err() { return Ok(()) },
                _ = tokio::time::sleep(RETRY), if retry => {}
                stopped = watches.join_next() => return Err(watch_stopped(stopped)),
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    }
    .instrument(span)
    .await
}

/// This cluster's catalog going out on `local`: a new generation only when the services changed.
pub(super) struct Publisher {
    local: watch::Sender<ExportCatalog>,
    cluster: String,
    generation: u64,
    /// The services of the last catalog published.
    published: Option<Vec<ExportedService>>,
}

impl Publisher {
    fn publish(&mut self, services: &[ExportedService]) {
        if self.published.as_deref() == Some(services) {
            return;
        }
        self.generation += 1;
        self.local.send_replace(ExportCatalog {
            cluster: self.cluster.clone(),
            generation: self.generation,
            services: services.to_vec(),
        });
        self.published = Some(services.to_vec());
        tracing::info!(
            generation = self.generation,
            services = services.len(),
            "local catalog published"
        );
    }
}

/// Returns when the view's sender is dropped (changes on the way are skipped: a pass always
/// reads the latest view).
async fn view_closed(view: &mut watch::Receiver<Arc<ClustersetView>>) {
    while view.changed().await.is_ok() {}
}

/// The reflector stores one pass reads.
struct Stores {
    exports: Store<DynamicObject>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    imports: Store<DynamicObject>,
}

impl Stores {
    /// Waits until every store has its first list; false when a watch task ended before.
    async fn ready(&self) -> bool {
        let (exports, services, slices, imports) = futures::join!(
            self.exports.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.imports.wait_until_ready(),
        );
        exports.is_ok() && services.is_ok() && slices.is_ok() && imports.is_ok()
    }
}

fn watch_stopped(stopped: Option<Result<&'static str, tokio::task::JoinError>>) -> WatcherError {
    match stopped {
        Some(Ok(resource)) => WatcherError::WatchStopped {
            resource,
            why: "its stream ended".into(),
        },
        Some(Err(e)) => WatcherError::WatchStopped {
            resource: "a",
            why: e.to_string(),
        },
        None => WatcherError::WatchStopped {
            resource: "every",
            why: "no watch was running".into(),
        },
    }
}

/// Finds the served versions of ServiceExport and ServiceImport, retrying (and logging what to do)
/// until both are served; `None` when `view` closes first. While the API says that ServiceExports
/// are not served, there can be none: `catalog` gets an empty catalog meanwhile.
async fn discover(
    client: &Client,
    view: &mut watch::Receiver<Arc<ClustersetView>>,
    catalog: &mut Publisher,
) -> Option<McsResources> {
    loop {
        let found = tokio::join!(
            served_version(client, "serviceexports", "ServiceExport"),
            served_version(client, "serviceimports", "ServiceImport"),
        );
        if let (Ok(None), _) = found {
            catalog.publish(&[]);
        }
        match found {
            (Ok(Some(exports)), Ok(Some(imports))) => return Some(McsResources { exports, imports }),
            (Ok(None), _) | (_, Ok(None)) => tracing::warn!(
                "the MCS API CRDs (serviceexports and serviceimports.{GROUP}, {}) are not both installed: apply deploy/base/crds/ (kubectl apply -k deploy/overlays/<cluster>); retrying in {} s",
                VERSIONS.join(" or "),
                RETRY.as_secs()
            ),
            (Err(e), _) | (_, Err(e)) => tracing::warn!(
                error = %e,
                "cannot read the API discovery of {GROUP}; is the API server reachable? retrying in {} s",
                RETRY.as_secs()
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = view_closed(view) => return None,
        }
    }
}

/// The first of [`VERSIONS`] that serves `plural`.
async fn served_version(
    client: &Client,
    plural: &str,
    kind: &str,
) -> Result<Option<ApiResource>, kube::Error> {
    for version in VERSIONS {
        match client
            .list_api_group_resources(&format!("{GROUP}/{version}"))
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == plural) => {
                return Ok(Some(ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(GROUP, version, kind),
                    plural,
                )))
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Starts a reflector over `api` in `watches`: its store, kept current, and `changed` notified
/// whenever the store changed (an object applied or deleted, or a new list swapped in).
fn reflect<K>(
    watches: &mut JoinSet<&'static str>,
    api: Api<K>,
    dyntype: K::DynamicType,
    resource: &'static str,
    changed: &Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let changed = changed.clone();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff();
    watches.spawn(
        async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone,
                    ) => changed.notify_one(),
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Err(e) => match status_of(&e) {
                        Some(s) if s.code == 410 => tracing::info!(
                            "the {resource} watch expired (410 Gone); listing {resource} again"
                        ),
                        Some(s) if s.code == 403 => tracing::warn!(
                            error = %e,
                            "cannot list/watch {resource}: forbidden; grant get, list and watch on {resource} to meshd's ServiceAccount: apply deploy/base/rbac.yaml"
                        ),
                        _ => tracing::warn!(
                            error = %e,
                            "list/watch of {resource} failed; retrying with back-off"
                        ),
                    },
                }
            }
            resource
        }
        .in_current_span(),
    );
    store
}

/// The API's answer inside a watcher error, when there is one.
fn status_of(e: &watcher::Error) -> Option<&kube::core::Status> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s),
        watcher::Error::WatchError(s) => Some(s),
        _ => None,
    }
}
