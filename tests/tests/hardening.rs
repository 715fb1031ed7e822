//! Policy that cannot be sidestepped and timeouts that cover the whole
//! exchange, through the real proxy: paths are normalized before routing
//! (and the app gets the normalized one), Upgrades are forwarded only when
//! allowed (never h2c), one authority per request, and a backend or client
//! that stalls mid-body is cut off.

use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One raw HTTP/1.1 exchange: (status, head, body as far as it came).
async fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// api: /admin to one backend, everything else to another.
fn routes(admin: SocketAddr, rest: SocketAddr, mesh: &str) -> String {
    format!(
        "{}---\n{}---\n{}---\n\
kind: HTTPRoute
metadata: {{name: api}}
spec:
  parentRefs: [{{name: api}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /admin}}}}]
    backendRefs: [{{name: admin}}]
  - backendRefs: [{{name: rest}}]
    allowedUpgrades: [my-proto/1]
{mesh}",
        service_yaml("api", 80, "http", &[]),
        service_yaml("admin", 80, "http", &[admin]),
        service_yaml("rest", 80, "http", &[rest]),
    )
}

#[tokio::test]
async fn paths_are_normalized_before_routing_and_the_app_gets_the_normalized_one() {
    let admin = Upstream::start("admin", Behavior::Demo).await;
    let rest = Upstream::start("rest", Behavior::Demo).await;
    let dir = TempDir::new("hard-paths");
    let cfg = dir.write("mesh.yaml", &routes(admin.addr, rest.addr, ""));
    let proxy = ProxyBuilder::new().config(&cfg).start().await;

    for path in [
        "/admin/x",
        "//admin/x",
        "/./admin/x",
        "/%61dmin/x",
        "/y/../admin/x",
        "/%2e/admin//x",
    ] {
        let (status, head, _) = raw(proxy.outbound, &get(path, "api")).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            head.contains("x-served-by: admin"),
            "{path} missed the /admin route:\n{head}"
        );
    }
    let seen: Vec<String> = admin.seen().iter().map(|s| s.path.clone()).collect();
    assert!(seen.iter().all(|p| p == "/admin/x"), "the app got {seen:?}");
    let (_, head, _) = raw(proxy.outbound, &get("/adminx", "api")).await;
    assert!(head.contains("x-served-by: rest"), "{head}");

    // Encoded slashes and backslashes are refused...
    for path in ["/admin%2fx", "/a%5Cb", "/a\\b"] {
        let (status, head, _) = raw(proxy.outbound, &get(path, "api")).await;
        assert_eq!(status, 400, "{path}: {head}");
        assert!(head.contains("x-remora-error: bad-request"), "{head}");
    }
    // ...unless the mesh passes them through (encoded, never decoded).
    dir.write(
        "mesh.yaml",
        &routes(
            admin.addr,
            rest.addr,
            "---\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {encodedSlashes: PassThrough}\n",
        ),
    );
    let o = proxy.outbound;
    wait_until(
        "PassThrough applied",
        Duration::from_secs(10),
        || async move { raw(o, &get("/x%2fy", "api")).await.0 == 200 },
    )
    .await;
    assert!(
        rest.seen().iter().any(|s| s.path == "/x%2Fy"),
        "{:?}",
        rest.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn upgrades_only_when_allowed_and_never_h2c() {
    let admin = Upstream::start("admin", Behavior::Demo).await;
    let rest = Upstream::start("rest", Behavior::Demo).await;
    let dir = TempDir::new("hard-upgrade");
    let cfg = dir.write("mesh.yaml", &routes(admin.addr, rest.addr, ""));
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let upgrade = |path: &str, proto: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n"
        )
    };
    let head_of = |addr, req: String| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        (String::from_utf8_lossy(&head).into_owned(), s)
    };

    // h2c: never forwarded; the request is served as a plain one.
    let (head, _) = head_of(proxy.outbound, upgrade("/", "h2c")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let last = rest.seen().pop().unwrap();
    assert!(
        last.headers.get("upgrade").is_none(),
        "h2c reached the app: {:?}",
        last.headers
    );

    // A protocol no rule allows: plain request too.
    let (head, _) = head_of(proxy.outbound, upgrade("/admin", "my-proto/1")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(admin.seen().pop().unwrap().headers.get("upgrade").is_none());

    // websocket always; my-proto/1 where the rule allows it: 101 and a tunnel.
    for (path, proto) in [("/admin", "websocket"), ("/", "my-proto/1")] {
        let (head, mut s) = head_of(proxy.outbound, upgrade(path, proto)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{proto}: {head}");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }
}

#[tokio::test]
async fn an_upgrade_on_a_mirrored_rule_is_one_try_and_never_mirrored() {
    let app = Upstream::start("app", Behavior::Demo).await;
    let copy = Upstream::start("copy", Behavior::Demo).await;
    let dir = TempDir::new("hard-upgrade-mirror");
    let cfg = dir.write(
        "mesh.yaml",
        &format!(
            "{}---\n{}---\n{}---\n\
kind: HTTPRoute
metadata: {{name: api}}
spec:
  parentRefs: [{{name: api}}]
  rules:
  - backendRefs: [{{name: app}}]
    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: copy}}}}}}]
