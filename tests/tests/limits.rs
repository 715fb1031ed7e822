//! Client-side limits of the real proxy binary, driven with raw TCP where
//! the test needs byte-level control: request head size and header count,
//! malformed requests, header read and idle timeouts, the connection cap,
//! and the upstream overflow 503.

use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How reading a connection to its end went.
#[derive(Debug)]
enum End {
    /// The peer closed (read returned 0).
    Eof,
    /// The peer reset the connection, or another read error.
    #[allow(dead_code)] // shown through Debug in failure messages
    Error(std::io::ErrorKind),
    /// Nothing ended it within the deadline.
    TimedOut,
}

impl End {
    fn closed(&self) -> bool {
        !matches!(self, End::TimedOut)
    }
}

/// Reads until EOF, an error, or `within` passes; returns what was read.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, End) {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, End::TimedOut),
            Ok(Ok(0)) => return (out, End::Eof),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (out, End::Error(e.kind())),
        }
    }
}

/// The status code of an HTTP/1.1 response's status line.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// One raw HTTP/1.1 response.
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

/// Appends the next bytes read to `buf`; panics on timeout, error or EOF.
async fn read_more(s: &mut TcpStream, deadline: tokio::time::Instant, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
        .await
        .expect("timed out reading a response")
        .expect("reading a response");
    assert!(
        n > 0,
        "connection closed mid-response: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads exactly one response (Content-Length or chunked) within `within`,
/// leaving the connection open.
async fn read_response(s: &mut TcpStream, within: Duration) -> RawResponse {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, deadline, &mut buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = status_of(head.as_bytes()).unwrap_or_else(|| panic!("not a response: {head}"));
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let body_done = |b: &[u8]| -> bool {
        if let Some(len) = header("content-length") {
            b.len() >= len.parse::<usize>().unwrap()
        } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            b.ends_with(b"0\r\n\r\n")
        } else {
            true
        }
    };
    while !body_done(&buf[head_end..]) {
        read_more(s, deadline, &mut buf).await;
    }
    RawResponse {
        status,
        head,
        body: String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    }
}

/// A normal request through the inbound listener is answered by the app.
async fn still_serves(proxy: &ProxyProcess) {
    let r = get_via(&http1_client(), proxy.inbound, "app", "/status/200")
        .await
        .expect("a normal request after the bad one");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-served-by"), Some("app"));
    assert_eq!(
        get_status(&format!("http://{}/live", proxy.admin)).await,
        Some(200)
    );
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .expect("connect to the proxy")
}

#[tokio::test]
async fn request_head_over_max_header_bytes_gets_431_and_close() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--max-header-bytes")
        .arg("8192")
        .start()
        .await;

    let mut s = connect(proxy.inbound).await;
    let big = "a".repeat(20 * 1024);
    let req = format!("GET /big HTTP/1.1\r\nHost: app\r\nX-Big: {big}\r\n\r\n");
    // The proxy may answer and close before reading everything; a failed
    // write is fine as long as the answer arrives.
    let _ = s.write_all(req.as_bytes()).await;
    let (bytes, end) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let status = status_of(&bytes);
    assert!(
        matches!(status, Some(431 | 400)),
        "expected 431/400, got {:?} ({end:?})",
        String::from_utf8_lossy(&bytes)
    );
    assert!(end.closed(), "connection left open after a {status:?}");
    assert_eq!(up.hits(), 0, "the oversized request reached the app");

    still_serves(&proxy).await;
}

#[tokio::test]
async fn more_headers_than_max_headers_is_rejected_and_closed() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--max-headers")
        .arg("10")
        .start()
        .await;

    // Ten headers in all are fine.
    let mut s = connect(proxy.inbound).await;
    let mut req = String::from("GET /ok HTTP/1.1\r\nHost: app\r\nConnection: close\r\n");
    for i in 0..8 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (bytes, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&bytes),
        Some(200),
        "{}",
        String::from_utf8_lossy(&bytes)
    );

    // Thirty are not.
    let mut s = connect(proxy.inbound).await;
    let mut req = String::from("GET /many HTTP/1.1\r\nHost: app\r\n");
    for i in 0..29 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let (bytes, end) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let status = status_of(&bytes);
    assert!(
        matches!(status, Some(431 | 400)),
        "expected 431/400, got {:?} ({end:?})",
        String::from_utf8_lossy(&bytes)
    );
    assert!(end.closed(), "connection left open after a {status:?}");
    assert_eq!(
        up.hits(),
        1,
        "the request with too many headers reached the app"
    );

    still_serves(&proxy).await;
}

