//! The control plane end to end: the real remora-control binary, real
//! proxies subscribed to it, real upstreams.

use remora_proto::control::{HistoryRequest, RollbackRequest};
use remora_tests::control::ControlProcess;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Services blue and green, and `shop` routed to `backend`.
fn mesh(blue: &Upstream, green: &Upstream, backend: &str) -> String {
    format!(
        "{}---\n{}---\n{}---\nkind: HTTPRoute\nmetadata: {{name: shop}}\nspec:\n  parentRefs: [{{name: shop}}]\n  rules:\n  - backendRefs: [{{name: {backend}}}]\n",
        service_yaml("blue", 80, "http", &[blue.addr]),
        service_yaml("green", 80, "http", &[green.addr]),
        service_yaml("shop", 80, "http", &[blue.addr]),
    )
}

async fn blue_green() -> (Upstream, Upstream) {
    (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    )
}

async fn proxy(cp: &ControlProcess, node: &str, state: &TempDir, extra: &[&str]) -> ProxyProcess {
    let mut b = ProxyBuilder::new().control_plane(&cp.url(), node, state);
    for a in extra {
        b = b.arg(a);
    }
    b.start().await
}

async fn served_by(p: &ProxyProcess) -> String {
    match get_via(&http1_client(), p.outbound, "shop", "/").await {
        Ok(r) => r.header("x-served-by").unwrap_or("").to_string(),
        Err(e) => e,
    }
}

async fn all_serve(proxies: &[ProxyProcess], who: &str) {
    for p in proxies {
        wait_until(
            &format!("proxy serving {who}"),
            Duration::from_secs(10),
            || async move { served_by(p).await == who },
        )
        .await;
    }
}

async fn all_acked(cp: &ControlProcess, n: usize) -> String {
    wait_until(
        "every proxy ACKed the current snapshot",
        Duration::from_secs(10),
        || async move {
            let s = cp.status().await;
            s.proxies.len() == n
                && s.proxies.iter().all(|p| {
                    p.connected && p.acked_version == s.snapshot_version && p.nack_error.is_empty()
                })
        },
    )
    .await;
    cp.status().await.snapshot_version
}

#[tokio::test]
async fn apply_reaches_every_proxy_and_status_shows_their_acks() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    assert_eq!(cp.apply(&mesh(&blue, &green, "blue")).await.unwrap(), 1);
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(proxy(&cp, &format!("p{i}"), &state, &[]).await);
    }
    all_serve(&proxies, "blue").await;
    let v1 = all_acked(&cp, 3).await;
    assert!(v1.starts_with("1."), "{v1}");

    assert_eq!(cp.apply(&mesh(&blue, &green, "green")).await.unwrap(), 2);
    all_serve(&proxies, "green").await;
    let v2 = all_acked(&cp, 3).await;
    assert!(v2.starts_with("2."), "{v2}");
    for p in &proxies {
        assert_eq!(p.config_version().await, v2);
    }
}

#[tokio::test]
async fn invalid_apply_is_refused_with_the_field_path_and_changes_nothing() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let p = proxy(&cp, "p0", &state, &[]).await;
    let before = all_acked(&cp, 1).await;

    let bad =
        mesh(&blue, &green, "green").replace("{name: green}]", "{name: green, weight: 2000000}]");
    let err = cp.apply(&bad).await.unwrap_err();
    assert!(
        err.contains(
            "HTTPRoute default/shop: rules[0].backendRefs[0].weight: must be at most 1000000"
        ),
        "{err}"
    );
    let status = cp.status().await;
    assert_eq!(status.config_version, 1, "no new version");
    assert_eq!(status.snapshot_version, before);
    assert_eq!(served_by(&p).await, "blue");
}