",
            service_yaml("api", 80, "http", &[]),
            service_yaml("app", 80, "http", &[app.addr]),
            service_yaml("copy", 80, "http", &[copy.addr]),
        ),
    );
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_ne!(s.read(&mut b).await.unwrap(), 0, "closed: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    assert_eq!(copy.hits(), 0, "a tunnel is never mirrored");
    // A plain request on the same rule is still mirrored.
    let r = get_via(&http1_client(), proxy.outbound, "api", "/plain")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    wait_until(
        "the plain request mirrored",
        Duration::from_secs(5),
        || async { copy.hits() == 1 },
    )
    .await;
}

#[tokio::test]
async fn one_authority_per_request() {
    let admin = Upstream::start("admin", Behavior::Demo).await;
    let rest = Upstream::start("rest", Behavior::Demo).await;
    let dir = TempDir::new("hard-authority");
    let cfg = dir.write("mesh.yaml", &routes(admin.addr, rest.addr, ""));
    let proxy = ProxyBuilder::new().config(&cfg).start().await;

    // Absolute form naming api, Host naming something else: routed by the
    // URI, and the app sees that same authority.
    let req = "GET http://api/admin/x HTTP/1.1\r\nHost: rest\r\nConnection: close\r\n\r\n";
    let (status, head, _) = raw(proxy.outbound, req).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("x-served-by: admin"), "{head}");
    assert_eq!(admin.seen().pop().unwrap().headers["host"], "api");

    // Two Host headers: refused.
    let req = "GET /x HTTP/1.1\r\nHost: api\r\nHost: rest\r\nConnection: close\r\n\r\n";
    let (status, head, _) = raw(proxy.outbound, req).await;
    assert_eq!(status, 400, "{head}");
}

/// A server that answers the head and part of the body, then says nothing.
async fn stalling_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf of it")
                    .await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_off_by_the_request_timeout_and_by_idleness() {
    let (stall, _server) = stalling_server().await;
    let dir = TempDir::new("hard-stall");
    let yaml = format!(
        "{}---\nkind: HTTPRoute\nmetadata: {{name: slow}}\nspec:\n  parentRefs: [{{name: slow}}]\n  rules: [{{timeouts: {{request: 1s}}}}]\n---\n{}",
        service_yaml("slow", 80, "http", &[stall]),
        service_yaml("idle", 80, "http", &[stall]),
    );
    let cfg = dir.write("mesh.yaml", &yaml);
    let proxy = ProxyBuilder::new()
        .config(&cfg)
        .arg("--stream-idle-timeout")
        .arg("2s")
        .start()
        .await;
    for (host, within) in [
        ("slow", Duration::from_millis(1800)),
        ("idle", Duration::from_millis(3500)),
    ] {
        let t0 = Instant::now();
        let (status, head, body) = raw(proxy.outbound, &get("/", host)).await;
        let took = t0.elapsed();
        assert_eq!(status, 200, "{host}: the head came: {head}");
        assert_eq!(
            body, "half of it",
            "{host}: the part that came, then the cut"
        );
        assert!(took < within, "{host}: cut after {took:?}");
        assert!(
            took >= Duration::from_millis(900),
            "{host}: too early: {took:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_is_cut_off() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let dir = TempDir::new("hard-client-stall");
    let cfg = dir.write("mesh.yaml", &service_yaml("app", 80, "http", &[up.addr]));
    let proxy = ProxyBuilder::new()
        .config(&cfg)
        .arg("--stream-idle-timeout")
        .arg("1s")
        .start()
        .await;
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\nonly a little")
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the stalled upload was never cut off");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 504") || text.starts_with("HTTP/1.1 502"),
        "{text}"
    );
    // The proxy serves on.
    let (status, _, _) = raw(proxy.outbound, &get("/", "app")).await;
    assert_eq!(status, 200);
}
