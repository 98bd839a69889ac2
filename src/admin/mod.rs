//! What meshd shows the outside world: Prometheus metrics ([`metrics`]), the admin API that
//! `meshctl peers` reads over a root-only Unix socket ([`api`] types, [`server`], [`client`]),
//! the peer monitor behind both ([`monitor`]), and the liveness/readiness probes.

pub mod api;
pub mod client;
pub mod metrics;
pub mod monitor;
pub mod server;
