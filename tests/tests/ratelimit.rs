//! Rate limiting through the real proxy binary: accuracy, keys, headers,
//! gRPC, dry-run, hot swap, and mesh-wide limits shared by replicas via the
//! real control plane.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use remora_tests::control::ControlProcess;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn policy(limits: &str, extra: &str) -> String {
    format!(
        "kind: RateLimitPolicy\nmetadata: {{name: api-limits}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n{extra}  limits:\n{limits}"
    )
}

/// A proxy fronting `app` as Service `api`, with `policy_yaml`.
async fn fronting(app: &Upstream, dir: &TempDir, policy_yaml: &str) -> ProxyProcess {
    let cfg = dir.write(
        "mesh.yaml",
        &format!(
            "{}---\n{policy_yaml}",
            service_yaml("api", 80, "http", &[app.addr])
        ),
    );
    ProxyBuilder::new()
        .config(&cfg)
        .app(app.addr)
        .arg("--service")
        .arg("api")
        .start()
        .await
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    limited: AtomicUsize,
    other: AtomicUsize,
}

/// Sends `rate` requests a second to `addr` for `secs`, each on its own
/// task so a slow answer never slows the pace.
async fn paced(
    addr: SocketAddr,
    rate: u32,
    secs: f64,
    header: Option<(&'static str, &'static str)>,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let c = http1_client();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let n = (rate as f64 * secs) as usize;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let (c, t) = (c.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut req = Request::get(format!("http://{addr}/")).header("host", "api");
            if let Some((k, v)) = header {
                req = req.header(k, v);
            }
            match send(&c, req.body(Full::new(Bytes::new())).unwrap())
                .await
                .map(|r| r.status)
            {
                Ok(200) => t.ok.fetch_add(1, Ordering::Relaxed),
                Ok(429) => t.limited.fetch_add(1, Ordering::Relaxed),
                _ => t.other.fetch_add(1, Ordering::Relaxed),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally
}

#[tokio::test]
async fn twice_the_limit_for_10s_admits_the_limit_within_2_percent() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-accuracy");
    let proxy = fronting(
        &app,
        &dir,
        &policy("  - {name: total, requests: 50, burst: 10}\n", ""),
    )
    .await;
    let t0 = Instant::now();
    let tally = paced(proxy.inbound, 100, 10.0, None).await;
    let secs = t0.elapsed().as_secs_f64();
    let ok = tally.ok.load(Ordering::Relaxed) as f64;
    let expected = 50.0 * secs + 10.0;
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
    let err = (ok - expected).abs() / (50.0 * secs);
    assert!(
        err <= 0.02,
        "admitted {ok} in {secs:.2}s, expected {expected:.0} (limit plus burst): {:.2}% off",
        err * 100.0
    );
    assert_eq!(
        app.hits() as f64,
        ok,
        "limited requests never reach the app"
    );
    let allowed = proxy
        .metric("remora_ratelimit_decisions_total", &["result=\"allowed\""])
        .await;
    let limited = proxy
        .metric("remora_ratelimit_decisions_total", &["result=\"limited\""])
        .await;
    assert_eq!(allowed, ok);
    assert_eq!(limited, tally.limited.load(Ordering::Relaxed) as f64);
}

#[tokio::test]
async fn limited_responses_carry_retry_after_and_ratelimit_headers() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-headers");
    let proxy = fronting(
        &app,
        &dir,
        &policy("  - {name: per-minute, requests: 3, per: minute}\n", ""),
    )
    .await;
    let c = http1_client();
    let first = get_via(&c, proxy.inbound, "api", "/").await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"per-minute\";q=3;w=60")
    );
    assert_eq!(first.header("ratelimit"), Some("\"per-minute\";r=2;t=20"));
    for _ in 0..2 {
        assert_eq!(
            get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
            200
        );
    }
    let r = get_via(&c, proxy.inbound, "api", "/").await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-remora-error"), Some("rate-limited"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one request per 20 s: retry after {retry}"
    );
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-minute\";r=0;t="));

    // gRPC callers get RESOURCE_EXHAUSTED, as a trailers-only answer.
    let req = Request::post(format!("http://{}/pkg.Svc/Method", proxy.inbound))
        .header("host", "api")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let g = send(&c, req).await.unwrap();
    assert_eq!(g.status, 200);
    assert_eq!(g.header("grpc-status"), Some("8"));
}

