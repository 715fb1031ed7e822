//! Config hot swap through the real proxy binary: under load, with
//! invalid configs, and recovery.

use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn route_set(backend: &str, ups: &[Upstream]) -> String {
    let mut y = String::new();
    for u in ups {
        y.push_str(&service_yaml(&u.name, 80, "http", &[u.addr]));
        y.push_str("---\n");
    }
    y.push_str(&service_yaml("shop", 80, "http", &[ups[0].addr]));
    y.push_str(&format!(
        "---\nkind: HTTPRoute\nmetadata: {{name: shop}}\nspec:\n  parentRefs: [{{name: shop}}]\n  rules:\n  - backendRefs: [{{name: {backend}}}]\n"
    ));
    y
}

#[tokio::test]
async fn hot_swap_under_load_drops_nothing() {
    let ups = vec![
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    ];
    let (a, b) = (route_set("blue", &ups), route_set("green", &ups));
    let dir = TempDir::new("hotswap");
    let cfg = dir.write("mesh.yaml", &a);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, o) = (stop.clone(), proxy.outbound);
        clients.push(tokio::spawn(async move {
            let c = http1_client();
            let (mut ok, mut failures) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match get_via(&c, o, "shop", "/").await {
                    Ok(r) if r.status == 200 => {
                        let who = r.header("x-served-by").unwrap_or("").to_string();
                        assert!(who == "blue" || who == "green", "served by {who:?}");
                        ok += 1;
                    }
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failures.push(e),
                }
            }
            (ok, failures)
        }));
    }

    let mut version = proxy.config_version().await;
    for i in 0..100 {
        dir.write("mesh.yaml", if i % 2 == 0 { &b } else { &a });
        let (p, prev) = (&proxy, &version);
        wait_until(
            "new version running",
            Duration::from_secs(10),
            || async move { p.config_version().await != *prev },
        )
        .await;
        version = proxy.config_version().await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests went through");
    let applied = proxy
        .metric("remora_config_reloads_total", &["result=\"applied\""])
        .await;
    assert!(applied >= 101.0, "applied {applied}");
    assert!(
        ups[0].hits() > 0 && ups[1].hits() > 0,
        "both route sets served traffic"
    );
}

#[tokio::test]
async fn invalid_config_keeps_the_old_one_and_names_the_field() {
    let ups = vec![
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    ];
    let dir = TempDir::new("invalid");
    let cfg = dir.write("mesh.yaml", &route_set("blue", &ups));
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let c = http1_client();
    let version = proxy.config_version().await;

    // A bad weight in an otherwise valid change that would move traffic.
    let bad = route_set("green", &ups).replace(
        "- backendRefs: [{name: green}]",
        "- backendRefs: [{name: green, weight: 2000000}]",
    );
    dir.write("mesh.yaml", &bad);
    let p = &proxy;
    wait_until(
        "rejection counted",
        Duration::from_secs(10),
        || async move {
            p.metric("remora_config_reloads_total", &["result=\"rejected\""])
                .await
                >= 1.0
        },
    )
    .await;
    let want = "HTTPRoute default/shop: rules[0].backendRefs[0].weight: must be at most 1000000";
    let logs = proxy.logs_with(&[want]).await;
    assert!(logs.contains(want), "{logs}");
    assert_eq!(
        proxy.config_version().await,
        version,
        "the old config still runs"
    );
    for _ in 0..10 {
        let r = get_via(&c, proxy.outbound, "shop", "/").await.unwrap();
        assert_eq!(r.header("x-served-by"), Some("blue"));
    }

    // YAML that does not parse, and a reference to a missing Service.
    dir.write("mesh.yaml", "kind: HTTPRoute\nmetadata: {name: x\n");
    dir.write("mesh.yaml", &route_set("purple", &ups));
    wait_until("second rejection", Duration::from_secs(10), || async move {
        p.logs()
            .contains("rules[0].backendRefs[0].name: Service default/purple is not defined")
    })
    .await;
    assert_eq!(proxy.config_version().await, version);

    // A good config after bad ones is applied.
    dir.write("mesh.yaml", &route_set("green", &ups));
    let v = &version;
    wait_until("recovery", Duration::from_secs(10), || async move {
        p.config_version().await != *v
    })
    .await;
    let r = get_via(&c, proxy.outbound, "shop", "/").await.unwrap();
    assert_eq!(r.header("x-served-by"), Some("green"));
}

#[tokio::test]
async fn config_directory_merges_files() {
    let up = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("confdir");
    dir.write(
        "10-services.yaml",
        &service_yaml("api", 80, "http", &[up.addr]),
    );
    dir.write(
        "20-routes.yml",
        "kind: HTTPRoute\nmetadata: {name: api}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: api}]}}]\n",
    );
    dir.write("README.txt", "not config");
    let proxy = ProxyBuilder::new().config(dir.path()).start().await;
    let r = get_via(&http1_client(), proxy.outbound, "api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-route"),
        Some("api"),
        "the route from the second file applies"
    );
}
