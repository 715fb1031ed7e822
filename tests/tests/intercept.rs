//! Transparent interception, end to end, in real network namespaces: two
//! "pods" (web in A, api in B), each with `remora-proxy init`'s iptables
//! rules, its app and its sidecar (uid 2102), and the control plane in the
//! root namespace as the mesh's CA. Apps are unchanged: they dial api's
//! virtual IP or B's address with no proxy settings and no Host rewriting.
//! Needs root, `ip` and `iptables` (SKIPPED otherwise; CI runs them).

use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::netns::{self, testapp, Net, Pod, PodProcess, PROXY_UID};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const WEB_ID: &str = "spiffe://mesh.test/ns/default/sa/web";
/// api's virtual IP: no interface has it; only interception makes it work.
const API_VIP: &str = "10.96.0.20";

fn mesh_yaml(policy: &str) -> String {
    format!(
        "\
kind: Service
metadata: {{name: api}}
spec:
  addresses: [{API_VIP}]
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: admin, port: 81, targetPort: 8081}}
  - {{name: grpc, port: 50051, protocol: grpc}}
  - {{name: echo, port: 9000}}
  - {{name: banner, port: 9001, protocol: tcp}}
  mtls: {{clientIdentityHeader: x-client-id}}
---
kind: Service
metadata: {{name: web}}
spec:
  addresses: [10.96.0.10]
  ports: [{{port: 80, targetPort: 8080}}]
---
kind: AuthorizationPolicy
metadata: {{name: api-callers}}
spec:
  targetRef: {{name: api}}
  from: [{{identity: '{policy}'}}]
"
    )
}

/// Two intercepted pods and the control plane. Fields drop in order:
/// processes before the network.
struct Pods {
    _apps: Vec<PodProcess>,
    web: ProxyProcess,
    api: ProxyProcess,
    cp: ControlProcess,
    a: Pod,
    b: Pod,
    _dirs: (TempDir, TempDir, TempDir),
    net: Net,
}

/// Runs a program to completion without blocking the test's runtime.
async fn output(cmd: std::process::Command) -> std::process::Output {
    let what = format!("{cmd:?}");
    tokio::process::Command::from(cmd)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {what}: {e}"))
}

