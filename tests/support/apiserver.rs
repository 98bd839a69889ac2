//! An in-process Kubernetes API server for the ServiceExport watcher's tests (tests/watcher.rs):
//! axum on 127.0.0.1, speaking the real list/watch protocol to an unmodified kube-rs client.
//!
//! It holds Nodes, Services, EndpointSlices, Leases, ServiceExports and ServiceImports as JSON
//! (the tests build the built-in ones from k8s-openapi types) under one global resourceVersion, keeps the history
//! of changes so that a watch can resume from any version not compacted away, and answers:
//!
//! - discovery of the MCS group (`/apis/multicluster.x-k8s.io/<version>`; 404 for versions it
//!   does not serve, like a real API server);
//! - lists with `metadata.resourceVersion`, `limit` and `continue`;
//! - `?watch=true&resourceVersion=N&allowWatchBookmarks=true`: the changes after N, then live
//!   ones, as newline-delimited `{"type": ..., "object": ...}`; a version older than the last
//!   compaction gets an ERROR event with a 410 Status, as a real API server does;
//! - `fieldSelector=metadata.name=NAME` on lists and watches;
//! - GET of one object, POST (create), PUT (replace; a stale `metadata.resourceVersion` gets
//!   409 Conflict), merge PATCH of an object or its `/status`, DELETE.
//!
//! Tests steer it: change objects (with or without a watch event), delete a namespace, send
//! bookmarks, expire or drop every open watch, hold new watches back, refuse a verb with 403, and
//! read back every request and every write.

#![allow(dead_code)] // each test uses its own part

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

pub const MCS_GROUP: &str = "multicluster.x-k8s.io";

/// A resource the server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kind {
    plural: &'static str,
    kind: &'static str,
    /// The group, "" for the core group.
    group: &'static str,
    /// Whether `status` is a subresource (then the object's own endpoint ignores it).
    status_subresource: bool,
}

const KINDS: [Kind; 6] = [
    Kind {
        plural: "nodes",
        kind: "Node",
        group: "",
        status_subresource: true,
    },
    Kind {
        plural: "services",
        kind: "Service",
        group: "",
        status_subresource: true,
    },
    Kind {
        plural: "endpointslices",
        kind: "EndpointSlice",
        group: "discovery.k8s.io",
        status_subresource: false,
    },
    Kind {
        plural: "leases",
        kind: "Lease",
        group: "coordination.k8s.io",
        status_subresource: false,
    },
    Kind {
        plural: "serviceexports",
        kind: "ServiceExport",
        group: MCS_GROUP,
        status_subresource: true,
    },
    Kind {
        plural: "serviceimports",
        kind: "ServiceImport",
        group: MCS_GROUP,
        status_subresource: true,
    },
];

fn kind_by_name(kind: &str) -> Kind {
    *KINDS
        .iter()
        .find(|k| k.kind == kind)
        .unwrap_or_else(|| panic!("the test API server holds no {kind}"))
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// The RBAC verb and resource (`serviceexports/status`) of a resource request; `None` for
    /// discovery and unknown paths.
    pub rbac: Option<(String, String)>,
    /// The HTTP status of the answer (200 for a watch, whatever its stream then says).
    pub status: u16,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

/// One accepted write.
#[derive(Debug, Clone)]
pub struct Write {
    /// create, update, patch or delete.
    pub verb: String,
    /// The resource, with `/status` for the subresource: `serviceexports/status`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The request body (null for delete).
    pub body: Value,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    plural: &'static str,
    namespace: String,
    event: &'static str,
    object: Value,
}

#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
    Bookmark(u64),
    Expire,
    Drop,
}

struct State {
    rv: u64,
    uid: u64,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    deleted_namespaces: BTreeSet<String>,
    /// (verb, resource) pairs answered with 403.
    forbidden: BTreeSet<(String, String)>,
    requests: Vec<Request>,
    writes: Vec<Write>,
}

struct Shared {
    /// The version the MCS CRDs serve; `None` while they are not installed.
    mcs_version: Mutex<Option<&'static str>>,
    state: Mutex<State>,
    events: broadcast::Sender<Broadcast>,
    hold: watch::Sender<bool>,
}

