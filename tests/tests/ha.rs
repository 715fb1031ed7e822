//! A highly available control plane: three real remora-control replicas on
//! one real 3-member etcd cluster (tests/src/etcd.rs), real proxies spread
//! over them, some given every replica's URL (they fail over). SKIPPED
//! where etcd is not installed.

use remora_tests::control::ControlProcess;
use remora_tests::etcd::EtcdCluster;
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::time::Duration;

/// Three replicas on `etcd`, each with a data directory of its own (which
/// stays empty: everything is in etcd).
async fn replicas(etcd: &EtcdCluster, extra: &[&str]) -> (Vec<ControlProcess>, Vec<TempDir>) {
    let dirs: Vec<TempDir> = (0..3).map(|i| TempDir::new(&format!("ha-cp{i}"))).collect();
    let (a, b, c) = tokio::join!(
        ControlProcess::start_replica(etcd, &dirs[0], "2s", extra),
        ControlProcess::start_replica(etcd, &dirs[1], "2s", extra),
        ControlProcess::start_replica(etcd, &dirs[2], "2s", extra),
    );
    (vec![a, b, c], dirs)
}

/// Services blue and green on their upstreams, `api` (its instances
/// register), and `shop` routed to `backend`.
fn mesh(blue: &Upstream, green: &Upstream, backend: &str) -> String {
    format!(
        "{}---\n{}---\n{}---\nkind: Service\nmetadata: {{name: api}}\nspec:\n  ports: [{{port: 80}}]\n---\nkind: HTTPRoute\nmetadata: {{name: shop}}\nspec:\n  parentRefs: [{{name: shop}}]\n  rules:\n  - backendRefs: [{{name: {backend}}}]\n",
        service_yaml("blue", 80, "http", &[blue.addr]),
        service_yaml("green", 80, "http", &[green.addr]),
        service_yaml("shop", 80, "http", &[blue.addr]),
    )
}

/// A proxy of `cp` as node `node`, with more flags.
async fn proxy(cp: &ControlProcess, node: &str, state: &TempDir, extra: &[&str]) -> ProxyProcess {
    let mut b = ProxyBuilder::new().control_plane(&cp.url(), node, state);
    for a in extra {
        b = b.arg(a);
    }
    b.start().await
}

async fn served_by(p: &ProxyProcess, host: &str) -> String {
    match get_via(&http1_client(), p.outbound, host, "/").await {
        Ok(r) => r.header("x-served-by").unwrap_or("").to_string(),
        Err(e) => e,
    }
}

async fn all_serve(proxies: &[ProxyProcess], host: &str, who: &str) {
    for p in proxies {
        wait_until(
            &format!("proxy serving {host} from {who}"),
            Duration::from_secs(15),
            || async move { served_by(p, host).await == who },
        )
        .await;
    }
}

/// Waits until `cp`'s status lists exactly `nodes`, each connected and
/// running (ACK) the snapshot `cp` pushes.
async fn lists_all_acked(cp: &ControlProcess, nodes: &[&str]) {
    wait_until(
        "status lists every proxy with its ACK",
        Duration::from_secs(15),
        || async move {
            let Some(s) = cp.try_status().await else {
                return false;
            };
            let mut listed: Vec<&str> = s.proxies.iter().map(|p| p.node_id.as_str()).collect();
            listed.sort();
            let mut want = nodes.to_vec();
            want.sort();
            listed == want
                && s.proxies.iter().all(|p| {
                    p.connected && p.acked_version == s.snapshot_version && p.nack_error.is_empty()
                })
        },
    )
    .await;
}

