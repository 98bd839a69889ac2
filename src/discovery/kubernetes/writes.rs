//! One pass of the watcher over its stores: publish the catalog, then bring ServiceExport statuses
//! and ServiceImports to what the pass decided. The only module here that writes to the API.
//!
//! Writes are merge patches (`application/merge-patch+json`) of the fields meshd owns, a POST to
//! create and a DELETE; each is made only when the store shows a difference. A refused write is
//! logged once per distinct refusal, naming the object and what to do, and retried by a later
//! pass ([`Pass::needs_retry`]); it never touches the catalog already published.

use super::clusterset::{self, WantedImport};
use super::local::{self, ExportVerdict};
use super::slices;
use super::status::{self, Condition, CONFLICT, READY, VALID};
use super::{Publisher, Stores, MANAGED_BY, RETRY};
use crate::discovery::catalog::{
    ClustersetView, ExportedService, ServiceType, SessionAffinity, TrafficPolicy,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, ResourceExt,
};
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

type Key = (String, String);

/// The state that outlives a pass: what was written, what was refused.
pub(super) struct Pass {
    client: Client,
    cluster: String,
    /// What this cluster's exports may hand out (empty: not checked).
    local_cidrs: Vec<ipnet::IpNet>,
    exports: ApiResource,
    imports: ApiResource,
    /// Status written per export: the resourceVersion it was written over, and the conditions.
    /// Until the watch shows the write, the store still holds that version: no second write.
    written: HashMap<Key, (String, Vec<Condition>)>,
    problems: Problems,
}

impl Pass {
    pub fn new(
        client: Client,
        cluster: String,
        local_cidrs: Vec<ipnet::IpNet>,
        exports: ApiResource,
        imports: ApiResource,
    ) -> Self {
        Pass {
            client,
            cluster,
            local_cidrs,
            exports,
            imports,
            written: HashMap::new(),
            problems: Problems::default(),
        }
    }

    /// True when a write was refused and should be tried again after [`RETRY`].
    pub fn needs_retry(&self) -> bool {
        self.problems.retry()
    }

    /// Publishes the local catalog and, when `write` (the active gateway), writes the
    /// ServiceExport statuses and the ServiceImports.
    pub async fn run(
        &mut self,
        stores: &Stores,
        view: &ClustersetView,
        catalog: &mut Publisher,
        write: bool,
    ) {
        let exports = stores.exports.state();
        let verdicts = local::decide(
            &exports,
            &stores.services.state(),
            &stores.slices.state(),
            &self.local_cidrs,
        );
        let services: Vec<ExportedService> =
            verdicts.iter().filter_map(|v| v.service.clone()).collect();
        catalog.publish(&services);
        if !write {
            return;
        }

        self.problems.begin();
        self.write_statuses(&exports, &verdicts, &services, view)
            .await;
        if view.loaded {
            let wanted = clusterset::wanted_imports(&self.cluster, &services, view);
            self.write_imports(&stores.imports.state(), &wanted).await;
            let slices = slices::wanted_slices(&self.cluster, &services, view);
            self.write_slices(&stores.slices.state(), &slices).await;
        }
        self.problems.end();
    }

