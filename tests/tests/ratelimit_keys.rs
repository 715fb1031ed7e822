//! Rate-limit key tables through the real proxy binary: past
//! `--ratelimit-max-keys`, a flood of new keys shares one overflow bucket
//! while a client the table already tracks keeps its own bucket.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;

/// Keys the proxy tracks per limit in this test.
const MAX_KEYS: usize = 50;
/// Unique `x-user` values sent, one request each: far past the table, and
/// more than 1,024 after it fills, enough to fail a proxy that checks the
/// key count only every 1,024 requests and then moves every key, tracked or
/// not, into the overflow bucket.
const FLOOD: usize = 1600;
/// Flood requests in flight at once.
const AT_ONCE: usize = 25;

#[tokio::test]
async fn a_flood_of_unique_keys_does_not_throttle_a_tracked_client() {
    let app = Upstream::start("api", Behavior::Demo).await;
    let dir = TempDir::new("rl-key-table");
    let cfg = dir.write(
        "mesh.yaml",
        &format!(
            "{}---\nkind: RateLimitPolicy\nmetadata: {{name: api-limits}}\nspec:\n  \
             targetRef: {{kind: Service, name: api}}\n  responseHeaders: false\n  limits:\n  \
             - name: per-user\n    requests: 5\n    per: minute\n    \
             key: [{{type: Header, name: x-user}}]\n",
            service_yaml("api", 80, "http", &[app.addr])
        ),
    );
    let proxy = ProxyBuilder::new()
        .config(&cfg)
        .app(app.addr)
        .arg("--service")
        .arg("api")
        .arg("--ratelimit-max-keys")
        .arg(&MAX_KEYS.to_string())
        .start()
        .await;
    let c = http1_client();
    let addr = proxy.inbound;
    let status = |user: String| {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://{addr}/"))
                .header("host", "api")
                .header("x-user", user)
                .body(Full::new(Bytes::new()))
                .unwrap();
            send(&c, req).await.unwrap().status
        }
    };

    // The client is tracked before the flood: the first of its five a minute.
    let mut steady = vec![status("steady".into()).await];
    let (mut flood_ok, mut flood_limited) = (0, 0);
    for part in 0..4 {
        let mut sent = part * FLOOD / 4;
        while sent < (part + 1) * FLOOD / 4 {
            let mut batch = tokio::task::JoinSet::new();
            for i in sent..sent + AT_ONCE {
                batch.spawn(status(format!("flood-{i}")));
            }
            while let Some(s) = batch.join_next().await {
                match s.unwrap() {
                    200 => flood_ok += 1,
                    429 => flood_limited += 1,
                    other => panic!("flood request answered {other}"),
                }
            }
            sent += AT_ONCE;
        }
        // Mid-flood, the client makes one more of its five.
        steady.push(status("steady".into()).await);
    }

    assert_eq!(
        steady, [200; 5],
        "the tracked client's own budget, mid-flood"
    );
    assert_eq!(
        status("steady".into()).await,
        429,
        "and its own limit still holds it"
    );
    // 49 flood keys found room in the table; the others shared the overflow
    // bucket's 5 a minute (one more if the test ran past 12 s).
    assert!(
        flood_ok <= MAX_KEYS - 1 + 5 + 2,
        "the flood got {flood_ok} of {FLOOD} through"
    );
    assert_eq!(flood_ok + flood_limited, FLOOD);
    assert_eq!(
        proxy
            .metric("remora_ratelimit_overflow_total", &["limit=\"per-user\""])
            .await,
        (FLOOD - (MAX_KEYS - 1)) as f64,
        "every flood key past the table, and no other, went to overflow"
    );
    assert_eq!(
        app.hits(),
        5 + flood_ok,
        "limited requests never reach the app"
    );
}
