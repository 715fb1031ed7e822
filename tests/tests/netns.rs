//! The pod harness itself (tests/src/netns.rs), without interception: pods
//! on one network reach each other, the test process and the root
//! namespace; the test app's modes work across them; a proxy runs in a pod
//! as its own uid; everything is gone afterwards. Needs root (SKIPPED
//! otherwise).

use remora_tests::control::ControlProcess;
use remora_tests::grpc::echo::echo_client::EchoClient;
use remora_tests::grpc::echo::EchoRequest;
use remora_tests::netns::{self, testapp, Net, PodProcess, PROXY_UID};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

/// Runs `cmd` to completion without blocking the runtime (the test's own
/// servers share it); its stdout, or a panic with its stderr.
async fn stdout_of(cmd: std::process::Command) -> String {
    let what = format!("{cmd:?}");
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// /proc/<pid>/status's line starting with `key`, e.g. "Uid:".
fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn pods_reach_each_other_the_test_process_and_the_host_then_vanish() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let net = Net::new("smoke");
    let a = net.pod("a");
    let b = net.pod("b");
    assert_ne!(a.ip, b.ip);
    let names = net.namespaces();
    let host_if = net.host_if().to_string();

    // Pod B's app: HTTP on 8080, echo on 9000, banner on 9001.
    let mut http = PodProcess::spawn({
        let mut c = b.command(testapp());
        c.args(["http", "--name", "b", "--listen", "0.0.0.0:8080"]);
        c
    });
    let mut echo = PodProcess::spawn({
        let mut c = b.command_as(PROXY_UID, PROXY_UID, testapp());
        c.args(["tcp-echo", "--listen", "0.0.0.0:9000"]);
        c
    });
    let mut banner = PodProcess::spawn({
        let mut c = b.command(testapp());
        c.args([
            "tcp-banner",
            "--banner",
            "HELLO",
            "--listen",
            "0.0.0.0:9001",
        ]);
        c
    });
    let mut grpc = PodProcess::spawn({
        let mut c = b.command(testapp());
        c.args(["grpc", "--name", "b", "--listen", "0.0.0.0:50051"]);
        c.args(["--listen", "127.0.0.1:50052"]);
        c
    });
    assert_eq!(
        http.listening(1).await,
        vec!["0.0.0.0:8080".parse().unwrap()]
    );
    echo.listening(1).await;
    banner.listening(1).await;
    assert_eq!(grpc.listening(2).await.len(), 2);

    // The pid is the program's own (ip netns exec and setpriv exec it), and
    // command_as set its uid.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", echo.id())).unwrap();
    assert_eq!(comm.trim(), "remora-testapp");
    let uid = proc_status(echo.id(), "Uid:");
    assert_eq!(uid.split_whitespace().nth(1), Some("2102"), "{uid}");

    // A → B with curl, from inside pod A.
    let url = format!("http://{}:8080/headers", b.ip);
    let got = stdout_of({
        let mut c = a.command("curl");
        c.args(["-s", "-i", "--max-time", "10", &url]);
        c
    })
    .await;
    assert!(got.contains("x-served-by: b"), "{got}");
    assert!(got.contains("x-served-port: 8080"), "{got}");
    assert!(
        got.contains("user-agent: curl/"),
        "/headers lists them:\n{got}"
    );

    // The test process → B directly.
    let r = get_via(&http1_client(), b.addr(8080), "b", "/headers")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-served-by"), Some("b"));
    assert!(r.body.contains("host: b\n"), "{}", r.body);

    // gRPC from the test process to B.
    let mut client = EchoClient::connect(format!("http://{}", b.addr(50051)))
        .await
        .expect("connect to B's gRPC server");
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!((reply.message.as_str(), reply.server.as_str()), ("hi", "b"));
    drop(client);

    // Opaque TCP from an app in A: client-first, then server-first.
    let got = stdout_of({
        let mut c = a.command(testapp());
        c.args(["connect", &b.addr(9000).to_string(), "--send", "ping"]);
        c
    })
    .await;
    assert_eq!(got, "ping");
    let got = stdout_of({
        let mut c = a.command(testapp());
        let addr = b.addr(9001).to_string();
        c.args(["connect", &addr, "--read-banner", "--send", "hi"]);
        c
    })
    .await;
    assert_eq!(got, "HELLO\r\nhi");

    // A → a server in the root namespace, on the host's address.
    let outside = Upstream::start_on(
        SocketAddr::from((net.host_ip(), 0)),
        "outside",
        Behavior::Demo,
    )
    .await;
    let got = stdout_of({
        let mut c = a.command("curl");
        c.args([
            "-s",
            "--max-time",
            "10",
            &format!("http://{}/", outside.addr),
        ]);
        c
    })
    .await;
    assert_eq!(got, "hello from outside\n");

    // Killing the process closes its port: the pid was the server's.
    echo.kill();
    let refused = tokio::net::TcpStream::connect(b.addr(9000)).await;
    assert!(refused.is_err(), "the echo server still answers");
    assert!(!std::path::Path::new(&format!("/proc/{}", echo.id())).exists());

    // Processes first, then the network: nothing is left.
    drop((http, echo, banner, grpc));
    drop(net);
    let left = netns_list();
    for ns in &names {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left behind:\n{left}"
        );
    }
    let link = std::process::Command::new("ip")
        .args(["link", "show", &host_if])
        .output()
        .unwrap();
    assert!(!link.status.success(), "{host_if} left behind");
}