    async fn write_statuses(
        &mut self,
        exports: &[Arc<DynamicObject>],
        verdicts: &[ExportVerdict],
        services: &[ExportedService],
        view: &ClustersetView,
    ) {
        let all = clusterset::exporters(&self.cluster, services, view);
        let now = local::rfc3339(&Time(Timestamp::now()));
        let by_key: HashMap<Key, &DynamicObject> = exports
            .iter()
            .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), &**e))
            .collect();
        self.written.retain(|key, _| by_key.contains_key(key));
        for verdict in verdicts {
            let key = (verdict.namespace.clone(), verdict.name.clone());
            let Some(export) = by_key.get(&key) else {
                continue;
            };
            let conflict = verdict.service.as_ref().map(|ours| {
                let exporters = &all[&(ours.namespace.as_str(), ours.name.as_str())];
                clusterset::conflict(&self.cluster, ours, exporters)
            });
            let mut wanted = vec![(VALID, &verdict.valid), (READY, &verdict.ready)];
            if let Some(conflict) = &conflict {
                wanted.push((CONFLICT, conflict));
            }
            let current = status::conditions_of(export.data.get("status"));
            let merged = status::merge(&current, &wanted, export.metadata.generation, &now);
            let version = export.resource_version().unwrap_or_default();
            let pending = self.written.get(&key).is_some_and(|(over, conditions)| {
                *over == version && status::same(conditions, &merged)
            });
            if status::same(&merged, &current) || pending {
                continue;
            }
            let what = format!("ServiceExport {}/{}", key.0, key.1);
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.0, &self.exports);
            let patch = Patch::Merge(json!({ "status": { "conditions": merged } }));
            match api
                .patch_status(&key.1, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    tracing::info!(
                        export = %what,
                        valid = %verdict.valid.reason,
                        ready = %verdict.ready.reason,
                        conflict = conflict.as_ref().map_or("-", |c| &*c.reason),
                        "status written"
                    );
                    self.written.insert(key, (version, merged));
                    self.problems.clear(&what);
                }
                // Deleted since the store saw it: nothing left to write.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => self.problems.report(
                    &what,
                    refusal(
                        &e,
                        "patch",
                        &format!("serviceexports/status ({})", self.exports.api_version),
                    ),
                    true,
                ),
            }
        }
    }

    async fn write_imports(&mut self, existing: &[Arc<DynamicObject>], wanted: &[WantedImport]) {
        let existing: BTreeMap<Key, &DynamicObject> = existing
            .iter()
            .map(|i| ((i.namespace().unwrap_or_default(), i.name_any()), &**i))
            .collect();
        for want in wanted {
            let key = (want.namespace.clone(), want.name.clone());
            match existing.get(&key) {
                None => self.create_import(want).await,
                Some(import) if managed(import) => self.update_import(import, want).await,
                Some(_) => self.problems.report(
                    &import_name(&key),
                    format!(
                        "exists and is not managed by meshd (no label {}={}); meshd leaves it as it is: delete it to let meshd manage it",
                        MANAGED_BY.0, MANAGED_BY.1
                    ),
                    false,
                ),
            }
        }
        for (key, import) in existing {
            if managed(import)
                && !wanted
                    .iter()
                    .any(|w| w.namespace == key.0 && w.name == key.1)
            {
                self.delete_import(&key).await;
            }
        }
    }

    /// Brings the MCS EndpointSlices meshd manages to `wanted` (see [`slices`]): creates the
    /// missing, patches the changed, deletes the ones no export backs any more.
    async fn write_slices(
        &mut self,
        existing: &[Arc<EndpointSlice>],
        wanted: &BTreeMap<Key, EndpointSlice>,
    ) {
        let existing: BTreeMap<Key, &EndpointSlice> = existing
            .iter()
            .filter(|s| slices::managed(s))
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), &**s))
            .collect();
        for (key, want) in wanted {
            let what = format!("EndpointSlice {}/{}", key.0, key.1);
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
            let result = match existing.get(key) {
                Some(have) if slices::same(have, want) => continue,
                Some(_) => {
                    let patch = Patch::Merge(json!({
                        "metadata": { "labels": want.metadata.labels },
                        "endpoints": want.endpoints,
                        "ports": want.ports,
                    }));
                    api.patch(&key.1, &PatchParams::default(), &patch)
                        .await
                        .map(|_| "updated")
                        .map_err(|e| (e, "patch"))
                }
                None => api
                    .create(&PostParams::default(), want)
                    .await
                    .map(|_| "created")
                    .map_err(|e| (e, "create")),
            };
            match result {
                Ok(done) => {
                    tracing::debug!(slice = %what, "MCS EndpointSlice {done}");
                    self.problems.clear(&what);
                }
                Err((kube::Error::Api(s), _)) if s.is_already_exists() => self.problems.report(
                    &what,
                    format!(
                        "exists and is not managed by meshd (no label {}={}); meshd leaves it as it is: delete it to let meshd manage it",
                        MANAGED_BY.0, MANAGED_BY.1
                    ),
                    false,
                ),
                Err((kube::Error::Api(s), _)) if s.code == 404 => self.problems.report(
                    &what,
                    format!(
                        "namespace {} does not exist in this cluster, so the service exported elsewhere cannot be imported here; create the namespace to import it",
                        key.0
                    ),
                    true,
                ),
                Err((e, verb)) => {
                    self.problems
                        .report(&what, refusal(&e, verb, "endpointslices"), true)
                }
            }
        }
        for key in existing.keys().filter(|k| !wanted.contains_key(*k)) {
            let what = format!("EndpointSlice {}/{}", key.0, key.1);
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
            match api.delete(&key.1, &DeleteParams::default()).await {
                Ok(_) => self.problems.clear(&what),
                Err(kube::Error::Api(s)) if s.code == 404 => self.problems.clear(&what),
                Err(e) => {
                    self.problems
                        .report(&what, refusal(&e, "delete", "endpointslices"), true)
                }
            }
        }
    }

    fn imports_api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.imports)
    }

    async fn create_import(&mut self, want: &WantedImport) {
        let what = import_name(&(want.namespace.clone(), want.name.clone()));
        let mut object = DynamicObject::new(&want.name, &self.imports).within(&want.namespace);
        *object.labels_mut() = import_labels(want);
        if !want.annotations.is_empty() {
            *object.annotations_mut() = want.annotations.clone();
        }
        let mut spec = import_spec(want);
        if let Some(fields) = spec.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        object.data = json!({ "spec": spec });
        let api = self.imports_api(&want.namespace);
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => {
                tracing::info!(import = %what, clusters = ?want.clusters, "ServiceImport created");
                self.problems.clear(&what);
                self.update_import(&created, want).await;
            }
            // Created by an earlier pass or by someone else since the store last saw it.
            Err(kube::Error::Api(s)) if s.is_already_exists() => match api.get(&want.name).await {
                Ok(found) if managed(&found) => self.update_import(&found, want).await,
                Ok(_) => self.problems.report(
                    &what,
                    format!(
                        "exists and is not managed by meshd (no label {}={}); meshd leaves it as it is: delete it to let meshd manage it",
                        MANAGED_BY.0, MANAGED_BY.1
                    ),
                    false,
                ),
                Err(e) => self.problems.report(&what, refusal(&e, "get", "serviceimports"), true),
            },
            Err(kube::Error::Api(s)) if s.code == 404 => self.problems.report(
                &what,
                format!(
                    "namespace {} does not exist in this cluster, so the service exported elsewhere cannot be imported here; create the namespace to import it",
                    want.namespace
                ),
                true,
            ),
            Err(e) => self.problems.report(&what, refusal(&e, "create", "serviceimports"), true),
        }
    }

    /// Brings a managed ServiceImport's spec (type, ports, ips, ipFamilies) and status (clusters)
    /// to `want`.
    async fn update_import(&mut self, import: &DynamicObject, want: &WantedImport) {
        let what = import_name(&(want.namespace.clone(), want.name.clone()));
        let api = self.imports_api(&want.namespace);
        let spec = import_spec(want);
        let current_spec = import.data.get("spec");
        // A field meshd clears is `null` in the merge patch and absent from the object.
        let spec_differs = IMPORT_SPEC_FIELDS.iter().any(|field| {
            current_spec
                .and_then(|s| s.get(field))
                .filter(|v| !v.is_null())
                != spec.get(field).filter(|v| !v.is_null())
        });
        let labels = import_labels(want);
        let metadata_differs =
            *import.labels() != labels || *import.annotations() != want.annotations;
        if spec_differs || metadata_differs {
            // Keys meshd no longer wants are `null`: removed by the merge patch.
            let replace = |current: &BTreeMap<String, String>,
                           wanted: &BTreeMap<String, String>| {
                let mut patch: serde_json::Map<String, Value> = current
                    .keys()
                    .filter(|k| !wanted.contains_key(*k))
                    .map(|k| (k.clone(), Value::Null))
                    .collect();
                patch.extend(wanted.iter().map(|(k, v)| (k.clone(), json!(v))));
                Value::Object(patch)
            };
            let patch = Patch::Merge(json!({
                "metadata": {
                    "labels": replace(import.labels(), &labels),
                    "annotations": replace(import.annotations(), &want.annotations),
                },
                "spec": spec,
            }));
            if let Err(e) = api.patch(&want.name, &PatchParams::default(), &patch).await {
                self.problems
                    .report(&what, refusal(&e, "patch", "serviceimports"), true);
                return;
            }
            tracing::info!(import = %what, "ServiceImport updated");
        }
        let clusters = json!(want
            .clusters
            .iter()
            .map(|c| json!({ "cluster": c }))
            .collect::<Vec<_>>());
        let current_clusters = import.data.get("status").and_then(|s| s.get("clusters"));
        if current_clusters != Some(&clusters) {
            let patch = Patch::Merge(json!({ "status": { "clusters": clusters } }));
            if let Err(e) = api
                .patch_status(&want.name, &PatchParams::default(), &patch)
                .await
            {
                self.problems
                    .report(&what, refusal(&e, "patch", "serviceimports/status"), true);
                return;
            }
        }
        self.problems.clear(&what);
    }

    async fn delete_import(&mut self, key: &Key) {
        let what = import_name(key);
        match self
            .imports_api(&key.0)
            .delete(&key.1, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(import = %what, "ServiceImport deleted: no cluster exports the service any more");
                self.problems.clear(&what);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => self.problems.clear(&what),
            Err(e) => self
                .problems
                .report(&what, refusal(&e, "delete", "serviceimports"), true),
        }
    }
}