#[tokio::test]
async fn a_proxy_that_cannot_apply_nacks_and_keeps_serving() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let strict = proxy(&cp, "strict", &state, &["--max-route-rules", "1"]).await;
    let normal = proxy(&cp, "normal", &state, &[]).await;
    all_acked(&cp, 2).await;

    // Two rules: fine for the control plane and the normal proxy, over the
    // strict proxy's limit.
    let two_rules = format!(
        "{}  - matches: [{{path: {{type: PathPrefix, value: /green}}}}]\n    backendRefs: [{{name: green}}]\n",
        mesh(&blue, &green, "blue")
    )
    .replace("  - backendRefs: [{name: blue}]\n  - matches", "  - matches");
    let two_rules = two_rules.replace("  rules:\n", "  rules:\n  - backendRefs: [{name: green}]\n    matches: [{path: {type: Exact, value: /x}}]\n");
    cp.apply(&two_rules).await.unwrap();
    wait_until(
        "the strict proxy's NACK and the normal proxy's ACK",
        Duration::from_secs(10),
        || async {
            let s = cp.status().await;
            s.proxies
                .iter()
                .any(|p| p.node_id == "strict" && !p.nack_error.is_empty())
                && s.proxies
                    .iter()
                    .any(|p| p.node_id == "normal" && p.acked_version == s.snapshot_version)
        },
    )
    .await;
    let status = cp.status().await;
    let s = status
        .proxies
        .iter()
        .find(|p| p.node_id == "strict")
        .unwrap();
    assert!(
        s.nack_error.contains("--max-route-rules"),
        "{}",
        s.nack_error
    );
    assert_eq!(s.nacked_version, status.snapshot_version);
    assert_ne!(s.acked_version, status.snapshot_version);
    let n = status
        .proxies
        .iter()
        .find(|p| p.node_id == "normal")
        .unwrap();
    assert_eq!(n.acked_version, status.snapshot_version);
    // The strict proxy still runs its previous config and serves.
    assert_eq!(strict.config_version().await, s.acked_version);
    let r = get_via(&http1_client(), strict.outbound, "shop", "/x")
        .await
        .unwrap();
    assert_eq!(r.header("x-served-by"), Some("blue"));
    let r = get_via(&http1_client(), normal.outbound, "shop", "/x")
        .await
        .unwrap();
    assert_eq!(r.header("x-served-by"), Some("green"));
}

#[tokio::test]
async fn control_plane_outage_drops_nothing_and_restart_keeps_versions_and_history() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let mut cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    cp.apply(&mesh(&blue, &green, "green")).await.unwrap();
    let proxies = vec![
        proxy(&cp, "a", &state, &[]).await,
        proxy(&cp, "b", &state, &[]).await,
    ];
    let version = all_acked(&cp, 2).await;
    let history = cp
        .admin()
        .await
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut load = Vec::new();
    for p in &proxies {
        let (stop, served, o) = (stop.clone(), served.clone(), p.outbound);
        load.push(tokio::spawn(async move {
            let c = http1_client();
            let mut bad = 0;
            while !stop.load(Ordering::Relaxed) {
                match get_via(&c, o, "shop", "/").await {
                    Ok(r) if r.status == 200 && r.header("x-served-by") == Some("green") => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => bad += 1,
                }
            }
            bad
        }));
    }
    let addr = cp.addr;
    cp.kill();
    // Both proxies notice the outage...
    for p in &proxies {
        wait_until(
            "proxy notices the outage",
            Duration::from_secs(20),
            || async move { p.metric("remora_control_plane_connected", &[]).await == 0.0 },
        )
        .await;
    }
    // ...and keep serving through it...
    let during = served.load(Ordering::Relaxed);
    let s = &served;
    wait_until(
        "requests served during the outage",
        Duration::from_secs(20),
        || async move { s.load(Ordering::Relaxed) >= during + 100 },
    )
    .await;
    // ...and the control plane comes back with the same history.
    let cp = ControlProcess::start_on(addr, &data, "2s").await;
    let again = all_acked(&cp, 2).await;
    stop.store(true, Ordering::Relaxed);
    let mut bad = 0;
    for l in load {
        bad += l.await.unwrap();
    }
    let ok = served.load(Ordering::Relaxed);
    assert_eq!(bad, 0, "{bad} requests failed during the outage ({ok} ok)");
    assert_eq!(again, version, "same version after the restart");
    let after = cp
        .admin()
        .await
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(after, history);
}