/// The running server; stops when dropped.
pub struct ApiServer {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// A server whose MCS CRDs serve v1alpha1 only, like deploy/base/crds.
    pub async fn start() -> ApiServer {
        ApiServer::start_serving(MCS_VERSION_ALPHA).await
    }

    /// A server whose MCS CRDs serve `mcs_version` only.
    pub async fn start_serving(mcs_version: &'static str) -> ApiServer {
        ApiServer::start_with(Some(mcs_version)).await
    }

    /// A server without the MCS CRDs, until [`install_mcs`](Self::install_mcs).
    pub async fn start_without_mcs() -> ApiServer {
        ApiServer::start_with(None).await
    }

    /// Installs the MCS CRDs, serving `version`.
    pub fn install_mcs(&self, version: &'static str) {
        *self.shared.mcs_version.lock().unwrap() = Some(version);
    }

    /// A server (MCS CRDs at v1alpha1) on `listener`: one bound in another network namespace
    /// serves the processes there.
    pub async fn start_on(listener: std::net::TcpListener) -> ApiServer {
        listener.set_nonblocking(true).unwrap();
        ApiServer::serve(
            Some(MCS_VERSION_ALPHA),
            tokio::net::TcpListener::from_std(listener).unwrap(),
        )
    }

    async fn start_with(mcs_version: Option<&'static str>) -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ApiServer::serve(mcs_version, listener)
    }

