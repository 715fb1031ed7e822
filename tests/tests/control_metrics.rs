//! The control plane's Prometheus metrics, end to end: the real
//! remora-control (`--metrics-addr`) and real proxies subscribed to it.
//!
//! - `remora_control_push_seconds` counts one observation per proxy per
//!   pushed version: a proxy's reconnect, or what it gets on connect, is
//!   not a push;
//! - the connected-proxy gauges follow connects and disconnects.

use remora_tests::control::ControlProcess;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
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

async fn metrics(cp: &ControlProcess) -> String {
    get_text(&format!("http://{}/metrics", cp.metrics)).await
}

async fn metric(cp: &ControlProcess, name: &str, parts: &[&str]) -> f64 {
    sum_metric(&metrics(cp).await, name, parts)
}

/// Waits until `n` proxies are connected and every one ACKed the current
/// snapshot; returns its version.
async fn all_acked(cp: &ControlProcess, n: usize) -> String {
    wait_until(
        "every proxy ACKed the current snapshot",
        Duration::from_secs(20),
        || async move {
            let s = cp.status().await;
            s.proxies.iter().filter(|p| p.connected).count() == n
                && s.proxies
                    .iter()
                    .filter(|p| p.connected)
                    .all(|p| p.acked_version == s.snapshot_version)
        },
    )
    .await;
    cp.status().await.snapshot_version
}

async fn proxy(cp: &ControlProcess, node: &str, state: &TempDir, extra: &[&str]) -> ProxyProcess {
    let mut b = ProxyBuilder::new().control_plane(&cp.url(), node, state);
    for a in extra {
        b = b.arg(a);
    }
    b.start().await
}

#[tokio::test]
async fn the_push_histogram_counts_one_observation_per_proxy_per_version() {
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    let (data, state) = (TempDir::new("cpm-data"), TempDir::new("cpm-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(proxy(&cp, &format!("p{i}"), &state, &[]).await);
    }
    all_acked(&cp, 3).await;
    // They connected after version 1 was committed: what they got on
    // connect is not a push.
    assert_eq!(
        metric(&cp, "remora_control_push_seconds_count", &[]).await,
        0.0
    );
    assert_eq!(metric(&cp, "remora_control_acks_total", &[]).await, 3.0);

    cp.apply(&mesh(&blue, &green, "green")).await.unwrap();
    let v2 = all_acked(&cp, 3).await;
    assert!(v2.starts_with("2."), "{v2}");
    assert_eq!(
        metric(&cp, "remora_control_push_seconds_count", &[]).await,
        3.0
    );
    cp.apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let v3 = all_acked(&cp, 3).await;
    assert!(v3.starts_with("3."), "{v3}");
    let text = metrics(&cp).await;
    assert_eq!(
        sum_metric(&text, "remora_control_push_seconds_count", &[]),
        6.0
    );
    let last = sum_metric(&text, "remora_control_push_last_ack_seconds", &[]);
    assert!(
        last > 0.0 && last < 20.0,
        "apply → last ACK {last} s:\n{text}"
    );
    assert!(sum_metric(&text, "remora_control_push_seconds_sum", &[]) >= last);
    assert!(sum_metric(&text, "remora_control_snapshot_bytes", &["scope=\"*\""]) > 100.0);
    assert_eq!(sum_metric(&text, "remora_control_config_version", &[]), 3.0);
    assert_eq!(sum_metric(&text, "remora_control_nacks_total", &[]), 0.0);
    // remoractl status shows the same push.
    let push = cp.status().await.last_push.unwrap();
    assert_eq!(
        (push.snapshot_version.as_str(), push.acks),
        (v3.as_str(), 3)
    );
    assert!(push.p50_seconds <= push.p99_seconds && push.p99_seconds <= push.last_ack_seconds);

    // A proxy that restarts reconnects with the version it runs: nothing
    // is pushed, nothing is counted.
    let p0 = proxies.remove(0);
    drop(p0);
    wait_until("p0's stream ends", Duration::from_secs(20), || async {
        metric(&cp, "remora_control_streams", &[]).await == 2.0
    })
    .await;
    proxies.push(proxy(&cp, "p0", &state, &[]).await);
    all_acked(&cp, 3).await;
    assert_eq!(
        metric(&cp, "remora_control_push_seconds_count", &[]).await,
        6.0
    );
    assert_eq!(metric(&cp, "remora_control_streams", &[]).await, 3.0);
}

#[tokio::test]
async fn connected_proxy_gauges_follow_connects_and_disconnects() {
    let (data, state) = (TempDir::new("cpm-data"), TempDir::new("cpm-state"));
    let cp = ControlProcess::start(&data).await;
    cp.apply(&format!(
        "{}---\n{}",
        service_yaml("web", 80, "http", &[]),
        service_yaml("api", 80, "http", &[]),
    ))
    .await
    .unwrap();
    let connected = |service: &'static str| {
        let cp = &cp;
        async move {
            metric(
                cp,
                "remora_control_proxies",
                &[&format!("service=\"default/{service}\"")],
            )
            .await
        }
    };
    let _web = proxy(&cp, "web-1", &state, &["--service", "web"]).await;
    let api = proxy(&cp, "api-1", &state, &["--service", "api"]).await;
    wait_until("web and api connected", Duration::from_secs(20), || async {
        connected("web").await == 1.0
            && connected("api").await == 1.0
            && metric(&cp, "remora_control_streams", &[]).await == 2.0
    })
    .await;
    // Each is counted under the version it runs.
    let v = all_acked(&cp, 2).await;
    let text = metrics(&cp).await;
    assert_eq!(
        sum_metric(
            &text,
            "remora_control_proxies",
            &["service=\"default/web\"", &format!("version=\"{v}\"")]
        ),
        1.0,
        "{text}"
    );

    // api goes: its gauge drops, web's stays.
    drop(api);
    wait_until("api's stream ends", Duration::from_secs(20), || async {
        connected("api").await == 0.0 && metric(&cp, "remora_control_streams", &[]).await == 1.0
    })
    .await;
    assert_eq!(connected("web").await, 1.0);

    // And comes back.
    let _api = proxy(&cp, "api-2", &state, &["--service", "api"]).await;
    wait_until("api reconnected", Duration::from_secs(20), || async {
        connected("api").await == 1.0 && metric(&cp, "remora_control_streams", &[]).await == 2.0
    })
    .await;
    // Only GET /metrics is served.
    let base = format!("http://{}", cp.metrics);
    assert_eq!(get_status(&format!("{base}/metrics")).await, Some(200));
    assert_eq!(get_status(&format!("{base}/")).await, Some(404));
}
