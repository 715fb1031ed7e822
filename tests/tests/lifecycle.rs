//! Process lifecycle of the real proxy binary: graceful drain on SIGTERM and
//! on POST /shutdown, the drain timeout, the admin endpoints while draining,
//! and refusing to start with an invalid config.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Polls the child until it exits or `within` passes; panics with the
/// proxy's logs on timeout.
async fn wait_exit(p: &mut ProxyProcess, within: Duration) -> ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < end,
            "proxy still running {within:?} later; logs:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True while the process has not exited.
fn running(p: &mut ProxyProcess) -> bool {
    p.child.try_wait().expect("try_wait").is_none()
}

/// True when a TCP connect to `addr` fails (the listener is closed).
async fn connect_refused(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

/// Starts GET `path` through the inbound listener in a task and waits until
/// the upstream has received it.
async fn start_slow_request(
    proxy: &ProxyProcess,
    up: &Upstream,
    path: &str,
) -> tokio::task::JoinHandle<Result<Reply, String>> {
    let before = up.hits();
    let (c, addr, path) = (http1_client(), proxy.inbound, path.to_string());
    let task = tokio::spawn(async move { get_via(&c, addr, "app", &path).await });
    wait_until(
        "upstream received the slow request",
        Duration::from_secs(5),
        || async { up.hits() > before },
    )
    .await;
    task
}

#[tokio::test]
async fn sigterm_serves_through_the_grace_then_drains_and_exits_0() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let mut proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--shutdown-grace")
        .arg("700ms")
        .start()
        .await;
    // The listener accepts before the drain.
    assert!(!connect_refused(proxy.inbound).await);
    let admin = proxy.admin;

    let slow = start_slow_request(&proxy, &up, "/delay/2000").await;
    let t0 = Instant::now();
    proxy.terminate();

    // First the grace: /ready is 503 at once (callers' snapshots lose this
    // instance), while new connections are still accepted and served.
    wait_until(
        "/ready is 503 after SIGTERM",
        Duration::from_secs(1),
        || async { get_status(&format!("http://{admin}/ready")).await == Some(503) },
    )
    .await;
    let r = get_via(&http1_client(), proxy.inbound, "app", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "served during the grace");
    assert!(
        t0.elapsed() < Duration::from_millis(700),
        "checked within the grace"
    );

    // Then the inbound listener closes, while the slow request is still in
    // flight and the process is alive.
    let inbound = proxy.inbound;
    wait_until(
        "inbound listener refuses connections after the grace",
        Duration::from_secs(2),
        || connect_refused(inbound),
    )
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(650),
        "not before the grace"
    );
    assert!(
        !slow.is_finished(),
        "the slow request ended before the listener was seen closed"
    );
    assert!(
        running(&mut proxy),
        "the proxy exited before the in-flight request finished"
    );

    // The in-flight request completes normally; the outbound listener (the
    // app's way out) closes after that, and the process exits.
    let r = slow
        .await
        .unwrap()
        .expect("in-flight request survives the drain");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "app waited 2000ms\n");

    let status = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
    assert!(connect_refused(proxy.outbound).await);
}