    fn serve(mcs_version: Option<&'static str>, listener: tokio::net::TcpListener) -> ApiServer {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            mcs_version: Mutex::new(mcs_version),
            state: Mutex::new(State {
                rv: 100,
                uid: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                deleted_namespaces: BTreeSet::new(),
                forbidden: BTreeSet::new(),
                requests: Vec::new(),
                writes: Vec::new(),
            }),
            events,
            hold: watch::Sender::new(false),
        });
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback({
            let shared = shared.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { handle(shared, method, uri, headers, body).await }
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ApiServer { url, shared, task }
    }

    /// Writes a kubeconfig at `path` whose one context is this server (no credentials).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters:\n- name: test\n  cluster:\n    server: {}\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
                 users:\n- name: test\n  user: {{}}\n",
                self.url
            ),
        )
        .unwrap();
    }

    /// A kube-rs client for this server, as meshd would build one.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// The apiVersion of an MCS kind on this server.
    pub fn mcs_api_version(&self) -> String {
        format!(
            "{MCS_GROUP}/{}",
            self.shared.mcs_version().unwrap_or(MCS_VERSION_ALPHA)
        )
    }

    /// Creates or replaces an object (its `kind` names the resource), with an ADDED or MODIFIED
    /// event. A creationTimestamp it carries is kept.
    pub fn apply(&self, object: Value) -> u64 {
        let mut state = self.state();
        let (key, object, event) = state.put(object);
        let rv = state.rv;
        self.shared.record(&mut state, key, event, object);
        rv
    }

    /// Like [`apply`](Self::apply), but no watch ever sees the change: only a new list does (as
    /// after a compaction that swallowed the event).
    /// Applies a ClusterIP Service `namespace/name` at `cluster_ip` with one port (http/TCP/80)
    /// and its EndpointSlice `slice` with one ready endpoint at `endpoint`.
    pub fn apply_service(
        &self,
        (namespace, name): (&str, &str),
        cluster_ip: &str,
        slice: &str,
        endpoint: &str,
    ) {
        self.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
        }));
        self.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": namespace, "name": slice,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [endpoint], "conditions": {"ready": true}}],
        }));
    }

    pub fn apply_unwatched(&self, object: Value) {
        let mut state = self.state();
        state.put(object);
    }

    /// Deletes an object, with a DELETED event.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let kind = kind_by_name(kind);
        let mut state = self.state();
        let key = (kind.plural, namespace.to_string(), name.to_string());
        let object = state
            .objects
            .remove(&key)
            .unwrap_or_else(|| panic!("no {} {namespace}/{name} to delete", kind.kind));
        let object = state.bump(object);
        self.shared.record(&mut state, key, "DELETED", object);
    }

    /// Deletes a namespace: a DELETED event for every object in it, and creates in it refused.
    pub fn delete_namespace(&self, namespace: &str) {
        let mut state = self.state();
        state.deleted_namespaces.insert(namespace.to_string());
        let keys: Vec<_> = state
            .objects
            .keys()
            .filter(|(_, ns, _)| ns == namespace)
            .cloned()
            .collect();
        for key in keys {
            let object = state.objects.remove(&key).unwrap();
            let object = state.bump(object);
            self.shared.record(&mut state, key, "DELETED", object);
        }
    }

    /// Creates a namespace deleted earlier (namespaces not deleted exist without being made).
    pub fn create_namespace(&self, namespace: &str) {
        self.state().deleted_namespaces.remove(namespace);
    }

    /// The object, as a GET would return it.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = kind_by_name(kind);
        self.state()
            .objects
            .get(&(kind.plural, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of a kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let kind = kind_by_name(kind);
        self.state()
            .objects
            .iter()
            .filter(|((plural, _, _), _)| *plural == kind.plural)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Forgets the history up to now: a watch from an older version gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.state();
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Sends an ERROR event with a 410 Status to every open watch, then ends it.
    pub fn expire_watches(&self) {
        let _ = self.shared.events.send(Broadcast::Expire);
    }

    /// Drops every open watch connection mid-stream (the response body fails).
    pub fn drop_watches(&self) {
        let _ = self.shared.events.send(Broadcast::Drop);
    }

    /// Sends a BOOKMARK with the current resourceVersion (returned) to every watch that asked
    /// for bookmarks.
    pub fn bookmark(&self) -> u64 {
        let state = self.state();
        let _ = self.shared.events.send(Broadcast::Bookmark(state.rv));
        state.rv
    }

    /// While held, new watch requests wait (as if the server were unreachable) until released.
    pub fn hold_watches(&self, hold: bool) {
        self.shared.hold.send_replace(hold);
    }

    /// Answers `verb` on `resource` (e.g. "patch", "serviceexports/status") with 403 Forbidden.
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.state()
            .forbidden
            .insert((verb.to_string(), resource.to_string()));
    }

    pub fn allow(&self, verb: &str, resource: &str) {
        self.state()
            .forbidden
            .remove(&(verb.to_string(), resource.to_string()));
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    pub fn writes(&self) -> Vec<Write> {
        self.state().writes.clone()
    }

    /// The accepted writes of one resource (e.g. "serviceexports/status").
    pub fn writes_to(&self, resource: &str) -> Vec<Write> {
        self.writes()
            .into_iter()
            .filter(|w| w.resource == resource)
            .collect()
    }
}

pub const MCS_VERSION_ALPHA: &str = "v1alpha1";
pub const MCS_VERSION_BETA: &str = "v1beta1";

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stamps a new resourceVersion on `object`.
    fn bump(&mut self, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object
    }

    /// Stores `object` (created or replaced) with a new resourceVersion.
    fn put(&mut self, mut object: Value) -> ((&'static str, String, String), Value, &'static str) {
        let kind = kind_by_name(object["kind"].as_str().expect("object without kind"));
        // Nodes are cluster-scoped: no namespace.
        let namespace = match object["metadata"]["namespace"].as_str() {
            Some(namespace) => namespace.to_string(),
            None if kind.plural == "nodes" => String::new(),
            None => panic!("object without namespace"),
        };
        let name = object["metadata"]["name"]
            .as_str()
            .expect("object without name")
            .to_string();
        let key = (kind.plural, namespace, name);
        let previous = self.objects.get(&key).cloned();
        let event = match &previous {
            Some(previous) => {
                object["metadata"]["uid"] = previous["metadata"]["uid"].clone();
                if object["metadata"]["creationTimestamp"].is_null() {
                    object["metadata"]["creationTimestamp"] =
                        previous["metadata"]["creationTimestamp"].clone();
                }
                let generation = previous["metadata"]["generation"].as_i64().unwrap_or(1);
                object["metadata"]["generation"] = if previous.get("spec") != object.get("spec") {
                    json!(generation + 1)
                } else {
                    json!(generation)
                };
                "MODIFIED"
            }
            None => {
                self.uid += 1;
                object["metadata"]["uid"] = json!(format!("uid-{}", self.uid));
                if object["metadata"]["creationTimestamp"].is_null() {
                    object["metadata"]["creationTimestamp"] = json!(now());
                }
                object["metadata"]["generation"] = json!(1);
                "ADDED"
            }
        };
        let object = self.bump(object);
        self.objects.insert(key.clone(), object.clone());
        (key, object, event)
    }
}

impl Shared {
    fn mcs_version(&self) -> Option<&'static str> {
        *self.mcs_version.lock().unwrap()
    }

    fn record(
        &self,
        state: &mut State,
        key: (&'static str, String, String),
        event: &'static str,
        object: Value,
    ) {
        let change = Change {
            rv: state.rv,
            plural: key.0,
            namespace: key.1,
            event,
            object,
        };
        state.history.push(change.clone());
        let _ = self.events.send(Broadcast::Change(change));
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn reply(code: StatusCode, body: Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        serde_json::to_vec(&body).unwrap(),
    )
        .into_response()
}

fn failure(code: StatusCode, reason: &str, message: String) -> Response {
    reply(code, status(code.as_u16(), reason, message))
}

/// What a path names.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Route {
    Discovery,
    Resource(Target),
    Unknown,
}

fn route(shared: &Shared, path: &str) -> Route {
    let rest = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("", rest)
    } else if let Some(rest) = path.strip_prefix("/apis/") {
        let mut parts = rest.splitn(3, '/');
        let (Some(group), Some(version)) = (parts.next(), parts.next()) else {
            return Route::Unknown;
        };
        let expected = match group {
            "discovery.k8s.io" | "coordination.k8s.io" => "v1",
            MCS_GROUP => match shared.mcs_version() {
                Some(version) => version,
                None => return Route::Unknown,
            },
            _ => return Route::Unknown,
        };
        if version != expected {
            return Route::Unknown;
        }
        match parts.next() {
            None | Some("") if group == MCS_GROUP => return Route::Discovery,
            None => return Route::Unknown,
            Some(rest) => (group, rest),
        }
    } else {
        return Route::Unknown;
    };
    let (group, rest) = rest;
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, parts) = match parts.as_slice() {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail.to_vec()),
        tail => (None, tail.to_vec()),
    };
    let Some(kind) = KINDS
        .iter()
        .find(|k| k.group == group && Some(&k.plural) == parts.first())
    else {
        return Route::Unknown;
    };
    let (name, status) = match parts.as_slice() {
        [_] => (None, false),
        [_, name] => (Some(name.to_string()), false),
        [_, name, "status"] => (Some(name.to_string()), true),
        _ => return Route::Unknown,
    };
    Route::Resource(Target {
        kind: *kind,
        namespace,
        name,
        status,
    })
}

