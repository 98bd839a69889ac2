//! The clusterset hub: the local catalog, the peers' catalogs and their reachability, merged into
//! the one [`ClustersetView`] that the DNS responder and the ServiceExport watcher read.
//!
//! Inputs: the local catalog arrives on a `watch` channel (from the exports file or the
//! ServiceExport watcher; generation 0 means "not read yet"), remote catalogs from the catalog
//! sync ([`super::sync`]), reachability from the health probe ([`super::probe`]). Whenever any of
//! them changes, [`Clusterset::run`] rebuilds the view and publishes it twice: as an `ArcSwap`
//! snapshot (the DNS query path loads it without a lock) and on a `watch` channel (for tasks
//! that react to changes).
//!
//! A remote cluster counts as up when its gateway answers the probe; its last good catalog stays
//! in the view while it is down (marked down, so DNS leaves it out) and is used again the
//! moment it answers. The view is `loaded` once the local catalog is read and every syncing peer
//! has been asked once (answered or failed), so DNS says SERVFAIL only during that first round.

use super::catalog::{ClusterEntry, ClustersetView, ExportCatalog};
use super::probe::{ProbeTarget, Prober};
use crate::keys::PublicKey;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// How often the view is rebuilt even without a change, to re-rank clusters by RTT.
pub const REORDER_EVERY: Duration = Duration::from_secs(10);

/// Sorts the remote clusters (everything after the local one) by the RTT `rtt_of` gives for
/// their name, nearest first; clusters without an RTT go last, in name order.
pub fn order_by_rtt(view: &mut ClustersetView, rtt_of: impl Fn(&str) -> Option<Duration>) {
    if let Some(remotes) = view.clusters.get_mut(1..) {
        remotes.sort_by_key(|c| rtt_of(&c.catalog.cluster).unwrap_or(Duration::MAX));
    }
}

#[derive(Debug)]
struct Remote {
    key: PublicKey,
    catalog: Option<Arc<ExportCatalog>>,
    asked: bool,
    last_answer: Option<SystemTime>,
    last_error: Option<String>,
}

/// The catalog sync with one peer, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub peer: String,
    /// Generation of the last good catalog; `null`: none received yet.
    pub generation: Option<u64>,
    pub services: usize,
    /// The peer answers the health probe.
    pub reachable: bool,
    /// Unix time (seconds) of the peer's last good answer (a catalog or "unchanged").
    pub last_answer: Option<u64>,
    /// Why the last attempt failed, when it did.
    pub last_error: Option<String>,
}

/// The merge point of every catalog; see the module documentation.
#[derive(Debug)]
pub struct Clusterset {
    local: watch::Sender<ExportCatalog>,
    /// The local catalog as last shared into a view, and the receiver that tells when it
    /// changed since.
    local_cache: Mutex<(watch::Receiver<ExportCatalog>, Arc<ExportCatalog>)>,
    remotes: Mutex<BTreeMap<String, Remote>>,
    prober: Arc<Prober>,
    changed: Notify,
    snapshot: Arc<ArcSwap<ClustersetView>>,
    view: watch::Sender<Arc<ClustersetView>>,
}

impl Clusterset {
    /// A hub for cluster `cluster` whose remote clusters' reachability comes from `prober`.
    pub fn new(cluster: &str, prober: Arc<Prober>) -> Arc<Self> {
        let unloaded = Arc::new(ClustersetView::unloaded());
        let empty = ExportCatalog {
            cluster: cluster.to_string(),
            generation: 0,
            services: Vec::new(),
        };
        let (local, mut local_rx) = watch::channel(empty.clone());
        local_rx.mark_unchanged();
        Arc::new(Clusterset {
            local,
            local_cache: Mutex::new((local_rx, Arc::new(empty))),
            remotes: Mutex::new(BTreeMap::new()),
            prober,
            changed: Notify::new(),
            snapshot: Arc::new(ArcSwap::new(unloaded.clone())),
            view: watch::channel(unloaded).0,
        })
    }

    /// Where the local catalog is published (exports file, ServiceExport watcher). Each new
    /// catalog needs a generation above 0 that differs from the last one.
    pub fn local_sender(&self) -> &watch::Sender<ExportCatalog> {
        &self.local
    }

    /// The local catalog as it changes (what the catalog sync serves to peers).
    pub fn local_catalog(&self) -> watch::Receiver<ExportCatalog> {
        self.local.subscribe()
    }

    /// The snapshot the DNS responder reads.
    pub fn snapshot(&self) -> Arc<ArcSwap<ClustersetView>> {
        self.snapshot.clone()
    }

