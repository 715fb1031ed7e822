//! Rolling updates with zero failed requests, and an instance that joins
//! the mesh only once it can serve: the real control plane, a caller's
//! sidecar, two replicas of a Service behind their sidecars, and a client at
//! a steady rate with no retries configured.

use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MESH: &str = "\
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80, protocol: http}]
  mtls: {mode: Permissive}
---
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80, protocol: http}]
";

/// The instances `Admin.Status` lists for api.
async fn api_instances(cp: &ControlProcess) -> Vec<String> {
    cp.status()
        .await
        .proxies
        .into_iter()
        .filter(|p| p.service == "default/api" && p.connected && !p.instance.is_empty())
        .map(|p| p.instance)
        .collect()
}

fn replica(cp: &ControlProcess, state: &TempDir, node: &str, app: &Upstream) -> ProxyBuilder {
    ProxyBuilder::new()
        .control_plane(&cp.url(), node, state)
        .app(app.addr)
        .arg("--service")
        .arg("api")
        .arg("--shutdown-grace")
        .arg("1s")
}

#[tokio::test]
async fn restarting_a_replica_three_times_under_steady_traffic_fails_no_request() {
    let data = TempDir::new("rollout-data");
    let state = TempDir::new("rollout-state");
    let cp = ControlProcess::start_with(any_port(), &data, "30s", &[]).await;
    cp.apply(MESH).await.unwrap();
    let (app1, app2) = (
        Upstream::start("api-1", Behavior::Demo).await,
        Upstream::start("api-2", Behavior::Demo).await,
    );
    let mut one = replica(&cp, &state, "api-1", &app1).start().await;
    let _two = replica(&cp, &state, "api-2", &app2).start().await;
    let web = ProxyBuilder::new()
        .control_plane(&cp.url(), "web-1", &state)
        .arg("--service")
        .arg("web")
        .start()
        .await;
    let cpr = &cp;
    wait_until(
        "both replicas registered",
        Duration::from_secs(20),
        || async move { api_instances(cpr).await.len() == 2 },
    )
    .await;

    // A client at a steady ~500 requests a second through web's sidecar,
    // no retries: every failure is counted.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (stop, sent, failed, failures) =
            (stop.clone(), sent.clone(), failed.clone(), failures.clone());
        let out = web.outbound;
        tokio::spawn(async move {
            let c = http1_client();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut inflight = tokio::task::JoinSet::new();
            while !stop.load(Relaxed) {
                tick.tick().await;
                let (c, sent, failed, failures) =
                    (c.clone(), sent.clone(), failed.clone(), failures.clone());
                inflight.spawn(async move {
                    sent.fetch_add(1, Relaxed);
                    match get_via(&c, out, "api", "/").await {
                        Ok(r) if r.status == 200 => {}
                        other => {
                            failed.fetch_add(1, Relaxed);
                            let what = other.map(|r| format!("{} {}", r.status, r.body));
                            failures.lock().unwrap().push(format!("{what:?}"));
                        }
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        })
    };

    // Both replicas answer.
    let (a1, a2) = (&app1, &app2);
    wait_until(
        "traffic reaches both replicas",
        Duration::from_secs(10),
        || async move { a1.hits() > 20 && a2.hits() > 20 },
    )
    .await;

    for round in 0..3 {
        // A rolling update of replica 1: SIGTERM, it deregisters and
        // serves on through its grace, drains, exits; its successor
        // registers once it can serve.
        one.terminate();
        let exited = tokio::time::timeout(Duration::from_secs(20), async {
            while one.child.try_wait().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            exited.is_ok(),
            "round {round}: replica 1 did not exit:\n{}",
            one.logs()
        );
        one = replica(&cp, &state, "api-1", &app1).start().await;
        wait_until(
            "the new replica is registered",
            Duration::from_secs(20),
            || async move { api_instances(cpr).await.len() == 2 },
        )
        .await;
        let before = app1.hits();
        wait_until(
            "the new replica takes traffic",
            Duration::from_secs(20),
            || async move { a1.hits() > before + 20 },
        )
        .await;
    }
    stop.store(true, Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Relaxed), failed.load(Relaxed));
    assert!(sent > 500, "only {sent} requests were sent");
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} requests failed during the rollout: {:?}",
        failures.lock().unwrap().iter().take(5).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_instance_joins_the_mesh_only_once_it_can_serve() {
    // Outside Kubernetes, on a plaintext control plane (development):
    // anonymous Discovery gives the proxy its config, but it has no
    // certificate until its identity's token is granted.
    let (data, secrets, state) = (
        TempDir::new("join-data"),
        TempDir::new("join-secrets"),
        TempDir::new("join-state"),
    );
    let tokens = Tokens::new(&secrets);
    let file = tokens.file();
    let cp = ControlProcess::start_with(
        any_port(),
        &data,
        "30s",
        &[
            "--bootstrap-tokens",
            file.to_str().unwrap(),
            "--trust-domain",
            "mesh.test",
        ],
    )
    .await;
    cp.apply(MESH).await.unwrap();
    let app = Upstream::start("api", Behavior::Demo).await;
    let token = secrets.write("api.token", "not-granted-yet\n");
    let api = replica(&cp, &state, "api-1", &app)
        .arg("--bootstrap-token-file")
        .arg(token.to_str().unwrap())
        .arg("--insecure-dev-plaintext")
        .start_live()
        .await;
    let cpr = &cp;
    wait_until(
        "api-1 has its config",
        Duration::from_secs(20),
        || async move {
            cpr.status()
                .await
                .proxies
                .iter()
                .any(|p| p.node_id == "api-1" && !p.acked_version.is_empty())
        },
    )
    .await;

    // With its config but without its certificate it serves nothing (not
    // even plaintext, which Permissive would allow) and is not registered.
    let r = get_via(&http1_client(), api.inbound, "api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("x-remora-error"), Some("not-ready"));
    assert!(
        api_instances(&cp).await.is_empty(),
        "registered before it could serve"
    );
    assert_eq!(app.hits(), 0);

    // Its token is granted: certificate, then registration, then service.
    tokens.grant("default", "api", "not-granted-yet");
    wait_until(
        "api-1 registered once it can serve",
        Duration::from_secs(20),
        || async move { api_instances(cpr).await.len() == 1 },
    )
    .await;
    let logs = api.logs_with(&["registered with the control plane"]).await;
    let installed = logs.find("identity certificate installed");
    let registered = logs.find("registered with the control plane");
    assert!(
        matches!((installed, registered), (Some(i), Some(r)) if i < r),
        "the certificate came first:\n{logs}"
    );
    let r = get_via(&http1_client(), api.inbound, "api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}