/// Answers a request and logs it once answered (so a test that sees it logged sees its effect).
async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut request, response) = answer(&shared, method, uri, headers, body).await;
    request.status = response.status().as_u16();
    shared.state.lock().unwrap().requests.push(request);
    response
}

async fn answer(
    shared: &Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (Request, Response) {
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default();
    let mut request = Request {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: query.clone(),
        rbac: None,
        status: 0,
    };
    let target = match route(shared, uri.path()) {
        Route::Resource(target) => target,
        Route::Discovery if method == Method::GET => return (request, discovery(shared)),
        _ => {
            let response = (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
            return (request, response);
        }
    };
    let verb = match (&method, &target.name) {
        (&Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::PUT, Some(_)) => "update",
        (&Method::DELETE, Some(_)) => "delete",
        _ => {
            let response = failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported here"),
            );
            return (request, response);
        }
    };
    let resource = if target.status {
        format!("{}/status", target.kind.plural)
    } else {
        target.kind.plural.to_string()
    };
    request.rbac = Some((verb.to_string(), resource.clone()));
    if shared
        .state
        .lock()
        .unwrap()
        .forbidden
        .contains(&(verb.to_string(), resource.clone()))
    {
        let response = failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{}.{} {}is forbidden: User \"system:serviceaccount:meshd-system:meshd\" cannot {verb} resource \"{resource}\" in API group \"{}\"{}",
                target.kind.plural,
                target.kind.group,
                target.name.as_deref().map(|n| format!("\"{n}\" ")).unwrap_or_default(),
                target.kind.group,
                target.namespace.as_deref().map(|ns| format!(" in the namespace \"{ns}\"")).unwrap_or_default(),
            ),
        );
        return (request, response);
    }
    let response = match verb {
        "watch" => watch_response(shared.clone(), target, query).await,
        "list" => list(shared, &target, &query),
        "get" => get(shared, &target),
        "create" => create(shared, &target, &body),
        "patch" => patch(shared, &target, &headers, &body),
        "update" => update(shared, &target, &body),
        _ => delete(shared, &target),
    };
    (request, response)
}

