//! The gateway election (`meshd::node::lease`) against the in-process API server, whose Leases
//! have real optimistic concurrency (a stale resourceVersion gets 409 Conflict): one holder at a
//! time, a graceful release handed over through the watch, a crashed holder replaced after
//! expiry, and a holder cut off from the API server fenced before anyone else may take over.

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::ApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use meshd::node::lease::{self, Candidate, Leadership, LeaseSettings, LEASE_NAME};
use serde_json::json;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// One candidate in the election: its view, and the switch that stops it (with a release).
struct Running {
    view: watch::Receiver<Leadership>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    observer: tokio::task::JoinHandle<()>,
}

impl Running {
    fn active(&self) -> bool {
        self.view.borrow().active
    }

    /// A graceful stop: inactive first, then the Lease released.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = (&mut self.task).await;
        self.observer.abort();
    }

    /// A crash: gone without a word.
    fn kill(self) {
        self.task.abort();
        self.observer.abort();
    }
}

fn candidate(server: &ApiServer, name: &str) -> Running {
    candidate_via(server.client(), name)
}

fn candidate_via(client: kube::Client, name: &str) -> Running {
    let api: Api<Lease> = Api::default_namespaced(client);
    let (seen, observer) = lease::observe(api.clone(), LEASE_NAME);
    let (out, view) = watch::channel(Leadership::default());
    let (stop, stop_rx) = oneshot::channel();
    let task = tokio::spawn(
        Candidate::new(api, name.to_string(), LeaseSettings::default()).run(seen, out, stop_rx),
    );
    Running {
        view,
        stop: Some(stop),
        task,
        observer,
    }
}

/// Waits (at most `limit`) until `ok` holds for `view`; when it happened.
async fn until(
    view: &mut watch::Receiver<Leadership>,
    limit: Duration,
    ok: impl Fn(&Leadership) -> bool,
) -> Option<Instant> {
    tokio::time::timeout(limit, view.wait_for(|l| ok(l)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|_| Instant::now())
}

/// Node A (through `a_client`) takes the Lease, then node B starts and names A as the holder.
async fn holder_and_standby(server: &ApiServer, a_client: kube::Client) -> (Running, Running) {
    let mut a = candidate_via(a_client, "node-a");
    assert!(until(&mut a.view, Duration::from_secs(10), |l| l.active)
        .await
        .is_some());
    let mut b = candidate(server, "node-b");
    assert!(
        until(&mut b.view, Duration::from_secs(10), |l| {
            l.holder.as_deref() == Some("node-a")
        })
        .await
        .is_some(),
        "the standby names the holder"
    );
    (a, b)
}

#[tokio::test]
async fn a_stale_resource_version_is_refused_with_409() {
    let server = ApiServer::start().await;
    let api: Api<Lease> = Api::default_namespaced(server.client());
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "x"}, "spec": {"holderIdentity": "a"},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &lease).await.unwrap();
    let again = api
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(again, kube::Error::Api(ref s) if s.code == 409),
        "{again}"
    );
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = api
        .replace("x", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    // The same write again carries the old version: someone else's write came in between.
    let stale = api
        .replace("x", &PostParams::default(), &first)
        .await
        .unwrap_err();
    assert!(
        matches!(stale, kube::Error::Api(ref s) if s.code == 409 && s.message.contains("has been modified")),
        "{stale}"
    );
    assert_eq!(
        api.get("x")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn one_candidate_holds_the_lease_and_a_release_hands_it_over() {
    let server = ApiServer::start().await;
    let (a, mut b) = holder_and_standby(&server, server.client()).await;
    // Both run for a while: never both active (every change of either is looked at).
    let (mut av, mut bv) = (a.view.clone(), b.view.clone());
    let watch_both = async {
        loop {
            tokio::select! {
                _ = av.changed() => {}
                _ = bv.changed() => {}
            }
            assert!(
                !(av.borrow().active && bv.borrow().active),
                "two active gateways"
            );
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), watch_both).await;
    assert!(a.active() && !b.active());
    let held = server.get("Lease", "default", LEASE_NAME).unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "node-a");
    assert_eq!(held["spec"]["leaseDurationSeconds"], 3);

    // A graceful stop: the standby takes over through its watch, well before any expiry.
    let released = Instant::now();
    a.stop().await;
    let took = until(&mut b.view, Duration::from_secs(10), |l| l.active)
        .await
        .expect("the standby never took the released Lease");
    eprintln!("hand-over after a release: {:?}", took - released);
    assert!(
        took - released < LeaseSettings::default().duration,
        "taken after {:?}: it waited for expiry instead of seeing the release",
        took - released
    );
    let held = server.get("Lease", "default", LEASE_NAME).unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "node-b");
    assert_eq!(held["spec"]["leaseTransitions"], 1);
    let writes: Vec<_> = server.writes_to("leases");
    assert!(
        writes
            .iter()
            .any(|w| w.verb == "update" && w.body["spec"]["holderIdentity"].is_null()),
        "no release was written"
    );
    b.kill();
}

