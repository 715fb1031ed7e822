//! remoractl against the real control plane: both binaries run as
//! subprocesses, the control plane on a free loopback port with a fresh
//! data directory per test.

use remora_tests::{any_port, binary, free_addr, logged_addr, TempDir};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running remora-control. Killed on drop.
struct ControlPlane {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<String>>,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts the control plane and waits until it accepts connections.
    fn start() -> ControlPlane {
        let dir = TempDir::new("remoractl");
        let mut child = Command::new(binary("remora-control"))
            .arg("--listen")
            .arg(any_port().to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("REMORA_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start remora-control");
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                if std::env::var_os("REMORA_TEST_ECHO").is_some() {
                    eprint!("[control] {text}");
                }
                sink.lock().unwrap().push_str(&text);
            }
        });
        let mut cp = ControlPlane {
            child,
            addr: any_port(),
            logs,
            dir,
        };
        // The kernel picks the port; the "listening" log line names it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = logged_addr(&cp.logs(), "control plane listening") {
                cp.addr = addr;
                break;
            }
            if let Ok(Some(status)) = cp.child.try_wait() {
                panic!(
                    "remora-control exited with {status} before listening:\n{}",
                    cp.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "remora-control did not listen in time:\n{}",
                cp.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        cp
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Writes a file into this control plane's scratch directory; returns
    /// its path.
    fn file(&self, name: &str, contents: &str) -> String {
        self.dir.write(name, contents).display().to_string()
    }

    /// Runs remoractl against this control plane.
    fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_with(args, None, &[])
    }

    /// Runs remoractl against this control plane with stdin and extra
    /// environment variables.
    fn ctl_with(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
        let url = self.url();
        let mut full = vec!["--server", url.as_str()];
        full.extend_from_slice(args);
        let mut r = remoractl(&full, stdin, env);
        r.control_logs = self.logs();
        r
    }

    /// `get -o json`, parsed.
    fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        let r = self.ctl(&full);
        r.expect(0);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {r}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One remoractl run.
struct Run {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
    control_logs: String,
}

impl Run {
    #[track_caller]
    fn expect(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code: {self}");
        self
    }

    #[track_caller]
    fn stdout_has(&self, text: &str) -> &Run {
        assert!(self.stdout.contains(text), "stdout lacks {text:?}: {self}");
        self
    }

    #[track_caller]
    fn stderr_has(&self, text: &str) -> &Run {
        assert!(self.stderr.contains(text), "stderr lacks {text:?}: {self}");
        self
    }

    /// Table rows (after the header lines) split on whitespace, for rows
    /// whose first cell is `first`.
    fn rows(&self, first: &str) -> Vec<Vec<String>> {
        self.stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|cells| cells.first().map(String::as_str) == Some(first))
            .collect()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "remoractl {:?} exited {}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )?;
        if !self.control_logs.is_empty() {
            write!(f, "--- control plane\n{}", self.control_logs)?;
        }
        Ok(())
    }
}

/// Runs remoractl with `args`, optional stdin and extra environment.
fn remoractl(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary("remoractl"));
    cmd.args(args)
        .env_remove("REMORA_SERVER")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start remoractl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
        // Dropping the pipe closes stdin.
    }
    let out = child.wait_with_output().expect("run remoractl");
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        control_logs: String::new(),
    }
}

/// Two Services and a route splitting `web`'s traffic to `api` with
/// `weight`.
fn mesh(weight: u32) -> String {
    format!(
        "kind: Service
metadata: {{name: web}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: 10.0.0.1, port: 8080}}]
---
kind: Service
metadata: {{name: api}}
spec:
  ports: [{{port: 80, protocol: http2}}]
  endpoints: [{{address: 10.0.0.2, port: 8080}}, {{address: 10.0.0.3, port: 8080}}]
---
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - backendRefs: [{{name: api, weight: {weight}}}]
"
    )
}

/// The weight of `web`'s first backend, from `get -o json`.
fn route_weight(cp: &ControlPlane) -> u64 {
    let cfg = cp.get_json(&["route", "web"]);
    cfg["httpRoutes"][0]["spec"]["rules"][0]["backendRefs"][0]["weight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no weight in {cfg}"))
}

