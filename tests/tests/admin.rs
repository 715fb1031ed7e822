//! The admin port of the real proxy: /config and POST /shutdown answer on
//! loopback or with the admin token (`--admin-token-file`), probes and
//! metrics answer everyone; and the listener survives slowloris clients,
//! connection floods and running out of file descriptors.
//!
//! A client off loopback is this machine's own first global IPv4 address
//! talking to a proxy whose admin listens on 0.0.0.0; without such an
//! address those tests print SKIPPED.

use remora_tests::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The proxy's limits these tests check (proxy/src/admin.rs).
const MAX_CONNECTIONS: usize = 64;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// This machine's first global IPv4 address: a client bound to it reaches a
/// 0.0.0.0 listener from off loopback. Or why there is none.
fn off_loopback_ip() -> Result<IpAddr, String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            cidr.split('/').next()?.parse::<IpAddr>().ok()
        })
        .filter(|ip| !ip.is_loopback())
        .ok_or_else(|| "this machine has no global IPv4 address".to_string())
}

/// The address off loopback, or None after printing why the test skips.
fn off_loopback_or_skip(test: &str) -> Option<IpAddr> {
    match off_loopback_ip() {
        Ok(ip) => Some(ip),
        Err(why) => {
            println!("SKIPPED: {test}: {why}");
            None
        }
    }
}