#[tokio::test]
async fn a_proxy_in_a_pod_runs_as_its_uid_and_routes_to_another_pod() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let net = Net::new("proxy");
    let (a, b) = (net.pod("a"), net.pod("b"));
    let mut app = PodProcess::spawn({
        let mut c = b.command(testapp());
        c.args(["http", "--name", "b", "--listen", "0.0.0.0:8080"]);
        c
    });
    app.listening(1).await;

    // The control plane listens in the root namespace, on the host's
    // address; the proxy in A (uid 2102) keeps its state under `state`.
    let data = TempDir::new("netns-cp");
    // Plaintext on a non-loopback address: a development setup, said so.
    let cp = ControlProcess::start_with(
        SocketAddr::from((net.host_ip(), 0)),
        &data,
        "2s",
        &["--insecure-dev-plaintext"],
    )
    .await;
    cp.apply(&service_yaml("web", 80, "http", &[b.addr(8080)]))
        .await
        .unwrap();
    let state = TempDir::new("netns-state");
    let proxy = ProxyBuilder::new()
        .control_plane(&cp.url(), "a", &state)
        .in_pod(&a, PROXY_UID)
        .start()
        .await;
    assert_eq!(proxy.admin, a.addr(netns::POD_ADMIN_PORT));
    assert_eq!(proxy.inbound, a.addr(netns::POD_INBOUND_PORT));
    let uid = proc_status(proxy.child.id(), "Uid:");
    assert_eq!(uid.split_whitespace().nth(1), Some("2102"), "{uid}");

    // An app in A calls through its outbound listener (loopback in A).
    let got = stdout_of({
        let mut c = a.command("curl");
        c.args(["-s", "-i", "--max-time", "10", "-H", "host: web"]);
        c.arg("http://127.0.0.1:4140/echo");
        c
    })
    .await;
    assert!(got.contains("x-served-by: b"), "{got}");

    // The state dir was the proxy's to write.
    let lkg = state.path().join("a/last-known-good.pb");
    wait_until(
        "the last-known-good snapshot",
        Duration::from_secs(10),
        || {
            let lkg = lkg.clone();
            async move { lkg.exists() }
        },
    )
    .await;
    assert!(!proxy.logs().contains("could not save"), "{}", proxy.logs());

    drop((proxy, app, cp));
}
