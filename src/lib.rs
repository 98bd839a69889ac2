//! meshd: a userspace WireGuard dataplane that joins the pod networks of Kubernetes clusters.
//!
//! Two halves share a few handles: the [`dataplane`] (synchronous threads, packets) and the
//! [`control`] plane (tokio: configuration, routes, the WireGuard UAPI). Beside them, [`discovery`]
//! (the exported-services catalog) and [`dns`] (the `clusterset.local` responder), [`admin`] (the
//! admin API, metrics, health), the limits of every TCP listener ([`listener`]) and HTTP both ways
//! ([`http`]). What only meshctl needs lives under `src/bin/meshctl/`. See docs/architecture.md
//! (with the module graph) and docs/dns.md.

// The in-memory peer pair of tests/support/pair.rs names this crate `meshd`, as the integration
// tests see it; the unit tests include the same file.
#[cfg(test)]
extern crate self as meshd;

pub mod admin;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod defaults;
pub mod discovery;
pub mod dns;
pub mod http;
pub mod keys;
pub mod listener;
pub mod netlink;
pub mod node;