/// Starts the proxy with its admin on 0.0.0.0 (the harness binds it to
/// loopback), plus `args`, and waits until /ready answers on loopback.
async fn start_on_all_addresses(args: &[&str]) -> ProxyProcess {
    let mut cmd = Command::new(binary("remora-proxy"));
    cmd.args(["--inbound-addr", "127.0.0.1:0"])
        .args(["--outbound-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "0.0.0.0:0"])
        .args(["--app-addr", &free_addr().to_string()])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start remora-proxy");
    let logs = capture_stderr(&mut child, "proxy");
    let deadline = Duration::from_secs(20);
    let admin = bound_addr(&mut child, &logs, "listener=\"admin\"", deadline).await;
    let inbound = bound_addr(&mut child, &logs, "listener=\"inbound\"", deadline).await;
    let outbound = bound_addr(&mut child, &logs, "listener=\"outbound\"", deadline).await;
    let p = ProxyProcess {
        child,
        inbound,
        outbound,
        admin,
        logs,
    };
    let ready = format!("http://127.0.0.1:{}/ready", admin.port());
    wait_until("proxy /ready", deadline, || {
        let ready = ready.clone();
        async move { get_status(&ready).await == Some(200) }
    })
    .await;
    p
}

/// One answer: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// `method path` on the admin port at `port`, from `from` (the connection
/// goes from that address to that address), with `Authorization: Bearer
/// <token>` when given.
async fn call(from: IpAddr, port: u16, method: &str, path: &str, token: Option<&str>) -> Answer {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = socket
        .connect(SocketAddr::new(from, port))
        .await
        .unwrap_or_else(|e| panic!("connect from {from} to port {port}: {e}"));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {raw:?}"));
    Answer {
        status,
        body: body.to_string(),
    }
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls the child until it exits or `within` passes.
async fn wait_exit(p: &mut ProxyProcess, within: Duration) -> ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < end,
            "proxy still running {within:?} later; logs:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn refused_metric(p: &ProxyProcess, path: &str) -> f64 {
    p.metric("remora_admin_refused_total", &[&format!("path=\"{path}\"")])
        .await
}

#[tokio::test]
async fn config_and_probes_answer_on_loopback_without_a_token() {
    let p = ProxyBuilder::new().start().await;
    let port = p.admin.port();
    let config = call(LOOPBACK, port, "GET", "/config", None).await;
    assert_eq!(config.status, 200, "{}", config.body);
    let doc: serde_json::Value = serde_json::from_str(&config.body).expect("/config is JSON");
    assert!(doc.get("version").is_some(), "{doc}");
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(
            call(LOOPBACK, port, "GET", path, None).await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(refused_metric(&p, "/config").await, 0.0);
}

#[tokio::test]
async fn off_loopback_config_needs_the_token_from_the_file() {
    let Some(remote) = off_loopback_or_skip("off_loopback_config_needs_the_token_from_the_file")
    else {
        return;
    };
    let dir = TempDir::new("admin-token");
    let token = dir.write("token", "first-token\n");
    let p = start_on_all_addresses(&["--admin-token-file", token.to_str().unwrap()]).await;
    let port = p.admin.port();
    let config = |token| call(remote, port, "GET", "/config", token);

    // Probes and metrics answer everyone.
    for path in ["/live", "/ready", "/metrics"] {
        let a = call(remote, port, "GET", path, None).await;
        assert_eq!(a.status, 200, "{path} from {remote}: {}", a.body);
    }

    let a = config(None).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.body.starts_with("forbidden: ") && a.body.ends_with('\n'),
        "{a:?}"
    );
    assert_eq!(a.body.lines().count(), 1, "a one-line reason: {a:?}");
    assert!(!a.body.contains("first-token"), "{a:?}");

    let a = config(Some("first-token")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    serde_json::from_str::<serde_json::Value>(&a.body).expect("/config is JSON");

    let a = config(Some("not-the-token")).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("wrong admin token"), "{a:?}");

    // Read at each call: replacing the file rotates the token.
    dir.write("token", "second-token");
    assert_eq!(config(Some("first-token")).await.status, 403);
    assert_eq!(config(Some("second-token")).await.status, 200);

    // An emptied file refuses every call off loopback, never "no token needed".
    dir.write("token", "");
    for t in [None, Some("second-token"), Some("")] {
        let a = config(t).await;
        assert_eq!(a.status, 403, "{t:?}: {}", a.body);
    }
    std::fs::remove_file(&token).unwrap();
    assert_eq!(config(Some("second-token")).await.status, 403);

    // Loopback needs no token, even now.
    assert_eq!(
        call(LOOPBACK, port, "GET", "/config", None).await.status,
        200
    );

    // Refusals: none, wrong, first after rotation, three emptied, deleted.
    assert_eq!(refused_metric(&p, "/config").await, 7.0);
    assert_eq!(refused_metric(&p, "/shutdown").await, 0.0);
    let logs = p
        .logs_with(&["admin call refused", &format!("peer={remote}:")])
        .await;
    assert!(
        logs.lines().any(|l| l.contains("admin call refused")
            && l.contains("INFO")
            && l.contains(&format!("peer={remote}:"))
            && l.contains("/config")),
        "no info line naming the peer:\n{logs}"
    );
    assert!(logs.contains("admin token file unusable"), "{logs}");
}

#[tokio::test]
async fn without_a_token_file_only_loopback_gets_config_and_shutdown() {
    let Some(remote) =
        off_loopback_or_skip("without_a_token_file_only_loopback_gets_config_and_shutdown")
    else {
        return;
    };
    let mut p = start_on_all_addresses(&[]).await;
    let port = p.admin.port();
    let a = call(remote, port, "GET", "/config", Some("guess")).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("--admin-token-file"), "{a:?}");
    let a = call(remote, port, "POST", "/shutdown", None).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(call(remote, port, "GET", "/ready", None).await.status, 200);
    assert_eq!(
        call(LOOPBACK, port, "GET", "/config", None).await.status,
        200
    );
    assert_eq!(refused_metric(&p, "/config").await, 1.0);
    assert_eq!(refused_metric(&p, "/shutdown").await, 1.0);

    let a = call(LOOPBACK, port, "POST", "/shutdown", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let status = wait_exit(&mut p, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", p.logs());
}

#[tokio::test]
async fn off_loopback_shutdown_needs_the_token_and_then_drains() {
    let Some(remote) =
        off_loopback_or_skip("off_loopback_shutdown_needs_the_token_and_then_drains")
    else {
        return;
    };
    let dir = TempDir::new("admin-shutdown");
    let token = dir.write("token", "stop-token");
    let mut p = start_on_all_addresses(&["--admin-token-file", token.to_str().unwrap()]).await;
    let port = p.admin.port();

    for t in [None, Some("wrong")] {
        let a = call(remote, port, "POST", "/shutdown", t).await;
        assert_eq!(a.status, 403, "{t:?}: {}", a.body);
    }
    assert_eq!(refused_metric(&p, "/shutdown").await, 2.0);
    // Still running, and not draining.
    assert!(p.child.try_wait().unwrap().is_none(), "the proxy exited");
    let a = call(remote, port, "GET", "/ready", None).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ready\n"));

    let a = call(remote, port, "POST", "/shutdown", Some("stop-token")).await;
    assert_eq!((a.status, a.body.as_str()), (200, "draining\n"));
    let status = wait_exit(&mut p, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", p.logs());
    assert!(p.logs().contains("shutdown requested"), "{}", p.logs());
}

/// Reads until the server closes the connection; how long that took.
async fn time_until_closed(s: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((start + within).into(), s.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_slowloris_client_is_cut_after_the_header_read_timeout() {
    let p = ProxyBuilder::new().start().await;
    let within = HEADER_READ_TIMEOUT + Duration::from_secs(5);

    // Half a request head, then nothing.
    let mut stalled = TcpStream::connect(p.admin).await.unwrap();
    stalled
        .write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\n")
        .await
        .unwrap();
    // A header line every 500 ms: progress does not extend the deadline.
    let mut trickle = TcpStream::connect(p.admin).await.unwrap();
    trickle.write_all(b"GET /ready HTTP/1.1\r\n").await.unwrap();
    let trickler = tokio::spawn(async move {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = trickle.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                },
                _ = tick.tick() => {
                    if trickle.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        return start.elapsed();
                    }
                }
            }
            assert!(
                start.elapsed() < within,
                "the trickling client is still served"
            );
        }
    });

    let took = time_until_closed(&mut stalled, within).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "cut after {took:?}: before the header-read timeout"
    );
    let took = trickler.await.unwrap();
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "{took:?}"
    );

    // A whole request on the next connection is answered.
    assert_eq!(
        call(LOOPBACK, p.admin.port(), "GET", "/ready", None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn connections_past_the_cap_wait_and_descriptors_stay_bounded() {
    let p = ProxyBuilder::new().start().await;
    let pid = p.child.id();
    let admin = p.admin;
    let before = fds(pid);
    // Past the cap the listener stops accepting, so the proxy holds at most
    // MAX_CONNECTIONS of them, plus a little for its own work.
    let bound = before + MAX_CONNECTIONS + 8;

    // 200 idle connections; the kernel queues those past the cap (and
    // drops some when its backlog is full too: they never connect).
    let attempts: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(admin))
                    .await
                    .ok()?
                    .ok()
            })
        })
        .collect();
    let mut idle = Vec::new();
    for a in attempts {
        if let Some(s) = a.await.unwrap() {
            idle.push(s);
        }
    }
    assert!(
        idle.len() > MAX_CONNECTIONS + 10,
        "only {} connected",
        idle.len()
    );

    // The first are accepted up to the cap; each is cut at the header-read
    // timeout, which lets the next ones in. Watch them go, with the
    // descriptors bounded all along.
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watchers: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                if matches!(s.read(&mut b).await, Ok(0) | Err(_)) {
                    closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut most = 0;
    let end = Instant::now() + 3 * HEADER_READ_TIMEOUT;
    while closed.load(std::sync::atomic::Ordering::Relaxed) < 2 * MAX_CONNECTIONS {
        most = most.max(fds(pid));
        assert!(most <= bound, "{most} descriptors open (bound {bound})");
        assert!(
            Instant::now() < end,
            "only {} idle connections were cut",
            closed.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most >= before + MAX_CONNECTIONS / 2,
        "the idle connections were never accepted ({most} descriptors, {before} before)"
    );

    // The rest give up; the proxy answers its probes at once.
    for w in &watchers {
        w.abort();
    }
    for w in watchers {
        let _ = w.await;
    }
    let ready = format!("http://{admin}/ready");
    wait_until(
        "/ready once the flood is gone",
        Duration::from_secs(5),
        || {
            let ready = ready.clone();
            async move { get_status(&ready).await == Some(200) }
        },
    )
    .await;
    wait_until(
        "descriptors back down",
        Duration::from_secs(5),
        || async move { fds(pid) <= before + 2 },
    )
    .await;
    assert!(
        p.metric("remora_connections_total", &["listener=\"admin\""])
            .await
            > (2 * MAX_CONNECTIONS) as f64
    );
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The soft limit on open files of process `pid`.
fn nofile_soft(pid: u32) -> Option<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3).map(str::to_string)
}

