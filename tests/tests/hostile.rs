//! Hostile clients against the real proxy binary. Each test starts its own
//! proxy and runs one attack on it, hand-written at the byte level where it
//! has to be (raw HTTP/2 frames over h2c prior knowledge, raw HTTP/1.1 over
//! TCP), and checks three things:
//!
//! - memory: the proxy's resident set (VmRSS) is sampled before, during and
//!   after the attack; its peak must stay under the sidecar's memory limit
//!   (64 MiB, `deploy/kubernetes/sidecar-example.yaml`) and its growth under
//!   a bound given (and argued) per attack;
//! - service: normal requests, each on a fresh connection, are answered
//!   while the attack runs (back to back, for as long as it runs) and after
//!   it;
//! - life: the proxy is still running and never panicked.
//!
//! Numbers are printed (`cargo test --test hostile -- --nocapture`) as
//! `hostile: <attack>: ...` lines.

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::Request;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame as BodyFrame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// ------------------------------------------------------------ memory

/// The sidecar container's memory limit: no attack may take the proxy
/// past it (the kernel would kill it, and every connection with it).
const SIDECAR_LIMIT_KIB: u64 = 64 * 1024;

/// The proxy's resident set in KiB (`VmRSS` in /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms from `start` to `finish`: the
/// baseline, the peak during the attack, and what is left after.
struct RssWatch {
    pid: u32,
    before: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl RssWatch {
    fn start(p: &ProxyProcess) -> RssWatch {
        let pid = p.child.id();
        let before = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(before));
        let stop = Arc::new(AtomicBool::new(false));
        let (pk, st) = (peak.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.load(SeqCst) {
                pk.fetch_max(rss_kib(pid), SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        RssWatch {
            pid,
            before,
            peak,
            stop,
            task,
        }
    }

    /// Stops sampling and checks the peak against the sidecar's limit and
    /// the growth against `growth_kib`, the bound for this attack.
    async fn finish(self, attack: &str, growth_kib: u64) -> (u64, u64, u64) {
        self.stop.store(true, SeqCst);
        let _ = self.task.await;
        let after = rss_kib(self.pid);
        let peak = self.peak.load(SeqCst).max(after);
        eprintln!(
            "hostile: {attack}: RSS before {} KiB, peak {} KiB (+{} KiB), after {} KiB; bounds: +{} KiB, {} KiB",
            self.before,
            peak,
            peak.saturating_sub(self.before),
            after,
            growth_kib,
            SIDECAR_LIMIT_KIB
        );
        assert!(
            peak <= SIDECAR_LIMIT_KIB,
            "{attack}: RSS peaked at {peak} KiB, past the sidecar's {SIDECAR_LIMIT_KIB} KiB"
        );
        assert!(
            peak.saturating_sub(self.before) <= growth_kib,
            "{attack}: RSS grew by {} KiB (from {} to {peak}), past the {growth_kib} KiB bound",
            peak - self.before,
            self.before
        );
        (self.before, peak, after)
    }
}

// ------------------------------------------------- the proxy under attack

/// A proxy from a file config with the Service `app` (and any more YAML),
/// the app behind it, and the config's directory.
struct Target {
    app: Upstream,
    proxy: ProxyProcess,
    _dir: TempDir,
}

impl Target {
    async fn start(tag: &str, more_yaml: &str, args: &[&str]) -> Target {
        let app = Upstream::start("app", Behavior::Demo).await;
        let dir = TempDir::new(tag);
        let yaml = format!(
            "{}{more_yaml}",
            service_yaml("app", 80, "http", &[app.addr])
        );
        let cfg = dir.write("mesh.yaml", &yaml);
        let mut b = ProxyBuilder::new().config(&cfg);
        for a in args {
            b = b.arg(a);
        }
        let proxy = b.start().await;
        served(&proxy, "before the attack").await;
        Target {
            app,
            proxy,
            _dir: dir,
        }
    }

    /// Still running, never panicked, and serving.
    async fn check_alive(&mut self, attack: &str) {
        served(&self.proxy, &format!("after {attack}")).await;
        assert!(
            self.proxy.child.try_wait().unwrap().is_none(),
            "{attack}: the proxy exited:\n{}",
            self.proxy.logs()
        );
        let logs = self.proxy.logs();
        assert!(!logs.contains("panicked"), "{attack}: {logs}");
    }
}

/// A normal request on a fresh connection: 200 from the app within 10 s.
async fn served(proxy: &ProxyProcess, when: &str) {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        get_via(&http1_client(), proxy.outbound, "app", "/"),
    )
    .await
    .unwrap_or_else(|_| panic!("{when}: a normal request got no answer in 10 s"));
    let r = r.unwrap_or_else(|e| panic!("{when}: a normal request failed: {e}"));
    assert_eq!(r.status, 200, "{when}: {}", r.body);
    assert_eq!(r.header("x-served-by"), Some("app"), "{when}");
}

/// Normal requests, back to back on fresh connections, for as long as
/// `attack` runs; every one must be served. Returns the attack's result
/// and how many normal requests were served meanwhile.
async fn while_attacking<T: Send + 'static>(
    proxy: &ProxyProcess,
    attack: JoinHandle<T>,
) -> (T, usize) {
    let mut served_n = 0;
    while !attack.is_finished() {
        served(proxy, "during the attack").await;
        served_n += 1;
    }
    let out = attack.await.expect("the attack task");
    (out, served_n)
}

// ------------------------------------------------------- raw HTTP/2

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len <= 16_384, "frame payload over the default max size");
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer (RFC 7541 §5.1) with an `n`-bit prefix, the first
/// byte's high bits taken from `flags`.
fn hpack_int(out: &mut Vec<u8>, n: u8, flags: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut v = value - max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A literal header field without indexing, new name, no Huffman.
fn literal(block: &mut Vec<u8>, name: &str, value: &[u8]) {
    block.push(0x00);
    hpack_string(block, name.as_bytes());
    hpack_string(block, value);
}

/// A literal header field that the decoder adds to its dynamic table.
fn literal_indexed(block: &mut Vec<u8>, name: &str, value: &[u8]) {
    block.push(0x40);
    hpack_string(block, name.as_bytes());
    hpack_string(block, value);
}

/// The header block of a GET to `authority` for `path`.
fn get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"GET");
    literal(&mut b, ":scheme", b"http");
    literal(&mut b, ":path", path.as_bytes());
    literal(&mut b, ":authority", authority.as_bytes());
    b
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// How an attacking HTTP/2 connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// GOAWAY with this error code.
    GoAway(u32),
    /// Closed (or reset) without a GOAWAY.
    Closed,
    /// Still open when we stopped looking.
    Open,
}