fn import_name(key: &Key) -> String {
    format!("ServiceImport {}/{}", key.0, key.1)
}

/// A managed ServiceImport's labels: the winning export's exported labels, and meshd's mark
/// (which no exported label can replace).
fn import_labels(want: &WantedImport) -> BTreeMap<String, String> {
    let mut labels = want.labels.clone();
    labels.insert(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
    labels
}

fn managed(object: &DynamicObject) -> bool {
    object.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
}

/// The fields of a ServiceImport's spec meshd owns.
const IMPORT_SPEC_FIELDS: [&str; 8] = [
    "type",
    "ports",
    "ips",
    "ipFamilies",
    "sessionAffinity",
    "sessionAffinityConfig",
    "internalTrafficPolicy",
    "trafficDistribution",
];

/// A ServiceImport's spec as meshd wants it: a merge patch (empty lists are `null`, which
/// removes them).
fn import_spec(want: &WantedImport) -> Value {
    let ports: Vec<Value> = want
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({ "protocol": p.protocol.to_string(), "port": p.port });
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            if let Some(app) = &p.app_protocol {
                port["appProtocol"] = json!(app);
            }
            port
        })
        .collect();
    let service_type = match want.service_type {
        ServiceType::ClusterSetIP => "ClusterSetIP",
        ServiceType::Headless => "Headless",
    };
    let list = |items: Vec<String>| {
        if items.is_empty() {
            Value::Null
        } else {
            json!(items)
        }
    };
    json!({
        "type": service_type,
        "ports": ports,
        "ips": list(want.ips.iter().map(|ip| ip.to_string()).collect()),
        "ipFamilies": list(want.ip_families.iter().map(|f| f.to_string()).collect()),
        "sessionAffinity": match want.session_affinity {
            Some(SessionAffinity::ClientIp) => json!("ClientIP"),
            Some(SessionAffinity::NoAffinity) => json!("None"),
            None => Value::Null,
        },
        "sessionAffinityConfig": match want.session_affinity_timeout {
            Some(seconds) => json!({ "clientIP": { "timeoutSeconds": seconds } }),
            None => Value::Null,
        },
        "internalTrafficPolicy": match want.internal_traffic_policy {
            Some(TrafficPolicy::Cluster) => json!("Cluster"),
            Some(TrafficPolicy::Local) => json!("Local"),
            None => Value::Null,
        },
        "trafficDistribution": want.traffic_distribution.as_deref().map_or(Value::Null, |t| json!(t)),
    })
}