#[tokio::test]
async fn a_proxy_restarted_during_an_outage_boots_from_its_last_known_good_copy() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let mut cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "green")).await.unwrap();
    let p = proxy(&cp, "lkg", &state, &[]).await;
    let version = all_acked(&cp, 1).await;
    let url = cp.url();
    cp.kill();
    drop(p);

    // Control plane down; the proxy starts again with the same state dir.
    let p = ProxyBuilder::new()
        .arg("--control-plane")
        .arg(&url)
        .arg("--node-id")
        .arg("lkg")
        .arg("--state-dir")
        .arg(&state.path().join("lkg").display().to_string())
        .start()
        .await;
    assert_eq!(p.config_version().await, version);
    assert_eq!(served_by(&p).await, "green");
    assert!(p
        .logs()
        .contains("booted from the last-known-good snapshot"));
}

#[tokio::test]
async fn without_a_kept_copy_a_proxy_is_not_ready_until_the_control_plane_answers() {
    let state = TempDir::new("cp-state");
    let dead = format!("http://{}", free_addr());
    let p = ProxyBuilder::new()
        .arg("--control-plane")
        .arg(&dead)
        .arg("--state-dir")
        .arg(&state.path().display().to_string())
        .spawn();
    let admin = p.admin;
    wait_until("admin answers", Duration::from_secs(20), || async move {
        get_status(&format!("http://{admin}/live")).await == Some(200)
    })
    .await;
    assert_eq!(
        get_status(&format!("http://{admin}/ready")).await,
        Some(503)
    );
}

#[tokio::test]
async fn rollback_restores_earlier_routes_on_every_proxy() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    cp.apply(&mesh(&blue, &green, "green")).await.unwrap();
    let proxies = vec![
        proxy(&cp, "a", &state, &[]).await,
        proxy(&cp, "b", &state, &[]).await,
    ];
    all_serve(&proxies, "green").await;
    let r = cp
        .admin()
        .await
        .rollback(RollbackRequest {
            version: 1,
            author: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 3, "a rollback is a new version");
    all_serve(&proxies, "blue").await;
    let v = all_acked(&cp, 2).await;
    assert!(v.starts_with("3."));
    let history = cp
        .admin()
        .await
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(history.len(), 3);
    assert!(
        history[2].summary.contains("rollback to version 1"),
        "{}",
        history[2].summary
    );
}

