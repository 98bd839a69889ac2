//! Service discovery: which services each cluster exports, merged into one clusterset view.
//!
//! [`catalog`] holds the data model ([`ExportCatalog`] per cluster, [`ClustersetView`] for all
//! of them); the local catalog comes either from [`exports`] (the static exports file, for the
//! lab and bare hosts) or from [`kubernetes`] (the ServiceExport watcher, in a cluster). The DNS
//! responder (`crate::dns`) only reads a [`ClustersetView`]; the catalog sync between peers
//! produces remote catalogs of the same types.

pub mod catalog;
pub mod exports;
pub mod kubernetes;

pub use catalog::{ClusterEntry, ClustersetView, ExportCatalog};