#[tokio::test]
async fn a_crashed_holder_is_replaced_only_after_its_lease_expires() {
    let server = ApiServer::start().await;
    let (a, mut b) = holder_and_standby(&server, server.client()).await;
    let crashed = Instant::now();
    a.kill();
    let took = until(&mut b.view, Duration::from_secs(10), |l| l.active)
        .await
        .expect("the standby never took the expired Lease");
    eprintln!("take-over after a crash: {:?}", took - crashed);
    // It had to wait for the record to age by its own clock (renewals were up to one retry
    // period before the crash).
    assert!(
        took - crashed >= LeaseSettings::default().duration - LeaseSettings::default().retry,
        "taken after {:?}, before the crashed holder's Lease could expire",
        took - crashed
    );
    b.kill();
}

#[tokio::test]
async fn a_holder_that_cannot_renew_stops_before_anyone_else_starts() {
    let server = ApiServer::start().await;
    // The holder reaches the API server through a link the test can cut.
    let (link, open) = cuttable_link(&server.url).await;
    let (mut a, mut b) = holder_and_standby(&server, client_of(&link)).await;
    // Partitioned: the holder's requests and its watch hang, unanswered.
    open.send_replace(false);
    let cut = Instant::now();
    let fenced = until(&mut a.view, Duration::from_secs(10), |l| !l.active)
        .await
        .expect("the holder kept forwarding without renewing");
    let took = until(&mut b.view, Duration::from_secs(10), |l| l.active)
        .await
        .expect("the standby never took over");
    eprintln!(
        "fenced after {:?}, taken over after {:?}",
        fenced - cut,
        took - cut
    );
    assert!(
        fenced < took,
        "split brain: the standby was active before the old holder stopped"
    );
    // Back in touch, the fenced holder stands by and names the new holder.
    open.send_replace(true);
    assert!(until(&mut a.view, Duration::from_secs(10), |l| l
        .holder
        .as_deref()
        == Some("node-b"))
    .await
    .is_some());
    assert!(!a.active());
    a.kill();
    b.kill();
}

fn client_of(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

/// A TCP relay to the API server at `url` on a new loopback port; while the switch is off,
/// bytes in both directions are swallowed (connections stay open, requests hang), as over a
/// link that went dark.
async fn cuttable_link(url: &str) -> (String, watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = url.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = format!("http://{}", listener.local_addr().unwrap());
    let (open, _) = watch::channel(true);
    let switch = open.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to, open) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    switch.subscribe(),
                ),
                (Box::new(sr) as _, Box::new(cw) as _, switch.subscribe()),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if *open.borrow() && to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    (local, open)
}

#[tokio::test]
async fn two_candidates_starting_together_elect_exactly_one() {
    let server = ApiServer::start().await;
    let mut all: Vec<Running> = (0..3)
        .map(|i| candidate(&server, &format!("node-{i}")))
        .collect();
    let mut first = all[0].view.clone();
    assert!(
        until(&mut first, Duration::from_secs(10), |l| l.holder.is_some())
            .await
            .is_some()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active: Vec<usize> = (0..3).filter(|i| all[*i].active()).collect();
    assert_eq!(active.len(), 1, "{active:?}");
    let holder =
        server.get("Lease", "default", LEASE_NAME).unwrap()["spec"]["holderIdentity"].clone();
    assert_eq!(holder, json!(format!("node-{}", active[0])));
    for c in all.drain(..) {
        c.kill();
    }
}
