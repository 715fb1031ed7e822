//! `remoractl inject` as users run it: the real binary on the example
//! workloads in examples/kubernetes/. The output has the interception init
//! container and the native sidecar with the right environment (and no
//! app address: the sidecar serves every port of the pod), the app's HTTP
//! and TCP probes ask the sidecar's admin port, other documents come
//! through byte for byte, a second run changes nothing, and (when
//! kubernetes-validate is installed) the output and deploy/kubernetes/*.yaml
//! are valid Kubernetes 1.33 objects.

use remora_tests::{binary, workspace_root, TempDir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// What each example file should become.
struct Expect {
    file: &'static str,
    /// Kind and name of the injected workload, the Service its sidecar
    /// registers under, and the --skip-* flags of its remora-init.
    injected: &'static [(
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    )],
    /// Workloads inject must refuse, with a phrase of the reason.
    refused: &'static [(&'static str, &'static str)],
}

const EXAMPLES: &[Expect] = &[
    Expect {
        file: "web-deployment.yaml",
        injected: &[("Deployment", "web", "web", &["--skip-outbound-ports=25"])],
        refused: &[],
    },
    Expect {
        file: "api-statefulset.yaml",
        injected: &[(
            "StatefulSet",
            "api-v1-store",
            "api-v1",
            &["--skip-inbound-ports=9090"],
        )],
        refused: &[],
    },
    Expect {
        file: "node-agent-daemonset.yaml",
        injected: &[(
            "DaemonSet",
            "node-agent",
            "node-agent",
            &["--skip-outbound-cidrs=169.254.169.254/32"],
        )],
        refused: &[("DaemonSet default/node-exporter", "hostNetwork: true")],
    },
    Expect {
        file: "migrate-job.yaml",
        injected: &[(
            "Job",
            "api-migrate",
            "api-migrate",
            &["--skip-outbound-ports=5432"],
        )],
        refused: &[],
    },
    Expect {
        file: "report-cronjob.yaml",
        injected: &[("CronJob", "report", "report", &[])],
        refused: &[],
    },
    Expect {
        file: "load-pod.yaml",
        injected: &[("Pod", "load", "load", &[])],
        refused: &[],
    },
];

fn examples_dir() -> PathBuf {
    workspace_root().join("examples/kubernetes")
}

/// Runs `remoractl inject` with `args`, feeding `stdin`.
fn remoractl_inject(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(binary("remoractl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remoractl");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().expect("remoractl inject")
}

/// Injects one file; returns (stdout, stderr), and fails the test unless
/// remoractl exits 0.
fn inject_file(path: &Path) -> (String, String) {
    let out = remoractl_inject(&["-f", path.to_str().unwrap()], b"");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "remoractl inject -f {}: {}\n{stderr}",
        path.display(),
        out.status
    );
    (stdout, stderr)
}

/// The documents of a YAML stream, split at `---` lines.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The items of the block list under the first `key:` line, each as its
/// lines (inject writes kubectl's layout: `- ` at the key's indentation).
fn list_items<'a>(doc: &'a str, key: &str) -> Vec<Vec<&'a str>> {
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim() == format!("{key}:")) else {
        return Vec::new();
    };
    let indent = indent_of(lines[start]);
    let mut items: Vec<Vec<&str>> = Vec::new();
    for line in &lines[start + 1..] {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let i = indent_of(line);
        if i == indent && line.trim_start().starts_with("- ") {
            items.push(vec![line]);
        } else if i > indent && !items.is_empty() {
            items.last_mut().unwrap().push(line);
        } else {
            break;
        }
    }
    items
}

/// The item whose first line is `- name: <name>`.
fn item<'a>(items: &[Vec<&'a str>], name: &str) -> Vec<&'a str> {
    items
        .iter()
        .find(|i| i[0].trim() == format!("- name: {name}"))
        .cloned()
        .unwrap_or_else(|| panic!("no item named {name} in {items:#?}"))
}

fn name_of(item: &[&str]) -> String {
    item[0].trim().trim_start_matches("- name: ").to_string()
}