#[test]
fn apply_then_get_in_every_format() {
    let cp = ControlPlane::start();
    let f = cp.file("mesh.yaml", &mesh(90));
    cp.ctl(&["apply", "-f", &f, "--author", "alice"])
        .expect(0)
        .stdout_has("applied: version 1 (2 services, 1 HTTPRoute");

    // table: a version header, then one row per resource.
    let t = cp.ctl(&["get"]);
    t.expect(0).stdout_has("version 1");
    for header in ["KIND", "NAMESPACE", "NAME", "SUMMARY"] {
        t.stdout_has(header);
    }
    let services = t.rows("Service");
    assert_eq!(services.len(), 2, "{t}");
    let api = services.iter().find(|r| r[2] == "api").expect("api row");
    assert_eq!(api[1], "default");
    let api_line = t.stdout.lines().find(|l| l.contains(" api ")).unwrap();
    assert!(api_line.contains("80/http2"), "{t}");
    assert!(api_line.contains("2 endpoints"), "{t}");
    let routes = t.rows("HTTPRoute");
    assert_eq!(routes.len(), 1, "{t}");
    assert_eq!(routes[0][1..3], ["default".to_string(), "web".to_string()]);
    let route_line = t
        .stdout
        .lines()
        .find(|l| l.starts_with("HTTPRoute"))
        .unwrap();
    assert!(route_line.contains("default/web"), "{t}");
    assert!(route_line.contains("1 rule"), "{t}");

    // Every spelling of a kind.
    for kind in ["svc", "service", "services", "Service", "SERVICES"] {
        let r = cp.ctl(&["get", kind]);
        r.expect(0);
        assert_eq!(r.rows("Service").len(), 2, "{r}");
        assert!(r.rows("HTTPRoute").is_empty(), "{r}");
    }
    for kind in ["route", "routes", "httproute", "httproutes", "HTTPRoute"] {
        let r = cp.ctl(&["get", kind]);
        r.expect(0);
        assert_eq!(r.rows("HTTPRoute").len(), 1, "{r}");
        assert!(r.rows("Service").is_empty(), "{r}");
    }
    let one = cp.ctl(&["get", "svc", "api", "-n", "default"]);
    one.expect(0);
    assert_eq!(one.rows("Service").len(), 1, "{one}");

    // json: the Config, as the proto's camelCase serde.
    let all = cp.get_json(&[]);
    assert_eq!(all["services"].as_array().unwrap().len(), 2, "{all}");
    assert_eq!(all["httpRoutes"][0]["metadata"]["name"], "web", "{all}");
    assert_eq!(route_weight(&cp), 90);

    // yaml: documents that apply back unchanged.
    let y = cp.ctl(&["get", "-o", "yaml"]);
    y.expect(0)
        .stdout_has("kind: HTTPRoute")
        .stdout_has("kind: Service")
        .stdout_has("weight: 90");
    cp.ctl_with(&["apply", "-f", "-"], Some(&y.stdout), &[])
        .expect(0)
        .stdout_has("unchanged: version 1");

    // A named resource that does not exist.
    cp.ctl(&["get", "route", "nope"])
        .expect(1)
        .stderr_has("nope");
    cp.ctl(&["get", "svc", "api", "-n", "elsewhere"])
        .expect(1)
        .stderr_has("api");
    // An unknown kind is a usage error.
    cp.ctl(&["get", "gateway"]).expect(2);
}

#[test]
fn apply_from_stdin() {
    let cp = ControlPlane::start();
    cp.ctl_with(&["apply", "-f", "-"], Some(&mesh(7)), &[])
        .expect(0)
        .stdout_has("applied: version 1");
    assert_eq!(route_weight(&cp), 7);
    // Applying the same again changes nothing and makes no version.
    cp.ctl_with(&["apply", "-f", "-"], Some(&mesh(7)), &[])
        .expect(0)
        .stdout_has("unchanged: version 1");
    // A parse error from stdin names the source, resource and field, and
    // nothing reaches the server.
    let bad = mesh(7).replace("weight: 7", "wieght: 7");
    cp.ctl_with(&["apply", "-f", "-"], Some(&bad), &[])
        .expect(1)
        .stderr_has("<stdin>")
        .stderr_has("HTTPRoute default/web")
        .stderr_has("rules[0].backendRefs[0]")
        .stderr_has("wieght");
    let h = cp.ctl(&["history"]);
    h.expect(0);
    assert_eq!(h.rows("1").len(), 1, "{h}");
    assert!(h.rows("2").is_empty(), "{h}");
}

