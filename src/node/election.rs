//! The gateway election as meshd runs it: a candidate node takes part ([`lease::Candidate`]),
//! any other node follows the holder ([`lease::follow`]); both learn the holder's address from
//! the node directory.

use super::kubernetes::{directory, Directory, GatewayError};
use super::lease::{self, Candidate, Leadership, LeaseSettings, LEASE_NAME};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::UNIX_EPOCH;
use tokio::sync::{oneshot, watch};

/// The election as `meshctl peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionView {
    /// This node's name.
    pub node: String,
    /// This node is a gateway candidate.
    pub candidate: bool,
    /// This node is the active gateway.
    pub active: bool,
    /// The active gateway's node (`null`: none right now, during a hand-over).
    pub holder: Option<String>,
    /// Its address (InternalIP).
    pub holder_address: Option<IpAddr>,
    /// Since when it holds the Lease (seconds since the Unix epoch).
    pub since: Option<u64>,
    /// The Lease's transitions (how often it changed hands).
    pub transitions: u32,
}

/// The cluster's nodes and the API client the election runs on.
pub struct Election {
    client: kube::Client,
    directory: Directory,
    own: Vec<IpAddr>,
}

/// A running election task: the view it keeps, and (for a candidate) the way to stop with a
/// release.
pub struct Running {
    pub leadership: watch::Receiver<Leadership>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    observer: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops taking part; an active candidate releases the Lease first (within 1 s).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let _ = (&mut self.task).await;
        } else {
            self.task.abort();
        }
        self.observer.abort();
    }
}

impl Election {
    /// Reads the node directory; `own` are this node's addresses.
    pub async fn new(client: kube::Client, own: Vec<IpAddr>) -> Result<Election, GatewayError> {
        let directory = directory(client.clone(), &own).await?;
        Ok(Election {
            client,
            directory,
            own,
        })
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// This node's name, or a stand-in naming the problem when no node has our address.
    pub fn me(&self) -> String {
        self.directory
            .me
            .clone()
            .unwrap_or_else(|| "(no node with this address)".to_string())
    }

    /// This node's InternalIP, when it is in the directory.
    pub fn my_address(&self) -> Option<IpAddr> {
        self.directory
            .me
            .as_ref()
            .and_then(|me| self.directory.addresses.get(me).copied())
    }

    /// The address of `node`; a node not seen yet has the directory read again.
    pub async fn address_of(&mut self, node: &str) -> Option<IpAddr> {
        if let Some(address) = self.directory.addresses.get(node) {
            return Some(*address);
        }
        match directory(self.client.clone(), &self.own).await {
            Ok(directory) => self.directory = directory,
            Err(e) => {
                tracing::warn!(error = %e, %node, "cannot read the nodes again to find the gateway's address")
            }
        }
        self.directory.addresses.get(node).copied()
    }

    fn api(&self) -> Api<Lease> {
        Api::default_namespaced(self.client.clone())
    }

    /// Takes part in the election as this node.
    pub fn run_candidate(&self, settings: LeaseSettings) -> Running {
        let (seen, observer) = lease::observe(self.api(), LEASE_NAME);
        let (out, leadership) = watch::channel(Leadership::default());
        let (stop, stop_rx) = oneshot::channel();
        let task =
            tokio::spawn(Candidate::new(self.api(), self.me(), settings).run(seen, out, stop_rx));
        Running {
            leadership,
            stop: Some(stop),
            task,
            observer,
        }
    }

    /// Follows the holder without taking part.
    pub fn run_follower(&self) -> Running {
        let (seen, observer) = lease::observe(self.api(), LEASE_NAME);
        let (out, leadership) = watch::channel(Leadership::default());
        let task = tokio::spawn(lease::follow(seen, out));
        Running {
            leadership,
            stop: None,
            task,
            observer,
        }
    }

    /// The view of `leadership` for `meshctl peers`.
    pub fn view(&self, leadership: &Leadership, holder_address: Option<IpAddr>) -> ElectionView {
        ElectionView {
            node: self.me(),
            candidate: self.directory.i_am_candidate(),
            active: leadership.active,
            holder: leadership.holder.clone(),
            holder_address,
            since: leadership
                .since
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            transitions: leadership.transitions,
        }
    }
}