/// The value of env var `name` in a container's lines: its `value`, or the
/// `fieldPath` it comes from.
fn env_var(container: &[&str], name: &str) -> String {
    let at = container
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no env var {name} in {container:#?}"));
    let next = container[at + 1].trim();
    if let Some(v) = next.strip_prefix("value: ") {
        return v.trim_matches('"').to_string();
    }
    assert_eq!(next, "valueFrom:", "{name}");
    assert_eq!(container[at + 2].trim(), "fieldRef:", "{name}");
    container[at + 3]
        .trim()
        .strip_prefix("fieldPath: ")
        .unwrap_or_else(|| panic!("{name}: no fieldPath"))
        .to_string()
}

fn has_line(lines: &[&str], line: &str) -> bool {
    lines.iter().any(|l| l.trim() == line)
}

/// The document of `kind` named `name`.
fn find_doc<'a>(docs: &'a [String], kind: &str, name: &str) -> &'a str {
    docs.iter()
        .find(|d| {
            d.lines().any(|l| l == format!("kind: {kind}"))
                && d.lines().any(|l| l == format!("  name: {name}"))
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the output"))
}

/// A document's kind and metadata.name (block style, as the examples are).
fn kind_and_name(doc: &str) -> (&str, &str) {
    let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "));
    let name = doc.lines().find_map(|l| l.strip_prefix("  name: "));
    (kind.unwrap_or_default(), name.unwrap_or_default())
}

/// Checks one injected workload's pod spec.
fn check_injected(doc: &str, service: &str, skip: &[&str]) {
    let init = list_items(doc, "initContainers");
    let names: Vec<String> = init.iter().map(|i| name_of(i)).collect();
    assert_eq!(names[..2], ["remora-init", "remora-proxy"], "{doc}");

    // remora-init: the interception rules, as root with NET_ADMIN/NET_RAW.
    let ri = item(&init, "remora-init");
    assert!(has_line(&ri, "image: remora-init:latest"), "{ri:#?}");
    let mut want_args = vec![
        "--proxy-uid=2102",
        "--inbound-port=4143",
        "--outbound-port=4140",
        "--admin-port=4191",
    ];
    want_args.extend_from_slice(skip);
    let ri_text = ri.join("\n");
    let args: Vec<&str> = list_items(&ri_text, "args")
        .iter()
        .map(|a| a[0].trim().trim_start_matches("- "))
        .collect();
    assert_eq!(args, want_args);
    for line in [
        "runAsUser: 0",
        "runAsNonRoot: false",
        "- NET_ADMIN",
        "- NET_RAW",
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
    ] {
        assert!(has_line(&ri, line), "remora-init lacks {line:?}: {ri:#?}");
    }

    // remora-proxy: a native sidecar.
    let rp = item(&init, "remora-proxy");
    for line in [
        "image: remora-proxy:latest",
        "restartPolicy: Always",
        "startupProbe:",
        "readinessProbe:",
        "livenessProbe:",
        "path: /ready",
        "path: /live",
        "failureThreshold: 120",
        "containerPort: 4143",
        "containerPort: 4191",
        "runAsUser: 2102",
        "runAsGroup: 2102",
        "runAsNonRoot: true",
    ] {
        assert!(has_line(&rp, line), "remora-proxy lacks {line:?}: {rp:#?}");
    }
    for (var, want) in [
        (
            "REMORA_CONTROL_PLANE",
            "https://remora-control.remora-system:4200",
        ),
        ("REMORA_CONTROL_PLANE_CA", "/etc/remora/ca/root.pem"),
        ("REMORA_SERVICE", service),
        ("REMORA_NAMESPACE", "metadata.namespace"),
        ("REMORA_IDENTITY_NAMESPACE", "metadata.namespace"),
        ("REMORA_IDENTITY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        (
            "REMORA_BOOTSTRAP_TOKEN_FILE",
            "/var/run/secrets/remora/serviceaccount/token",
        ),
        ("REMORA_STATE_DIR", "/var/lib/remora"),
        ("POD_IP", "status.podIP"),
    ] {
        assert_eq!(env_var(&rp, var), want, "{var}");
    }
    // Nothing pins the app's address or protocol: with interception the
    // sidecar serves whichever port each connection was for.
    for pinned in ["REMORA_APP_ADDR", "REMORA_APP_PROTOCOL"] {
        assert!(
            !rp.iter().any(|l| l.contains(pinned)),
            "remora-proxy has {pinned}: {rp:#?}"
        );
    }

    // Its volumes: the projected token, the CA, in-memory state, /run.
    let volumes = list_items(doc, "volumes");
    let token = item(&volumes, "remora-token");
    for line in ["audience: remora", "expirationSeconds: 3600", "path: token"] {
        assert!(has_line(&token, line), "{token:#?}");
    }
    assert!(has_line(
        &item(&volumes, "remora-ca"),
        "name: remora-ca-root"
    ));
    assert!(has_line(&item(&volumes, "remora-state"), "medium: Memory"));
    item(&volumes, "remora-xtables-lock");
}

#[test]
fn examples_get_the_init_container_and_the_native_sidecar() {
    for ex in EXAMPLES {
        let path = examples_dir().join(ex.file);
        let input = std::fs::read_to_string(&path).unwrap();
        let (out, notes) = inject_file(&path);
        let docs = documents(&out);
        for (kind, name, service, skip) in ex.injected {
            check_injected(find_doc(&docs, kind, name), service, skip);
            assert!(
                notes.contains(&format!(
                    "{kind} default/{name}: injected (Service {service})"
                )),
                "{}: {notes}",
                ex.file
            );
        }
        for (what, why) in ex.refused {
            let line = notes
                .lines()
                .find(|l| l.contains(what))
                .unwrap_or_else(|| panic!("{}: nothing said about {what}: {notes}", ex.file));
            assert!(
                line.contains("not injected") && line.contains(why),
                "{line}"
            );
        }
        // Documents inject leaves alone (other kinds, refused workloads)
        // come through byte for byte, comments and all.
        let input_docs = documents(&input);
        assert_eq!(docs.len(), input_docs.len(), "{}", ex.file);
        for doc in &input_docs {
            let (kind, name) = kind_and_name(doc);
            if ex
                .injected
                .iter()
                .any(|(k, n, _, _)| (*k, *n) == (kind, name))
            {
                continue;
            }
            assert!(
                docs.contains(doc),
                "{}: {kind} {name} not passed through as it was:\n{doc}",
                ex.file
            );
        }
    }
}

#[test]
fn injecting_twice_is_byte_identical() {
    let dir = TempDir::new("inject-twice");
    for ex in EXAMPLES {
        let (once, _) = inject_file(&examples_dir().join(ex.file));
        let again = dir.write(ex.file, &once);
        let (twice, notes) = inject_file(&again);
        assert_eq!(once, twice, "{}", ex.file);
        for (kind, name, _, _) in ex.injected {
            assert!(
                notes.contains(&format!("{kind} default/{name}: already injected")),
                "{}: {notes}",
                ex.file
            );
        }
    }
}

/// A Deployment whose app is probed over HTTP (on a named port), over TCP,
/// and over HTTPS.
const PROBED: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: web:1
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /ready
            port: http
          periodSeconds: 5
        livenessProbe:
          tcpSocket:
            port: 8080
          failureThreshold: 6
        startupProbe:
          httpGet:
            path: /started
            port: 8443
            scheme: HTTPS
";

#[test]
fn app_probes_are_rewritten_to_ask_the_sidecar() {
    let out = remoractl_inject(&["-f", "-"], PROBED.as_bytes());
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    let notes = String::from_utf8(out.stderr).unwrap();
    let app = item(&list_items(&yaml, "containers"), "app").join("\n");
    let probe = |field: &str| -> Vec<String> {
        let start = app
            .lines()
            .position(|l| l.trim() == format!("{field}:"))
            .unwrap_or_else(|| panic!("no {field}: {app}"));
        app.lines()
            .skip(start + 1)
            .take_while(|l| indent_of(l) > 8)
            .map(|l| l.trim().to_string())
            .collect()
    };
    assert_eq!(
        probe("readinessProbe"),
        [
            "httpGet:",
            "path: /app-health/app/readyz",
            "port: 4191",
            "periodSeconds: 5"
        ]
    );
    assert_eq!(
        probe("livenessProbe"),
        [
            "httpGet:",
            "path: /app-health/app/livez",
            "port: 4191",
            "failureThreshold: 6"
        ]
    );
    // HTTPS is left to the kubelet, and inject says so.
    assert_eq!(
        probe("startupProbe"),
        ["httpGet:", "path: /started", "port: 8443", "scheme: HTTPS"]
    );
    assert!(
        notes.contains("Deployment web: container app: startupProbe left as is: HTTPS probes are not rewritten"),
        "{notes}"
    );

    // The sidecar is told what they were, the named port resolved.
    let rp = item(&list_items(&yaml, "initContainers"), "remora-proxy");
    let at = rp
        .iter()
        .position(|l| l.trim() == "- name: REMORA_APP_PROBES")
        .unwrap_or_else(|| panic!("no REMORA_APP_PROBES: {rp:#?}"));
    let block: Vec<&str> = rp[at + 1..].iter().take(5).map(|l| l.trim()).collect();
    assert_eq!(
        block,
        [
            "value: |-",
            "{",
            r#""/app-health/app/livez": {"tcpSocket":{"port":8080},"timeoutSeconds":1},"#,
            r#""/app-health/app/readyz": {"httpGet":{"path":"/ready","port":8080,"scheme":"HTTP"},"timeoutSeconds":1}"#,
            "}",
        ]
    );

    // Once more: byte for byte the same.
    let again = remoractl_inject(&["-f", "-"], yaml.as_bytes());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), yaml);

    // The annotation turns it off.
    let off = PROBED.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web}\n      annotations: {remora.dev/rewrite-app-probes: \"false\"}\n",
    );
    let out = remoractl_inject(&["-f", "-"], off.as_bytes());
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(!yaml.contains("/app-health/"), "{yaml}");
    assert!(!yaml.contains("REMORA_APP_PROBES"), "{yaml}");
}

