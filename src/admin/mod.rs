//! What meshd shows the outside world: Prometheus metrics today, the admin API for `meshctl` next.

pub mod metrics;
