//! A proxy given several control-plane replicas: real remora-control
//! processes, each with its own data directory (file store) but the same
//! CA files, bootstrap tokens and config, and a real proxy with all their
//! URLs. Killing the replica it is connected to fails no request; it moves
//! to another replica, resumes from the version it runs, ACKs, and takes a
//! config change from there; a dead address in the list costs no backoff;
//! certificate renewals go to a live replica; a name that resolves to the
//! replicas is verified as that name whatever address it resolved to.

use remora_tests::control::{ControlProcess, SharedCa, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPLICA: &str = "remora_control_plane_replica_info";
const FAILOVERS: &str = "remora_control_plane_failovers_total";
const ROTATIONS: &str = "remora_identity_rotations_total";

/// The name the replicas' certificates carry next to localhost.
const NAME: &str = "replicas.remora.test";

/// Control-plane replicas that share a CA, tokens and config, each with
/// its own data directory.
struct Cluster {
    /// None once killed.
    replicas: Vec<Option<ControlProcess>>,
    _data: Vec<TempDir>,
    secrets: TempDir,
    ca: SharedCa,
    tokens: Tokens,
    lifetime: String,
}

impl Cluster {
    /// `addrs.len()` replicas, issuing `lifetime` certificates for trust
    /// domain mesh.test, each serving TLS for `names` (and its listen IP).
    async fn start(addrs: &[SocketAddr], lifetime: &str) -> Cluster {
        let secrets = TempDir::new("failover-secrets");
        let ca = SharedCa::new(&secrets);
        let tokens = Tokens::new(&secrets);
        // Granted before the replicas start: they read the tokens at start.
        tokens.token_for("default", "web");
        let mut c = Cluster {
            replicas: vec![],
            _data: vec![],
            secrets,
            ca,
            tokens,
            lifetime: lifetime.to_string(),
        };
        for addr in addrs {
            c.add(*addr, &format!("localhost,{NAME}")).await;
        }
        c
    }

    /// One more replica on `addr` with a certificate for `names`.
    async fn add(&mut self, addr: SocketAddr, names: &str) -> &ControlProcess {
        let data = TempDir::new("failover-data");
        let tokens = self.tokens.file().display().to_string();
        let mut flags: Vec<String> = [
            "--tls",
            "--bootstrap-tokens",
            &tokens,
            "--trust-domain",
            "mesh.test",
            "--cert-lifetime",
            &self.lifetime,
            "--server-name",
            names,
        ]
        .map(String::from)
        .to_vec();
        flags.extend(self.ca.flags());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cp = ControlProcess::start_with(addr, &data, "2s", &flags).await;
        self._data.push(data);
        self.replicas.push(Some(cp));
        self.replicas.last().unwrap().as_ref().unwrap()
    }

    fn live(&self) -> impl Iterator<Item = &ControlProcess> {
        self.replicas.iter().flatten()
    }

    /// Every replica's URL, comma-separated.
    fn urls(&self) -> String {
        self.live().map(|c| c.url()).collect::<Vec<_>>().join(",")
    }

    /// The same config applied to every live replica.
    async fn apply(&self, yaml: &str) {
        for cp in self.live() {
            cp.apply(yaml).await.expect("apply");
        }
    }

    fn at(&self, addr: SocketAddr) -> &ControlProcess {
        self.live()
            .find(|c| c.addr == addr)
            .unwrap_or_else(|| panic!("no live replica at {addr}"))
    }

    /// SIGKILL: the replica goes away at once, as a crashed pod does.
    fn kill(&mut self, addr: SocketAddr) {
        for slot in &mut self.replicas {
            if slot.as_ref().is_some_and(|c| c.addr == addr) {
                slot.take().unwrap().kill();
            }
        }
    }

    /// SIGTERM, as a rolling update or a drain does, and waits for the exit.
    async fn stop(&mut self, addr: SocketAddr) {
        for slot in &mut self.replicas {
            if slot.as_ref().is_some_and(|c| c.addr == addr) {
                slot.take().unwrap().stop().await;
            }
        }
    }

    /// A proxy with identity default/web and the control plane at `urls`,
    /// reconnecting with the default backoff.
    fn proxy(&self, urls: &str, node: &str, state: &TempDir) -> ProxyBuilder {
        let token = self.tokens.token_for("default", "web");
        ProxyBuilder::new()
            .arg("--control-plane")
            .arg(urls)
            .arg("--node-id")
            .arg(node)
            .arg("--state-dir")
            .arg(state.path().join(node).to_str().unwrap())
            .arg("--control-plane-ca")
            .arg(self.ca.cert.to_str().unwrap())
            .arg("--bootstrap-token-file")
            .arg(token.to_str().unwrap())
            .arg("--identity-service-account")
            .arg("web")
    }
}

/// The replica the proxy's Discovery stream is on, from its metrics.
async fn connected_to(p: &ProxyProcess) -> Option<SocketAddr> {
    let m = p.metrics().await;
    m.lines().filter(|l| l.starts_with(REPLICA)).find_map(|l| {
        l.split("address=\"")
            .nth(1)?
            .split('"')
            .next()?
            .parse()
            .ok()
    })
}

async fn failovers(p: &ProxyProcess, client: &str) -> f64 {
    p.metric(FAILOVERS, &[&format!("client=\"{client}\"")])
        .await
}

async fn rotations(p: &ProxyProcess) -> f64 {
    p.metric(ROTATIONS, &["result=\"ok\""]).await
}

/// The replica that issued the proxy's newest certificate, from its log.
fn issued_by(logs: &str) -> Option<SocketAddr> {
    logs.lines()
        .rfind(|l| l.contains("identity certificate installed"))
        .and_then(|l| {
            l.split("replica=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// What `replica` says of `node`: connected, and ACKed the version it
/// publishes now.
async fn acked_at(cp: &ControlProcess, node: &str) -> bool {
    let s = cp.status().await;
    s.proxies.iter().any(|p| {
        p.node_id == node
            && p.connected
            && !s.snapshot_version.is_empty()
            && p.acked_version == s.snapshot_version
            && p.nack_error.is_empty()
    })
}

/// A client at a steady ~500 requests a second through the proxy's
/// outbound listener to `host`, no retries: every failure is counted.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(proxy: SocketAddr, host: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, sent, failed, failures) =
                (stop.clone(), sent.clone(), failed.clone(), failures.clone());
            tokio::spawn(async move {
                let c = http1_client();
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                let mut inflight = tokio::task::JoinSet::new();
                while !stop.load(Relaxed) {
                    tick.tick().await;
                    let (c, sent, failed, failures) =
                        (c.clone(), sent.clone(), failed.clone(), failures.clone());
                    inflight.spawn(async move {
                        sent.fetch_add(1, Relaxed);
                        match get_via(&c, proxy, host, "/").await {
                            Ok(r) if r.status == 200 => {}
                            other => {
                                failed.fetch_add(1, Relaxed);
                                let what = other.map(|r| format!("{} {}", r.status, r.body));
                                failures.lock().unwrap().push(format!("{what:?}"));
                            }
                        }
                    });
                }
                while inflight.join_next().await.is_some() {}
            })
        };
        Load {
            stop,
            sent,
            failed,
            failures,
            task,
        }
    }

    /// Stops and returns (sent, failed, first failures).
    async fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Relaxed);
        self.task.await.unwrap();
        let first = self
            .failures
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .cloned()
            .collect();
        (self.sent.load(Relaxed), self.failed.load(Relaxed), first)
    }
}