/// A client speaking HTTP/2 frames by hand over TCP (h2c, prior knowledge).
struct H2 {
    tcp: TcpStream,
    buf: Vec<u8>,
    server_settings: BTreeMap<u16, u32>,
}

impl H2 {
    /// The preface and our SETTINGS; reads the server's SETTINGS and ACKs
    /// them.
    async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> H2 {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut h2 = H2 {
            tcp,
            buf: Vec::new(),
            server_settings: BTreeMap::new(),
        };
        let mut payload = Vec::new();
        for (id, v) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        h2.tcp.write_all(&hello).await.expect("preface");
        let theirs = loop {
            let f = tokio::time::timeout(Duration::from_secs(10), h2.read_frame())
                .await
                .expect("the server's SETTINGS in time")
                .expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                break f;
            }
        };
        for s in theirs.payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            h2.server_settings.insert(id, v);
        }
        h2.tcp
            .write_all(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("SETTINGS ACK");
        h2
    }

    /// Writes `bytes` by `deadline`; false if the server stopped taking
    /// them (it closed, or stopped reading).
    async fn write_by(&mut self, bytes: &[u8], deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        matches!(
            tokio::time::timeout(left, self.tcp.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// The next frame; None once the connection is closed (or broken).
    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            match self.tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads (and drops) frames until GOAWAY, close, or `within` passes.
    async fn ending(&mut self, within: Duration) -> Ending {
        let end = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, self.read_frame()).await {
                Err(_) => return Ending::Open,
                Ok(None) => return Ending::Closed,
                Ok(Some(f)) if f.kind == GOAWAY => {
                    let code = f
                        .payload
                        .get(4..8)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return Ending::GoAway(code);
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Reads until stream `id` ends; its `:status` (from a literal or the
    /// static table), or None if the stream was reset or the connection
    /// ended.
    async fn status_of(&mut self, id: u32, within: Duration) -> Option<u16> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let f = tokio::time::timeout_at(end, self.read_frame())
                .await
                .ok()??;
            if f.stream != id {
                continue;
            }
            match f.kind {
                HEADERS => return decode_status(&f.payload),
                RST_STREAM => return None,
                _ => {}
            }
        }
    }
}

/// The `:status` of a response header block, enough for what the proxy
/// sends (hyper's encoder: an indexed static entry, or a literal with an
/// indexed name, never Huffman-coded here for status codes it indexes).
fn decode_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    // Indexed static entries 8..=14 are :status 200, 204, 206, 304, 400,
    // 404, 500.
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    if first & 0x80 != 0 {
        let i = usize::from(first & 0x7f);
        return STATIC.get(i.checked_sub(8)?).copied();
    }
    // A literal with the name :status (static index 8..14) and a 3-digit
    // value, Huffman-coded or not.
    let value = block.get(2..5)?;
    let huffman = block.get(1)? & 0x80 != 0;
    if !huffman {
        return std::str::from_utf8(value).ok()?.parse().ok();
    }
    // Huffman digits: 0-2 are 5 bits (00000, 00001, 00010), 3-9 are 6
    // bits (011001..011111); decode bit by bit.
    let len = usize::from(block[1] & 0x7f);
    let bits: Vec<u8> = block
        .get(2..2 + len)?
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let (mut n, mut i, mut digits) = (0u32, 0usize, 0);
    while digits < 3 {
        let five = bits.get(i..i + 5)?.iter().fold(0u8, |a, b| a << 1 | b);
        let d = if five <= 2 {
            i += 5;
            u32::from(five)
        } else {
            let six = bits.get(i..i + 6)?.iter().fold(0u8, |a, b| a << 1 | b);
            i += 6;
            u32::from(six.checked_sub(0b011001)?) + 3
        };
        n = n * 10 + d;
        digits += 1;
    }
    u16::try_from(n).ok()
}

/// Attacks over one connection after another, each made by `connect` and
/// run by `attack`, until `budget` passes or `max_conns` were used: an
/// attacker whose connection is cut comes back. Returns each connection's
/// (frames sent, how it ended).
fn repeat_attack<F, Fut>(
    budget: Duration,
    max_conns: usize,
    attack: F,
) -> JoinHandle<Vec<(usize, Ending)>>
where
    F: Fn(Instant) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (usize, Ending)> + Send,
{
    tokio::spawn(async move {
        let end = Instant::now() + budget;
        let mut out = Vec::new();
        while Instant::now() < end && out.len() < max_conns {
            out.push(attack(end).await);
        }
        out
    })
}

fn summary(conns: &[(usize, Ending)]) -> String {
    let sent: usize = conns.iter().map(|c| c.0).sum();
    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    for (_, e) in conns {
        *endings.entry(format!("{e:?}")).or_default() += 1;
    }
    format!(
        "{} connections, {sent} frames sent, endings {endings:?}",
        conns.len()
    )
}

// ------------------------------------------------------- HTTP/2 attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_and_costs_no_memory() {
    let mut t = Target::start("hostile-reset", "", &[]).await;
    let rss = RssWatch::start(&t.proxy);
    let addr = t.proxy.outbound;
    // Each connection: HEADERS for a slow request, then RST_STREAM(CANCEL)
    // at once, 100 streams a write, up to 5,000 streams; connections
    // again and again for 3 s (at most 8: 40,000 streams).
    let attack = repeat_attack(Duration::from_secs(3), 8, move |end| async move {
        let mut h2 = H2::connect(addr, &[]).await;
        let (mut sent, mut id) = (0, 1u32);
        while sent < 5_000 && Instant::now() < end {
            let mut burst = Vec::new();
            for _ in 0..100 {
                burst.extend(frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    id,
                    &get_block("app", "/delay/1000"),
                ));
                burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                id += 2;
            }
            if !h2.write_by(&burst, end).await {
                break;
            }
            sent += 100;
        }
        (sent, h2.ending(Duration::from_secs(5)).await)
    });
    let (conns, during) = while_attacking(&t.proxy, attack).await;
    eprintln!(
        "hostile: rapid reset: {}; {during} normal requests served meanwhile; the app saw {} requests",
        summary(&conns),
        t.app.hits()
    );
    // Every stream was cancelled: the proxy holds nothing for them. The
    // bound is generous for hyper/h2 connection state and the allocator
    // keeping freed pages: 8 MiB.
    rss.finish("rapid reset", 8 * 1024).await;
    t.check_alive("rapid reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_flood_is_cut_off_at_the_header_limit() {
    let mut t = Target::start("hostile-continuation", "", &[]).await;
    let rss = RssWatch::start(&t.proxy);
    // Requests the app has served so far (the check at the start).
    let base = t.app.hits();
    let addr = t.proxy.outbound;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never
    // end the block: even connections send 16 KiB frames full of header
    // literals (up to 16 MiB, 256 times --max-header-bytes), odd ones
    // empty frames (up to 100,000, the variant that costs a server CPU
    // rather than memory). 3 s, at most 8 connections.
    let n = Arc::new(AtomicUsize::new(0));
    let attack = repeat_attack(Duration::from_secs(3), 8, move |end| {
        let big = n.fetch_add(1, SeqCst).is_multiple_of(2);
        async move {
            let mut h2 = H2::connect(addr, &[]).await;
            let mut sent = 0;
            if !h2
                .write_by(&frame(HEADERS, END_STREAM, 1, &get_block("app", "/")), end)
                .await
            {
                return (0, h2.ending(Duration::from_secs(5)).await);
            }
            let mut chunk = Vec::new();
            if big {
                let mut i = 0;
                while chunk.len() < 16_000 {
                    literal(&mut chunk, &format!("x-flood-{i}"), &[b'a'; 100]);
                    i += 1;
                }
            }
            let per_write = if big { 16 } else { 1000 };
            let most = if big { 1024 } else { 100_000 };
            let burst: Vec<u8> = (0..per_write)
                .flat_map(|_| frame(CONTINUATION, 0, 1, &chunk))
                .collect();
            while sent < most && Instant::now() < end {
                if !h2.write_by(&burst, end).await {
                    break;
                }
                sent += per_write;
            }
            (sent, h2.ending(Duration::from_secs(5)).await)
        }
    });
    let (conns, during) = while_attacking(&t.proxy, attack).await;
    eprintln!(
        "hostile: CONTINUATION flood: {}; {during} normal requests served meanwhile",
        summary(&conns)
    );
    // The header block is bounded by --max-header-bytes (64 KiB) per
    // connection: 8 MiB allows for that, h2's buffers and the allocator.
    rss.finish("CONTINUATION flood", 8 * 1024).await;
    assert_eq!(
        t.app.hits(),
        base + during,
        "a flooded header block reached the app"
    );
    t.check_alive("CONTINUATION flood").await;
}

/// A flood of one kind of control frame that asks for an answer
/// (SETTINGS, PING), written without ever reading the answers.
async fn control_frame_flood(tag: &str, attack_name: &str, one: Vec<u8>) {
    let mut t = Target::start(tag, "", &[]).await;
    let rss = RssWatch::start(&t.proxy);
    let addr = t.proxy.outbound;
    // 1,000 frames a write, up to 200,000 a connection, never reading:
    // the answers pile up unless the proxy stops reading or drops them.
    // 3 s, at most 4 connections.
    let burst: Arc<Vec<u8>> = Arc::new(one.repeat(1000));
    let attack = repeat_attack(Duration::from_secs(3), 4, move |end| {
        let burst = burst.clone();
        async move {
            let mut h2 = H2::connect(addr, &[]).await;
            let mut sent = 0;
            // A write that blocks means the proxy stopped reading: stop
            // after 1 s of that, not at the end of the whole budget.
            while sent < 200_000 && Instant::now() < end {
                let by = (Instant::now() + Duration::from_secs(1)).min(end);
                if !h2.write_by(&burst, by).await {
                    break;
                }
                sent += 1000;
            }
            (sent, h2.ending(Duration::from_secs(2)).await)
        }
    });
    let (conns, during) = while_attacking(&t.proxy, attack).await;
    eprintln!(
        "hostile: {attack_name}: {}; {during} normal requests served meanwhile",
        summary(&conns)
    );
    // Answers to a client that does not read can only wait in the
    // socket, the proxy's write buffer (hyper: about 400 KiB) or be
    // dropped: 8 MiB for four connections and the allocator.
    rss.finish(attack_name, 8 * 1024).await;
    t.check_alive(attack_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_flood_costs_no_memory() {
    let mut p = Vec::new();
    p.extend_from_slice(&SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes());
    control_frame_flood(
        "hostile-settings",
        "SETTINGS flood",
        frame(SETTINGS, 0, 0, &p),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_ping_flood_costs_no_memory() {
    control_frame_flood("hostile-ping", "PING flood", frame(PING, 0, 0, b"flooding")).await;
}

/// An app whose every response is a `size`-byte body, sent in 16 KiB
/// chunks as the reader takes them; counts the bytes the proxy pulled.
async fn big_body_app(size: usize) -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let pulled = Arc::new(AtomicU64::new(0));
    let p = pulled.clone();
    let task = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'z'; 16 << 10]);
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (p, chunk) = (p.clone(), chunk.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let (p, chunk) = (p.clone(), chunk.clone());
                    async move {
                        let frames =
                            futures_util::stream::iter(0..size / chunk.len()).map(move |_| {
                                p.fetch_add(chunk.len() as u64, SeqCst);
                                Ok::<_, Infallible>(BodyFrame::data(chunk.clone()))
                            });
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-length", size.to_string())
                                .body(StreamBody::new(frames))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, pulled, task)
}

/// A client opens as many streams as the proxy allows, each for a 32 MiB
/// response, and never reads its socket; with `max_windows`, it first
/// opens its flow-control windows as wide as HTTP/2 allows (so flow
/// control never stops the proxy from sending). Held for 3 s while
/// normal requests go on.
async fn unread_streams(attack: &str, max_windows: bool, growth_kib: u64) {
    let (big, pulled, _server) = big_body_app(32 << 20).await;
    let more = format!("---\n{}", service_yaml("big", 80, "http", &[big]));
    let mut t = Target::start("hostile-unread", &more, &[]).await;
    let rss = RssWatch::start(&t.proxy);
    let settings: &[(u16, u32)] = if max_windows {
        &[(SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)]
    } else {
        &[]
    };
    let mut h2 = H2::connect(t.proxy.outbound, settings).await;
    let streams = *h2
        .server_settings
        .get(&SETTINGS_MAX_CONCURRENT_STREAMS)
        .unwrap_or(&100);
    let mut burst = Vec::new();
    if max_windows {
        let more = 0x7fff_ffffu32 - 65_535;
        burst.extend(frame(WINDOW_UPDATE, 0, 0, &more.to_be_bytes()));
    }
    for i in 0..streams {
        burst.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * i + 1,
            &get_block("big", "/"),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    assert!(h2.write_by(&burst, deadline).await, "the streams' HEADERS");
    let hold = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        h2
    });
    let (h2, during) = while_attacking(&t.proxy, hold).await;
    eprintln!(
        "hostile: {attack}: {streams} streams of 32 MiB; the app produced {} KiB (most waits in socket buffers); {during} normal requests served meanwhile",
        pulled.load(SeqCst) >> 10,
    );
    drop(h2);
    rss.finish(attack, growth_kib).await;
    t.check_alive(attack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_that_are_never_read_hold_bounded_memory() {
    // Flow control as the client left it (64 KiB for the connection, all
    // streams together): the proxy may send 64 KiB, and reads from the
    // app only as the client makes room; what it holds is, per stream, its
    // upstream connection with hyper's buffers and a chunk in flight:
    // measured at about 56 KiB. 256 streams: 24 MiB.
    unread_streams("unread streams", false, 24 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_never_read_with_open_windows_hold_bounded_memory() {
    // Whatever windows the client grants, what the proxy holds for one
    // connection must stay well inside the sidecar: 32 MiB.
    unread_streams("unread streams, open windows", true, 32 * 1024).await;
}

// ------------------------------------------------------- HTTP/1 attacks

/// Reads until EOF, an error, or `deadline`; the bytes, and whether the
/// proxy ended the connection.
async fn read_to_close<R: tokio::io::AsyncRead + Unpin>(
    s: &mut R,
    deadline: tokio::time::Instant,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` one at a time, `every` apart, until the proxy closes
/// the connection or `until`; true if the proxy closed it.
async fn trickle(s: &mut TcpStream, bytes: &[u8], every: Duration, until: Instant) -> bool {
    for b in bytes.iter().cycle() {
        if Instant::now() >= until {
            return false;
        }
        if s.write_all(&[*b]).await.is_err() {
            return true;
        }
        // A closed connection shows as a readable EOF before a write fails.
        let mut probe = [0u8; 512];
        match tokio::time::timeout(every, s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {
                // An answer (408, 400, 504): read on to the close.
                let end = tokio::time::Instant::from_std(until);
                return read_to_close(s, end).await.1;
            }
            Err(_) => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_request_heads_are_cut_at_the_header_read_timeout() {
    let mut t = Target::start(
        "hostile-slow-heads",
        "",
        &["--header-read-timeout", "1s", "--idle-timeout", "60s"],
    )
    .await;
    let rss = RssWatch::start(&t.proxy);
    // Requests the app has served so far (the check at the start).
    let base = t.app.hits();
    // 200 clients each send a request head one byte every 100 ms, a header
    // that never ends: never idle, never done.
    const CLIENTS: usize = 200;
    let addr = t.proxy.outbound;
    let t0 = Instant::now();
    let attack = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            tasks.spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ")
                    .await
                    .unwrap();
                let until = Instant::now() + Duration::from_secs(8);
                let cut = trickle(&mut s, b"abcdefgh", Duration::from_millis(100), until).await;
                (cut, Instant::now())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    let (ends, during) = while_attacking(&t.proxy, attack).await;
    let cut = ends.iter().filter(|(c, _)| *c).count();
    let last = ends
        .iter()
        .map(|(_, at)| at.duration_since(t0))
        .max()
        .unwrap();
    eprintln!(
        "hostile: slowloris heads: {cut} of {CLIENTS} cut, the last after {last:?}; {during} normal requests served meanwhile"
    );
    assert_eq!(cut, CLIENTS, "slow heads kept their connections");
    // A 1 s limit on the whole head; 200 connections are opened over a
    // moment on a busy machine: all gone within 5 s.
    assert!(
        last < Duration::from_secs(5),
        "the last was cut after {last:?}"
    );
    // 200 connections at once, each with its task, hyper's connection
    // state and read and write buffers (8 KiB each to start), and the
    // timer: measured at about 40 KiB a connection; 16 MiB.
    rss.finish("slowloris heads", 16 * 1024).await;
    assert_eq!(t.app.hits(), base + during, "a slow head reached the app");
    t.check_alive("slowloris heads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_request_bodies_are_cut_by_the_request_and_idle_timeouts() {
    // `slow` has a 2 s request timeout; `app` has none, only the 1 s stream
    // idle timeout.
    let slow_app = Upstream::start("slow", Behavior::Demo).await;
    let more = format!(
        "---\n{}---\nkind: HTTPRoute\nmetadata: {{name: slow}}\nspec:\n  parentRefs: [{{name: slow}}]\n  rules: [{{timeouts: {{request: 2s}}}}]\n",
        service_yaml("slow", 80, "http", &[slow_app.addr])
    );
    let mut t = Target::start(
        "hostile-slow-bodies",
        &more,
        &["--stream-idle-timeout", "1s"],
    )
    .await;
    let rss = RssWatch::start(&t.proxy);
    // 100 clients trickle a 1 MB body to `slow` a byte every 100 ms (never
    // idle: only the request timeout can end them); 100 send part of a body
    // to `app` and stop (the idle timeout ends them).
    const EACH: usize = 100;
    let addr = t.proxy.outbound;
    let t0 = Instant::now();
    let attack = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2 * EACH {
            let host = if i % 2 == 0 { "slow" } else { "app" };
            tasks.spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let head = format!(
                    "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\nstart"
                );
                s.write_all(head.as_bytes()).await.unwrap();
                let until = Instant::now() + Duration::from_secs(8);
                let cut = if host == "slow" {
                    trickle(&mut s, b"abcdefgh", Duration::from_millis(100), until).await
                } else {
                    read_to_close(&mut s, tokio::time::Instant::from_std(until))
                        .await
                        .1
                };
                (host, cut, Instant::now())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    let (ends, during) = while_attacking(&t.proxy, attack).await;
    for host in ["slow", "app"] {
        let mine: Vec<_> = ends.iter().filter(|(h, _, _)| *h == host).collect();
        let cut = mine.iter().filter(|(_, c, _)| *c).count();
        let last = mine
            .iter()
            .map(|(_, _, at)| at.duration_since(t0))
            .max()
            .unwrap();
        eprintln!(
            "hostile: slowloris bodies to {host}: {cut} of {EACH} cut, the last after {last:?}"
        );
        assert_eq!(cut, EACH, "{host}: slow bodies kept their connections");
        assert!(
            last < Duration::from_secs(6),
            "{host}: the last was cut after {last:?}"
        );
    }
    eprintln!("hostile: slowloris bodies: {during} normal requests served meanwhile");
    // 200 connections, each with an upstream connection and a body in
    // flight (a few KiB each): 16 MiB.
    rss.finish("slowloris bodies", 16 * 1024).await;
    t.check_alive("slowloris bodies").await;
}

/// The soft limit on open files (`ulimit -n`) of this process; the proxy
/// inherits it.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

/// Raises this process's soft open-files limit to its hard limit, if
/// `prlimit` (util-linux) is there; children started later inherit it.
fn raise_open_files_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string));
    if let Some(hard) = hard {
        let _ = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={hard}:{hard}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `wanted` idle connections, a third of each kind: one that sent nothing,
/// one that sent half a request head, one that had its answer and stays
/// (keep-alive). They need as many descriptors here and in the proxy, on
/// top of what the other tests in this binary hold: the soft limit is
/// raised if allowed, and with a lower hard limit fewer connections are
/// opened (the output says how many). Every one must be closed by the
/// proxy (header read and idle timeouts, 8 s), normal requests served
/// while they are open, and the growth stay within `per_conn_kib` each.
async fn idle_connections(attack: &str, wanted: usize, per_conn_kib: u64) {
    raise_open_files_limit();
    let limit = open_files_limit();
    let conns = wanted.min(limit.saturating_sub(512) as usize);
    assert!(
        conns >= wanted.min(500),
        "only {limit} open files: too few for this test"
    );
    let mut t = Target::start(
        "hostile-idle",
        "",
        &["--idle-timeout", "8s", "--header-read-timeout", "8s"],
    )
    .await;
    let rss = RssWatch::start(&t.proxy);
    let addr = t.proxy.outbound;
    let mut open = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        match i % 3 {
            0 => {}
            1 => s.write_all(b"GET / HTTP/1.1\r\nHost: ap").await.unwrap(),
            _ => {
                s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                    .await
                    .unwrap();
            }
        }
        open.push(s);
    }
    let t0 = Instant::now();
    let p = &t.proxy;
    wait_until(
        &format!("{conns} connections open"),
        Duration::from_secs(20),
        || async move {
            p.metric("remora_connections_active", &["listener=\"outbound\""])
                .await
                >= conns as f64
        },
    )
    .await;
    // All of them open: normal requests are still served.
    for _ in 0..5 {
        served(&t.proxy, "with the idle connections open").await;
    }
    let held = rss_kib(t.proxy.child.id());
    eprintln!("hostile: {attack}: {conns} open (of {wanted} wanted), RSS {held} KiB");
    // The proxy closes every one: the silent and the half-sent by the
    // header read timeout, the kept-alive by the idle timeout (8 s each,
    // long enough to open all 2,000 first).
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in open.into_iter().enumerate() {
        tasks.spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            (i % 3, read_to_close(&mut s, end).await.1)
        });
    }
    let mut left_open = [0usize; 3];
    while let Some(r) = tasks.join_next().await {
        let (kind, closed) = r.unwrap();
        left_open[kind] += usize::from(!closed);
    }
    eprintln!(
        "hostile: {attack}: after {:?}, still open: {} silent, {} half-sent, {} kept alive",
        t0.elapsed(),
        left_open[0],
        left_open[1],
        left_open[2]
    );
    assert_eq!(
        left_open,
        [0, 0, 0],
        "idle connections the proxy never closed (silent, half a head, kept alive)"
    );
    rss.finish(attack, per_conn_kib * conns as u64).await;
    t.check_alive(attack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_by_the_header_read_and_idle_timeouts() {
    // Measured per connection: 17 KiB silent, 40 KiB with half a head, 45
    // KiB kept alive (its task, hyper's connection state and buffers, the
    // timers). 600 of them, 48 KiB each: 28 MiB, inside the sidecar.
    idle_connections("600 idle connections", 600, 48).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "passes without margin: 2,000 idle connections take +38.5-39.5 MiB against the +40 MiB bound (about 20 KiB a connection: hyper's HTTP/1 read and write buffers, 8 KiB each and kept for the connection's life, and its connection state); it was +50 MiB before the request future and the connection state were boxed (server.rs). Un-ignore once a connection costs clearly less (BENCHMARKS.md, Per-connection memory)"]
async fn two_thousand_idle_connections_fit_in_the_sidecar() {
    // The 2,000 idle connections must fit in the sidecar's 64 MiB
    // with room to serve: 20 KiB a connection (40 MiB).
    idle_connections("2,000 idle connections", 2000, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_are_refused_at_the_limits() {
    let mut t = Target::start(
        "hostile-headers",
        "",
        &["--max-header-bytes", "65536", "--max-headers", "100"],
    )
    .await;
    let rss = RssWatch::start(&t.proxy);
    // Requests the app has served so far (the check at the start).
    let base = t.app.hits();
    let addr = t.proxy.outbound;
    let attack = tokio::spawn(async move {
        let mut report = Vec::new();
        // HTTP/1.1, 20 connections of each: a head that never ends (16 MiB
        // of header lines), and 10,000 tiny headers.
        for kind in ["endless head", "10,000 headers"] {
            let mut refused = 0;
            for _ in 0..20 {
                let s = TcpStream::connect(addr).await.expect("connect");
                let mut head = b"GET / HTTP/1.1\r\nHost: app\r\n".to_vec();
                let line = if kind == "endless head" {
                    format!("X-Flood: {}\r\n", "a".repeat(1000))
                } else {
                    "X: y\r\n".to_string()
                };
                let lines = if kind == "endless head" {
                    16_000
                } else {
                    10_000
                };
                head.extend(line.repeat(lines).into_bytes());
                if kind != "endless head" {
                    head.extend_from_slice(b"\r\n");
                }
                // The proxy answers and closes before reading it all: write
                // and read at once.
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), w.write_all(&head)).await;
                    w
                });
                let end = tokio::time::Instant::now() + Duration::from_secs(10);
                let (answer, closed) = read_to_close(&mut r, end).await;
                drop(writer.await);
                let text = String::from_utf8_lossy(&answer);
                if closed
                    && (text.starts_with("HTTP/1.1 431")
                        || text.starts_with("HTTP/1.1 400")
                        || text.is_empty())
                {
                    refused += 1;
                } else {
                    panic!("{kind}: {text:?}, closed: {closed}");
                }
            }
            report.push(format!("{kind}: {refused} of 20 refused"));
        }
        // HTTP/2: an HPACK bomb (one 4 KiB header in the dynamic table, then
        // referenced by a 1-byte index 4,000 times: 16 MiB decoded from 4
        // KiB sent), and 10,000 tiny headers, on 10 connections each.
        for kind in ["HPACK bomb", "10,000 h2 headers"] {
            let mut refused = 0;
            for _ in 0..10 {
                let mut h2 = H2::connect(addr, &[]).await;
                let mut block = get_block("app", "/");
                if kind == "HPACK bomb" {
                    literal_indexed(&mut block, "x-bomb", &[b'b'; 4000]);
                    block.extend(std::iter::repeat_n(0x80 | 62, 4000));
                } else {
                    for i in 0..10_000 {
                        literal(&mut block, "x", format!("{i}").as_bytes());
                    }
                }
                let mut frames = Vec::new();
                let mut chunks = block.chunks(16_384).peekable();
                let mut first = true;
                while let Some(c) = chunks.next() {
                    let last = chunks.peek().is_none();
                    let kind = if first { HEADERS } else { CONTINUATION };
                    let flags =
                        if last { END_HEADERS } else { 0 } | if first { END_STREAM } else { 0 };
                    frames.extend(frame(kind, flags, 1, c));
                    first = false;
                }
                let end = Instant::now() + Duration::from_secs(10);
                let _ = h2.write_by(&frames, end).await;
                match h2.status_of(1, Duration::from_secs(10)).await {
                    Some(200) => panic!("{kind}: served"),
                    _ => refused += 1,
                }
            }
            report.push(format!("{kind}: {refused} of 10 refused"));
        }
        report
    });
    let (report, during) = while_attacking(&t.proxy, attack).await;
    eprintln!(
        "hostile: header floods: {}; {during} normal requests served meanwhile",
        report.join(", ")
    );
    // Every head is cut at 64 KiB (HTTP/1.1: hyper's buffer; HTTP/2: the
    // decoded header list) on one connection at a time: 8 MiB.
    rss.finish("header floods", 8 * 1024).await;
    assert_eq!(
        t.app.hits(),
        base + during,
        "a flooded request reached the app"
    );
    t.check_alive("header floods").await;
}

// ------------------------------------------------- policy bypass attempts

/// One raw HTTP/1.1 exchange on a fresh connection: (status, head).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write the request");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let (bytes, _) = read_to_close(&mut s, end).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}

/// Is `path` (as an app received it) the admin tree?
fn under_admin(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// The bypass attempts on `/admin` over HTTP/1.1, written as a client
/// would put them on the wire (`Connection: close` each).
fn http1_bypasses(host: &str) -> Vec<(String, Vec<u8>)> {
    let get = |target: &str, more: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{more}Connection: close\r\n\r\n")
            .into_bytes()
    };
    let mut v: Vec<(String, Vec<u8>)> = [
        "//admin",
        "///admin/users",
        "/./admin",
        "/%61dmin",
        "/adm%69n/users",
        "/x/../admin",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin",
        "/admin%2f..",
        "/admin%2F..%2F",
        "/%2fadmin",
        "\\admin",
        "/\\admin",
        "/admin/.",
        "/admin?x=/../rest",
    ]
    .iter()
    .map(|p| (format!("path {p}"), get(p, "")))
    .collect();
    v.push((
        "absolute form, another Host".into(),
        format!("GET http://{host}/admin HTTP/1.1\r\nHost: rest\r\nConnection: close\r\n\r\n")
            .into_bytes(),
    ));
    v.push((
        "absolute form with a dot segment".into(),
        format!(
            "GET http://{host}/x/../admin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    ));
    v.push((
        "two Host headers".into(),
        format!("GET /admin HTTP/1.1\r\nHost: rest\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
    ));
    for (what, more) in [
        (
            "Connection: x-client-id with a forged one",
            "Connection: x-client-id\r\nX-Client-Id: spiffe://mesh.test/ns/ops/sa/admin\r\n",
        ),
        (
            "Connection naming Host",
            "Connection: host\r\n",
        ),
        (
            "Upgrade: h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        (
            "Upgrade: websocket",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
    ] {
        v.push((what.to_string(), get("/admin", more)));
    }
    v
}

/// api: /admin (its own route, one request an hour in all) to the `admin`
/// backend; everything else to `rest`.
fn admin_routes(admin: SocketAddr, rest: SocketAddr) -> String {
    format!(
        "---\n{}---\n{}---\n{}---\n\
kind: HTTPRoute
metadata: {{name: admin}}
spec:
  parentRefs: [{{name: api}}]
  rules: [{{matches: [{{path: {{type: PathPrefix, value: /admin}}}}], backendRefs: [{{name: admin}}]}}]
---
kind: HTTPRoute
metadata: {{name: rest}}
spec:
  parentRefs: [{{name: api}}]
  rules: [{{backendRefs: [{{name: rest}}]}}]
---
kind: RateLimitPolicy
metadata: {{name: admin-limit}}
spec:
  targetRef: {{kind: HTTPRoute, name: admin}}
  limits: [{{name: admin, requests: 1, per: hour}}]
",
        service_yaml("api", 80, "http", &[]),
        service_yaml("admin", 80, "http", &[admin]),
        service_yaml("rest", 80, "http", &[rest]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_policy_cannot_be_bypassed_on_the_outbound_side() {
    let admin = Upstream::start("admin", Behavior::Demo).await;
    let rest = Upstream::start("rest", Behavior::Demo).await;
    let mut t = Target::start(
        "hostile-bypass-out",
        &admin_routes(admin.addr, rest.addr),
        &[],
    )
    .await;
    let rss = RssWatch::start(&t.proxy);
    let addr = t.proxy.outbound;

    // The one request the policy allows, and the next, refused.
    let get = b"GET /admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n";
    let (status, head) = raw_exchange(addr, get).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("x-served-by: admin"), "{head}");
    assert_eq!(raw_exchange(addr, get).await.0, 429);

    // Every disguise of /admin: refused by the limit (429), refused as
    // malformed (400), or no route at all (404); never the admin backend
    // again, and never /admin at the other backend.
    let mut outcomes = BTreeMap::new();
    for (what, req) in http1_bypasses("api") {
        let (status, head) = raw_exchange(addr, &req).await;
        assert!(matches!(status, 400 | 404 | 429), "HTTP/1.1 {what}: {head}");
        *outcomes.entry(status).or_insert(0) += 1;
        served(&t.proxy, &format!("between bypass attempts ({what})")).await;
    }
    // The same over HTTP/2 (h2c): the :path as sent.
    for path in [
        "//admin",
        "/./admin",
        "/%61dmin",
        "/x/../admin",
        "/admin%2f..",
    ] {
        let mut h2 = H2::connect(addr, &[]).await;
        let block = get_block("api", path);
        assert!(
            h2.write_by(
                &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block),
                Instant::now() + Duration::from_secs(5)
            )
            .await
        );
        let status = h2.status_of(1, Duration::from_secs(10)).await;
        assert!(
            matches!(status, Some(400 | 429) | None),
            "HTTP/2 :path {path}: {status:?}"
        );
        *outcomes.entry(status.unwrap_or(0)).or_insert(0) += 1;
    }
    // h2c smuggled after an Upgrade to a path the policy does not cover:
    // served as a plain request (by rest), and the HTTP/2 preface after it
    // is no request at all.
    let mut smuggle = b"GET / HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec();
    smuggle.extend_from_slice(PREFACE);
    smuggle.extend(frame(SETTINGS, 0, 0, &[]));
    smuggle.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("api", "/admin"),
    ));
    let (status, head) = raw_exchange(addr, &smuggle).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("x-served-by: rest"), "{head}");

    eprintln!("hostile: outbound bypass attempts: statuses {outcomes:?}");
    assert_eq!(admin.hits(), 1, "a bypass reached the admin backend");
    let leaked: Vec<String> = rest
        .seen()
        .iter()
        .map(|s| s.path.clone())
        .filter(|p| under_admin(p))
        .collect();
    assert!(
        leaked.is_empty(),
        "/admin reached the other backend: {leaked:?}"
    );
    assert!(
        rest.seen()
            .iter()
            .all(|s| s.headers.get("upgrade").is_none()),
        "an h2c Upgrade reached the app"
    );
    // A few hundred short requests: 8 MiB.
    rss.finish("outbound bypass attempts", 8 * 1024).await;
    t.check_alive("outbound bypass attempts").await;
}

/// An app that speaks h2c when asked, as some servers do: an HTTP/1.1
/// request whose Upgrade header lists `h2c` anywhere gets a 101 and the
/// connection becomes HTTP/2. It records each request as
/// `<h1|h2> <path> <x-client-id or ->`.
async fn h2c_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = l.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| h2c_app_h1(req, s.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen, task)
}

fn record(seen: &Mutex<Vec<String>>, req: &Request<hyper::body::Incoming>) {
    let version = if req.version() == http::Version::HTTP_2 {
        "h2"
    } else {
        "h1"
    };
    let id = req
        .headers()
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    seen.lock()
        .unwrap()
        .push(format!("{version} {} {id}", req.uri().path()));
}

async fn h2c_app_h1(
    mut req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<String>>>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    record(&seen, &req);
    let h2c = req
        .headers()
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("h2c"));
    if !h2c {
        return Ok(http::Response::new(Full::new(Bytes::from_static(b"app\n"))));
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let svc = service_fn(move |req| {
                let seen = seen.clone();
                async move {
                    record(&seen, &req);
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"app over h2c\n",
                    ))))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(up, svc)
                .await;
        }
    });
    Ok(http::Response::builder()
        .status(101)
        .header("connection", "Upgrade")
        .header("upgrade", "h2c")
        .body(Full::new(Bytes::new()))
        .unwrap())
}

/// The mesh of tests/mtls.rs, reduced: a TLS control plane (the CA), api's
/// sidecar in front of `app` with a route-level AuthorizationPolicy on
/// /admin that only namespace `ops` passes, and web's sidecar, whose
/// outbound listener the attacker (web's app) uses.
struct AuthzMesh {
    api: ProxyProcess,
    web: ProxyProcess,
    _cp: ControlProcess,
    _dirs: [TempDir; 3],
}

const AUTHZ_MESH: &str = "\
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
  mtls: {clientIdentityHeader: x-client-id}
---
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
  calls: [api]
---
kind: HTTPRoute
metadata: {name: admin}
spec:
  parentRefs: [{name: api}]
  rules: [{matches: [{path: {type: PathPrefix, value: /admin}}], backendRefs: [{name: api}]}]
---
kind: HTTPRoute
metadata: {name: rest}
spec:
  parentRefs: [{name: api}]
  rules: [{backendRefs: [{name: api}]}]
---
kind: AuthorizationPolicy
metadata: {name: admin-only-ops}
spec:
  targetRef: {kind: HTTPRoute, name: admin}
  from: [{namespace: ops}]
";

impl AuthzMesh {
    async fn start(app: SocketAddr) -> AuthzMesh {
        let (data, state, secrets) = (
            TempDir::new("hostile-authz-data"),
            TempDir::new("hostile-authz-state"),
            TempDir::new("hostile-authz-secrets"),
        );
        let tokens = Tokens::new(&secrets);
        for sa in ["api", "web"] {
            tokens.token_for("default", sa);
        }
        let file = tokens.file();
        let cp = ControlProcess::start_with(
            any_port(),
            &data,
            "30s",
            &[
                "--tls",
                "--bootstrap-tokens",
                file.to_str().unwrap(),
                "--trust-domain",
                "mesh.test",
            ],
        )
        .await;
        cp.apply(AUTHZ_MESH).await.expect("apply the mesh");
        let root = data.path().join("ca/root.pem");
        let sidecar = |node: &str, service: &str| {
            let token = tokens.token_for("default", service);
            ProxyBuilder::new()
                .control_plane(&cp.url(), node, &state)
                .arg("--service")
                .arg(service)
                .arg("--bootstrap-token-file")
                .arg(token.to_str().unwrap())
                .arg("--control-plane-ca")
                .arg(root.to_str().unwrap())
        };
        let api = sidecar("api-1", "api").app(app).start().await;
        let web = sidecar("web-1", "web").start().await;
        let mesh = AuthzMesh {
            api,
            web,
            _cp: cp,
            _dirs: [data, state, secrets],
        };
        let c = http1_client();
        let o = mesh.web.outbound;
        wait_until("web reaches api over mTLS", Duration::from_secs(30), || {
            let c = c.clone();
            async move { matches!(get_via(&c, o, "api", "/").await, Ok(r) if r.status == 200) }
        })
        .await;
        mesh
    }

    /// web calls api's `/` and is served.
    async fn served(&self, when: &str) {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            get_via(&http1_client(), self.web.outbound, "api", "/"),
        )
        .await
        .unwrap_or_else(|_| panic!("{when}: no answer in 10 s"))
        .unwrap_or_else(|e| panic!("{when}: {e}"));
        assert_eq!(r.status, 200, "{when}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_authorization_policy_cannot_be_bypassed_on_the_inbound_side() {
    let (app, seen, _server) = h2c_app().await;
    let mut mesh = AuthzMesh::start(app).await;
    let rss = RssWatch::start(&mesh.api);
    let addr = mesh.web.outbound;
    // The policy holds for the plain path...
    let (status, head) = raw_exchange(
        addr,
        b"GET /admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{head}");
    // ...and for every disguise of it (or the request is refused as
    // malformed, or routes nowhere).
    let mut outcomes = BTreeMap::new();
    for (what, req) in http1_bypasses("api") {
        let (status, head) = raw_exchange(addr, &req).await;
        assert!(matches!(status, 400 | 403 | 404), "{what}: {head}");
        *outcomes.entry(status).or_insert(0) += 1;
        mesh.served(&format!("between bypass attempts ({what})"))
            .await;
    }
    // An Upgrade to h2c alone, then HTTP/2 for /admin: served as a plain
    // request for /, never a tunnel.
    let (head, inner) = h2c_tunnel_attempt(addr, "h2c").await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "served as a plain request: {head}"
    );
    assert_eq!(inner, None);
    eprintln!("hostile: inbound bypass attempts: statuses {outcomes:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|l| l.starts_with("h1 ")),
        "the app spoke h2c: {seen:?}"
    );
    let leaked: Vec<&String> = seen
        .iter()
        .filter(|l| l.split(' ').nth(1).is_some_and(under_admin))
        .collect();
    assert!(
        leaked.is_empty(),
        "a denied caller reached /admin: {leaked:?}"
    );
    // The app saw only web's verified identity, never a forged one.
    assert!(
        seen.iter()
            .all(|l| l.ends_with(" spiffe://mesh.test/ns/default/sa/web")),
        "{seen:?}"
    );
    rss.finish("inbound bypass attempts", 8 * 1024).await;
    assert!(
        mesh.api.child.try_wait().unwrap().is_none(),
        "api's proxy exited"
    );
    mesh.served("after the bypass attempts").await;
}

/// Sends `Upgrade: <upgrade>` for `/` (a path the caller may use) through
/// web's sidecar; if the answer is a 101 to h2c, speaks HTTP/2 in the
/// tunnel and asks for /admin. Returns the upgrade's head and, if it
/// came to that, the tunnelled request's status.
async fn h2c_tunnel_attempt(addr: SocketAddr, upgrade: &str) -> (String, Option<u16>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !(head.starts_with("HTTP/1.1 101") && head.to_ascii_lowercase().contains("upgrade: h2c")) {
        return (head, None);
    }
    let mut h2 = H2 {
        tcp: s,
        buf: Vec::new(),
        server_settings: BTreeMap::new(),
    };
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("api", "/admin"),
    ));
    let _ = h2
        .write_by(&hello, Instant::now() + Duration::from_secs(5))
        .await;
    (head, h2.status_of(1, Duration::from_secs(10)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_listing_h2c_after_websocket_does_not_open_an_h2c_tunnel_past_the_policy() {
    let (app, seen, _server) = h2c_app().await;
    let mesh = AuthzMesh::start(app).await;
    let (head, inner) = h2c_tunnel_attempt(mesh.web.outbound, "websocket, h2c").await;
    let seen = seen.lock().unwrap().clone();
    eprintln!("hostile: `Upgrade: websocket, h2c`: {head:?}, /admin in the tunnel: {inner:?}; the app saw {seen:?}");
    assert!(
        seen.iter()
            .all(|l| !l.contains("h2c") && !l.starts_with("h2 ")),
        "the app spoke h2c: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|l| l.split(' ').nth(1).is_some_and(under_admin)),
        "/admin reached the app past the policy: {seen:?}"
    );
    assert_ne!(
        inner,
        Some(200),
        "/admin was served inside an h2c tunnel: {head}"
    );
}

// ------------------------------------------------ rate-limit key flood

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unique_rate_limit_keys_keeps_memory_and_a_tracked_clients_budget() {
    // api is limited to 5 a minute per x-user, with 1,000 keys tracked;
    // the normal requests go to app, which has no limit.
    const MAX_KEYS: usize = 1000;
    const FLOOD: usize = 10_000;
    let api = Upstream::start("api", Behavior::Demo).await;
    let more = format!(
        "---\n{}---\nkind: RateLimitPolicy\nmetadata: {{name: per-user}}\nspec:\n  \
         targetRef: {{kind: Service, name: api}}\n  direction: outbound\n  responseHeaders: false\n  \
         limits: [{{name: per-user, requests: 5, per: minute, key: [{{type: Header, name: x-user}}]}}]\n",
        service_yaml("api", 80, "http", &[api.addr])
    );
    let max_keys = MAX_KEYS.to_string();
    let mut t = Target::start("hostile-keys", &more, &["--ratelimit-max-keys", &max_keys]).await;
    let rss = RssWatch::start(&t.proxy);
    let addr = t.proxy.outbound;
    let status = move |c: HttpClient, user: String| async move {
        let req = Request::get(format!("http://{addr}/"))
            .header("host", "api")
            .header("x-user", user)
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&c, req).await.map(|r| r.status).unwrap_or(0)
    };
    // Tracked before the flood: the first of its five a minute.
    let c = http1_client();
    let mut steady = vec![status(c.clone(), "steady".into()).await];
    // 10,000 new keys over keep-alive connections, 50 in flight.
    let flood = tokio::spawn(async move {
        let h1 = http1_client();
        let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..FLOOD {
            if set.len() >= 50 {
                let s = set.join_next().await.unwrap().unwrap();
                *counts.entry(s).or_default() += 1;
            }
            set.spawn(status(h1.clone(), format!("flood-{i}")));
        }
        while let Some(s) = set.join_next().await {
            *counts.entry(s.unwrap()).or_default() += 1;
        }
        counts
    });
    // Meanwhile the tracked client makes three more, and normal requests
    // are served.
    let mut during = 0;
    while !flood.is_finished() {
        if steady.len() < 4 {
            steady.push(status(c.clone(), "steady".into()).await);
        }
        served(&t.proxy, "during the key flood").await;
        during += 1;
    }
    let counts = flood.await.unwrap();
    steady.push(status(c.clone(), "steady".into()).await);
    while steady.len() < 5 {
        steady.push(status(c.clone(), "steady".into()).await);
    }
    let overflow = t
        .proxy
        .metric("remora_ratelimit_overflow_total", &["limit=\"per-user\""])
        .await;
    eprintln!(
        "hostile: rate-limit key flood: {FLOOD} keys, statuses {counts:?}, {overflow} checks in the overflow bucket; {during} normal requests served meanwhile"
    );
    assert_eq!(
        steady, [200; 5],
        "the tracked client's own budget, through the flood"
    );
    assert_eq!(
        status(c.clone(), "steady".into()).await,
        429,
        "its own limit still holds"
    );
    let ok = counts.get(&200).copied().unwrap_or(0);
    assert_eq!(
        ok + counts.get(&429).copied().unwrap_or(0),
        FLOOD,
        "{counts:?}"
    );
    // 999 flood keys found room; the rest shared the overflow bucket's 5
    // a minute (one more per 12 s the flood took).
    assert!(ok <= MAX_KEYS - 1 + 5 + 2, "the flood got {ok} through");
    // 1,000 tracked keys at about 40 bytes each, and 10,000 requests'
    // transient state: 8 MiB.
    rss.finish("rate-limit key flood", 8 * 1024).await;
    t.check_alive("rate-limit key flood").await;
}
