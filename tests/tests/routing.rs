//! Routing through the real proxy binary: matches on path, header, method
//! and query; weighted splits; header filters; mirroring.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::time::Duration;

async fn upstreams(names: &[&str]) -> Vec<Upstream> {
    let mut v = Vec::new();
    for n in names {
        v.push(Upstream::start(n, Behavior::Demo).await);
    }
    v
}

#[tokio::test]
async fn routes_by_path_header_method_and_query() {
    let ups = upstreams(&["web", "api", "beta", "writer", "v2", "exact"]).await;
    let mut yaml = String::new();
    for u in &ups {
        yaml.push_str(&service_yaml(&u.name, 80, "http", &[u.addr]));
        yaml.push_str("---\n");
    }
    yaml.push_str(
        r#"
kind: HTTPRoute
metadata: {name: web-routes}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: api}]
  - matches: [{path: {type: Exact, value: /api/exact}}]
    backendRefs: [{name: exact}]
  - matches: [{headers: [{name: x-channel, value: beta}]}]
    backendRefs: [{name: beta}]
  - matches: [{method: POST}]
    backendRefs: [{name: writer}]
  - matches: [{queryParams: [{name: version, type: RegularExpression, value: "2|two"}]}]
    backendRefs: [{name: v2}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: web}]
"#,
    );
    let dir = TempDir::new("routing");
    let cfg = dir.write("mesh.yaml", &yaml);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let c = http1_client();
    let o = proxy.outbound;

    let served = |r: Reply| r.header("x-served-by").unwrap_or("none").to_string();
    assert_eq!(
        served(get_via(&c, o, "web", "/api/items").await.unwrap()),
        "api"
    );
    assert_eq!(
        served(get_via(&c, o, "web", "/api/exact").await.unwrap()),
        "exact"
    );
    // /apix is not under the /api prefix (segment match).
    assert_eq!(served(get_via(&c, o, "web", "/apix").await.unwrap()), "web");
    assert_eq!(
        served(get_via(&c, o, "web", "/?version=two").await.unwrap()),
        "v2"
    );
    assert_eq!(
        served(get_via(&c, o, "web", "/?version=3").await.unwrap()),
        "web"
    );
    assert_eq!(
        served(
            get_via(&c, o, "web.default.svc.cluster.local:80", "/x")
                .await
                .unwrap()
        ),
        "web"
    );

    let req = Request::get(format!("http://{o}/home"))
        .header("host", "web")
        .header("x-channel", "beta")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(served(send(&c, req).await.unwrap()), "beta");

    let req = Request::post(format!("http://{o}/orders"))
        .header("host", "web")
        .body(Full::new(Bytes::from("order")))
        .unwrap();
    assert_eq!(served(send(&c, req).await.unwrap()), "writer");

    // A host that names no Service is a 404 the proxy answers itself.
    let r = get_via(&c, o, "nowhere", "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-remora-error"), Some("no-route"));

    // Every request above was counted per route.
    let m = proxy.metrics().await;
    assert!(
        sum_metric(
            &m,
            "remora_requests_total",
            &["route=\"default/web-routes/rule-0\"", "code_class=\"2xx\""]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn weighted_split_90_10_over_10000_requests() {
    let ups = upstreams(&["shop", "canary"]).await;
    let yaml = format!(
        "{}---\n{}---\n{}",
        service_yaml("shop", 80, "http", &[ups[0].addr]),
        service_yaml("canary", 80, "http", &[ups[1].addr]),
        r#"
kind: HTTPRoute
metadata: {name: shift}
spec:
  parentRefs: [{name: shop}]
  rules:
  - backendRefs: [{name: shop, weight: 90}, {name: canary, weight: 10}]
"#
    );
    let dir = TempDir::new("split");
    let cfg = dir.write("mesh.yaml", &yaml);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let c = http1_client();

    let n = 10_000usize;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (c, o) = (c.clone(), proxy.outbound);
        tasks.push(tokio::spawn(async move {
            let mut canary = 0usize;
            for _ in (w..n).step_by(8) {
                let r = get_via(&c, o, "shop", "/").await.unwrap();
                assert_eq!(r.status, 200);
                if r.header("x-served-by") == Some("canary") {
                    canary += 1;
                }
            }
            canary
        }));
    }
    let mut canary = 0;
    for t in tasks {
        canary += t.await.unwrap();
    }
    let share = canary as f64 * 100.0 / n as f64;
    assert!(
        (8.5..=11.5).contains(&share),
        "canary got {share:.2}% of {n}"
    );
    assert_eq!(ups[0].hits() + ups[1].hits(), n);
}

#[tokio::test]
async fn header_modifiers_and_mirror() {
    let ups = upstreams(&["app", "shadow"]).await;
    let yaml = format!(
        "{}---\n{}---\n{}",
        service_yaml("app", 80, "http", &[ups[0].addr]),
        service_yaml("shadow", 80, "http", &[ups[1].addr]),
        r#"
kind: HTTPRoute
metadata: {name: filters}
spec:
  parentRefs: [{name: app}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: prod}]
        add: [{name: x-added, value: "1"}]
        remove: [x-secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-frame-options, value: DENY}]
        remove: [x-served-by]
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow}
    backendRefs: [{name: app}]
"#
    );
    let dir = TempDir::new("filters");
    let cfg = dir.write("mesh.yaml", &yaml);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let c = http1_client();
    let req = Request::post(format!("http://{}/echo", proxy.outbound))
        .header("host", "app")
        .header("x-env", "dev")
        .header("x-secret", "hunter2")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let r = send(&c, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "payload");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-served-by"), None, "response header removed");

    let seen = ups[0].seen().pop().unwrap();
    assert_eq!(seen.headers["x-env"], "prod");
    assert_eq!(seen.headers["x-added"], "1");
    assert!(!seen.headers.contains_key("x-secret"));

    // The mirror gets a copy, body included; its answer is ignored.
    let shadow = &ups[1];
    wait_until("mirror copy", Duration::from_secs(5), || async {
        shadow.hits() == 1
    })
    .await;
    let copy = shadow.seen().pop().unwrap();
    assert_eq!(copy.body, "payload");
    assert_eq!(copy.path, "/echo");
}
