//! Protocols through the real proxy binary: HTTP/1.1 Upgrade tunnels, opaque
//! TCP, HTTP/2 ↔ HTTP/1.1 translation both ways, chunked bodies streamed
//! through, and client keep-alive.

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest any single exchange may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A proxy whose config is `yaml`.
async fn proxy_with(tag: &str, yaml: &str) -> (ProxyProcess, TempDir) {
    let dir = TempDir::new(tag);
    let cfg = dir.write("mesh.yaml", yaml);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    (proxy, dir)
}

/// Reads an HTTP/1.1 response head (up to the blank line) byte by byte, so
/// nothing after it is consumed.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = r.read(&mut b).await.expect("read response head");
        assert!(
            n == 1,
            "connection closed inside the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    String::from_utf8(head).expect("ASCII head")
}

/// The value of `name` in a raw response head, case-insensitively.
fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Bytes that are not HTTP: a masked WebSocket-style text frame, then a
/// larger binary pattern.
fn tunnel_payload(round: u8) -> Vec<u8> {
    let mut p = vec![
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    p.extend((0..64 * 1024u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(round)));
    p
}

/// Sends a WebSocket-style Upgrade request on a raw connection to `addr`
/// with `Host: host`, expects a 101, then checks bytes written come back
/// echoed through the tunnel, several times over.
async fn upgrade_and_echo(addr: SocketAddr, host: &str) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = within("101 response", read_head(&mut s)).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got:\n{head}"
    );
    assert!(
        head_header(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "101 names the protocol:\n{head}"
    );
    assert!(
        head_header(&head, "connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "101 carries Connection: upgrade:\n{head}"
    );

    let (mut r, mut w) = s.split();
    for round in 0..3u8 {
        let payload = tunnel_payload(round);
        let mut back = vec![0u8; payload.len()];
        within("tunnel echo", async {
            let (wr, rd) = tokio::join!(w.write_all(&payload), r.read_exact(&mut back));
            wr.expect("write into the tunnel");
            rd.expect("read the echo from the tunnel");
        })
        .await;
        assert!(back == payload, "round {round}: echoed bytes differ");
    }
    // Closing our side ends the tunnel: the echo closes back.
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("tunnel close", r.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        rest.is_empty(),
        "nothing after the echo: {} bytes",
        rest.len()
    );
}

#[tokio::test]
async fn http1_upgrade_tunnels_bytes_through_outbound_and_inbound_listeners() {
    let up = Upstream::start("ws", Behavior::Demo).await;
    let (proxy, _dir) = proxy_with("upgrade", &service_yaml("ws", 80, "http", &[up.addr])).await;

    upgrade_and_echo(proxy.outbound, "ws").await;
    let seen = up
        .seen()
        .pop()
        .expect("the upstream saw the upgrade request");
    assert_eq!(seen.path, "/ws");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );

    // The inbound listener in front of the same app (the default app
    // protocol, http).
    let inbound = ProxyBuilder::new().app(up.addr).start().await;
    upgrade_and_echo(inbound.inbound, "anything.local").await;
    assert_eq!(up.hits(), 2, "one upgrade request per listener");
}

/// A TCP server that is not HTTP: it speaks first ("HELLO\r\n"), then
/// echoes until the client closes, then closes.
async fn banner_echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if s.write_all(b"HELLO\r\n").await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn opaque_tcp_inbound_forwards_server_first_protocol_and_counts_bytes() {
    let (app, server) = banner_echo_server().await;
    let proxy = ProxyBuilder::new()
        .app(app)
        .arg("--app-protocol")
        .arg("tcp")
        .start()
        .await;

    // Nothing counted before the first connection. (The series itself may
    // appear a moment after /ready: the listener task registers it.)
    assert_eq!(
        proxy
            .metric("remora_tcp_bytes_total", &["listener=\"inbound\""])
            .await,
        0.0
    );

    let mut s = TcpStream::connect(proxy.inbound).await.unwrap();
    // The server speaks first: an HTTP listener would wait for a request
    // and never deliver this.
    let mut banner = [0u8; 7];
    within("banner", s.read_exact(&mut banner)).await.unwrap();
    assert_eq!(&banner, b"HELLO\r\n");

    let payload: Vec<u8> = b"\x00\x01not http at all\r\n\r\n"
        .iter()
        .copied()
        .chain((0..100_000u32).map(|i| (i % 251) as u8))
        .collect();
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; payload.len()];
    within("echo", async {
        let (wr, rd) = tokio::join!(w.write_all(&payload), r.read_exact(&mut back));
        wr.unwrap();
        rd.unwrap();
    })
    .await;
    assert!(back == payload, "echoed bytes differ");
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("close", r.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    drop(s);

    // Both directions counted once the connection ends: payload up,
    // banner and echo down.
    let want = (payload.len() * 2 + banner.len()) as f64;
    let p = &proxy;
    wait_until("tcp bytes counted", DEADLINE, || async move {
        p.metric("remora_tcp_bytes_total", &["listener=\"inbound\""])
            .await
            >= want
    })
    .await;
    let m = proxy.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("remora_tcp_bytes_total{")
            && l.contains("listener=\"inbound\"")),
        "the opaque listener exports remora_tcp_bytes_total:\n{m}"
    );
    assert_eq!(
        sum_metric(&m, "remora_tcp_bytes_total", &["listener=\"inbound\""]),
        want,
        "exactly the bytes forwarded:\n{m}"
    );
    server.abort();
}

