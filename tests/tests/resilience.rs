//! Retries, retry budgets, timeouts and outlier detection through the real
//! proxy binary.

use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Config: Service `svc` with these endpoints and one HTTPRoute rule with
/// `rule_extra` (YAML lines indented for a rule).
fn config(endpoints: &[SocketAddr], rule_extra: &str) -> String {
    format!(
        "{}---\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: svc}}]\n  rules:\n  - backendRefs: [{{name: svc}}]\n{rule_extra}",
        service_yaml("svc", 80, "http", endpoints)
    )
}

async fn start(dir: &TempDir, yaml: &str, extra: &[&str]) -> ProxyProcess {
    let cfg = dir.write("mesh.yaml", yaml);
    let mut b = ProxyBuilder::new().config(&cfg);
    for a in extra {
        b = b.arg(a);
    }
    b.start().await
}

#[tokio::test]
async fn retries_503_until_success() {
    let up = Upstream::start("flaky", Behavior::Demo).await;
    let dir = TempDir::new("retry503");
    let proxy = start(
        &dir,
        &config(
            &[up.addr],
            "    retry: {codes: [503], attempts: 3, backoff: 10ms}\n",
        ),
        &[],
    )
    .await;
    let c = http1_client();
    up.fail_next(2, 503);
    let r = get_via(&c, proxy.outbound, "svc", "/").await.unwrap();
    assert_eq!(r.status, 200, "two 503s then success: the client sees 200");
    assert_eq!(up.hits(), 3);
    assert_eq!(
        proxy
            .metric("remora_retries_total", &["result=\"attempted\""])
            .await,
        2.0
    );

    // More failures than attempts: the last answer goes back.
    up.fail_next(10, 503);
    let r = get_via(&c, proxy.outbound, "svc", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 3 + 4, "first try plus three retries");
}

