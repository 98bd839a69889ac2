//! Keeps this node's part in place: writes the masquerade bypass and, on a route agent, the
//! routes to the gateway; checks both every [`CHECK_EVERY`](super::CHECK_EVERY) and writes back
//! what something removed; takes all of it away when meshd exits.

use super::agent::{self, AgentError, NextHop, RouteAgent};
use super::bypass::{Bypass, BypassError};
use super::vxlan::{self, Vxlan, VxlanError};
use super::{NodeState, NodeView, Role};
use crate::config::RouteMode;
use ipnet::IpNet;
use std::net::IpAddr;
use tokio::sync::{oneshot, watch};

/// The prefixes the node's part is about: this cluster's and the remote clusters'.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prefixes {
    pub local: Vec<IpNet>,
    pub remote: Vec<IpNet>,
}

/// Why the node's part could not be put in place at start.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(transparent)]
    Bypass(#[from] BypassError),
    #[error(transparent)]
    Routes(#[from] AgentError),
    #[error(transparent)]
    Vxlan(#[from] VxlanError),
    #[error("this node has no route to the gateway {0}: it must reach the gateway node's address (check gateway_address, or the label meshd.io/gateway=true)")]
    NoRouteToGateway(IpAddr),
}

/// How this node's part reaches the gateway, for [`NodeView`].
#[derive(Debug, Clone, Default)]
struct Path {
    text: Option<String>,
    interface: Option<String>,
}

/// Whether a route agent goes through VXLAN: forced either way, or (auto) when the gateway is not
/// on this node's network (`direct`: the route to it has no `via`).
fn takes_vxlan(mode: RouteMode, direct: bool) -> bool {
    match mode {
        RouteMode::Direct => false,
        RouteMode::Vxlan => true,
        RouteMode::Auto => !direct,
    }
}

async fn route_to_gateway(
    handle: &rtnetlink::Handle,
    gateway: IpAddr,
) -> Result<(u32, bool), KeeperError> {
    let route = crate::netlink::route_to(handle, gateway)
        .await
        .map_err(AgentError::Dump)?;
    match route {
        Some(crate::netlink::Route {
            oif: Some(oif),
            via,
            ..
        }) => Ok((oif, via.is_none())),
        _ => Err(KeeperError::NoRouteToGateway(gateway)),
    }
}

/// The running keeper: [`Keeper::stop`] takes everything away.
pub struct Keeper {
    /// Stops the task; `true`: leave the bypass in place for the next keeper.
    stop: Option<oneshot::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a masquerade bypass call panicked")
}

async fn with_bypass<T: Send + 'static>(
    bypass: Bypass,
    f: impl FnOnce(&mut Bypass) -> T + Send + 'static,
) -> (Bypass, T) {
    blocking(move || {
        let mut bypass = bypass;
        let out = f(&mut bypass);
        (bypass, out)
    })
    .await
}

impl Keeper {
    /// Clears what an earlier meshd left, writes the bypass (if `bypass_enabled`) and the
    /// agent's routes (on a route agent), then keeps them in place until stopped.
    pub async fn start(
        handle: rtnetlink::Handle,
        role: Role,
        gateway: Option<IpAddr>,
        bypass_enabled: bool,
        route_mode: RouteMode,
        mut prefixes: watch::Receiver<Prefixes>,
        state: NodeState,
    ) -> Result<Keeper, KeeperError> {
        let cleared = agent::clear(&handle).await?;
        if cleared > 0 {
            tracing::info!(
                routes = cleared,
                "removed routes an earlier meshd left (proto 77)"
            );
        }
        // Writing the bypass replaces the table in one transaction: no moment without it (a
        // packet passing then would be masqueraded, and conntrack would keep that for its
        // whole flow). Only a bypass that is off has its leftover removed.
        if !bypass_enabled {
            blocking(Bypass::remove).await?;
        }
        let wanted = prefixes.borrow_and_update().clone();
        let mut bypass = None;
        if bypass_enabled {
            let (b, r) = with_bypass(
                Bypass::new(wanted.local.clone(), wanted.remote.clone()),
                Bypass::apply,
            )
            .await;
            r?;
            tracing::info!(table = super::bypass::TABLE, local = ?wanted.local, remote = ?wanted.remote,
                "masquerade bypass in place: traffic between these keeps its source address");
            bypass = Some(b);
        }
        if vxlan::clear(&handle).await? {
            tracing::info!(
                interface = vxlan::NAME,
                "removed the VXLAN interface an earlier meshd left"
            );
        }
        let mut vx: Option<Vxlan> = None;
        let mut path = Path::default();
        let mut routes = match (role, gateway) {
            (Role::RouteAgent, Some(gw)) => {
                let (oif, direct) = route_to_gateway(&handle, gw).await?;
                let use_vxlan = takes_vxlan(route_mode, direct);
                let underlay = crate::netlink::interface_name(oif);
                let hop = if use_vxlan {
                    let local = crate::netlink::addresses(&handle)
                        .await
                        .map_err(AgentError::Dump)?
                        .into_iter()
                        .find(|(index, ip)| *index == oif && ip.is_ipv4())
                        .map(|(_, ip)| ip)
                        .ok_or(VxlanError::NoUnderlay(gw))?;
                    let end = Vxlan::create(&handle, local, oif, Some(gw)).await?;
                    let hop = NextHop {
                        address: IpAddr::V4(end.peer_overlay.ok_or(VxlanError::NotIpv4(gw))?),
                        oif: Some(end.index),
                    };
                    path.text = Some(format!("vxlan ({} over {underlay})", vxlan::NAME));
                    path.interface = Some(vxlan::NAME.to_string());
                    vx = Some(end);
                    hop
                } else {
                    path.text = Some(format!("direct (via {gw} on {underlay})"));
                    path.interface = Some(underlay);
                    NextHop {
                        address: gw,
                        oif: None,
                    }
                };
                let mut agent = RouteAgent::new(handle.clone(), gw, hop);
                agent.sync(&wanted.remote).await?;
                tracing::info!(gateway = %gw, path = path.text.as_deref().unwrap_or(""), prefixes = ?wanted.remote,
                    "route agent: remote CIDRs routed to the gateway");
                Some(agent)
            }
            (Role::Gateway, Some(gw)) if route_mode != RouteMode::Direct => {
                // The agents' VXLAN ends point here; this end learns them as they send.
                let oif = crate::netlink::addresses(&handle)
                    .await
                    .map_err(AgentError::Dump)?
                    .into_iter()
                    .find(|(_, ip)| *ip == gw)
                    .map(|(index, _)| index)
                    .ok_or(VxlanError::NoUnderlay(gw))?;
                let end = Vxlan::create(&handle, gw, oif, None).await?;
                path.text = Some(format!(
                    "vxlan end for the agents ({} over {})",
                    vxlan::NAME,
                    end.underlay
                ));
                vx = Some(end);
                None
            }
            _ => None,
        };
        publish(
            &state,
            role,
            gateway,
            &path,
            bypass.as_ref(),
            None,
            routes.as_ref(),
        )
        .await;

        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut keep_bypass = false;
            let mut tick = tokio::time::interval(super::CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut error = None;
                tokio::select! {
                    keep = &mut stop_rx => {
                        keep_bypass = keep.unwrap_or(false);
                        break;
                    }
                    changed = prefixes.changed() => {
                        if changed.is_err() { break; }
                        let wanted = prefixes.borrow_and_update().clone();
                        if let Some(b) = bypass.take() {
                            let w = wanted.clone();
                            let (b, r) = with_bypass(b, move |b| b.set_prefixes(w.local, w.remote)).await;
                            error = r.err().map(|e| e.to_string());
                            bypass = Some(b);
                        }
                        if let Some(agent) = routes.as_mut() {
                            if let Err(e) = agent.sync(&wanted.remote).await {
                                tracing::error!(error = %e, "route agent: a route to the gateway could not be set");
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if let Some(end) = vx.as_mut() {
                            match end.ensure().await {
                                Ok(false) => {}
                                Ok(true) => {
                                    tracing::warn!(interface = vxlan::NAME, "the VXLAN interface was removed: made again");
                                    if let (Some(agent), Some(overlay)) = (routes.as_mut(), end.peer_overlay) {
                                        agent.set_hop(NextHop { address: IpAddr::V4(overlay), oif: Some(end.index) });
                                    }
                                }
                                Err(e) => tracing::error!(error = %e, "the VXLAN interface could not be made again"),
                            }
                        }
                        if let Some(b) = bypass.take() {
                            let (b, r) = with_bypass(b, Bypass::check).await;
                            match r {
                                Ok(true) => tracing::warn!(table = super::bypass::TABLE,
                                    "the masquerade bypass was changed or removed (by hand, a CNI or an iptables/nft restore): written again"),
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::error!(error = %e, "the masquerade bypass could not be checked or written");
                                    error = Some(e.to_string());
                                }
                            }
                            bypass = Some(b);
                        }
                        if let Some(agent) = routes.as_mut() {
                            match agent.put_back().await {
                                Ok(0) => {}
                                Ok(n) => tracing::warn!(routes = n, "route agent: routes to the gateway were removed: added again"),
                                Err(e) => tracing::error!(error = %e, "route agent: a route to the gateway could not be put back"),
                            }
                        }
                    }
                }
                publish(
                    &state,
                    role,
                    gateway,
                    &path,
                    bypass.as_ref(),
                    error,
                    routes.as_ref(),
                )
                .await;
            }
            if bypass.is_some() && !keep_bypass {
                if let Err(e) = blocking(Bypass::remove).await {
                    tracing::error!(error = %e, "the masquerade bypass could not be removed: nft delete table inet meshd");
                }
            }
            if routes.is_some() {
                if let Err(e) = agent::clear(&handle).await {
                    tracing::error!(error = %e, "route agent: routes could not be removed: ip route flush proto 77");
                }
            }
            if let Some(end) = vx {
                if let Err(e) = end.remove().await {
                    tracing::error!(error = %e, "the VXLAN interface could not be removed: ip link del {}", vxlan::NAME);
                }
            }
        });
        Ok(Keeper {
            stop: Some(stop_tx),
            task,
        })
    }

    /// Takes the bypass and the routes away, and waits until they are gone.
    pub async fn stop(self) {
        self.end(false).await;
    }

    /// Takes the routes and the VXLAN end away but leaves the bypass, for a keeper of a new
    /// role (the node became or stopped being the active gateway, or the gateway moved): the
    /// next one rewrites the bypass in one transaction, so no packet meets kindnet's
    /// masquerade in between.
    pub async fn hand_over(self) {
        self.end(true).await;
    }

    async fn end(mut self, keep_bypass: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(keep_bypass);
        }
        let _ = (&mut self.task).await;
    }
}

async fn publish(
    state: &NodeState,
    role: Role,
    gateway: Option<IpAddr>,
    path: &Path,
    bypass: Option<&Bypass>,
    error: Option<String>,
    routes: Option<&RouteAgent>,
) {
    let mut view = NodeView::new(role, gateway, bypass.is_some());
    view.path = path.text.clone();
    view.route_interface = path.interface.clone();
    if let Some(b) = bypass {
        view.masquerade_bypass.in_place = error.is_none();
        view.masquerade_bypass.restored = b.restored();
        view.masquerade_bypass.error = error;
    }
    let unread = match routes {
        Some(agent) => match agent.view().await {
            Ok(r) => {
                view.routes = r;
                None
            }
            Err(e) => Some(e.to_string()),
        },
        None => None,
    };
    let mut shown = state.write();
    view.election = shown.election.take();
    view.find_problems();
    view.problems.extend(unread);
    *shown = view;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_vxlan_only_when_the_gateway_is_behind_a_router() {
        assert!(!takes_vxlan(RouteMode::Auto, true));
        assert!(takes_vxlan(RouteMode::Auto, false));
        assert!(takes_vxlan(RouteMode::Vxlan, true));
        assert!(!takes_vxlan(RouteMode::Direct, false));
    }
}