#[tokio::test]
async fn http2_client_to_http1_service_is_translated_with_host_header() {
    let up = Upstream::start("web", Behavior::Demo).await;
    let (proxy, _dir) = proxy_with("h2-to-h1", &service_yaml("web", 80, "http", &[up.addr])).await;

    // h2c with prior knowledge on one connection to the proxy; the
    // :authority names the Service (an HTTP/2 client sends no Host header).
    let tcp = TcpStream::connect(proxy.outbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake with the proxy");
    tokio::spawn(conn);

    let req = Request::get("http://web/hello?x=1")
        .version(Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within("h2 GET", send.send_request(req))
        .await
        .expect("h2 GET");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-served-by"], "web");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello from web\n");

    let seen = up.seen().pop().unwrap();
    assert_eq!(
        seen.version,
        Version::HTTP_11,
        "the upstream speaks HTTP/1.1"
    );
    assert_eq!(seen.path, "/hello");
    assert_eq!(
        seen.headers.get("host").map(|v| v.to_str().unwrap()),
        Some("web"),
        "the :authority became a Host header: {:?}",
        seen.headers
    );

    // A body crosses the translation too.
    let payload = Bytes::from("h2 body ".repeat(10_000));
    let req = Request::post("http://web/echo")
        .version(Version::HTTP_2)
        .body(Full::new(payload.clone()))
        .unwrap();
    let resp = within("h2 POST", send.send_request(req))
        .await
        .expect("h2 POST");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body == payload, "echoed body differs");
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_11);
    assert!(seen.body == payload);
}

#[tokio::test]
async fn http1_client_to_http2_service_reaches_upstream_over_http2() {
    let up = Upstream::start("web2", Behavior::Demo).await;
    let (proxy, _dir) =
        proxy_with("h1-to-h2", &service_yaml("web2", 80, "http2", &[up.addr])).await;
    let c = http1_client();

    let r = get_via(&c, proxy.outbound, "web2", "/hello").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "hello from web2\n");
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_2, "the upstream speaks HTTP/2");
    assert_eq!(seen.path, "/hello");
    for h in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
        assert!(!seen.headers.contains_key(h), "{h} is not sent over HTTP/2");
    }

    let payload = "h1 body ".repeat(10_000);
    let req = Request::post(format!("http://{}/echo", proxy.outbound))
        .header("host", "web2")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let r = send(&c, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == payload, "echoed body differs");
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_2);
    assert!(seen.body == payload);
}

/// An HTTP/1.1 server that streams each request body straight back (so its
/// response has no length and goes out chunked), recording request heads.
async fn streaming_echo_server() -> (
    SocketAddr,
    Arc<Mutex<Vec<http::HeaderMap>>>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    h.lock().unwrap().push(req.headers().clone());
                    async move { Ok::<_, Infallible>(Response::new(req.into_body())) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, heads, task)
}