#[tokio::test]
async fn no_retry_without_policy_and_not_for_post() {
    let up = Upstream::start("flaky", Behavior::Demo).await;
    let dir = TempDir::new("noretry");
    let proxy = start(
        &dir,
        &config(
            &[up.addr],
            "    retry: {codes: [503], attempts: 3, backoff: 10ms}\n",
        ),
        &[],
    )
    .await;
    up.fail_next(1, 503);
    let req = http::Request::post(format!("http://{}/orders", proxy.outbound))
        .header("host", "svc")
        .body(http_body_util::Full::new(bytes::Bytes::from("x")))
        .unwrap();
    let r = send(&http1_client(), req).await.unwrap();
    assert_eq!(r.status, 503, "POST is not idempotent: not retried");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn retries_connection_refused_on_another_endpoint() {
    let live = Upstream::start("live", Behavior::Demo).await;
    let dead = free_addr(); // nothing listens here
    let dir = TempDir::new("refused");
    // Ejection of 0s keeps the dead endpoint in rotation, and the live one
    // answers slowly (its latency estimate rises, the dead one's does not),
    // so P2C keeps choosing the dead endpoint first: only the retry, which
    // avoids the endpoint that just failed, saves each request.
    let proxy = start(
        &dir,
        &config(
            &[dead, live.addr],
            "    retry: {attempts: 1, backoff: 1ms}\n",
        ),
        &["--outlier-ejection", "0s"],
    )
    .await;
    let c = http1_client();
    for _ in 0..40 {
        let r = get_via(&c, proxy.outbound, "svc", "/delay/20")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let retried = proxy
        .metric("remora_retries_total", &["result=\"attempted\""])
        .await;
    assert!(
        retried >= 30.0,
        "requests hit the dead endpoint and were retried: {retried}"
    );
    assert_eq!(live.hits(), 40);
}

#[tokio::test]
async fn connection_refused_without_retry_is_502() {
    let dir = TempDir::new("refused502");
    let proxy = start(&dir, &service_yaml("svc", 80, "http", &[free_addr()]), &[]).await;
    let r = get_via(&http1_client(), proxy.outbound, "svc", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-remora-error"), Some("connect"));
}

/// Sends `n` GETs, four at a time; returns how many got each status.
async fn load(proxy: &ProxyProcess, n: usize) -> Vec<u16> {
    let c = http1_client();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (c, o) = (c.clone(), proxy.outbound);
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            for _ in (w..n).step_by(4) {
                v.push(
                    get_via(&c, o, "svc", "/")
                        .await
                        .map(|r| r.status)
                        .unwrap_or(0),
                );
            }
            v
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test]
async fn budget_stops_a_retry_storm() {
    let down = Upstream::start("down", Behavior::Status(503)).await;
    let dir = TempDir::new("budget");
    // 20% of requests, floor 1/s over 10 s = 10 retries.
    let proxy = start(
        &dir,
        &config(
            &[down.addr],
            "    retry: {codes: [503], attempts: 3, backoff: 1ms, budget: {percent: 20, minRetriesPerSecond: 1, interval: 10s}}\n",
        ),
        // Keep the endpoint in rotation: this test is about the budget.
        &["--outlier-consecutive-failures", "1000000"],
    )
    .await;
    let n = 300;
    let statuses = load(&proxy, n).await;
    assert!(statuses.iter().all(|&s| s == 503));
    let hits = down.hits();
    // Without a budget: 300 * 4 = 1200 hits. With it: 300 + 20% = 360.
    assert!(hits >= n + 50, "retries happen within the budget: {hits}");
    assert!(hits <= n + 65, "retries capped at 20% of requests: {hits}");
    let exhausted = proxy
        .metric("remora_retries_total", &["result=\"budget_exhausted\""])
        .await;
    assert!(exhausted > 0.0);
}

#[tokio::test]
async fn every_retrying_route_gets_a_default_budget() {
    let down = Upstream::start("down", Behavior::Status(503)).await;
    let dir = TempDir::new("defaultbudget");
    let proxy = start(
        &dir,
        &config(
            &[down.addr],
            "    retry: {codes: [503], attempts: 5, backoff: 1ms}\n",
        ),
        &[
            "--outlier-consecutive-failures",
            "1000000",
            "--retry-budget-min-per-second",
            "2",
        ],
    )
    .await;
    let n = 200;
    load(&proxy, n).await;
    // Default 20% (40) with a floor of 2/s * 10 s (20): at most 40 retries,
    // where 5 attempts each would have been 1000.
    let hits = down.hits();
    assert!((n + 30..=n + 45).contains(&hits), "hits {hits}");
}

#[tokio::test]
async fn per_try_timeout_gives_504() {
    let up = Upstream::start("slow", Behavior::Demo).await;
    let dir = TempDir::new("pertry");
    let proxy = start(
        &dir,
        &config(&[up.addr], "    timeouts: {backendRequest: 100ms}\n"),
        &[],
    )
    .await;
    let t0 = Instant::now();
    let r = get_via(&http1_client(), proxy.outbound, "svc", "/delay/3000")
        .await
        .unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-remora-error"), Some("timeout"));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn per_try_timeout_is_retried_within_request_timeout() {
    let up = Upstream::start("slow", Behavior::Demo).await;
    let dir = TempDir::new("trytimeout");
    let proxy = start(
        &dir,
        &config(
            &[up.addr],
            "    timeouts: {request: 500ms, backendRequest: 100ms}\n    retry: {attempts: 10, backoff: 1ms}\n",
        ),
        &["--outlier-consecutive-failures", "1000000"],
    )
    .await;
    let t0 = Instant::now();
    let r = get_via(&http1_client(), proxy.outbound, "svc", "/delay/3000")
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(
        up.hits() >= 3,
        "tries timed out one by one and were retried: {}",
        up.hits()
    );
}

#[tokio::test]
async fn request_timeout_gives_504() {
    let up = Upstream::start("slow", Behavior::Demo).await;
    let dir = TempDir::new("reqtimeout");
    let proxy = start(
        &dir,
        &config(&[up.addr], "    timeouts: {request: 200ms}\n"),
        &[],
    )
    .await;
    let c = http1_client();
    let t0 = Instant::now();
    let r = get_via(&c, proxy.outbound, "svc", "/delay/3000")
        .await
        .unwrap();
    assert_eq!(r.status, 504);
    assert!(t0.elapsed() < Duration::from_millis(1500));
    // A fast request on the same route is fine.
    assert_eq!(
        get_via(&c, proxy.outbound, "svc", "/delay/10")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn outlier_detection_ejects_and_probes_back() {
    let good = Upstream::start("good", Behavior::Demo).await;
    let bad = Upstream::start("bad", Behavior::Demo).await;
    bad.fail_with(Some(503));
    let dir = TempDir::new("outlier");
    let proxy = start(
        &dir,
        &service_yaml("svc", 80, "http", &[good.addr, bad.addr]),
        &[
            "--outlier-consecutive-failures",
            "3",
            "--outlier-ejection",
            "300ms",
        ],
    )
    .await;
    let c = http1_client();
    let o = proxy.outbound;
    // Until the bad endpoint is ejected, some requests fail.
    wait_until("ejection", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let _ = get_via(&c, o, "svc", "/").await;
            sum_metric(
                &get_text(&format!("http://{}/metrics", proxy.admin)).await,
                "remora_outlier_ejections_total",
                &[],
            ) >= 1.0
        }
    })
    .await;
    // While ejected, everything goes to the good endpoint.
    let before = bad.hits();
    for _ in 0..30 {
        assert_eq!(get_via(&c, o, "svc", "/").await.unwrap().status, 200);
    }
    assert!(bad.hits() - before <= 1, "at most one probe while ejected");
    // The bad one recovers; after the ejection period it is probed and
    // takes traffic again.
    bad.fail_with(None);
    let recovered = bad.hits();
    let bad = &bad;
    wait_until(
        "traffic back on the recovered endpoint",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            async move {
                let r = get_via(&c, o, "svc", "/").await.unwrap();
                assert_eq!(r.status, 200);
                bad.hits() >= recovered + 3
            }
        },
    )
    .await;
}

fn post(proxy: &ProxyProcess, body: Vec<u8>) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("http://{}/echo", proxy.outbound))
        .header("host", "svc")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn non_idempotent_retry_replays_the_body_when_the_route_allows_it() {
    let up = Upstream::start("flaky", Behavior::Demo).await;
    let dir = TempDir::new("postretry");
    let proxy = start(
        &dir,
        &config(
            &[up.addr],
            "    retry: {codes: [503], attempts: 2, backoff: 1ms, nonIdempotent: true}\n",
        ),
        &[],
    )
    .await;
    up.fail_next(1, 503);
    let body = vec![b'x'; 10_000];
    let r = send(&http1_client(), post(&proxy, body.clone()))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.len(),
        body.len(),
        "the retried POST carried the whole body"
    );
    assert_eq!(up.hits(), 2);
    assert!(up.seen().iter().all(|s| s.body.len() == body.len()));
}

#[tokio::test]
async fn bodies_larger_than_the_retry_buffer_are_not_retried() {
    let up = Upstream::start("flaky", Behavior::Demo).await;
    let dir = TempDir::new("bigbody");
    let proxy = start(
        &dir,
        &config(
            &[up.addr],
            "    retry: {codes: [503], attempts: 2, backoff: 1ms, nonIdempotent: true}\n",
        ),
        &["--retry-buffer-bytes", "1024"],
    )
    .await;
    up.fail_next(1, 503);
    let r = send(&http1_client(), post(&proxy, vec![b'y'; 4096]))
        .await
        .unwrap();
    assert_eq!(
        r.status, 503,
        "too big to buffer: sent once, its answer returned"
    );
    assert_eq!(up.hits(), 1);
    // A small body on the same route is retried.
    up.fail_next(1, 503);
    let r = send(&http1_client(), post(&proxy, vec![b'y'; 512]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 3);
}