/// Decodes `a=b&c=d` (percent-escapes included).
fn url_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn discovery(shared: &Shared) -> Response {
    let verbs = json!([
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "create",
        "update",
        "watch"
    ]);
    let status_verbs = json!(["get", "patch", "update"]);
    let mut resources = Vec::new();
    for kind in KINDS.iter().filter(|k| k.group == MCS_GROUP) {
        resources.push(json!({
            "name": kind.plural, "singularName": kind.kind.to_lowercase(), "namespaced": true,
            "kind": kind.kind, "verbs": verbs,
        }));
        resources.push(json!({
            "name": format!("{}/status", kind.plural), "singularName": "", "namespaced": true,
            "kind": kind.kind, "verbs": status_verbs,
        }));
    }
    reply(
        StatusCode::OK,
        json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{MCS_GROUP}/{}", shared.mcs_version().unwrap_or_default()),
            "resources": resources,
        }),
    )
}

fn matches(target: &Target, namespace: &str) -> bool {
    target.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

/// Built-in lists omit each item's apiVersion and kind, as a real API server does.
fn list_item(kind: Kind, object: &Value) -> Value {
    let mut object = object.clone();
    if kind.group != MCS_GROUP {
        if let Some(map) = object.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
    }
    object
}

/// The name a `fieldSelector=metadata.name=NAME` asks for (`Some(None)`: no selector); the
/// only selector the server understands.
fn name_selector(query: &BTreeMap<String, String>) -> Result<Option<String>, Box<Response>> {
    if query.contains_key("labelSelector") {
        return Err(Box::new(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the test API server does not filter by label".into(),
        )));
    }
    match query.get("fieldSelector") {
        None => Ok(None),
        Some(selector) => match selector.strip_prefix("metadata.name=") {
            Some(name) => Ok(Some(name.to_string())),
            None => Err(Box::new(failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the test API server filters by metadata.name only, not {selector}"),
            ))),
        },
    }
}

fn named(object: &Value, name: &Option<String>) -> bool {
    name.as_deref()
        .is_none_or(|n| object["metadata"]["name"].as_str() == Some(n))
}

fn list(shared: &Shared, target: &Target, query: &BTreeMap<String, String>) -> Response {
    let name = match name_selector(query) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let state = shared.state.lock().unwrap();
    let (offset, rv) = match query.get("continue") {
        Some(token) => {
            let (offset, rv) = token.split_once(':').unwrap();
            (offset.parse::<usize>().unwrap(), rv.parse::<u64>().unwrap())
        }
        None => (0, state.rv),
    };
    let all: Vec<Value> = state
        .objects
        .iter()
        .filter(|((plural, ns, _), o)| {
            *plural == target.kind.plural && matches(target, ns) && named(o, &name)
        })
        .map(|(_, o)| list_item(target.kind, o))
        .collect();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(all.len());
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if end < all.len() {
        metadata["continue"] = json!(format!("{end}:{rv}"));
    }
    let api_version = if target.kind.group.is_empty() {
        "v1".to_string()
    } else if target.kind.group == MCS_GROUP {
        format!("{MCS_GROUP}/{}", shared.mcs_version().unwrap_or_default())
    } else {
        format!("{}/v1", target.kind.group)
    };
    reply(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", target.kind.kind), "apiVersion": api_version,
            "metadata": metadata, "items": all[offset.min(all.len())..end],
        }),
    )
}