/// stdout of a program run in `pod`, or the failure with its stderr.
async fn run_in(pod: &Pod, program: &str, args: &[&str]) -> Result<String, String> {
    let mut c = pod.command(program);
    c.args(args);
    let out = output(c).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{program} {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn curl(pod: &Pod, url: &str) -> Result<String, String> {
    run_in(pod, "curl", &["-s", "-i", "--max-time", "5", url]).await
}

async fn testapp_in(pod: &Pod, args: &[&str]) -> Result<String, String> {
    run_in(pod, testapp().to_str().unwrap(), args).await
}

/// Retries `f` until it returns Ok with something `good` accepts.
async fn eventually<F, Fut>(what: &str, mut f: F, good: impl Fn(&str) -> bool) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = f().await;
        match &r {
            Ok(out) if good(out) => return out.clone(),
            _ if Instant::now() > end => panic!("{what}: never came true; last: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn spawn_app(pod: &Pod, args: &[&str]) -> PodProcess {
    let mut c = pod.command(testapp());
    c.args(args);
    PodProcess::spawn(c)
}

/// `remora-proxy init` in `pod`, as the init container would run it.
async fn init(pod: &Pod, extra: &[&str]) -> std::process::Output {
    let mut c = pod.command(binary("remora-proxy"));
    c.arg("init").args(extra);
    output(c).await
}

impl Pods {
    async fn start(tag: &str) -> Pods {
        let net = Net::new(tag);
        let (a, b) = (net.pod("a"), net.pod("b"));
        // B's app: HTTP on two ports, gRPC, a client-first and a
        // server-first TCP protocol.
        let mut apps = vec![
            spawn_app(
                &b,
                &[
                    "http",
                    "--name",
                    "api",
                    "--listen",
                    "0.0.0.0:8080",
                    "--listen",
                    "0.0.0.0:8081",
                ],
            ),
            spawn_app(&b, &["grpc", "--name", "api", "--listen", "0.0.0.0:50051"]),
            spawn_app(&b, &["tcp-echo", "--listen", "0.0.0.0:9000"]),
            spawn_app(
                &b,
                &[
                    "tcp-banner",
                    "--banner",
                    "HELLO",
                    "--listen",
                    "0.0.0.0:9001",
                ],
            ),
        ];
        apps[0].listening(2).await;
        for app in &mut apps[1..] {
            app.listening(1).await;
        }
        for pod in [&a, &b] {
            let out = init(pod, &[]).await;
            assert!(
                out.status.success(),
                "init in {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let (data, state, secrets) = (
            TempDir::new("icpt-data"),
            TempDir::new("icpt-state"),
            TempDir::new("icpt-secrets"),
        );
        // The control plane over TLS on the host's address, one bootstrap
        // token per identity; its root copied where the sidecars (uid 2102)
        // may read it.
        let tokens = Tokens::new(&secrets);
        let tokens_file = tokens.file();
        let cp = ControlProcess::start_with(
            SocketAddr::from((net.host_ip(), 0)),
            &data,
            "30s",
            &[
                "--tls",
                "--bootstrap-tokens",
                tokens_file.to_str().unwrap(),
                "--trust-domain",
                "mesh.test",
            ],
        )
        .await;
        let root = secrets.write("root.pem", cp.ca_pem.as_deref().unwrap());
        cp.apply(&mesh_yaml(WEB_ID)).await.unwrap();
        let sidecar = |pod: &Pod, service: &str| {
            let token = tokens.token_for("default", service);
            ProxyBuilder::new()
                .control_plane(&cp.url(), service, &state)
                .in_pod(pod, PROXY_UID)
                .arg("--control-plane-ca")
                .arg(root.to_str().unwrap())
                .arg("--service")
                .arg(service)
                .arg("--bootstrap-token-file")
                .arg(token.to_str().unwrap())
                .arg("--advertise-addr")
                .arg(&pod.addr(netns::POD_INBOUND_PORT).to_string())
                .arg("--detect-timeout")
                .arg("300ms")
                .start()
        };
        let api = sidecar(&b, "api").await;
        let web = sidecar(&a, "web").await;
        Pods {
            _apps: apps,
            web,
            api,
            cp,
            a,
            b,
            _dirs: (data, state, secrets),
            net,
        }
    }

    /// The first successful call from A to api's HTTP port (B's instance
    /// has registered and A has it).
    async fn ready(&self) {
        let url = format!("http://{API_VIP}/");
        eventually(
            "A reaches api",
            || curl(&self.a, &url),
            |o| o.contains("x-served-by: api"),
        )
        .await;
    }
}

/// HTTP status of a `curl -i` answer.
fn status(out: &str) -> &str {
    out.split_whitespace().nth(1).unwrap_or("")
}

#[tokio::test]
async fn http_grpc_and_websocket_from_an_unchanged_app_cross_both_sidecars_over_mtls() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let p = Pods::start("icpt-http").await;
    p.ready().await;

    // Plain curl to the virtual IP: B's app answers on 8080, with the
    // caller's verified identity (the inbound sidecar set it).
    let got = curl(&p.a, &format!("http://{API_VIP}/headers"))
        .await
        .unwrap();
    assert_eq!(status(&got), "200", "{got}");
    assert!(got.contains("x-served-port: 8080"), "{got}");
    assert!(got.contains(&format!("x-client-id: {WEB_ID}")), "{got}");
    assert!(
        got.contains(&format!("host: {API_VIP}")),
        "the Host is the app's own:\n{got}"
    );

    // The same app port by B's own address (an endpoint of api), and the
    // other HTTP port of the multi-port app.
    let got = curl(&p.a, &format!("http://{}:8080/headers", p.b.ip))
        .await
        .unwrap();
    assert!(
        got.contains("x-served-port: 8080") && got.contains("x-client-id"),
        "{got}"
    );
    let got = curl(&p.a, &format!("http://{API_VIP}:81/headers"))
        .await
        .unwrap();
    assert!(
        got.contains("x-served-port: 8081") && got.contains("x-client-id"),
        "{got}"
    );

    // It went over mTLS between the sidecars: handshakes on both sides.
    let handshakes = "remora_tls_handshakes_total";
    let ok = "result=\"ok\"";
    let out = p
        .web
        .metric(handshakes, &["direction=\"outbound\"", ok])
        .await;
    let inb = p
        .api
        .metric(handshakes, &["direction=\"inbound\"", ok])
        .await;
    assert!(out >= 1.0 && inb >= 1.0, "handshakes: {out} out, {inb} in");
    // Port 80 is undeclared: A's sidecar detected HTTP/1.
    assert!(
        p.web
            .metric(
                "remora_protocol_detections_total",
                &["listener=\"outbound\"", "result=\"http1\""]
            )
            .await
            >= 1.0
    );

    // gRPC (port declared grpc): unary and a server stream with trailers.
    let got = testapp_in(
        &p.a,
        &[
            "grpc-call",
            &format!("http://{API_VIP}:50051"),
            "--message",
            "hi",
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        "unary hi api\nstream hi-0\nstream hi-1\nstream hi-2\ntrailer hi\n"
    );

    // A WebSocket-style Upgrade: 101, then bytes both ways.
    let got = testapp_in(
        &p.a,
        &[
            "upgrade",
            &format!("{API_VIP}:80"),
            "--host",
            "api",
            "--send",
            "ws-bytes",
        ],
    )
    .await
    .unwrap();
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(got.ends_with("ws-bytes"), "{got}");

    // A client outside the mesh (the test process, plaintext) dialling B's
    // app port is redirected into B's sidecar and refused: Strict.
    let outside = tokio::time::timeout(
        Duration::from_secs(5),
        get_via(&http1_client(), p.b.addr(8080), "api", "/"),
    )
    .await
    .expect("refused promptly");
    assert!(
        outside.is_err(),
        "plaintext reached the app: {:?}",
        outside.map(|r| r.status)
    );
    assert!(
        p.api
            .metric("remora_inbound_plaintext_refused_total", &[])
            .await
            >= 1.0
    );
    drop(p);
}

#[tokio::test]
async fn opaque_tcp_crosses_over_mtls_and_authorization_decides() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let p = Pods::start("icpt-tcp").await;
    p.ready().await;

    // Client-first on an undeclared port: detected as opaque.
    let echo = format!("{API_VIP}:9000");
    let got = testapp_in(&p.a, &["connect", &echo, "--send", "\x01binary ping"])
        .await
        .unwrap();
    assert_eq!(got, "\x01binary ping");
    // Server-first on a port declared tcp: the banner comes at once.
    let banner = format!("{API_VIP}:9001");
    let got = testapp_in(&p.a, &["connect", &banner, "--read-banner", "--send", "hi"])
        .await
        .unwrap();
    assert_eq!(got, "HELLO\r\nhi");

    // Between the sidecars it was mTLS: B counted its app's bytes per port,
    // A per Service port.
    let b_bytes = |port: &str| {
        let label = format!("target=\"app:{port}\"");
        let api = &p.api;
        async move {
            api.metric("remora_tcp_bytes_total", &["listener=\"inbound\"", &label])
                .await
        }
    };
    assert_eq!(b_bytes("9000").await, 24.0, "12 bytes each way");
    assert_eq!(
        b_bytes("9001").await,
        11.0,
        "HELLO\\r\\n, then hi both ways"
    );
    assert_eq!(
        p.web
            .metric(
                "remora_tcp_bytes_total",
                &["target=\"default/api:9000\"", "flow=\"client_to_server\""]
            )
            .await,
        12.0
    );
    assert!(
        p.web
            .metric(
                "remora_protocol_detections_total",
                &["listener=\"outbound\"", "result=\"opaque\""]
            )
            .await
            >= 1.0
    );
    let allowed = p
        .api
        .metric(
            "remora_authz_decisions_total",
            &["target=\"Service default/api\"", "result=\"allowed\""],
        )
        .await;
    assert!(allowed >= 2.0, "each connection was authorized: {allowed}");

    // Plaintext TCP from outside the mesh (the test process) to the
    // server-first port: Strict refuses it before the app says a word.
    let mut s = tokio::net::TcpStream::connect(p.b.addr(9001))
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got);
    let _ = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("closed promptly");
    assert!(
        got.is_empty(),
        "plaintext got {:?}",
        String::from_utf8_lossy(&got)
    );

    // A policy that no longer allows web: HTTP gets 403, TCP is closed.
    p.cp.apply(&mesh_yaml("spiffe://mesh.test/ns/default/sa/other"))
        .await
        .unwrap();
    let url = format!("http://{API_VIP}/");
    eventually(
        "web is forbidden",
        || curl(&p.a, &url),
        |o| status(o) == "403",
    )
    .await;
    let got = testapp_in(&p.a, &["connect", &echo, "--send", "ping"]).await;
    assert_eq!(
        got.as_deref(),
        Ok(""),
        "a denied connection carries nothing"
    );
    let logs = p
        .api
        .logs_with(&["connection denied by authorization policy"])
        .await;
    assert!(
        logs.contains(WEB_ID),
        "the denial names the caller:\n{logs}"
    );
    drop(p);
}

#[tokio::test]
async fn addresses_outside_the_mesh_follow_the_outbound_policy_and_the_proxy_never_loops() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let p = Pods::start("icpt-out").await;
    p.ready().await;
    let before = p
        .web
        .metric("remora_connections_total", &["listener=\"outbound\""])
        .await;

    // A server in the root namespace: no Service of the mesh.
    let outside = Upstream::start_on(
        SocketAddr::from((p.net.host_ip(), 0)),
        "outside",
        Behavior::Demo,
    )
    .await;
    let url = format!("http://{}/", outside.addr);
    let got = curl(&p.a, &url).await.unwrap();
    assert!(got.ends_with("hello from outside\n"), "{got}");
    assert_eq!(
        p.web
            .metric(
                "remora_outbound_unknown_destinations_total",
                &["result=\"passthrough\""]
            )
            .await,
        1.0
    );

    // RegistryOnly: refused, counted, logged.
    let mut registry_only = mesh_yaml(WEB_ID);
    registry_only.push_str(
        "---\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {outboundTrafficPolicy: RegistryOnly}\n",
    );
    p.cp.apply(&registry_only).await.unwrap();
    let web = &p.web;
    // (/config answers on loopback only; the metric names the version.)
    wait_until(
        "RegistryOnly applied",
        Duration::from_secs(10),
        || async move { web.metric("remora_config_info", &["version=\"2."]).await >= 1.0 },
    )
    .await;
    let refused = curl(&p.a, &url).await;
    assert!(refused.is_err(), "RegistryOnly let it through: {refused:?}");
    assert_eq!(
        p.web
            .metric(
                "remora_outbound_unknown_destinations_total",
                &["result=\"refused\""]
            )
            .await,
        1.0
    );
    let logs = p.web.logs_with(&["RegistryOnly"]).await;
    assert!(logs.contains(&outside.addr.to_string()), "{logs}");
    // The mesh still works.
    let got = curl(&p.a, &format!("http://{API_VIP}/")).await.unwrap();
    assert_eq!(status(&got), "200", "{got}");
    assert_eq!(outside.hits(), 1);

    // Only the app's three connections reached A's outbound listener: the
    // proxy's own (to the control plane, to B's sidecar) were not looped
    // back into it, and none of them was a passthrough.
    let after = p
        .web
        .metric("remora_connections_total", &["listener=\"outbound\""])
        .await;
    assert_eq!(after - before, 3.0);
    assert!(
        p.web.metric("remora_control_plane_connected", &[]).await == 1.0,
        "the proxy reaches the control plane while intercepted"
    );
    drop(p);
}

#[tokio::test]
async fn init_is_idempotent_uninstalls_and_says_what_failed() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let net = Net::new("icpt-init");
    let pod = net.pod("a");
    let save = || pod.run(&["iptables-save", "-t", "nat"]);
    let rules = |out: std::process::Output| {
        // Without the comment lines (they carry a timestamp).
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let flags = [
        "--skip-outbound-ports",
        "25,3000-3010",
        "--skip-inbound-ports",
        "22",
    ];
    assert!(init(&pod, &flags).await.status.success());
    let once = rules(save());
    assert!(
        once.contains("-A PREROUTING -p tcp -j REMORA_INBOUND"),
        "{once}"
    );
    assert!(once.contains("-A OUTPUT -p tcp -j REMORA_OUTPUT"), "{once}");
    assert!(once.contains("--uid-owner 2102 -j RETURN"), "{once}");
    assert!(once.contains("--dports 25,3000:3010 -j RETURN"), "{once}");
    assert!(once.contains("-j REDIRECT --to-ports 4140"), "{once}");
    assert!(init(&pod, &flags).await.status.success());
    assert_eq!(rules(save()), once, "a second run gives the same rules");

    assert!(init(&pod, &["--uninstall"]).await.status.success());
    let gone = rules(save());
    assert!(!gone.contains("REMORA"), "{gone}");
    assert!(
        init(&pod, &["--uninstall"]).await.status.success(),
        "twice is fine"
    );

    // Without NET_ADMIN (the proxy's own uid): a clear error.
    let mut c = pod.command_as(PROXY_UID, PROXY_UID, binary("remora-proxy"));
    c.arg("init");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("iptables-restore"), "{err}");
    assert!(err.contains("NET_ADMIN"), "{err}");
    drop(net);
}