/// Why a write was refused, and what to do.
fn refusal(e: &kube::Error, verb: &str, resource: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "forbidden ({}): grant {verb} on {resource} to meshd's ServiceAccount: apply deploy/base/rbac.yaml; retrying every {} s",
            s.message,
            RETRY.as_secs()
        ),
        kube::Error::Api(s) => format!(
            "{verb} refused with {} {}: {}; retrying every {} s",
            s.code,
            s.reason,
            s.message,
            RETRY.as_secs()
        ),
        other => format!(
            "{verb} failed: {other}; is the API server reachable? retrying every {} s",
            RETRY.as_secs()
        ),
    }
}

/// Refused writes, logged when they start or change and when they end; the keys a pass did not
/// touch (their object needs no write any more) are forgotten at its end.
#[derive(Default)]
struct Problems {
    /// Object → (what went wrong, whether a retry may help).
    current: BTreeMap<String, (String, bool)>,
    touched: BTreeSet<String>,
}

impl Problems {
    fn begin(&mut self) {
        self.touched.clear();
    }

    fn report(&mut self, what: &str, problem: String, retry: bool) {
        self.touched.insert(what.to_string());
        if self.current.get(what).map(|(p, _)| p) != Some(&problem) {
            tracing::warn!(object = %what, "{what}: {problem}");
        }
        self.current.insert(what.to_string(), (problem, retry));
    }

    fn clear(&mut self, what: &str) {
        self.touched.insert(what.to_string());
        if self.current.remove(what).is_some() {
            tracing::info!(object = %what, "{what}: written; the earlier problem is resolved");
        }
    }

    fn end(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        self.current.retain(|what, _| touched.contains(what));
    }

    fn retry(&self) -> bool {
        self.current.values().any(|(_, retry)| *retry)
    }
}