#[test]
fn diff_shows_changes_and_exit_code_tells_whether_any() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    let b = cp.file("b.yaml", &mesh(80));
    cp.ctl(&["apply", "-f", &a]).expect(0);

    let d = cp.ctl(&["diff", "-f", &b]);
    d.expect(1).stdout_has("~ HTTPRoute default/web");
    let lines: Vec<&str> = d.stdout.lines().map(str::trim_start).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with('-') && l.contains("weight: 90")),
        "{d}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with('+') && l.contains("weight: 80")),
        "{d}"
    );
    // Unchanged resources only with --all.
    assert!(!d.stdout.contains("Service default/api"), "{d}");
    cp.ctl(&["diff", "-f", &b, "--all"])
        .expect(1)
        .stdout_has("Service default/api");
    // diff changed nothing.
    assert_eq!(route_weight(&cp), 90);

    // A new resource shows as created.
    let extra = format!(
        "{}---\nkind: Service\nmetadata: {{name: db}}\nspec:\n  ports: [{{port: 5432, protocol: tcp}}]\n",
        mesh(90)
    );
    cp.ctl_with(&["diff", "-f", "-"], Some(&extra), &[])
        .expect(1)
        .stdout_has("+ Service default/db");

    // Identical config: exit 0.
    cp.ctl(&["diff", "-f", &a])
        .expect(0)
        .stdout_has("no changes");
    // Invalid input is an error, not "changes".
    let bad = cp.file("bad.yaml", &mesh(2_000_000));
    cp.ctl(&["diff", "-f", &bad])
        .expect(2)
        .stderr_has("rules[0].backendRefs[0].weight");
}

#[test]
fn invalid_apply_is_rejected_with_the_field_and_changes_nothing() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    cp.ctl(&["apply", "-f", &a]).expect(0);
    let before = cp.get_json(&[]);

    let bad = cp.file("bad.yaml", &mesh(2_000_000));
    cp.ctl(&["apply", "-f", &bad])
        .expect(1)
        .stderr_has("HTTPRoute default/web")
        .stderr_has("rules[0].backendRefs[0].weight");
    assert_eq!(cp.get_json(&[]), before);
    let t = cp.ctl(&["get"]);
    t.expect(0).stdout_has("version 1");

    // A route to a Service that does not exist.
    let dangling = "kind: HTTPRoute\nmetadata: {name: other}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - backendRefs: [{name: ghost}]\n";
    cp.ctl_with(&["apply", "-f", "-"], Some(dangling), &[])
        .expect(1)
        .stderr_has("HTTPRoute default/other")
        .stderr_has("rules[0].backendRefs[0]");
    assert_eq!(cp.get_json(&[]), before);

    // A file with no resources at all.
    let empty = cp.file("empty.yaml", "# nothing\n");
    cp.ctl(&["apply", "-f", &empty]).expect(1);
    // An unreadable file is a usage error.
    let missing = format!("{}/missing.yaml", cp.dir.path().display());
    cp.ctl(&["apply", "-f", &missing])
        .expect(2)
        .stderr_has("missing.yaml");
    // -f is required.
    cp.ctl(&["apply"]).expect(2);

    let h = cp.ctl(&["history"]);
    h.expect(0);
    assert!(
        h.rows("2").is_empty(),
        "a rejected apply made a version: {h}"
    );
}

#[test]
fn delete_removes_a_resource_unless_still_referenced() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    cp.ctl(&["apply", "-f", &a]).expect(0);

    // api is still a backend of the route.
    cp.ctl(&["delete", "svc", "api"])
        .expect(1)
        .stderr_has("HTTPRoute default/web");
    assert_eq!(
        cp.get_json(&["svc"])["services"].as_array().unwrap().len(),
        2
    );

    cp.ctl(&["delete", "route", "web", "-n", "default"])
        .expect(0)
        .stdout_has("deleted: HTTPRoute default/web (version 2)");
    cp.ctl(&["get", "route", "web"]).expect(1);
    cp.ctl(&["delete", "service", "api"])
        .expect(0)
        .stdout_has("deleted: Service default/api (version 3)");
    let left = cp.get_json(&[]);
    let services = left["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{left}");
    assert_eq!(services[0]["metadata"]["name"], "web");

    // Deleting what is not there.
    cp.ctl(&["delete", "svc", "api"])
        .expect(1)
        .stderr_has("api");
    // A kind it does not know is a usage error.
    cp.ctl(&["delete", "gateway", "x"]).expect(2);
}