#[tokio::test]
async fn an_apply_through_one_replica_reaches_the_proxies_of_all_and_status_lists_them_on_each() {
    let Some(etcd) = EtcdCluster::start("ha_apply").await else {
        return;
    };
    let (cps, _dirs) = replicas(&etcd, &[]).await;
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    let api_app = Upstream::start("api-1", Behavior::Demo).await;
    cps[0].apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let state = TempDir::new("ha-state");
    // One caller per replica, and an instance of `api` registered through
    // replica 2.
    let mut callers = Vec::new();
    for (i, cp) in cps.iter().enumerate() {
        callers.push(proxy(cp, &format!("web-{i}"), &state, &[]).await);
    }
    let _api = ProxyBuilder::new()
        .app(api_app.addr)
        .control_plane(&cps[1].url(), "api-1", &state)
        .arg("--service")
        .arg("api")
        .start()
        .await;
    all_serve(&callers, "shop", "blue").await;
    // The instance registered through replica 2 is in every replica's
    // snapshots.
    all_serve(&callers, "api", "api-1").await;

    // An apply through replica 1 reaches the proxies of replicas 2 and 3.
    let v = cps[0].apply(&mesh(&blue, &green, "green")).await.unwrap();
    all_serve(&callers, "shop", "green").await;
    for cp in &cps {
        wait_until(
            "every replica runs the new version",
            Duration::from_secs(10),
            || async move { cp.try_status().await.is_some_and(|s| s.config_version == v) },
        )
        .await;
    }
    // remoractl status on any replica lists every proxy, with its ACK.
    let nodes = ["web-0", "web-1", "web-2", "api-1"];
    for cp in &cps {
        lists_all_acked(cp, &nodes).await;
    }
    let out = tokio::process::Command::new(binary("remoractl"))
        .args(["--server", &cps[2].url(), "status"])
        .env_remove("REMORA_SERVER")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for n in nodes {
        assert!(
            text.contains(n),
            "remoractl status on replica 3 misses {n}:\n{text}"
        );
    }
    // The same snapshot version everywhere: same config, same instances,
    // same trust bundle.
    let versions: Vec<String> = futures_util::future::join_all(cps.iter().map(|c| c.status()))
        .await
        .into_iter()
        .map(|s| s.snapshot_version)
        .collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
}

#[tokio::test]
async fn concurrent_applies_through_two_replicas_land_in_order_with_one_history() {
    let Some(etcd) = EtcdCluster::start("ha_concurrent").await else {
        return;
    };
    let (cps, _dirs) = replicas(&etcd, &[]).await;
    let blue = Upstream::start("blue", Behavior::Demo).await;
    cps[0]
        .apply(&service_yaml("base", 80, "http", &[blue.addr]))
        .await
        .unwrap();
    for round in 0..5 {
        let a = service_yaml(&format!("a{round}"), 80, "http", &[blue.addr]);
        let b = service_yaml(&format!("b{round}"), 80, "http", &[blue.addr]);
        let (ra, rb) = tokio::join!(cps[0].apply_status(&a), cps[1].apply_status(&b));
        let mut landed = Vec::new();
        for r in [ra, rb] {
            match r {
                Ok(v) => landed.push(v),
                // Refused as a conflict, never anything else.
                Err(s) => assert_eq!(s.code(), tonic::Code::Aborted, "{s:?}"),
            }
        }
        assert!(!landed.is_empty(), "round {round}: neither apply landed");
        let n = landed.len();
        landed.sort();
        landed.dedup();
        assert_eq!(landed.len(), n, "round {round}: two applies, one version");
    }
    // One history, the same through every replica, versions consecutive.
    let histories: Vec<Vec<(u64, String)>> =
        futures_util::future::join_all(cps.iter().map(|c| c.history()))
            .await
            .into_iter()
            .map(|h| h.into_iter().map(|e| (e.version, e.summary)).collect())
            .collect();
    assert!(
        histories.iter().all(|h| *h == histories[0]),
        "{histories:?}"
    );
    let versions: Vec<u64> = histories[0].iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    // Every replica converges on the last one, with the same config.
    let last = *versions.last().unwrap();
    for cp in &cps {
        wait_until(
            "the replica runs the last version",
            Duration::from_secs(10),
            || async move {
                cp.try_status()
                    .await
                    .is_some_and(|s| s.config_version == last)
            },
        )
        .await;
    }
    let mut configs = Vec::new();
    for cp in &cps {
        let r = cp
            .admin()
            .await
            .get(remora_proto::control::GetRequest::default())
            .await
            .unwrap()
            .into_inner();
        configs.push(r.resources);
    }
    assert!(configs.iter().all(|c| *c == configs[0]));
}