#[tokio::test]
async fn a_noisy_client_is_limited_while_a_quiet_one_is_not() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-keys");
    let limits = "  - name: per-user\n    requests: 5\n    burst: 5\n    key: [{type: Header, name: x-user}]\n    overrides: [{value: vip, requests: 50, burst: 50}]\n";
    let proxy = fronting(&app, &dir, &policy(limits, "  responseHeaders: false\n")).await;
    let c = http1_client();
    let status = |user: &'static str| {
        let c = c.clone();
        let addr = proxy.inbound;
        async move {
            let req = Request::get(format!("http://{addr}/"))
                .header("host", "api")
                .header("x-user", user);
            let r = send(&c, req.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            assert!(r.header("ratelimit").is_none(), "headers turned off");
            r.status
        }
    };
    let mut noisy_ok = 0;
    for _ in 0..40 {
        if status("noisy").await == 200 {
            noisy_ok += 1;
        }
    }
    assert!(noisy_ok <= 7, "noisy got {noisy_ok} of 40");
    for _ in 0..4 {
        assert_eq!(
            status("quiet").await,
            200,
            "the quiet client is not limited"
        );
    }
    let mut vip_ok = 0;
    for _ in 0..40 {
        if status("vip").await == 200 {
            vip_ok += 1;
        }
    }
    assert_eq!(vip_ok, 40, "the override gives vip 10x");
}

#[tokio::test]
async fn dry_run_counts_and_logs_but_does_not_enforce() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-dry");
    let proxy = fronting(
        &app,
        &dir,
        &policy(
            "  - {name: tiny, requests: 1, per: minute}\n",
            "  dryRun: true\n",
        ),
    )
    .await;
    let c = http1_client();
    for _ in 0..10 {
        assert_eq!(
            get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
            200
        );
    }
    let would = proxy
        .metric(
            "remora_ratelimit_decisions_total",
            &["result=\"dry_run_limited\""],
        )
        .await;
    assert_eq!(would, 9.0);
    let logs = proxy.logs_with(&["dry run: would limit"]).await;
    assert!(logs.contains("dry run: would limit"), "{logs}");
}

#[tokio::test]
async fn hot_swap_keeps_buckets_and_a_changed_rate_takes_effect() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-swap");
    let proxy = fronting(
        &app,
        &dir,
        &policy("  - {name: m, requests: 3, per: minute}\n", ""),
    )
    .await;
    let c = http1_client();
    for _ in 0..3 {
        assert_eq!(
            get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
            200
        );
    }
    assert_eq!(
        get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
        429
    );

    // An unrelated change: the bucket stays empty.
    let v = proxy.config_version().await;
    let other = format!("{}---\n", service_yaml("other", 80, "http", &[app.addr]));
    let p1 = format!(
        "{other}{}",
        policy("  - {name: m, requests: 3, per: minute}\n", "")
    );
    dir.write(
        "mesh.yaml",
        &format!("{}---\n{p1}", service_yaml("api", 80, "http", &[app.addr])),
    );
    let (p, v1) = (&proxy, &v);
    wait_until("swap", Duration::from_secs(10), || async move {
        p.config_version().await != *v1
    })
    .await;
    assert_eq!(
        get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
        429,
        "bucket state survived the swap"
    );

    // A changed rate takes effect on the next request.
    let v = proxy.config_version().await;
    let p2 = format!(
        "{other}{}",
        policy("  - {name: m, requests: 100, per: minute}\n", "")
    );
    dir.write(
        "mesh.yaml",
        &format!("{}---\n{p2}", service_yaml("api", 80, "http", &[app.addr])),
    );
    let v2 = &v;
    wait_until("swap", Duration::from_secs(10), || async move {
        p.config_version().await != *v2
    })
    .await;
    assert_eq!(
        get_via(&c, proxy.inbound, "api", "/").await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn a_bad_policy_is_refused_with_the_field_path() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-bad");
    let proxy = fronting(&app, &dir, &policy("  - {name: ok, requests: 5}\n", "")).await;
    let v = proxy.config_version().await;
    dir.write(
        "mesh.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("api", 80, "http", &[app.addr]),
            policy("  - {name: zero, requests: 0}\n  - {name: k, requests: 5, key: [{type: Cookie}]}\n  - {name: b, requests: 5, burst: 0}\n", "")
        ),
    );
    let p = &proxy;
    wait_until("rejection", Duration::from_secs(10), || async move {
        p.metric("remora_config_reloads_total", &["result=\"rejected\""])
            .await
            >= 1.0
    })
    .await;
    let wants = [
        "RateLimitPolicy default/api-limits: limits[0].requests: must be at least 1",
        "RateLimitPolicy default/api-limits: limits[1].key[0].type",
        "RateLimitPolicy default/api-limits: limits[2].burst: must be at least 1",
    ];
    let logs = proxy.logs_with(&wants).await;
    for want in wants {
        assert!(logs.contains(want), "missing {want:?}");
    }
    assert_eq!(proxy.config_version().await, v);
}

