//! The app's kubelet probes, answered by the real proxy's admin server:
//! REMORA_APP_PROBES (here its flag, --app-probes) lists the paths
//! `remoractl inject` pointed the probes at, and the proxy probes real apps
//! on loopback (POD_IP=127.0.0.1, as the kubelet would reach the pod) and
//! answers with their status: 2xx/3xx pass, the app's failure code or 503
//! fail, an unlisted path is 404, a hanging app is a 503 within the
//! probe's timeout. Also: inject's REMORA_APP_PROBES is what the proxy
//! reads, and a bad value stops the proxy at start.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The proxies of this test binary find the app at the pod's IP, which is
/// loopback here. Set once, before any proxy starts, the same for all.
fn pod_ip_is_loopback() {
    static SET: Once = Once::new();
    SET.call_once(|| std::env::set_var("POD_IP", "127.0.0.1"));
}

/// GET `path` on the admin port as the kubelet does it.
async fn kubelet_get(admin: SocketAddr, path: &str) -> Reply {
    let req = Request::get(format!("http://{admin}{path}"))
        .header("user-agent", "kube-probe/1.33")
        .header("accept", "*/*")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&http1_client(), req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A port where nothing listens (bound, then closed).
fn closed_port() -> u16 {
    free_addr().port()
}

#[tokio::test]
async fn listed_probes_answer_with_the_apps_status() {
    pod_ip_is_loopback();
    let ready = Upstream::start("ready", Behavior::Status(200)).await;
    let failing = Upstream::start("failing", Behavior::Status(500)).await;
    let demo = Upstream::start("demo", Behavior::Demo).await;
    let tcp_app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp_app.local_addr().unwrap().port();
    let gone = closed_port();
    let probes = format!(
        r#"{{
  "/app-health/app/readyz": {{"httpGet":{{"port":{ready},"path":"/ready?full=1","scheme":"HTTP","headers":[{{"name":"X-Probe","value":"kubelet"}}]}},"timeoutSeconds":5}},
  "/app-health/app/livez": {{"httpGet":{{"port":{failing},"path":"/live"}}}},
  "/app-health/app/startupz": {{"tcpSocket":{{"port":{tcp_port}}},"timeoutSeconds":2}},
  "/app-health/moved/readyz": {{"httpGet":{{"port":{demo},"path":"/status/302"}}}},
  "/app-health/gone/livez": {{"tcpSocket":{{"port":{gone}}}}},
  "/app-health/gone/readyz": {{"httpGet":{{"port":{gone},"path":"/"}}}}
}}"#,
        ready = ready.addr.port(),
        failing = failing.addr.port(),
        demo = demo.addr.port(),
    );
    let proxy = ProxyBuilder::new()
        .arg("--app-probes")
        .arg(&probes)
        .start()
        .await;

    for (path, status) in [
        ("/app-health/app/readyz", 200),
        ("/app-health/app/livez", 500),
        ("/app-health/app/startupz", 200),
        ("/app-health/moved/readyz", 302),
        ("/app-health/gone/livez", 503),
        ("/app-health/gone/readyz", 503),
    ] {
        let r = kubelet_get(proxy.admin, path).await;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(r.body, "", "{path}: the answer has no body");
        // A redirect passes as it is: the kubelet is not sent elsewhere.
        assert_eq!(r.header("location"), None, "{path}");
    }

    // The app saw the probe the kubelet would have sent.
    let seen = ready.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/ready");
    let h = &seen[0].headers;
    assert_eq!(h["x-probe"], "kubelet");
    assert_eq!(h["user-agent"], "kube-probe/1.33");
    assert_eq!(
        h["host"],
        format!("127.0.0.1:{}", ready.addr.port()).as_str()
    );
    assert_eq!(failing.hits(), 1);

    // Only the listed paths, and only GET.
    for path in [
        "/app-health/app/other",
        "/app-health/app/readyz/",
        "/app-health/",
        "/app-health/other/readyz",
    ] {
        assert_eq!(kubelet_get(proxy.admin, path).await.status, 404, "{path}");
    }
    let post = Request::post(format!("http://{}/app-health/app/readyz", proxy.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&http1_client(), post).await.unwrap().status, 404);
    assert_eq!(ready.hits(), 1, "an unlisted path reached the app");
    // The sidecar's own endpoints are still there.
    assert_eq!(kubelet_get(proxy.admin, "/ready").await.status, 200);

    let metrics = proxy.metrics().await;
    for (probe, result) in [
        ("/app-health/app/readyz", "pass"),
        ("/app-health/app/livez", "fail"),
        ("/app-health/app/startupz", "pass"),
        ("/app-health/moved/readyz", "pass"),
        ("/app-health/gone/livez", "error"),
        ("/app-health/gone/readyz", "error"),
    ] {
        let probe_label = format!("probe=\"{probe}\"");
        let result_label = format!("result=\"{result}\"");
        assert_eq!(
            sum_metric(
                &metrics,
                "remora_app_probes_total",
                &[&probe_label, &result_label]
            ),
            1.0,
            "{probe} {result}:\n{metrics}"
        );
    }
    drop(tcp_app);
}

