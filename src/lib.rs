//! meshd: a userspace WireGuard dataplane that joins the pod networks of Kubernetes clusters.
//!
//! Two halves share a few handles: the [`dataplane`] (synchronous threads, packets) and the
//! [`control`] plane (tokio: configuration, routes, the WireGuard UAPI). See docs/architecture.md.

pub mod admin;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod keys;