#[tokio::test]
async fn mesh_wide_limit_is_shared_by_replicas_and_rebalanced_when_one_dies() {
    let (data, state) = (TempDir::new("rl-cp"), TempDir::new("rl-state"));
    let cp = ControlProcess::start(&data).await;
    // R = 60/s for the whole Service, whatever the number of replicas.
    cp.apply(&format!(
        "kind: Service\nmetadata: {{name: api}}\nspec:\n  ports: [{{port: 80}}]\n---\n{}",
        policy(
            "  - {name: total, requests: 60, burst: 6, scope: Mesh}\n",
            ""
        )
    ))
    .await
    .unwrap();
    let mut apps = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let app = Upstream::start(&format!("api-{i}"), Behavior::Demo).await;
        let p = ProxyBuilder::new()
            .app(app.addr)
            .arg("--control-plane")
            .arg(&cp.url())
            .arg("--node-id")
            .arg(&format!("api-{i}"))
            .arg("--service")
            .arg("api")
            .arg("--state-dir")
            .arg(&state.path().join(format!("api-{i}")).display().to_string())
            .start()
            .await;
        apps.push(app);
        replicas.push(p);
    }
    // Every replica knows there are three.
    for p in &replicas {
        wait_until(
            "three replicas in the snapshot",
            Duration::from_secs(10),
            || async move {
                get_text(&format!("http://{}/config", p.admin))
                    .await
                    .matches("\"address\"")
                    .count()
                    == 3
            },
        )
        .await;
    }

    // 2R offered, spread over the replicas, for 20 s.
    let t0 = Instant::now();
    let loads: Vec<_> = replicas
        .iter()
        .map(|p| tokio::spawn(paced(p.inbound, 40, 20.0, None)))
        .collect();
    let mut ok = 0;
    for l in loads {
        ok += l.await.unwrap().ok.load(Ordering::Relaxed);
    }
    let secs = t0.elapsed().as_secs_f64();
    let expected = 60.0 * secs;
    let err = (ok as f64 - expected).abs() / expected;
    assert!(
        err <= 0.10,
        "admitted {ok} in {secs:.1}s, expected ~{expected:.0}: {:.1}% off",
        err * 100.0
    );

    // One replica dies: the other two take over its share.
    let gone = replicas.pop().unwrap();
    gone.terminate();
    for p in &replicas {
        wait_until(
            "two replicas in the snapshot",
            Duration::from_secs(10),
            || async move {
                get_text(&format!("http://{}/config", p.admin))
                    .await
                    .matches("\"address\"")
                    .count()
                    == 2
            },
        )
        .await;
    }
    let t1 = Instant::now();
    let loads: Vec<_> = replicas
        .iter()
        .map(|p| tokio::spawn(paced(p.inbound, 60, 5.0, None)))
        .collect();
    let mut ok = 0;
    for l in loads {
        ok += l.await.unwrap().ok.load(Ordering::Relaxed);
    }
    let secs = t1.elapsed().as_secs_f64();
    let expected = 60.0 * secs;
    let err = (ok as f64 - expected).abs() / expected;
    assert!(
        err <= 0.15,
        "two replicas admitted {ok} in {secs:.1}s, expected ~{expected:.0}"
    );
}

#[tokio::test]
async fn route_and_outbound_policies_are_enforced_on_the_callers_proxy() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-outbound");
    // An HTTPRoute policy for /slow, and an outbound policy on the Service.
    let cfg = dir.write(
        "mesh.yaml",
        &format!(
            "{}---\n\
             kind: HTTPRoute\nmetadata: {{name: api}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  \
             - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]\n  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n---\n\
             kind: RateLimitPolicy\nmetadata: {{name: route}}\nspec:\n  targetRef: {{kind: HTTPRoute, name: api}}\n  \
             limits: [{{name: route-total, requests: 2, per: minute}}]\n---\n\
             kind: RateLimitPolicy\nmetadata: {{name: calls}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n  direction: outbound\n  \
             limits: [{{name: per-caller, requests: 4, per: minute, key: [{{type: SourceAddress}}]}}]\n",
            service_yaml("api", 80, "http", &[app.addr])
        ),
    );
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let c = http1_client();
    let o = proxy.outbound;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get_via(&c, o, "api", "/slow").await.unwrap().status);
    }
    // The route allows 2 a minute; the outbound Service limit 4.
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    // The inbound side knows nothing of outbound policies.
    let direct = get_via(&c, proxy.inbound, "api", "/").await.unwrap();
    assert_ne!(direct.status, 429);
    let m = proxy.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "remora_ratelimit_decisions_total",
            &["policy=\"default/route\"", "result=\"limited\""]
        ),
        3.0
    );
    // The outbound Service policy saw every call too: 4 allowed, the 5th over.
    assert_eq!(
        sum_metric(
            &m,
            "remora_ratelimit_decisions_total",
            &["policy=\"default/calls\"", "result=\"allowed\""]
        ),
        4.0
    );
    assert_eq!(
        sum_metric(
            &m,
            "remora_ratelimit_decisions_total",
            &["policy=\"default/calls\"", "result=\"limited\""]
        ),
        1.0
    );
}