#[test]
fn history_lists_versions_with_authors() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    let b = cp.file("b.yaml", &mesh(80));
    cp.ctl(&["apply", "-f", &a, "--author", "alice"]).expect(0);
    // The default author is $USER@$HOSTNAME.
    cp.ctl_with(
        &["apply", "-f", &b],
        None,
        &[("USER", "carol"), ("HOSTNAME", "box")],
    )
    .expect(0)
    .stdout_has("applied: version 2");
    cp.ctl(&["delete", "route", "web", "--author", "dave"])
        .expect(0);

    let h = cp.ctl(&["history"]);
    h.expect(0)
        .stdout_has("VERSION")
        .stdout_has("TIME")
        .stdout_has("AUTHOR")
        .stdout_has("SUMMARY");
    let author = |v: &str| {
        let rows = h.rows(v);
        assert_eq!(rows.len(), 1, "version {v}: {h}");
        // VERSION TIME AUTHOR SUMMARY...
        let time = &rows[0][1];
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "time {time:?}: {h}"
        );
        assert!(time.as_str() > "2020-", "time {time:?}: {h}");
        rows[0][2].clone()
    };
    assert_eq!(author("1"), "alice");
    assert_eq!(author("2"), "carol@box");
    assert_eq!(author("3"), "dave");
}

#[test]
fn rollback_restores_an_earlier_config() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    let b = cp.file("b.yaml", &mesh(80));
    cp.ctl(&["apply", "-f", &a]).expect(0);
    cp.ctl(&["apply", "-f", &b]).expect(0);
    cp.ctl(&["delete", "route", "web"]).expect(0);
    cp.ctl(&["get", "route", "web"]).expect(1);

    cp.ctl(&["rollback", "1", "--author", "erin"])
        .expect(0)
        .stdout_has("rolled back to version 1's config as version 4");
    assert_eq!(route_weight(&cp), 90);
    cp.ctl(&["get"]).expect(0).stdout_has("version 4");

    cp.ctl(&["rollback", "2"])
        .expect(0)
        .stdout_has("rolled back to version 2's config as version 5");
    assert_eq!(route_weight(&cp), 80);

    let h = cp.ctl(&["history"]);
    h.expect(0);
    assert_eq!(h.rows("4")[0][2], "erin", "{h}");
    assert_eq!(h.rows("5").len(), 1, "{h}");

    // A version that does not exist.
    cp.ctl(&["rollback", "99"]).expect(1).stderr_has("99");
    assert_eq!(route_weight(&cp), 80);
    // Not a number.
    cp.ctl(&["rollback", "latest"]).expect(2);
}

#[test]
fn status_shows_versions() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    cp.ctl(&["apply", "-f", &a]).expect(0);
    cp.ctl(&["status"])
        .expect(0)
        .stdout_has("config version 1")
        .stdout_has("snapshot version");
}