#[tokio::test]
async fn the_outbound_listener_stays_open_while_the_app_still_uses_it() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let dir = TempDir::new("lifecycle-out");
    let cfg = dir.write("mesh.yaml", &service_yaml("app", 80, "http", &[up.addr]));
    let mut proxy = ProxyBuilder::new()
        .config(&cfg)
        .arg("--shutdown-grace")
        .arg("0s")
        .arg("--drain-timeout")
        .arg("10s")
        .start()
        .await;
    // The app holds a keep-alive connection to its outbound listener.
    let client = http1_client();
    let r = get_via(&client, proxy.outbound, "app", "/").await.unwrap();
    assert_eq!(r.status, 200);
    proxy.terminate();
    let inbound = proxy.inbound;
    wait_until("inbound closed", Duration::from_secs(2), || {
        connect_refused(inbound)
    })
    .await;
    // The app (still running) can still call out, on its connection and on
    // new ones.
    let r = get_via(&client, proxy.outbound, "app", "/").await.unwrap();
    assert_eq!(
        r.status, 200,
        "the app's calls out still work while it finishes"
    );
    let r = get_via(&http1_client(), proxy.outbound, "app", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(running(&mut proxy));
    // The app goes: its connections close, and the proxy follows.
    drop(client);
    let status = wait_exit(&mut proxy, Duration::from_secs(8)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
}

#[tokio::test]
async fn drain_timeout_cuts_a_long_request_short_and_exits_0() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let mut proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--shutdown-grace")
        .arg("0s")
        .arg("--drain-timeout")
        .arg("300ms")
        .start()
        .await;
    let slow = start_slow_request(&proxy, &up, "/delay/5000").await;

    let t0 = Instant::now();
    proxy.terminate();
    let status = wait_exit(&mut proxy, Duration::from_secs(3)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
    assert!(
        took < Duration::from_millis(2500),
        "exit took {took:?}, the drain timeout is 300ms"
    );
    // The request was cut off, not answered by the upstream.
    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the cut-off request ends once the proxy is gone")
        .unwrap();
    assert!(
        r.is_err(),
        "got a reply from a request that was cut off: {:?}",
        r.map(|r| r.status)
    );
}

#[tokio::test]
async fn ready_turns_503_while_draining_and_admin_endpoints_answer() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let dir = TempDir::new("lifecycle-admin");
    let cfg = dir.write("mesh.yaml", &service_yaml("app", 80, "http", &[up.addr]));
    let mut proxy = ProxyBuilder::new()
        .config(&cfg)
        .app(up.addr)
        .arg("--shutdown-grace")
        .arg("0s")
        .start()
        .await;
    let admin = proxy.admin;

    assert_eq!(
        get_status(&format!("http://{admin}/ready")).await,
        Some(200)
    );
    assert_eq!(get_status(&format!("http://{admin}/live")).await, Some(200));

    // /config is JSON with the running version.
    let body = get_text(&format!("http://{admin}/config")).await;
    let doc: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/config is not JSON ({e}): {body}"));
    let version = doc["version"]
        .as_str()
        .unwrap_or_else(|| panic!("/config has no string version: {body}"))
        .to_string();
    assert!(!version.is_empty(), "{body}");

    // /metrics reports that version as remora_config_info.
    let m = proxy.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "remora_config_info",
            &[&format!("version=\"{version}\"")]
        ),
        1.0,
        "{m}"
    );

    let slow = start_slow_request(&proxy, &up, "/delay/2000").await;
    proxy.terminate();
    wait_until(
        "/ready is 503 while draining",
        Duration::from_secs(1),
        || async { get_status(&format!("http://{admin}/ready")).await == Some(503) },
    )
    .await;
    assert!(
        running(&mut proxy),
        "the proxy exited before /ready was seen at 503"
    );
    assert!(!slow.is_finished());
    // Still live while draining: only readiness goes down.
    assert_eq!(get_status(&format!("http://{admin}/live")).await, Some(200));

    let r = slow
        .await
        .unwrap()
        .expect("in-flight request survives the drain");
    assert_eq!(r.status, 200);
    let status = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
}

#[tokio::test]
async fn post_shutdown_on_admin_drains_like_sigterm_and_exits_0() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let mut proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--shutdown-grace")
        .arg("0s")
        .start()
        .await;
    let slow = start_slow_request(&proxy, &up, "/delay/1500").await;

    let req = Request::post(format!("http://{}/shutdown", proxy.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(&http1_client(), req).await.expect("POST /shutdown");
    assert_eq!(r.status, 200);

    let inbound = proxy.inbound;
    wait_until(
        "inbound listener refuses connections after /shutdown",
        Duration::from_secs(1),
        || connect_refused(inbound),
    )
    .await;
    assert!(!slow.is_finished());
    assert!(
        running(&mut proxy),
        "the proxy exited before the in-flight request finished"
    );
    assert_eq!(
        get_status(&format!("http://{}/ready", proxy.admin)).await,
        Some(503)
    );

    let r = slow
        .await
        .unwrap()
        .expect("in-flight request survives the drain");
    assert_eq!(r.status, 200);
    let status = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
}

#[tokio::test]
async fn invalid_config_at_start_exits_nonzero_naming_resource_and_field() {
    let dir = TempDir::new("lifecycle-bad");
    let yaml = format!(
        "{}---\n{}",
        service_yaml("shop", 80, "http", &["127.0.0.1:9".parse().unwrap()]),
        r#"
kind: HTTPRoute
metadata: {name: checkout}
spec:
  parentRefs: [{name: shop}]
  rules:
  - backendRefs: [{name: shop, weight: 2000000}]
"#
    );
    let cfg = dir.write("mesh.yaml", &yaml);
    let mut proxy = ProxyBuilder::new().config(&cfg).spawn();

    let status = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert!(!status.success(), "exited with {status}");
    assert!(status.code().is_some(), "killed by a signal: {status}");

    let field = "rules[0].backendRefs[0].weight";
    let logs = proxy.logs_with(&[field]).await;
    assert!(
        logs.contains(field),
        "stderr does not name the field:\n{logs}"
    );
    assert!(
        logs.contains("HTTPRoute default/checkout"),
        "stderr does not name the resource:\n{logs}"
    );
    // Nothing was left listening.
    assert!(connect_refused(proxy.admin).await);
}