#[tokio::test]
async fn endpoint_churn_sends_requests_only_to_live_instances() {
    let data = TempDir::new("cp-data");
    let state = TempDir::new("cp-state");
    let cp = ControlProcess::start(&data).await;
    // `api` has no static endpoints: its instances register themselves.
    cp.apply(
        "kind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 80}]\n---\n\
         kind: Service\nmetadata: {name: other}\nspec:\n  ports: [{port: 80}]\n---\n\
         kind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n  calls: [api]\n---\n\
         kind: HTTPRoute\nmetadata: {name: api}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - retry: {attempts: 2, backoff: 5ms}\n",
    )
    .await
    .unwrap();
    let apps: Vec<Upstream> = futures_util_join(["api-1", "api-2", "api-3"]).await;
    let instance = |i: usize| {
        ProxyBuilder::new()
            .app(apps[i].addr)
            .arg("--control-plane")
            .arg(&cp.url())
            .arg("--node-id")
            .arg(&format!("api-{}", i + 1))
            .arg("--service")
            .arg("api")
            .arg("--state-dir")
            .arg(&state.path().join(format!("api-{i}")).display().to_string())
            .start()
    };
    let mut inst1 = Some(instance(0).await);
    let _inst2 = instance(1).await;
    let caller = proxy(&cp, "web-1", &state, &["--service", "web"]).await;
    let c = http1_client();
    let o = caller.outbound;
    let served = |r: &Reply| r.header("x-served-by").unwrap_or("").to_string();

    // Both registered instances take traffic.
    wait_until("both instances serve", Duration::from_secs(10), || {
        let c = c.clone();
        let (a, b) = (&apps[0], &apps[1]);
        async move {
            let _ = get_via(&c, o, "api", "/").await;
            a.hits() > 0 && b.hits() > 0
        }
    })
    .await;

    // A third comes; the first goes (SIGTERM: it deregisters, then drains).
    let _inst3 = instance(2).await;
    wait_until("the new instance serves", Duration::from_secs(10), || {
        let c = c.clone();
        let a = &apps[2];
        async move {
            let _ = get_via(&c, o, "api", "/").await;
            a.hits() > 0
        }
    })
    .await;
    let gone = inst1.take().unwrap();
    gone.terminate();
    let (g, cp) = (&gone, &cp);
    wait_until(
        "the stopped instance is out of the caller's endpoints",
        Duration::from_secs(10),
        || async move {
            let s = cp.status().await;
            !s.proxies
                .iter()
                .any(|p| p.node_id == "api-1" && p.connected)
                && g.logs().contains("deregistered")
        },
    )
    .await;
    let hits_after_stop = apps[0].hits();
    for _ in 0..100 {
        let r = get_via(&c, o, "api", "/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            ["api-2", "api-3"].contains(&served(&r).as_str()),
            "served by {}",
            served(&r)
        );
    }
    assert_eq!(
        apps[0].hits(),
        hits_after_stop,
        "nothing reached the stopped instance"
    );
    // The caller's scope: what `web` calls, and web itself; not `other`.
    let cfg = get_text(&format!("http://{}/config", caller.admin)).await;
    assert!(
        cfg.contains("\"api\"") && !cfg.contains("\"other\""),
        "{cfg}"
    );
}

async fn futures_util_join<const N: usize>(names: [&str; N]) -> Vec<Upstream> {
    let mut v = Vec::new();
    for n in names {
        v.push(Upstream::start(n, Behavior::Demo).await);
    }
    v
}

#[tokio::test]
async fn a_stuck_subscriber_never_delays_the_others() {
    use remora_proto::control::discovery_client::DiscoveryClient;
    use remora_proto::control::{discovery_request::Kind, DiscoveryRequest, Hello};
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    // A big config, so a few snapshots fill the stuck stream's HTTP/2 window.
    let mut big = mesh(&blue, &green, "blue");
    for i in 0..300 {
        big.push_str(&format!(
            "---\n{}",
            service_yaml(&format!("filler-{i}"), 80, "http", &[blue.addr])
        ));
    }
    cp.apply(&big).await.unwrap();

    // The stuck one: says Hello, then never reads a snapshot.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            node_id: "stuck".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut client = DiscoveryClient::connect(cp.url()).await.unwrap();
    let _stuck_stream = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();

    let p = proxy(&cp, "live", &state, &[]).await;
    for i in 0..10 {
        let target = if i % 2 == 0 { "green" } else { "blue" };
        let v = cp
            .apply(&big.replace(
                "backendRefs: [{name: blue}]",
                &format!("backendRefs: [{{name: {target}}}]"),
            ))
            .await
            .unwrap();
        let p = &p;
        wait_until(
            "the live proxy runs the new version",
            Duration::from_secs(5),
            || async move { p.config_version().await.starts_with(&format!("{v}.")) },
        )
        .await;
    }
    let status = cp.status().await;
    let stuck = status
        .proxies
        .iter()
        .find(|p| p.node_id == "stuck")
        .unwrap();
    assert!(
        stuck.acked_version.is_empty(),
        "the stuck subscriber never ACKed"
    );
    assert!(stuck.connected);
}