#[tokio::test]
async fn killing_the_connected_replica_under_traffic_fails_no_request_and_the_proxy_moves_on() {
    let mut cluster = Cluster::start(&[any_port(), any_port(), any_port()], "1h").await;
    let (app1, app2) = (
        Upstream::start("api-1", Behavior::Demo).await,
        Upstream::start("api-2", Behavior::Demo).await,
    );
    cluster
        .apply(&service_yaml("api", 80, "http", &[app1.addr]))
        .await;
    let state = TempDir::new("failover-state");
    let web = cluster
        .proxy(&cluster.urls(), "web-1", &state)
        .start()
        .await;
    let webr = &web;
    wait_until(
        "the proxy has its certificate",
        Duration::from_secs(20),
        || async move { rotations(webr).await >= 1.0 },
    )
    .await;
    let first = connected_to(&web).await.expect("connected to a replica");
    wait_until(
        "the first replica shows the proxy's ACK",
        Duration::from_secs(10),
        || async { acked_at(cluster.at(first), "web-1").await },
    )
    .await;
    let running = web.config_version().await;
    assert!(running.starts_with("1."), "{running}");
    assert_eq!(failovers(&web, "discovery").await, 0.0);

    let load = Load::start(web.outbound, "api");
    let a1 = &app1;
    wait_until("traffic flows", Duration::from_secs(10), || async move {
        a1.hits() > 50
    })
    .await;

    // The replica goes away with its streams.
    let served_before = app1.hits();
    cluster.kill(first);
    let killed_at = Instant::now();
    wait_until(
        "the proxy is on another replica",
        Duration::from_secs(10),
        || async { connected_to(webr).await.is_some_and(|a| a != first) },
    )
    .await;
    let moved_in = killed_at.elapsed();
    let second = connected_to(&web).await.unwrap();
    eprintln!("reconnected to {second} {moved_in:?} after {first} was killed");
    wait_until(
        "traffic flows on after the failover",
        Duration::from_secs(10),
        || async move { a1.hits() > served_before + 500 },
    )
    .await;
    assert_eq!(failovers(&web, "discovery").await, 1.0);
    let logs = web
        .logs_with(&["failed over to another control-plane replica"])
        .await;
    assert!(
        logs.contains(&format!("from={first} to={second}")),
        "no failover line:\n{logs}"
    );

    // It resumed from the version it runs, and the survivor counts it as
    // ACKed.
    let survivor = cluster.at(second);
    wait_until(
        "the survivor shows the proxy's ACK",
        Duration::from_secs(10),
        || async { acked_at(survivor, "web-1").await },
    )
    .await;
    let cp_logs = logs_with(&survivor.logs, &["node=\"web-1\""]).await;
    assert!(
        cp_logs.lines().any(
            |l| l.contains("proxy connected") && l.contains(&format!("last_version={running}"))
        ),
        "the Hello did not carry {running}:\n{cp_logs}"
    );

    // A change applied to the survivor reaches the proxy.
    let v2 = survivor
        .apply(&service_yaml("api", 80, "http", &[app2.addr]))
        .await
        .unwrap();
    assert_eq!(v2, 2);
    wait_until(
        "the proxy runs version 2",
        Duration::from_secs(10),
        || async { webr.config_version().await.starts_with("2.") },
    )
    .await;
    let a2 = &app2;
    wait_until(
        "traffic follows version 2",
        Duration::from_secs(10),
        || async move { a2.hits() > 50 },
    )
    .await;
    wait_until(
        "the survivor shows the ACK of version 2",
        Duration::from_secs(10),
        || async { acked_at(survivor, "web-1").await },
    )
    .await;

    let (sent, failed, first_failures) = load.finish().await;
    assert!(sent > 600, "only {sent} requests were sent");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the failover: {first_failures:?}"
    );
}

