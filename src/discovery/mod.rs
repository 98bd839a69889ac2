//! Service discovery: which services each cluster exports, merged into one clusterset view.
//!
//! [`catalog`] holds the data model ([`ExportCatalog`] per cluster, [`ClustersetView`] for all
//! of them); [`exports`] reads the static exports file into an [`ExportCatalog`]. The DNS
//! responder (`crate::dns`) only reads a [`ClustersetView`]; the ServiceExport watcher and the
//! catalog sync between peers (not built yet) will produce catalogs of the same types.

pub mod catalog;
pub mod exports;

pub use catalog::{ClusterEntry, ClustersetView, ExportCatalog};