#[tokio::test]
async fn sigterm_stops_the_control_plane_even_with_streams_open() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let mut cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let p = proxy(&cp, "p", &state, &[]).await;
    all_acked(&cp, 1).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &cp.child.id().to_string()])
        .status();
    let child = &mut cp.child;
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the control plane did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    // The proxy keeps serving without it.
    assert_eq!(served_by(&p).await, "blue");
}

/// Runs remoractl against `cp`: (exit code, stdout, stderr).
async fn remoractl(cp: &ControlProcess, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("remoractl"))
        .arg("--server")
        .arg(cp.url())
        .args(args)
        .env_remove("REMORA_SERVER")
        .output()
        .await
        .expect("run remoractl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_after_a_control_plane_restart_shows_ack_for_proxies_on_the_current_version() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let mut cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "green")).await.unwrap();
    let _proxies = [
        proxy(&cp, "a", &state, &[]).await,
        proxy(&cp, "b", &state, &[]).await,
    ];
    let version = all_acked(&cp, 2).await;
    let addr = cp.addr;
    cp.stop().await;
    let cp = ControlProcess::start_on(addr, &data, "2s").await;
    wait_until(
        "both proxies reconnected",
        Duration::from_secs(20),
        || async {
            let s = cp.status().await;
            s.proxies.len() == 2 && s.proxies.iter().all(|p| p.connected)
        },
    )
    .await;
    // They run the current version (nothing was sent again): ACK, not
    // PENDING, right away.
    let (code, out, err) = remoractl(&cp, &["status", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["snapshotVersion"], version.as_str(), "{out}");
    for p in doc["proxies"].as_array().unwrap() {
        assert_eq!(p["state"], "ACK", "{out}");
        assert_eq!(p["version"], version.as_str(), "{out}");
    }
    assert_eq!(doc["summary"]["current"], 2, "{out}");
    let (code, out, err) = remoractl(&cp, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 proxies connected, 2 on the current version, 0 NACKs, 0 pending"),
        "{out}"
    );
    assert!(!out.contains("PENDING"), "{out}");
    let (code, out, err) = remoractl(&cp, &["status", "--wait=10s", "-o", "yaml"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("state: ACK"), "{out}");
}

#[tokio::test]
async fn status_wait_succeeds_after_an_apply_and_fails_naming_a_proxy_that_nacks() {
    let (blue, green) = blue_green().await;
    let (data, state) = (TempDir::new("cp-data"), TempDir::new("cp-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let _strict = proxy(&cp, "strict", &state, &["--max-route-rules", "1"]).await;
    let _normal = proxy(&cp, "normal", &state, &[]).await;

    // An apply every proxy takes: --wait returns once both ACKed it.
    assert_eq!(cp.apply(&mesh(&blue, &green, "green")).await.unwrap(), 2);
    let (code, out, err) = remoractl(&cp, &["status", "--wait=20s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("config version 2, snapshot version 2."),
        "{out}"
    );
    assert!(
        out.contains("2 proxies connected, 2 on the current version"),
        "{out}"
    );
    assert!(out.contains("last push (2."), "{out}");

    // Two rules: over the strict proxy's limit. --wait fails at its NACK,
    // naming it and why, without waiting out the 60 s.
    let two_rules = mesh(&blue, &green, "blue").replace(
        "  rules:\n",
        "  rules:\n  - backendRefs: [{name: green}]\n    matches: [{path: {type: Exact, value: /x}}]\n",
    );
    assert_eq!(cp.apply(&two_rules).await.unwrap(), 3);
    let t0 = std::time::Instant::now();
    let (code, out, err) = remoractl(&cp, &["status", "--wait"]).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "it waited out the timeout"
    );
    // NACKs first (normal may still be on its way: PENDING).
    assert!(
        err.contains("a proxy rejected snapshot version 3.")
            && err.contains("of 2 proxies: strict (NACK: ")
            && err.contains("--max-route-rules"),
        "{err}"
    );
    assert!(!err.contains("normal (NACK"), "{err}");
    assert!(out.contains("NACK: "), "{out}");
}