#[tokio::test]
async fn a_replica_stopping_for_an_update_hands_its_proxy_to_another() {
    let mut cluster = Cluster::start(&[any_port(), any_port()], "1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    cluster
        .apply(&service_yaml("api", 80, "http", &[app.addr]))
        .await;
    let state = TempDir::new("failover-stop-state");
    let web = cluster
        .proxy(&cluster.urls(), "web-1", &state)
        .start()
        .await;
    let first = connected_to(&web).await.expect("connected");
    let load = Load::start(web.outbound, "api");
    // SIGTERM: the replica stops taking streams and closes its open ones.
    cluster.stop(first).await;
    let webr = &web;
    wait_until(
        "the proxy is on the other replica",
        Duration::from_secs(10),
        || async { connected_to(webr).await.is_some_and(|a| a != first) },
    )
    .await;
    assert_eq!(failovers(&web, "discovery").await, 1.0);
    let other = connected_to(&web).await.unwrap();
    wait_until(
        "the other replica shows the proxy's ACK",
        Duration::from_secs(10),
        || async { acked_at(cluster.at(other), "web-1").await },
    )
    .await;
    let (sent, failed, first_failures) = load.finish().await;
    assert!(sent > 0);
    assert_eq!(failed, 0, "{failed} of {sent} failed: {first_failures:?}");
}

#[tokio::test]
async fn dead_addresses_first_in_the_list_cost_no_backoff() {
    let cluster = Cluster::start(&[any_port()], "1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    cluster
        .apply(&service_yaml("api", 80, "http", &[app.addr]))
        .await;
    // Ports nothing listens on: connection refused.
    let dead: Vec<String> = (0..3).map(|_| format!("https://{}", free_addr())).collect();
    let urls = format!("{},{}", dead.join(","), cluster.urls());
    let state = TempDir::new("failover-dead-state");
    let started = Instant::now();
    // A long backoff: a round that failed would show.
    let web = cluster
        .proxy(&urls, "web-1", &state)
        .arg("--control-plane-max-backoff")
        .arg("30s")
        .start()
        .await;
    let ready_in = started.elapsed();
    let webr = &web;
    wait_until(
        "the proxy has its certificate",
        Duration::from_secs(10),
        || async move { rotations(webr).await >= 1.0 },
    )
    .await;
    eprintln!("ready {ready_in:?} after start");
    let logs = web.logs();
    assert!(
        !logs.contains("no control-plane replica reachable"),
        "a whole round failed:\n{logs}"
    );
    assert_eq!(
        connected_to(&web).await,
        Some(cluster.live().next().unwrap().addr)
    );
    assert!(
        ready_in < Duration::from_secs(10),
        "ready only after {ready_in:?}"
    );
    assert_eq!(
        get_via(&http1_client(), web.outbound, "api", "/")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn certificate_renewal_moves_to_the_second_replica_when_the_first_is_gone() {
    // 4 s certificates, renewed at about 2.8 s.
    let mut cluster = Cluster::start(&[any_port(), any_port()], "4s").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    cluster
        .apply(&service_yaml("api", 80, "http", &[app.addr]))
        .await;
    let state = TempDir::new("failover-renew-state");
    let web = cluster
        .proxy(&cluster.urls(), "web-1", &state)
        .start()
        .await;
    let webr = &web;
    wait_until("a first renewal", Duration::from_secs(20), || async move {
        rotations(webr).await >= 2.0
    })
    .await;
    let first = issued_by(&web.logs()).expect("the issuing replica is logged");
    cluster.kill(first);
    let other = cluster.live().next().unwrap().addr;
    let before = rotations(&web).await;
    wait_until(
        "two renewals after the issuing replica is gone",
        Duration::from_secs(30),
        || async move { rotations(webr).await >= before + 2.0 },
    )
    .await;
    let logs = web.logs();
    assert_eq!(issued_by(&logs), Some(other), "{logs}");
    assert!(
        !logs.contains("identity certificate expired"),
        "the certificate lapsed:\n{logs}"
    );
    assert!(
        web.metric("remora_identity_cert_expiry_seconds", &[]).await > 0.0,
        "no certificate"
    );
    let survivor = logs_with(&cluster.at(other).logs, &["certificate issued"]).await;
    assert!(
        survivor.lines().any(|l| l.contains("certificate issued")
            && l.contains("spiffe://mesh.test/ns/default/sa/web")
            && l.contains("authenticated_by=\"certificate\"")),
        "the survivor renewed nothing:\n{survivor}"
    );
}

#[tokio::test]
async fn a_name_that_resolves_to_the_replicas_is_verified_as_that_name() {
    if let Some(why) = private_hosts_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // Two replicas on one port of two loopback addresses, and an impostor
    // on a third: the same CA, but a certificate for another name.
    let first: SocketAddr = "127.0.0.2:0".parse().unwrap();
    let mut cluster = Cluster::start(&[first], "1h").await;
    let port = cluster.live().next().unwrap().addr.port();
    cluster
        .add(
            SocketAddr::from(([127, 0, 0, 3], port)),
            &format!("localhost,{NAME}"),
        )
        .await;
    cluster
        .add(
            SocketAddr::from(([127, 0, 0, 4], port)),
            "impostor.remora.test",
        )
        .await;
    let app = Upstream::start("api", Behavior::Demo).await;
    cluster
        .apply(&service_yaml("api", 80, "http", &[app.addr]))
        .await;
    let hosts = cluster.secrets.write(
        "hosts",
        &format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n127.0.0.4 {NAME}\n"),
    );
    let url = format!("https://{NAME}:{port}");
    let state = TempDir::new("failover-name-state");
    let web = cluster
        .proxy(&url, "web-1", &state)
        .hosts(&hosts)
        .start()
        .await;
    let webr = &web;
    wait_until(
        "the proxy has its certificate",
        Duration::from_secs(20),
        || async move { rotations(webr).await >= 1.0 },
    )
    .await;
    let impostor = SocketAddr::from(([127, 0, 0, 4], port));
    let on = connected_to(&web).await.expect("connected");
    assert_ne!(on, impostor);
    assert!(
        web.metric(REPLICA, &[&format!("url=\"{url}\"")]).await == 1.0,
        "the replica gauge does not name {url}:\n{}",
        web.metrics().await
    );

    cluster.kill(on);
    wait_until(
        "the proxy is on the other replica",
        Duration::from_secs(15),
        || async { connected_to(webr).await.is_some_and(|a| a != on) },
    )
    .await;
    let now_on = connected_to(&web).await.unwrap();
    assert_ne!(now_on, impostor, "the impostor's certificate was accepted");
    assert_eq!(now_on.port(), port);

    // Only the impostor is left: the proxy tries it, refuses its
    // certificate, and serves on without a control plane.
    let mark = web.logs().len();
    cluster.kill(now_on);
    let refused = format!("replica={impostor}");
    let tried = |logs: &str| {
        logs[mark..]
            .lines()
            .any(|l| l.contains("control plane unreachable") && l.contains(&refused))
    };
    wait_until(
        "the proxy tries the impostor",
        Duration::from_secs(15),
        || async { tried(&webr.logs()) },
    )
    .await;
    let logs = web.logs();
    let line = logs[mark..]
        .lines()
        .find(|l| l.contains("control plane unreachable") && l.contains(&refused))
        .unwrap();
    assert!(
        line.contains("certificate"),
        "not a certificate error: {line}"
    );
    assert_eq!(connected_to(&web).await, None);
    assert!(
        !cluster
            .at(impostor)
            .logs
            .lock()
            .unwrap()
            .contains("proxy connected"),
        "a stream reached the impostor"
    );
    let r = get_via(&http1_client(), web.outbound, "api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the proxy stopped serving");
}

/// Runs the proxy with `args` and returns its exit status and stderr once
/// it exits (it must, within 10 s).
async fn exits_with(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut b = ProxyBuilder::new();
    for a in args {
        b = b.arg(a);
    }
    let mut p = b.spawn();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            // The reader thread drains the pipe after the exit.
            let logs = logs_with(&p.logs, &["remora-proxy:"]).await;
            return (status, logs);
        }
        assert!(Instant::now() < end, "still running:\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn lists_that_would_leak_the_token_or_cannot_be_tried_are_refused_at_start() {
    let secrets = TempDir::new("failover-flags");
    let token = secrets.write("token", "t0ken\n");
    let ca = SharedCa::new(&secrets);
    let (token, ca) = (token.to_str().unwrap(), ca.cert.to_str().unwrap());

    // Every address is checked: one http:// among names is enough to refuse.
    let (status, logs) = exits_with(&[
        "--control-plane",
        "http://127.0.0.1:1,http://127.0.0.1:2",
        "--bootstrap-token-file",
        token,
    ])
    .await;
    assert!(!status.success());
    assert!(
        logs.contains("--control-plane http://127.0.0.1:1: the bootstrap token would cross the network in the clear"),
        "{logs}"
    );
    // A mixed list: the http replica would be a way to plaintext.
    let (status, logs) = exits_with(&[
        "--control-plane",
        "https://127.0.0.1:1,http://127.0.0.1:2",
        "--control-plane-ca",
        ca,
        "--bootstrap-token-file",
        token,
        "--insecure-dev-plaintext",
    ])
    .await;
    assert!(!status.success());
    assert!(logs.contains("mix http and https"), "{logs}");
    // More than 16 addresses.
    let many: Vec<String> = (1..=17).map(|i| format!("https://127.0.0.1:{i}")).collect();
    let many = many.join(",");
    let (status, logs) = exits_with(&["--control-plane", &many, "--control-plane-ca", ca]).await;
    assert!(!status.success());
    assert!(logs.contains("17 addresses, at most 16"), "{logs}");
    // An https list needs the CA that verifies it.
    let (status, logs) =
        exits_with(&["--control-plane", "https://127.0.0.1:1,https://127.0.0.1:2"]).await;
    assert!(!status.success());
    assert!(logs.contains("needs --control-plane-ca"), "{logs}");
}