fn not_found(target: &Target) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "{}.{} \"{}\" not found",
            target.kind.plural,
            target.kind.group,
            target.name.as_deref().unwrap_or_default()
        ),
    )
}

fn key(target: &Target) -> (&'static str, String, String) {
    (
        target.kind.plural,
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    )
}

fn get(shared: &Shared, target: &Target) -> Response {
    match shared.state.lock().unwrap().objects.get(&key(target)) {
        Some(object) => reply(StatusCode::OK, object.clone()),
        None => not_found(target),
    }
}

fn record_write(state: &mut State, verb: &str, target: &Target, body: Value) {
    state.writes.push(Write {
        verb: verb.to_string(),
        resource: if target.status {
            format!("{}/status", target.kind.plural)
        } else {
            target.kind.plural.to_string()
        },
        namespace: target.namespace.clone().unwrap_or_default(),
        name: target.name.clone().unwrap_or_default(),
        body,
    });
}

/// A request body as JSON, or the 400 a real API server answers to anything else.
fn json_body(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice::<Value>(body).map_err(|_| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        ))
    })
}

fn create(shared: &Shared, target: &Target, body: &Bytes) -> Response {
    let mut object = match json_body(body) {
        Ok(value) => value,
        Err(response) => return *response,
    };
    let Some(namespace) = target.namespace.clone() else {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "create in a namespace".into(),
        );
    };
    let mut state = shared.state.lock().unwrap();
    if state.deleted_namespaces.contains(&namespace) {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
        );
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if object["kind"] != json!(target.kind.kind) || name.is_empty() {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "kind or metadata.name missing or wrong".into(),
        );
    }
    let key = (target.kind.plural, namespace.clone(), name.clone());
    if state.objects.contains_key(&key) {
        return failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!(
                "{}.{} \"{name}\" already exists",
                target.kind.plural, target.kind.group
            ),
        );
    }
    let target = Target {
        kind: target.kind,
        namespace: Some(namespace.clone()),
        name: Some(name),
        status: false,
    };
    record_write(&mut state, "create", &target, object.clone());
    if target.kind.status_subresource {
        if let Some(map) = object.as_object_mut() {
            map.remove("status");
        }
    }
    object["metadata"]["namespace"] = json!(namespace);
    object["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("creationTimestamp");
    let (key, object, event) = state.put(object);
    shared.record(&mut state, key, event, object.clone());
    reply(StatusCode::CREATED, object)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch(shared: &Shared, target: &Target, headers: &HeaderMap, body: &Bytes) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/merge-patch+json" {
        return failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the test API server takes merge patches only, not {content_type}"),
        );
    }
    let patch = match json_body(body) {
        Ok(value) => value,
        Err(response) => return *response,
    };
    let mut state = shared.state.lock().unwrap();
    let key = key(target);
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(target);
    };
    record_write(&mut state, "patch", target, patch.clone());
    // The status subresource takes only status; the object's endpoint everything but status.
    let mut effective = patch.clone();
    if let Some(map) = effective.as_object_mut() {
        if target.status {
            map.retain(|k, _| k == "status");
        } else if target.kind.status_subresource {
            map.remove("status");
        }
    }
    let mut updated = current.clone();
    merge_patch(&mut updated, &effective);
    if updated == current {
        return reply(StatusCode::OK, current);
    }
    if updated.get("spec") != current.get("spec") {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        updated["metadata"]["generation"] = json!(generation + 1);
    }
    let updated = state.bump(updated);
    state.objects.insert(key.clone(), updated.clone());
    shared.record(&mut state, key, "MODIFIED", updated.clone());
    reply(StatusCode::OK, updated)
}