/// Sets the soft limit on open files of process `pid`.
fn prlimit_nofile(pid: u32, soft: &str) -> Result<(), String> {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .output()
        .map_err(|e| format!("cannot run prlimit: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[tokio::test]
async fn accept_errors_back_off_instead_of_spinning() {
    let p = ProxyBuilder::new().start().await;
    let pid = p.child.id();
    let before = fds(pid);
    let soft = nofile_soft(pid).expect("/proc/<pid>/limits");
    // A few descriptors to spare, then EMFILE on accept.
    if let Err(why) = prlimit_nofile(pid, &(before + 4).to_string()) {
        println!("SKIPPED: accept_errors_back_off_instead_of_spinning: prlimit: {why}");
        return;
    }
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(TcpStream::connect(p.admin).await.unwrap());
    }
    p.logs_with(&["accept failed"]).await;
    assert!(p.logs().contains("accept failed"), "{}", p.logs());

    // With connections still queued the error repeats at every attempt: a
    // loop without back-off would burn a core (~100 ticks a second).
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(2)).await; // a measuring window
    let (spent, over) = (cpu_ticks(pid) - c0, t0.elapsed());
    assert!(
        spent < 40,
        "{spent} ticks of CPU in {over:?} while accept kept failing"
    );
    let warns = p
        .logs()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(warns <= 4, "{warns} warnings: a streak warns once");

    // Descriptors back: the admin port recovers.
    prlimit_nofile(pid, &soft).unwrap();
    drop(held);
    let ready = format!("http://{}/ready", p.admin);
    wait_until("/ready after EMFILE", Duration::from_secs(5), || {
        let ready = ready.clone();
        async move { get_status(&ready).await == Some(200) }
    })
    .await;
}
