//! Service discovery: which services each cluster exports, merged into one clusterset view.
//!
//! [`catalog`] holds the data model ([`ExportCatalog`] per cluster, [`ClustersetView`] for all
//! of them); the local catalog comes either from [`exports`] (the static exports file, for the
//! lab and bare hosts) or from [`kubernetes`] (the ServiceExport watcher, in a cluster); [`sync`]
//! exchanges catalogs with the peers over the tunnel; [`probe`] tells which peers are reachable
//! through it; [`clusterset`] merges all of that into the view the DNS responder (`crate::dns`)
//! answers from.

pub mod catalog;
pub mod clusterset;
pub mod exports;
pub mod kubernetes;
pub mod probe;
pub mod sync;

pub use catalog::{ClusterEntry, ClustersetView, ExportCatalog};

use crate::config::Config;

/// The peers that take part in discovery (those with a `tunnel_address`): what to probe and
/// whose catalogs to follow.
pub fn discovery_peers(config: &Config) -> (Vec<probe::ProbeTarget>, Vec<sync::SyncPeer>) {
    config
        .peers
        .iter()
        .filter_map(|p| {
            let addr = p.tunnel_address?;
            Some((
                probe::ProbeTarget {
                    name: p.name.clone(),
                    key: p.public_key,
                    addr,
                },
                sync::SyncPeer {
                    name: p.name.clone(),
                    tunnel_address: addr,
                    allowed_cidrs: p.allowed_cidrs.clone(),
                },
            ))
        })
        .unzip()
}