#[tokio::test]
async fn losing_one_etcd_member_changes_nothing() {
    let Some(mut etcd) = EtcdCluster::start("ha_member").await else {
        return;
    };
    let (cps, _dirs) = replicas(&etcd, &[]).await;
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    cps[0].apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let state = TempDir::new("ha-state");
    let mut callers = Vec::new();
    for (i, cp) in cps.iter().enumerate() {
        callers.push(proxy(cp, &format!("web-{i}"), &state, &[]).await);
    }
    all_serve(&callers, "shop", "blue").await;
    // The first member is every replica's first endpoint.
    etcd.kill_member(0);
    cps[1].apply(&mesh(&blue, &green, "green")).await.unwrap();
    all_serve(&callers, "shop", "green").await;
    // A new instance registers, through the third replica, and reaches all.
    let api_app = Upstream::start("api-1", Behavior::Demo).await;
    let _api = ProxyBuilder::new()
        .app(api_app.addr)
        .control_plane(&cps[2].url(), "api-1", &state)
        .arg("--service")
        .arg("api")
        .start()
        .await;
    all_serve(&callers, "api", "api-1").await;
    for cp in &cps {
        lists_all_acked(cp, &["web-0", "web-1", "web-2", "api-1"]).await;
    }
}

#[tokio::test]
async fn with_etcd_down_proxies_serve_and_applies_are_refused_then_everything_converges() {
    let Some(mut etcd) = EtcdCluster::start("ha_down").await else {
        return;
    };
    let (cps, _dirs) = replicas(&etcd, &[]).await;
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    let before = cps[0].apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let state = TempDir::new("ha-state");
    let mut callers = Vec::new();
    for (i, cp) in cps.iter().enumerate() {
        callers.push(proxy(cp, &format!("web-{i}"), &state, &[]).await);
    }
    let api_app = Upstream::start("api-1", Behavior::Demo).await;
    let _api = ProxyBuilder::new()
        .app(api_app.addr)
        .control_plane(&cps[0].url(), "api-1", &state)
        .arg("--service")
        .arg("api")
        .start()
        .await;
    all_serve(&callers, "api", "api-1").await;

    etcd.stop();
    // Applies are refused, saying the store is unavailable, quickly.
    let started = std::time::Instant::now();
    let err = cps[1]
        .apply_status(&mesh(&blue, &green, "green"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("the config store is unavailable, nothing was changed"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Proxies keep serving what they have, instances included, past the
    // registration grace (2 s) and the replicas' lease TTL.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        for p in &callers {
            assert_eq!(served_by(p, "shop").await, "blue");
            assert_eq!(served_by(p, "api").await, "api-1");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every replica still answers status (with what it holds).
    for cp in &cps {
        assert!(cp.try_status().await.is_some());
    }

    etcd.restart().await;
    // The next apply works, with no replica restarted.
    let v = cps[1].apply(&mesh(&blue, &green, "green")).await.unwrap();
    assert_eq!(v, before + 1, "nothing was half-written during the outage");
    all_serve(&callers, "shop", "green").await;
    all_serve(&callers, "api", "api-1").await;
    for cp in &cps {
        lists_all_acked(cp, &["web-0", "web-1", "web-2", "api-1"]).await;
    }
}

#[tokio::test]
async fn a_restarted_replica_catches_up_on_versions_it_missed() {
    let Some(etcd) = EtcdCluster::start("ha_catchup").await else {
        return;
    };
    let (mut cps, dirs) = replicas(&etcd, &[]).await;
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    cps[0].apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let state = TempDir::new("ha-state");
    let p = proxy(&cps[2], "web-2", &state, &[]).await;
    assert_eq!(served_by(&p, "shop").await, "blue");

    let addr = cps[2].addr;
    cps[2].kill();
    let mut last = 0;
    for backend in ["green", "blue", "green"] {
        last = cps[0].apply(&mesh(&blue, &green, backend)).await.unwrap();
    }
    // Back on the same address: the proxy reconnects to it.
    let flags = etcd.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let restarted = ControlProcess::start_with(addr, &dirs[2], "2s", &flags).await;
    assert_eq!(restarted.status().await.config_version, last);
    cps[2] = restarted;
    all_serve(std::slice::from_ref(&p), "shop", "green").await;
    let h: Vec<u64> = cps[2].history().await.iter().map(|e| e.version).collect();
    assert_eq!(h, (1..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn every_replica_issues_under_the_one_root_the_first_stored_in_etcd() {
    let Some(etcd) = EtcdCluster::start("ha_ca").await else {
        return;
    };
    let dir = TempDir::new("ha-tokens");
    let tokens = remora_tests::control::Tokens::new(&dir);
    let tokens_file = tokens.file().display().to_string();
    let mut flags = etcd.flags();
    flags.extend(["--tls", "--bootstrap-tokens", &tokens_file].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dirs: Vec<TempDir> = (0..3).map(|i| TempDir::new(&format!("ha-ca{i}"))).collect();
    // All three at once: they race to store the first root.
    let (a, b, c) = tokio::join!(
        ControlProcess::spawn_with(any_port(), &dirs[0], "2s", &flags),
        ControlProcess::spawn_with(any_port(), &dirs[1], "2s", &flags),
        ControlProcess::spawn_with(any_port(), &dirs[2], "2s", &flags),
    );
    let mut cps = [a, b, c];
    // The root in etcd, read through etcd's JSON gateway.
    let root = stored_root(&etcd).await;
    assert!(root.contains("BEGIN CERTIFICATE"), "{root}");
    // Each replica's serving certificate verifies under it: one CA, never
    // one per replica, though all three started at once.
    for cp in &mut cps {
        cp.ca_pem = Some(root.clone());
        let cp = &*cp;
        wait_until(
            "the replica's certificate verifies under the shared root",
            Duration::from_secs(10),
            || async move { cp.try_status().await.is_some() },
        )
        .await;
    }
}

/// The root certificate the replicas stored at /remora/ca/root.
async fn stored_root(etcd: &EtcdCluster) -> String {
    use http_body_util::BodyExt;
    let endpoint = etcd.endpoints().split(',').next().unwrap().to_string();
    let key = base64(b"/remora/ca/root");
    let body = format!("{{\"key\":\"{key}\"}}");
    let req = http::Request::post(format!("{endpoint}/v3/kv/range"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = http1_client().request(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let value = v["kvs"][0]["value"].as_str().unwrap_or_default();
    let stored: serde_json::Value = serde_json::from_slice(&unbase64(value)).unwrap();
    stored["cert_pem"].as_str().unwrap_or_default().to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let Some(v) = B64.iter().position(|b| *b == c) else {
            continue;
        };
        n = n << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
        }
    }
    out
}

/// Whether a proxy's /config JSON holds an endpoint at `addr`.
fn has_endpoint(v: &serde_json::Value, addr: std::net::SocketAddr) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            let here = m.get("address").and_then(|a| a.as_str()) == Some(&addr.ip().to_string())
                && m.get("port").and_then(|p| p.as_u64()) == Some(addr.port() as u64);
            here || m.values().any(|x| has_endpoint(x, addr))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| has_endpoint(x, addr)),
        _ => false,
    }
}

/// The replica a proxy's Discovery stream is on, from its metrics.
async fn connected_to(p: &ProxyProcess) -> Option<std::net::SocketAddr> {
    p.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("remora_control_plane_replica_info"))
        .find_map(|l| {
            l.split("address=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        })
}

#[tokio::test]
async fn killing_the_replica_a_proxy_is_on_under_traffic_fails_nothing_and_keeps_its_endpoint() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    let Some(etcd) = EtcdCluster::start("ha_failover").await else {
        return;
    };
    let (mut cps, _dirs) = replicas(&etcd, &[]).await;
    let (blue, green) = (
        Upstream::start("blue", Behavior::Demo).await,
        Upstream::start("green", Behavior::Demo).await,
    );
    cps[0].apply(&mesh(&blue, &green, "blue")).await.unwrap();
    let state = TempDir::new("ha-state");
    let urls = cps.iter().map(|c| c.url()).collect::<Vec<_>>().join(",");
    let api_app = Upstream::start("api-1", Behavior::Demo).await;
    let api = ProxyBuilder::new()
        .app(api_app.addr)
        .control_plane(&urls, "api-1", &state)
        .arg("--service")
        .arg("api")
        .start()
        .await;
    let on = {
        let api = &api;
        wait_until(
            "api-1 is on a replica",
            Duration::from_secs(10),
            || async move { connected_to(api).await.is_some() },
        )
        .await;
        connected_to(api).await.unwrap()
    };
    let doomed = cps.iter().position(|c| c.addr == on).expect("one of ours");
    // Callers on the other two replicas.
    let mut callers = Vec::new();
    for (i, cp) in cps.iter().enumerate().filter(|(i, _)| *i != doomed) {
        callers.push(proxy(cp, &format!("web-{i}"), &state, &[]).await);
    }
    all_serve(&callers, "api", "api-1").await;

    // Steady traffic through both callers, and their snapshots watched.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, missing) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut tasks = Vec::new();
    for c in &callers {
        let (outbound, admin) = (c.outbound, c.admin);
        let (stop, sent, failed, missing) =
            (stop.clone(), sent.clone(), failed.clone(), missing.clone());
        let endpoint = api.inbound;
        tasks.push(tokio::spawn(async move {
            let client = http1_client();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Relaxed) {
                tick.tick().await;
                sent.fetch_add(1, Relaxed);
                match get_via(&client, outbound, "api", "/").await {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failed.fetch_add(1, Relaxed);
                    }
                }
                if sent.load(Relaxed) % 4 == 0 {
                    let text = get_text(&format!("http://{admin}/config")).await;
                    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    if !has_endpoint(&doc, endpoint) {
                        missing.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cps[doomed].kill();
    let api_ref = &api;
    wait_until(
        "api-1 moved to another replica",
        Duration::from_secs(10),
        || async move { connected_to(api_ref).await.is_some_and(|a| a != on) },
    )
    .await;
    let now_on = connected_to(&api).await.unwrap();
    let survivor = cps.iter().find(|c| c.addr == now_on).unwrap();
    wait_until(
        "the new replica shows api-1 connected",
        Duration::from_secs(10),
        || async move {
            survivor.try_status().await.is_some_and(|s| {
                s.proxies.iter().any(|p| {
                    p.node_id == "api-1" && p.connected && p.acked_version == s.snapshot_version
                })
            })
        },
    )
    .await;
    // Past the dead replica's lease (the 2 s grace) and then some: the
    // endpoint must have moved to the survivor's lease, not expired.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (sent, failed, missing) = (
        sent.load(Relaxed),
        failed.load(Relaxed),
        missing.load(Relaxed),
    );
    assert!(sent > 500, "{sent} requests");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert_eq!(
        missing, 0,
        "api-1's endpoint went missing {missing} times from a snapshot"
    );
    // And the mesh still changes through the survivors.
    survivor.apply(&mesh(&blue, &green, "green")).await.unwrap();
    all_serve(&callers, "shop", "green").await;
}