#[test]
fn stdin_and_directory_inputs_give_the_same_output() {
    let path = examples_dir().join("web-deployment.yaml");
    let (from_file, _) = inject_file(&path);
    let out = remoractl_inject(&["-f", "-"], &std::fs::read(&path).unwrap());
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), from_file);

    // A directory: its files in name order, one stream.
    let (from_dir, _) = inject_file(&examples_dir());
    let mut files: Vec<&str> = EXAMPLES.iter().map(|e| e.file).collect();
    files.sort();
    let each: Vec<String> = files
        .iter()
        .map(|f| inject_file(&examples_dir().join(f)).0)
        .collect();
    assert_eq!(from_dir, each.join("---\n"));
}

#[test]
fn unreadable_or_unparsable_input_fails_and_writes_nothing() {
    let out = remoractl_inject(&["-f", "-"], b"kind: Pod\n---\nkind: [unclosed\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<stdin>: document 2"), "{err}");

    let out = remoractl_inject(&["-f", "/nonexistent/remora.yaml"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// Says SKIPPED on the terminal, past the test harness's output capture:
/// a skipped check must never look like a pass.
fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

#[test]
fn injected_examples_and_deploy_manifests_pass_kubernetes_validate() {
    let probe = Command::new("kubernetes-validate")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        skipped("kubernetes-validate not installed (pip install kubernetes-validate)");
        return;
    }
    let dir = TempDir::new("inject-validate");
    let mut files = Vec::new();
    for ex in EXAMPLES {
        let (out, _) = inject_file(&examples_dir().join(ex.file));
        files.push(dir.write(ex.file, &out));
    }
    let deploy = workspace_root().join("deploy/kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&deploy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    assert!(
        !manifests.is_empty(),
        "no manifests in {}",
        deploy.display()
    );
    files.extend(manifests);

    // 1.33: native sidecars are GA; --strict refuses unknown fields.
    let out = Command::new("kubernetes-validate")
        .args(["--kubernetes-version", "1.33.0", "--strict"])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    // Every file was looked at, not just the first.
    for f in &files {
        assert!(
            report.contains(&format!("{} passed", f.display())),
            "{} not validated:\n{report}",
            f.display()
        );
    }
}