#[tokio::test]
async fn a_hanging_app_fails_the_probe_within_its_timeout() {
    pod_ip_is_loopback();
    // The kernel accepts the connection; the app never reads or answers.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hanging.local_addr().unwrap().port();
    let probes = format!(
        r#"{{"/app-health/app/readyz": {{"httpGet":{{"port":{port},"path":"/ready"}},"timeoutSeconds":1}}}}"#
    );
    let proxy = ProxyBuilder::new()
        .arg("--app-probes")
        .arg(&probes)
        .start()
        .await;

    // Several at once: each gets its own answer on time.
    let started = Instant::now();
    let probes: Vec<_> = (0..3)
        .map(|_| {
            let admin = proxy.admin;
            tokio::spawn(async move { kubelet_get(admin, "/app-health/app/readyz").await })
        })
        .collect();
    for p in probes {
        assert_eq!(p.await.unwrap().status, 503);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "answered before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "answered late: {took:?}");
    assert_eq!(
        proxy
            .metric(
                "remora_app_probes_total",
                &["probe=\"/app-health/app/readyz\"", "result=\"timeout\""]
            )
            .await,
        3.0
    );
    // The admin server still answers at once.
    assert_eq!(kubelet_get(proxy.admin, "/live").await.status, 200);
    drop(hanging);
}

#[tokio::test]
async fn without_app_probes_every_app_health_path_is_404() {
    let proxy = ProxyBuilder::new().start().await;
    for path in ["/app-health/app/readyz", "/app-health/x/livez"] {
        assert_eq!(kubelet_get(proxy.admin, path).await.status, 404, "{path}");
    }
}

#[tokio::test]
async fn a_bad_app_probes_value_stops_the_proxy_at_start() {
    for (json, says) in [
        ("{not json", "not valid JSON"),
        (
            r#"{"/ready": {"tcpSocket": {"port": 8080}}}"#,
            "must start with /app-health/",
        ),
        (
            r#"{"/app-health/app/readyz": {"httpGet": {"port": 8080, "scheme": "HTTPS"}}}"#,
            "is not \"HTTP\"",
        ),
    ] {
        let mut p = ProxyBuilder::new().arg("--app-probes").arg(json).spawn();
        let end = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "{json}: still running:\n{}", p.logs());
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(status.code(), Some(2), "{json}");
        let logs = p.logs_with(&["REMORA_APP_PROBES", says]).await;
        assert!(
            logs.contains("--app-probes (REMORA_APP_PROBES): ") && logs.contains(says),
            "{json}:\n{logs}"
        );
    }
}

/// The value of env var `name` in inject's output, a `|-` block.
fn block_env(yaml: &str, name: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no {name} in:\n{yaml}"));
    assert_eq!(lines[at + 1].trim(), "value: |-", "{yaml}");
    let body = &lines[at + 2..];
    let indent = body[0].len() - body[0].trim_start().len();
    body.iter()
        .take_while(|l| l.len() > indent && l[..indent].trim().is_empty())
        .map(|l| &l[indent..])
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `remoractl inject` writes into REMORA_APP_PROBES is what the proxy
/// reads: a Pod probed on a named port and by TCP, injected, then its
/// sidecar's probes run against the real app.
#[tokio::test]
async fn injects_app_probes_drive_the_proxy() {
    pod_ip_is_loopback();
    let app = Upstream::start("app", Behavior::Status(204)).await;
    let port = app.addr.port();
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web}}\nspec:\n  containers:\n  - name: app\n    image: web:1\n    ports: [{{name: http, containerPort: {port}}}]\n    readinessProbe:\n      httpGet: {{path: /ready, port: http, httpHeaders: [{{name: X-Probe, value: kubelet}}]}}\n      timeoutSeconds: 2\n    livenessProbe:\n      tcpSocket: {{port: {port}}}\n"
    );
    let mut child = Command::new(binary("remoractl"))
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remoractl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pod.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    let probes = block_env(&yaml, "REMORA_APP_PROBES");

    let proxy = ProxyBuilder::new()
        .arg("--app-probes")
        .arg(&probes)
        .start()
        .await;
    assert_eq!(
        kubelet_get(proxy.admin, "/app-health/app/readyz")
            .await
            .status,
        204
    );
    assert_eq!(app.seen()[0].path, "/ready");
    assert_eq!(app.seen()[0].headers["x-probe"], "kubelet");
    assert_eq!(
        kubelet_get(proxy.admin, "/app-health/app/livez")
            .await
            .status,
        200
    );
    assert_eq!(
        kubelet_get(proxy.admin, "/app-health/app/startupz")
            .await
            .status,
        404,
        "the pod has no startup probe"
    );
}
