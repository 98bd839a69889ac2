//! Gateway election: the nodes labelled `meshd.io/gateway=true` (the candidates) hold a
//! `coordination.k8s.io/v1` Lease in turn; its holder is the active gateway, every other
//! candidate a warm standby, and the route agents route to the holder.
//!
//! The rules, in client-go's shape with shorter defaults ([`LeaseSettings`]):
//! - Everyone watches the Lease ([`observe`]) and judges expiry by its own clock: a record is
//!   expired when it has not changed for its `leaseDurationSeconds` since this process saw it
//!   change, so clocks need not agree.
//! - A candidate takes the Lease when it is free (released, expired or absent) with a write
//!   conditioned on the resourceVersion it saw (optimistic concurrency: of two candidates, one
//!   gets 409 Conflict), then renews it every `retry`.
//! - Fencing: a holder that has not renewed for `renew_deadline` (shorter than the duration)
//!   stops being active, so it stops forwarding before anyone else may take the Lease, even
//!   when it cannot reach the API server at all.
//! - A graceful stop releases the Lease (no holder); the standbys see that through their
//!   watch and take it at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};

pub use crate::config::LeaseSettings;

/// The Lease's name, in meshd's namespace.
pub const LEASE_NAME: &str = "meshd-gateway";

/// The Lease as this process last saw it change.
#[derive(Debug, Clone)]
pub struct Seen {
    pub lease: Lease,
    /// When this process saw this record (a new resourceVersion) first.
    pub at: Instant,
}

impl Seen {
    /// The holder the record names (`None`: released or never held).
    pub fn holder(&self) -> Option<&str> {
        holder_of(&self.lease)
    }

    /// Whether the record no longer stands: nobody renewed it for its duration since we saw
    /// it, by our own clock.
    pub fn expired(&self, now: Instant) -> bool {
        now >= expiry(self)
    }
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// What the watch has told so far: `None` until its first list is complete, then the Lease
/// (or `Some(None)`: there is none).
pub type Observed = Option<Option<Seen>>;

/// Watches the Lease `name` in `api`'s namespace; the receiver follows it. A failed watch is
/// retried with backoff (the last record stays, and ages towards expiry).
pub fn observe(
    api: Api<Lease>,
    name: &str,
) -> (watch::Receiver<Observed>, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    let (tx, rx) = watch::channel(None);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
        let mut listing: Option<Lease> = None;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let found = match event {
                Ok(watcher::Event::Init) => {
                    listing = None;
                    continue;
                }
                Ok(watcher::Event::InitApply(lease)) => {
                    listing = Some(lease);
                    continue;
                }
                Ok(watcher::Event::InitDone) => listing.take(),
                Ok(watcher::Event::Apply(lease)) => Some(lease),
                Ok(watcher::Event::Delete(_)) => None,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, lease = LEASE_NAME, "cannot watch the gateway Lease; retrying (meshd's Role needs get, list and watch on leases)");
                    }
                    failing = true;
                    continue;
                }
            };
            if failing {
                tracing::info!(lease = LEASE_NAME, "watching the gateway Lease again");
                failing = false;
            }
            tx.send_modify(|current: &mut Observed| {
                let same = matches!((current.as_ref().and_then(|c: &Option<Seen>| c.as_ref()), &found),
                    (Some(seen), Some(lease)) if seen.lease.metadata.resource_version == lease.metadata.resource_version);
                if !same {
                    *current = Some(found.map(|lease| Seen {
                        lease,
                        at: Instant::now(),
                    }));
                }
            });
        }
    });
    (rx, task)
}

/// The election as one process sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The holder the Lease names (a node name), `None` when released, absent or expired.
    pub holder: Option<String>,
    /// Since when that holder holds it (its `acquireTime`).
    pub since: Option<SystemTime>,
    /// The Lease's `leaseTransitions`.
    pub transitions: u32,
    /// This process is the active gateway: it holds the Lease and renewed it within the
    /// renew deadline.
    pub active: bool,
}

impl Leadership {
    fn from_seen(seen: Option<&Seen>, now: Instant) -> Leadership {
        let live = seen.filter(|s| !s.expired(now));
        let spec = live.and_then(|s| s.lease.spec.as_ref());
        Leadership {
            holder: live.and_then(Seen::holder).map(str::to_string),
            since: spec
                .and_then(|s| s.acquire_time.as_ref())
                .map(|t| SystemTime::from(t.0)),
            transitions: seen
                .and_then(|s| s.lease.spec.as_ref())
                .and_then(|s| s.lease_transitions)
                .unwrap_or(0)
                .max(0) as u32,
            active: false,
        }
    }
}