/// PUT: replaces the object. A body naming a resourceVersion other than the stored one is
/// refused with 409 Conflict, as a real API server does (optimistic concurrency).
fn update(shared: &Shared, target: &Target, body: &Bytes) -> Response {
    let mut object = match json_body(body) {
        Ok(value) => value,
        Err(response) => return *response,
    };
    let mut state = shared.state.lock().unwrap();
    let key = key(target);
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(target);
    };
    let wanted = object["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    if wanted.is_some() && wanted.as_deref() != current["metadata"]["resourceVersion"].as_str() {
        return failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}.{} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                target.kind.plural,
                target.kind.group,
                target.name.as_deref().unwrap_or_default()
            ),
        );
    }
    record_write(&mut state, "update", target, object.clone());
    object["apiVersion"] = current["apiVersion"].clone();
    object["kind"] = current["kind"].clone();
    object["metadata"]["namespace"] = current["metadata"]["namespace"].clone();
    object["metadata"]["name"] = current["metadata"]["name"].clone();
    let (key, object, event) = state.put(object);
    shared.record(&mut state, key, event, object.clone());
    reply(StatusCode::OK, object)
}

fn delete(shared: &Shared, target: &Target) -> Response {
    let mut state = shared.state.lock().unwrap();
    let key = key(target);
    let Some(object) = state.objects.remove(&key) else {
        return not_found(target);
    };
    record_write(&mut state, "delete", target, Value::Null);
    let object = state.bump(object);
    shared.record(&mut state, key, "DELETED", object.clone());
    reply(StatusCode::OK, object)
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": event, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

async fn watch_response(
    shared: Arc<Shared>,
    target: Target,
    query: BTreeMap<String, String>,
) -> Response {
    let mut hold = shared.hold.subscribe();
    while *hold.borrow_and_update() {
        if hold.changed().await.is_err() {
            break;
        }
    }
    let name = match name_selector(&query) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let api_version = if target.kind.group.is_empty() {
        "v1".to_string()
    } else if target.kind.group == MCS_GROUP {
        format!("{MCS_GROUP}/{}", shared.mcs_version().unwrap_or_default())
    } else {
        format!("{}/v1", target.kind.group)
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let (replay, mut live) = {
        let state = shared.state.lock().unwrap();
        let from = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse::<u64>().ok())
            .unwrap_or(state.rv);
        if from < state.compacted {
            let gone = status(
                410,
                "Expired",
                format!("too old resource version: {from} ({})", state.compacted),
            );
            let _ = tx.try_send(Ok(event_line("ERROR", &gone)));
            drop(tx);
            return streaming(rx);
        }
        let replay: Vec<Change> = state
            .history
            .iter()
            .filter(|c| {
                c.rv > from
                    && c.plural == target.kind.plural
                    && matches(&target, &c.namespace)
                    && named(&c.object, &name)
            })
            .cloned()
            .collect();
        // Subscribed under the lock: every later change is live, every earlier one replayed.
        (replay, shared.events.subscribe())
    };
    tokio::spawn(async move {
        for change in replay {
            if tx
                .send(Ok(event_line(change.event, &change.object)))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let message = tokio::select! {
                m = live.recv() => m,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            let line = match message {
                Ok(Broadcast::Change(c))
                    if c.plural == target.kind.plural
                        && matches(&target, &c.namespace)
                        && named(&c.object, &name) =>
                {
                    Ok(event_line(c.event, &c.object))
                }
                Ok(Broadcast::Change(_)) => continue,
                Ok(Broadcast::Bookmark(rv)) if bookmarks => Ok(event_line(
                    "BOOKMARK",
                    &json!({"kind": target.kind.kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": rv.to_string()}}),
                )),
                Ok(Broadcast::Bookmark(_)) => continue,
                Ok(Broadcast::Expire) => {
                    let gone = status(
                        410,
                        "Expired",
                        "The resourceVersion for the provided watch is too old.".into(),
                    );
                    let _ = tx.send(Ok(event_line("ERROR", &gone))).await;
                    return;
                }
                Ok(Broadcast::Drop) => Err(std::io::Error::other("connection dropped by the test")),
                Err(broadcast::error::RecvError::Lagged(_))
                | Err(broadcast::error::RecvError::Closed) => {
                    Err(std::io::Error::other("watch fell behind"))
                }
            };
            let last = line.is_err();
            if tx.send(line).await.is_err() || last {
                return;
            }
        }
    });
    streaming(rx)
}

fn streaming(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