/// About 1 MiB in 64 chunks of 16 KiB, each chunk's bytes different.
fn chunks() -> Vec<Bytes> {
    (0..64u32)
        .map(|c| {
            Bytes::from(
                (0..16 * 1024u32)
                    .map(|i| (i.wrapping_mul(7).wrapping_add(c * 13) % 256) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .collect()
}

/// A request body with no length, produced chunk by chunk by a task.
fn streamed_body(chunks: Vec<Bytes>) -> BoxBody<Bytes, Infallible> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    tokio::spawn(async move {
        for c in chunks {
            if tx.send(Ok(Frame::data(c))).await.is_err() {
                return;
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

#[tokio::test]
async fn chunked_request_and_response_bodies_stream_through_intact() {
    let demo = Upstream::start("echo", Behavior::Demo).await;
    let (stream_addr, heads, server) = streaming_echo_server().await;
    let yaml = format!(
        "{}---\n{}",
        service_yaml("echo", 80, "http", &[demo.addr]),
        service_yaml("stream", 80, "http", &[stream_addr])
    );
    let (proxy, _dir) = proxy_with("chunked", &yaml).await;
    let client: Client<_, BoxBody<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new()).build_http();
    let expected: Bytes = chunks().concat().into();
    assert_eq!(expected.len(), 1024 * 1024);

    // To the demo upstream's /echo: a chunked request, echoed whole.
    let req = Request::post(format!("http://{}/echo", proxy.outbound))
        .header("host", "echo")
        .body(streamed_body(chunks()))
        .unwrap();
    let resp = within("POST /echo", client.request(req))
        .await
        .expect("POST /echo");
    assert_eq!(resp.status(), 200);
    let body = within("echo body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), expected.len());
    assert!(body == expected, "echoed body differs");
    let seen = demo.seen().pop().unwrap();
    assert_eq!(
        seen.headers
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked"),
        "the upstream got the body chunked: {:?}",
        seen.headers
    );
    assert!(seen.body == expected, "the upstream got every byte");

    // To a server that streams the body back: chunked both ways.
    let req = Request::post(format!("http://{}/stream", proxy.outbound))
        .header("host", "stream")
        .body(streamed_body(chunks()))
        .unwrap();
    let resp = within("POST /stream", client.request(req))
        .await
        .expect("POST /stream");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked"),
        "the response came back chunked: {:?}",
        resp.headers()
    );
    assert!(resp.headers().get("content-length").is_none());
    let body = within("stream body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), expected.len());
    assert!(body == expected, "streamed-back body differs");
    let head = heads
        .lock()
        .unwrap()
        .pop()
        .expect("the streaming server saw it");
    assert_eq!(
        head.get("transfer-encoding").map(|v| v.to_str().unwrap()),
        Some("chunked"),
        "{head:?}"
    );
    server.abort();
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_client_connection() {
    let up = Upstream::start("web", Behavior::Demo).await;
    let (proxy, _dir) = proxy_with("keepalive", &service_yaml("web", 80, "http", &[up.addr])).await;
    assert_eq!(
        proxy
            .metric("remora_connections_total", &["listener=\"outbound\""])
            .await,
        0.0
    );

    // One TCP connection, HTTP/1.1, requests one after another.
    let tcp = TcpStream::connect(proxy.outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let n = 50;
    for i in 0..n {
        within("ready", send.ready())
            .await
            .unwrap_or_else(|e| panic!("request {i}: the connection closed: {e}"));
        let req = if i % 2 == 0 {
            Request::get(format!("/req/{i}"))
                .header("host", "web")
                .body(Full::new(Bytes::new()))
        } else {
            Request::post("/echo")
                .header("host", "web")
                .body(Full::new(Bytes::from(format!("body {i}"))))
        }
        .unwrap();
        let resp = within("response", send.send_request(req))
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(
            resp.headers()
                .get("connection")
                .is_none_or(|v| v != "close"),
            "request {i}: the proxy asked to close"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if i % 2 == 0 {
            assert_eq!(body, "hello from web\n");
        } else {
            assert_eq!(body, format!("body {i}"));
        }
    }
    assert!(!conn.is_finished(), "the client connection is still open");
    assert_eq!(up.hits(), n);

    let m = proxy.metrics().await;
    assert_eq!(
        sum_metric(&m, "remora_connections_total", &["listener=\"outbound\""]),
        1.0,
        "every request on the one accepted connection:\n{m}"
    );
    assert_eq!(
        sum_metric(&m, "remora_connections_active", &["listener=\"outbound\""]),
        1.0,
        "{m}"
    );
}