/// Follows the Lease without taking part (a route agent): `out` names the live holder.
pub async fn follow(mut seen: watch::Receiver<Observed>, out: watch::Sender<Leadership>) {
    loop {
        let (view, next_expiry) = {
            let now = Instant::now();
            let current = seen.borrow_and_update();
            let s = current.as_ref().and_then(Option::as_ref);
            (Leadership::from_seen(s, now), s.map(expiry))
        };
        out.send_if_modified(|l| replace_if_changed(l, view));
        let wake = next_expiry
            .filter(|at| *at > Instant::now())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = seen.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

fn expiry(seen: &Seen) -> Instant {
    let seconds = seen
        .lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(0)
        .max(0);
    seen.at + Duration::from_secs(seconds as u64)
}

fn replace_if_changed(current: &mut Leadership, new: Leadership) -> bool {
    if *current == new {
        false
    } else {
        *current = new;
        true
    }
}

/// Why a write of the Lease failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("another candidate wrote the Lease first (409 Conflict)")]
    Conflict,
    #[error("{0}")]
    Api(kube::Error),
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

fn classify(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(status) if status.code == 409 => WriteError::Conflict,
        _ => WriteError::Api(e),
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// A candidate in the election; [`Candidate::run`] takes part until told to stop.
pub struct Candidate {
    api: Api<Lease>,
    identity: String,
    settings: LeaseSettings,
}

impl Candidate {
    pub fn new(api: Api<Lease>, identity: String, settings: LeaseSettings) -> Candidate {
        Candidate {
            api,
            identity,
            settings,
        }
    }

    /// The Lease naming us, renewed now, from `base` (the record we saw, `None`: create it).
    fn record(&self, base: Option<&Lease>) -> Lease {
        let previous = base.and_then(|l| l.spec.as_ref());
        let held_by_us = base.and_then(holder_of) == Some(self.identity.as_str());
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        let now = now_micro();
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_string()),
                resource_version: base.and_then(|l| l.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.settings.duration.as_secs() as i32),
                acquire_time: if held_by_us {
                    previous.and_then(|s| s.acquire_time.clone())
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(if held_by_us || base.is_none() {
                    transitions
                } else {
                    transitions + 1
                }),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Writes `lease` (create when it has no resourceVersion, else a conditional replace),
    /// within `limit`.
    async fn write(&self, lease: Lease, limit: Duration) -> Result<Lease, WriteError> {
        let pp = PostParams::default();
        let call = async {
            if lease.metadata.resource_version.is_none() {
                self.api.create(&pp, &lease).await
            } else {
                self.api.replace(LEASE_NAME, &pp, &lease).await
            }
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(WriteError::Timeout(limit)),
        }
    }

    /// Takes part until `stop` fires: standby until the Lease is free, then active while it
    /// renews in time; `out` follows. On `stop`, an active candidate first reports itself
    /// inactive, then releases the Lease so that a standby takes it at once.
    pub async fn run(
        self,
        mut seen: watch::Receiver<Observed>,
        out: watch::Sender<Leadership>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let retry = self.settings.retry;
        // Ours: the record we last wrote, and when the write that made it was sent.
        let mut held: Option<(Lease, Instant)> = None;
        // A failing take is logged once, not every retry (cut off from the API server, a
        // standby tries twice a second for as long as that lasts).
        let mut failing = false;
        loop {
            let now = Instant::now();
            match held.take() {
                None => {
                    let snapshot = seen.borrow_and_update().clone();
                    let mut view =
                        Leadership::from_seen(snapshot.as_ref().and_then(Option::as_ref), now);
                    if view.holder.as_deref() == Some(self.identity.as_str()) {
                        // A record naming us that we do not hold (we fenced, or restarted):
                        // nobody forwards until it is taken again.
                        view.holder = None;
                        view.since = None;
                    }
                    let free = match &snapshot {
                        None => false,
                        Some(None) => true,
                        Some(Some(s)) => {
                            s.holder().is_none_or(|h| h == self.identity) || s.expired(now)
                        }
                    };
                    if free {
                        let base = snapshot.as_ref().and_then(Option::as_ref).map(|s| &s.lease);
                        let sent = Instant::now();
                        match self.write(self.record(base), retry).await {
                            Ok(lease) => {
                                let since = lease
                                    .spec
                                    .as_ref()
                                    .and_then(|s| s.acquire_time.as_ref())
                                    .map(|t| SystemTime::from(t.0));
                                tracing::info!(node = %self.identity, lease = LEASE_NAME, "this node took the gateway Lease: active gateway");
                                failing = false;
                                view = Leadership {
                                    holder: Some(self.identity.clone()),
                                    since,
                                    transitions: lease
                                        .spec
                                        .as_ref()
                                        .and_then(|s| s.lease_transitions)
                                        .unwrap_or(0)
                                        .max(0)
                                        as u32,
                                    active: true,
                                };
                                held = Some((lease, sent));
                            }
                            Err(WriteError::Conflict) => {}
                            Err(e) if !failing => {
                                failing = true;
                                tracing::warn!(error = %e, lease = LEASE_NAME, "cannot take the free gateway Lease; trying again every lease_retry_ms (logged once; check that this node reaches the API server)")
                            }
                            Err(_) => {}
                        }
                    }
                    out.send_if_modified(|l| replace_if_changed(l, view));
                    if held.is_some() {
                        continue;
                    }
                    let wake = snapshot
                        .as_ref()
                        .and_then(Option::as_ref)
                        .map(expiry)
                        .filter(|at| *at > Instant::now())
                        .unwrap_or_else(|| Instant::now() + retry)
                        .min(Instant::now() + retry);
                    tokio::select! {
                        _ = &mut stop => return,
                        changed = seen.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(wake.into()) => {}
                    }
                }
                Some((lease, renewed)) => {
                    let fence_at = renewed + self.settings.renew_deadline;
                    let next = (Instant::now() + retry).min(fence_at);
                    tokio::select! {
                        _ = &mut stop => {
                            out.send_modify(|l| l.active = false);
                            self.release(lease).await;
                            return;
                        }
                        _ = tokio::time::sleep_until(next.into()) => {}
                    }
                    let sent = Instant::now();
                    if sent >= fence_at {
                        self.fence("no renewal within the renew deadline", &out);
                        continue;
                    }
                    let mut record = self.record(Some(&lease));
                    let limit = fence_at - sent;
                    let result = match self.write(record.clone(), limit).await {
                        Err(WriteError::Conflict) => {
                            // Our own earlier write may have landed without its answer: the
                            // record still naming us, renew on top of it.
                            match tokio::time::timeout(limit, self.api.get_opt(LEASE_NAME)).await {
                                Ok(Ok(Some(current)))
                                    if holder_of(&current) == Some(self.identity.as_str()) =>
                                {
                                    record = self.record(Some(&current));
                                    self.write(
                                        record,
                                        fence_at.saturating_duration_since(Instant::now()),
                                    )
                                    .await
                                }
                                _ => Err(WriteError::Conflict),
                            }
                        }
                        other => other,
                    };
                    match result {
                        Ok(lease) => held = Some((lease, sent)),
                        Err(WriteError::Conflict) => {
                            self.fence("another candidate holds the Lease now", &out)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, lease = LEASE_NAME, "cannot renew the gateway Lease; retrying until the renew deadline");
                            held = Some((lease, renewed));
                        }
                    }
                }
            }
        }
    }

    fn fence(&self, why: &str, out: &watch::Sender<Leadership>) {
        out.send_modify(|l| {
            l.active = false;
            l.holder = None;
        });
        tracing::error!(node = %self.identity, lease = LEASE_NAME, reason = why,
            renew_deadline = ?self.settings.renew_deadline,
            "lost the gateway Lease: this node stops forwarding and stands by");
    }

    /// Gives the Lease up (no holder, duration 1 s), so that a standby takes it at once.
    async fn release(&self, lease: Lease) {
        let mut record = lease;
        if let Some(spec) = record.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now_micro());
        }
        match self.write(record, Duration::from_secs(1)).await {
            Ok(_) => {
                tracing::info!(node = %self.identity, lease = LEASE_NAME, "released the gateway Lease")
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = LEASE_NAME, "cannot release the gateway Lease: a standby takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(holder: Option<&str>, seconds: i32, at: Instant) -> Seen {
        Seen {
            lease: Lease {
                metadata: ObjectMeta::default(),
                spec: Some(LeaseSpec {
                    holder_identity: holder.map(str::to_string),
                    lease_duration_seconds: Some(seconds),
                    lease_transitions: Some(4),
                    ..LeaseSpec::default()
                }),
            },
            at,
        }
    }

    #[test]
    fn a_record_expires_by_our_clock_from_when_we_saw_it() {
        let t0 = Instant::now();
        let s = seen(Some("n1"), 3, t0);
        assert!(!s.expired(t0 + Duration::from_millis(2999)));
        assert!(s.expired(t0 + Duration::from_secs(3)));
        let view = Leadership::from_seen(Some(&s), t0);
        assert_eq!(view.holder.as_deref(), Some("n1"));
        assert_eq!(view.transitions, 4);
        let gone = Leadership::from_seen(Some(&s), t0 + Duration::from_secs(4));
        assert_eq!(gone.holder, None, "an expired holder is no holder");
        assert_eq!(seen(Some(""), 3, t0).holder(), None, "released");
    }
}