/// The row of `remoractl status` for `node`, once `cond` holds for it.
async fn wait_for_status(
    cp: &ControlPlane,
    node: &str,
    what: &str,
    cond: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = cp.ctl(&["status"]);
        r.expect(0);
        if let Some(row) = r.rows(node).into_iter().find(|row| cond(row)) {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn status_shows_each_proxy_ack_and_nack() {
    let cp = ControlPlane::start();
    let a = cp.file("a.yaml", &mesh(90));
    cp.ctl(&["apply", "-f", &a]).expect(0);
    let state = TempDir::new("remoractl-proxy-state");
    // At most one route rule: a two-rule route gets NACKed.
    let proxy = remora_tests::ProxyBuilder::new()
        .arg("--control-plane")
        .arg(&cp.url())
        .arg("--service")
        .arg("web")
        .arg("--node-id")
        .arg("node-a")
        .arg("--state-dir")
        .arg(state.path().to_str().unwrap())
        .arg("--max-route-rules")
        .arg("1")
        .start()
        .await;

    // NODE SERVICE CONNECTED VERSION STATE INSTANCE SINCE
    let row = wait_for_status(&cp, "node-a", "ACK", |r| {
        r.get(4).map(String::as_str) == Some("ACK")
    })
    .await;
    assert_eq!(row[1], "default/web", "{row:?}");
    assert_eq!(row[2], "yes", "{row:?}");
    assert!(row[3].starts_with("1."), "acked version {row:?}");
    assert_eq!(row[5], proxy.inbound.to_string(), "{row:?}");
    assert!(row[6].ends_with('Z'), "since {row:?}");
    cp.ctl(&["status"])
        .expect(0)
        .stdout_has("config version 1")
        .stdout_has("NODE")
        .stdout_has("INSTANCE");

    let two_rules = "kind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - backendRefs: [{name: api}]\n  - matches: [{path: {value: /x}}]\n    backendRefs: [{name: web}]\n";
    cp.ctl_with(&["apply", "-f", "-"], Some(two_rules), &[])
        .expect(0)
        .stdout_has("applied: version 2");
    let row = wait_for_status(&cp, "node-a", "NACK", |r| {
        r.get(4).map(String::as_str) == Some("NACK:")
    })
    .await;
    // Still running (and having acked) version 1.
    assert!(row[3].starts_with("1."), "acked version {row:?}");
    cp.ctl(&["status"])
        .expect(0)
        .stdout_has("config version 2")
        .stdout_has("--max-route-rules");
}

#[test]
fn server_from_environment() {
    let cp = ControlPlane::start();
    let r = remoractl(&["get"], None, &[("REMORA_SERVER", &cp.url())]);
    r.expect(0);
    assert!(r.stdout.contains("version 0"), "{r}");
}

#[test]
fn check_validates_offline() {
    let dir = TempDir::new("remoractl-check");
    // Nothing listens there: check must not need a server.
    let nowhere = format!("http://{}", free_addr());
    let good = dir.write("good.yaml", &mesh(90));
    let r = remoractl(
        &["--server", &nowhere, "check", "-f", good.to_str().unwrap()],
        None,
        &[],
    );
    r.expect(0).stdout_has("ok: 2 services, 1 HTTP routes");
    // A directory of files, and stdin.
    remoractl(&["check", "-f", dir.path().to_str().unwrap()], None, &[]).expect(0);
    remoractl(&["check", "-f", "-"], Some(&mesh(1)), &[]).expect(0);

    let bad = dir.write("bad.yaml", &mesh(2_000_000));
    remoractl(&["check", "-f", bad.to_str().unwrap()], None, &[])
        .expect(1)
        .stderr_has("HTTPRoute default/web")
        .stderr_has("rules[0].backendRefs[0].weight");
    // A route whose backend is missing from the (complete) config.
    let only_route = dir.write(
        "route.yaml",
        "kind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - backendRefs: [{name: web}]\n",
    );
    remoractl(&["check", "-f", only_route.to_str().unwrap()], None, &[])
        .expect(1)
        .stderr_has("parentRefs[0]");
    let missing = dir.path().join("missing.yaml");
    remoractl(&["check", "-f", missing.to_str().unwrap()], None, &[])
        .expect(2)
        .stderr_has("missing.yaml");
}

#[test]
fn unreachable_server_exits_3() {
    let dir = TempDir::new("remoractl-down");
    let f = dir.write("a.yaml", &mesh(90));
    let f = f.to_str().unwrap();
    let nowhere = format!("http://{}", free_addr());
    for args in [
        vec!["apply", "-f", f],
        vec!["diff", "-f", f],
        vec!["get"],
        vec!["delete", "svc", "web"],
        vec!["history"],
        vec!["rollback", "1"],
        vec!["status"],
    ] {
        let mut full = vec!["--server", nowhere.as_str(), "--timeout", "2s"];
        full.extend_from_slice(&args);
        remoractl(&full, None, &[])
            .expect(3)
            .stderr_has(nowhere.as_str());
    }
}

#[test]
fn help_works_for_every_command() {
    let top = remoractl(&["--help"], None, &[]);
    top.expect(0)
        .stdout_has("Exit codes")
        .stdout_has("--server")
        .stdout_has("REMORA_SERVER");
    for cmd in [
        "apply", "diff", "get", "delete", "history", "rollback", "status", "check",
    ] {
        assert!(top.stdout.contains(cmd), "{cmd} missing: {top}");
        let r = remoractl(&[cmd, "--help"], None, &[]);
        r.expect(0).stdout_has(&format!("Usage: remoractl {cmd}"));
        remoractl(&["help", cmd], None, &[]).expect(0);
    }
    remoractl(&["apply", "--help"], None, &[])
        .expect(0)
        .stdout_has("--author")
        .stdout_has("--filename");
    remoractl(&["get", "--help"], None, &[])
        .expect(0)
        .stdout_has("--output")
        .stdout_has("--namespace");
    // No command is a usage error.
    remoractl(&[], None, &[]).expect(2);
}