#[tokio::test]
async fn malformed_request_line_gets_400_and_close_and_proxy_keeps_serving() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let mut proxy = ProxyBuilder::new().app(up.addr).start().await;

    let mut s = connect(proxy.inbound).await;
    s.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    let (bytes, end) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&bytes),
        Some(400),
        "{:?} ({end:?})",
        String::from_utf8_lossy(&bytes)
    );
    assert!(end.closed(), "connection left open after a 400");
    assert_eq!(up.hits(), 0);

    still_serves(&proxy).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited"
    );
    let logs = proxy.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn partial_request_head_is_closed_after_header_read_timeout() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--header-read-timeout")
        .arg("300ms")
        .arg("--idle-timeout")
        .arg("60s")
        .start()
        .await;

    let mut s = connect(proxy.inbound).await;
    s.write_all(b"GET /slowloris HTTP/1.1\r\nHost: app\r\nX-Partial: ")
        .await
        .unwrap();
    let t0 = Instant::now();
    let (bytes, end) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        end.closed(),
        "a partial request head kept its connection for {:?}",
        t0.elapsed()
    );
    // Closing may come with a 408; never with a forwarded answer.
    let status = status_of(&bytes);
    assert!(
        bytes.is_empty() || status == Some(408),
        "unexpected reply {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn silent_keep_alive_connection_is_closed_after_idle_timeout() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--idle-timeout")
        .arg("300ms")
        // Long, so only the idle timeout can close the connection.
        .arg("--header-read-timeout")
        .arg("60s")
        .start()
        .await;

    let mut s = connect(proxy.inbound).await;
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, "app says 200\n");
    assert!(
        !r.head.to_ascii_lowercase().contains("connection: close"),
        "the proxy did not keep the connection alive: {}",
        r.head
    );

    let t0 = Instant::now();
    let (bytes, end) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        end.closed(),
        "an idle keep-alive connection stayed open for {:?}",
        t0.elapsed()
    );
    assert!(
        bytes.is_empty(),
        "unexpected bytes: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn third_connection_waits_until_one_of_max_connections_2_closes() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--max-connections")
        .arg("2")
        .arg("--header-read-timeout")
        .arg("60s")
        .arg("--idle-timeout")
        .arg("60s")
        .start()
        .await;

    // Two clients hold connections open with half a request each.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(proxy.inbound).await;
        s.write_all(b"GET /held HTTP/1.1\r\nHost: app\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    let p = &proxy;
    wait_until(
        "two inbound connections open",
        Duration::from_secs(5),
        || async move {
            p.metric("remora_connections_active", &["listener=\"inbound\""])
                .await
                == 2.0
        },
    )
    .await;

    // A third connects (the kernel backlog takes it) but is not served.
    let mut third = connect(proxy.inbound).await;
    third
        .write_all(b"GET /third HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the third connection got {early:?} while two were open"
    );
    assert_eq!(up.hits(), 0);
    assert_eq!(
        proxy
            .metric("remora_connections_active", &["listener=\"inbound\""])
            .await,
        2.0
    );

    // One of the two leaves: the third is accepted and served.
    drop(held.remove(0));
    let r = read_response(&mut third, Duration::from_secs(5)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, "hello from app\n");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn upstream_over_connection_and_pending_caps_gets_503_overflow() {
    let up = Upstream::start("app", Behavior::Demo).await;
    let proxy = ProxyBuilder::new()
        .app(up.addr)
        .arg("--upstream-max-connections")
        .arg("1")
        .arg("--upstream-max-pending")
        .arg("1")
        .start()
        .await;
    let name = "remora_upstream_overflow_total";
    assert!(
        proxy.metrics().await.lines().any(|l| l.starts_with(name)),
        "no {name} in /metrics:\n{}",
        proxy.metrics().await
    );
    assert_eq!(proxy.metric(name, &[]).await, 0.0);

    let c = http1_client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, addr) = (c.clone(), proxy.inbound);
        tasks.push(tokio::spawn(async move {
            get_via(&c, addr, "app", "/delay/1000").await
        }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap().expect("every request gets an answer");
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.header("x-remora-error"), Some("overflow"), "{}", r.body);
                overflow += 1;
            }
            s => panic!("unexpected status {s}: {}", r.body),
        }
    }
    assert!(ok >= 1, "nothing got through");
    assert!(overflow >= 1, "no request was refused ({ok} succeeded)");
    // One connection plus one pending: at most two at once reach the app.
    assert!(ok <= 2, "{ok} requests got through a cap of 1 + 1");
    assert_eq!(up.hits(), ok);
    assert_eq!(proxy.metric(name, &[]).await, overflow as f64);
}