    /// The view as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClustersetView>> {
        self.view.subscribe()
    }

    /// Sets the peers whose catalogs are synced, keeping what is known of the ones that stay.
    pub fn set_peers(&self, peers: &[ProbeTarget]) {
        let mut remotes = self.remotes.lock();
        remotes.retain(|name, r| peers.iter().any(|p| p.name == *name && p.key == r.key));
        for p in peers {
            remotes.entry(p.name.clone()).or_insert_with(|| Remote {
                key: p.key,
                catalog: None,
                asked: false,
                last_answer: None,
                last_error: None,
            });
        }
        drop(remotes);
        self.changed.notify_one();
    }

    /// A peer answered: with its checked catalog, or `None` for "unchanged".
    pub fn remote_answered(&self, name: &str, catalog: Option<ExportCatalog>) {
        let mut remotes = self.remotes.lock();
        let Some(r) = remotes.get_mut(name) else {
            return;
        };
        let news = catalog.is_some() || !r.asked;
        if let Some(c) = catalog {
            r.catalog = Some(Arc::new(c));
        }
        r.asked = true;
        r.last_answer = Some(SystemTime::now());
        r.last_error = None;
        drop(remotes);
        if news {
            self.changed.notify_one();
        }
    }

    /// Asking a peer failed (unreachable, refused, bad answer): its last good catalog stays.
    pub fn remote_failed(&self, name: &str, error: String) {
        let mut remotes = self.remotes.lock();
        let Some(r) = remotes.get_mut(name) else {
            return;
        };
        let first = !std::mem::replace(&mut r.asked, true);
        r.last_error = Some(error);
        drop(remotes);
        if first {
            self.changed.notify_one();
        }
    }

    /// The sync state of every peer, by name.
    pub fn sync_status(&self) -> Vec<SyncStatus> {
        self.remotes
            .lock()
            .iter()
            .map(|(name, r)| SyncStatus {
                peer: name.clone(),
                generation: r.catalog.as_ref().map(|c| c.generation),
                services: r.catalog.as_ref().map_or(0, |c| c.services.len()),
                reachable: self.prober.reachable(&r.key),
                last_answer: r
                    .last_answer
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                last_error: r.last_error.clone(),
            })
            .collect()
    }

    /// The local catalog, shared: copied once per generation, not once per rebuild.
    fn local_shared(&self) -> Arc<ExportCatalog> {
        let mut guard = self.local_cache.lock();
        let (rx, shared) = &mut *guard;
        if rx.has_changed().unwrap_or(false) {
            *shared = Arc::new(rx.borrow_and_update().clone());
        }
        shared.clone()
    }

    /// The view from what is known now.
    pub fn build(&self) -> ClustersetView {
        let local = self.local_shared();
        let remotes = self.remotes.lock();
        let entries: BTreeMap<String, ClusterEntry> = remotes
            .iter()
            .filter_map(|(name, r)| {
                let catalog = r.catalog.clone()?;
                Some((
                    name.clone(),
                    ClusterEntry {
                        up: self.prober.reachable(&r.key),
                        catalog,
                    },
                ))
            })
            .collect();
        let loaded = local.generation > 0 && remotes.values().all(|r| r.asked);
        let mut view = ClustersetView::build(local, &entries);
        view.loaded = loaded;
        order_by_rtt(&mut view, |cluster| {
            remotes
                .get(cluster)
                .and_then(|r| self.prober.status(&r.key))
                .and_then(|s| s.rtt)
        });
        view
    }

    /// Rebuilds and publishes the view on every change, and every [`REORDER_EVERY`] so that the
    /// remote clusters follow their RTTs, until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut local = self.local.subscribe();
        let mut probes = self.prober.changes();
        let mut reorder = tokio::time::interval(REORDER_EVERY);
        loop {
            let view = Arc::new(self.build());
            if **self.snapshot.load() != *view {
                self.snapshot.store(view.clone());
                self.view.send_replace(view);
            }
            tokio::select! {
                r = local.changed() => if r.is_err() { return },
                r = probes.changed() => if r.is_err() { return },
                _ = self.changed.notified() => {}
                _ = reorder.tick() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn catalog(cluster: &str, generation: u64) -> ExportCatalog {
        ExportCatalog {
            cluster: cluster.into(),
            generation,
            services: Vec::new(),
        }
    }

    #[test]
    fn remote_clusters_are_ranked_by_rtt_after_the_local_one() {
        let entry = |name: &str| ClusterEntry {
            up: true,
            catalog: Arc::new(catalog(name, 1)),
        };
        let mut view = ClustersetView {
            loaded: true,
            clusters: vec![
                entry("m1"),
                entry("m2"),
                entry("m3"),
                entry("m4"),
                entry("m5"),
            ],
        };
        let rtts = [("m1", 0), ("m2", 40), ("m3", 5), ("m5", 12)];
        order_by_rtt(&mut view, |name| {
            rtts.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, ms)| Duration::from_millis(*ms))
        });
        let names: Vec<&str> = view
            .clusters
            .iter()
            .map(|c| c.catalog.cluster.as_str())
            .collect();
        assert_eq!(names, ["m1", "m3", "m5", "m2", "m4"]);
    }

    #[test]
    fn loaded_needs_the_local_catalog_and_one_answer_from_every_peer() {
        let m2 = ProbeTarget {
            name: "m2".into(),
            key: PrivateKey::generate().public_key(),
            addr: "100.64.0.2".parse().unwrap(),
        };
        let prober = Prober::new(51821, vec![m2.clone()]);
        let hub = Clusterset::new("m1", prober);
        hub.set_peers(&[m2]);
        assert!(!hub.build().loaded);
        hub.local_sender().send_replace(catalog("m1", 1));
        assert!(!hub.build().loaded, "m2 not asked yet");
        hub.remote_failed("m2", "connection refused".into());
        let view = hub.build();
        assert!(view.loaded);
        assert_eq!(view.clusters.len(), 1, "no catalog from m2 yet");
        assert_eq!(
            hub.sync_status()[0].last_error.as_deref(),
            Some("connection refused")
        );
        hub.remote_answered("m2", Some(catalog("m2", 4)));
        let view = hub.build();
        assert_eq!(view.clusters.len(), 2);
        assert!(!view.clusters[1].up, "m2 never answered the probe");
        hub.remote_failed("m2", "malformed".into());
        assert_eq!(
            hub.build().clusters[1].catalog.generation,
            4,
            "last good catalog kept"
        );
        let status = &hub.sync_status()[0];
        assert_eq!((status.generation, status.reachable), (Some(4), false));
        assert!(status.last_answer.is_some());
        hub.set_peers(&[]);
        assert_eq!(
            hub.build().clusters.len(),
            1,
            "a removed peer's catalog goes"
        );
    }
}
