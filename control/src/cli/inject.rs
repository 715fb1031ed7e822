//! `remoractl inject`: adds the Remora sidecar to the pod templates of
//! Kubernetes manifests, offline, like `linkerd inject`.
//!
//! Each pod gets two init containers, in this order:
//! - `remora-init` runs `remora-proxy init` as root with NET_ADMIN and
//!   NET_RAW: it installs the iptables rules that send the pod's traffic
//!   through the proxy (except the proxy's own, by uid) and exits.
//! - `remora-proxy`, a native sidecar (`restartPolicy: Always`): it starts
//!   before the app containers, which wait for its startup probe (config and
//!   first workload certificate), runs beside them, and stops after them.
//!
//! The sidecar is not told where the app listens: it serves whatever port
//! each intercepted connection was for. The kubelet's HTTP and TCP probes
//! of the app would be intercepted too (and refused by a Strict Service, as
//! plaintext from outside the mesh), so they are rewritten to ask the
//! sidecar's admin port (`/app-health/<container>/<kind>`), and the sidecar
//! is told what each one was (REMORA_APP_PROBES), as Istio does.
//!
//! Documents are read as `yaml_serde::Value`, so unknown fields and key
//! order survive. A document that is not changed (another kind, already
//! injected, disabled, refused) is written back byte for byte, comments
//! included, so inject is idempotent: its own output comes back identical.
//! A changed document is written by `to_yaml`, which quotes every string
//! that kubectl's YAML 1.1 reader would take for something else.

use super::Failure;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use yaml_serde::{Mapping, Value};

pub const DEFAULT_CONTROL_PLANE: &str = "https://remora-control.remora-system:4200";
pub const DEFAULT_PROXY_IMAGE: &str = "remora-proxy:latest";
pub const DEFAULT_INIT_IMAGE: &str = "remora-init:latest";

/// Container names: `remora-proxy` in a pod means it is already injected.
const PROXY: &str = "remora-proxy";
const INIT: &str = "remora-init";

/// The sidecar's uid and gid; `remora-init` leaves its traffic alone.
const PROXY_UID: u64 = 2102;
const INBOUND_PORT: u64 = 4143;
const OUTBOUND_PORT: u64 = 4140;
const ADMIN_PORT: u64 = 4191;

/// The pod's own service-account token for audience "remora": the bootstrap
/// credential the control plane checks with a TokenReview.
const TOKEN_VOLUME: &str = "remora-token";
const TOKEN_DIR: &str = "/var/run/secrets/remora/serviceaccount";
/// The mesh's root CA (ConfigMap remora-ca-root, key root.pem).
const CA_VOLUME: &str = "remora-ca";
const CA_CONFIGMAP: &str = "remora-ca-root";
const CA_DIR: &str = "/etc/remora/ca";
/// The last-known-good snapshot, in memory.
const STATE_VOLUME: &str = "remora-state";
const STATE_DIR: &str = "/var/lib/remora";
/// /run for remora-init: iptables takes its lock file there, and the root
/// filesystem is read-only.
const XTABLES_VOLUME: &str = "remora-xtables-lock";
const VOLUMES: [&str; 4] = [TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME, XTABLES_VOLUME];

/// The sidecar stops after the app containers have exited, so there is
/// little left to drain by then.
const DRAIN_TIMEOUT: &str = "5s";

const ANN_INJECT: &str = "remora.dev/inject";
const ANN_SERVICE: &str = "remora.dev/service";
const ANN_SKIP_INBOUND_PORTS: &str = "remora.dev/skip-inbound-ports";
const ANN_SKIP_OUTBOUND_PORTS: &str = "remora.dev/skip-outbound-ports";
const ANN_SKIP_OUTBOUND_CIDRS: &str = "remora.dev/skip-outbound-cidrs";
const ANN_REWRITE_APP_PROBES: &str = "remora.dev/rewrite-app-probes";

/// The app's probes, as the sidecar's admin server answers them: the
/// kubelet asks for `/app-health/<container>/<suffix>` on the admin port.
const APP_HEALTH: &str = "/app-health/";
const APP_PROBES: [(&str, &str); 3] = [
    ("readinessProbe", "readyz"),
    ("livenessProbe", "livez"),
    ("startupProbe", "startupz"),
];
/// The kubelet's probe timeout when a probe sets none.
const PROBE_TIMEOUT_SECONDS: u64 = 1;

/// What the injected containers run and talk to.
#[derive(Clone, Debug)]
pub struct Options {
    pub control_plane: String,
    pub proxy_image: String,
    pub init_image: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            control_plane: DEFAULT_CONTROL_PLANE.into(),
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            init_image: DEFAULT_INIT_IMAGE.into(),
        }
    }
}

/// Reads `path` (a file, a directory of .yaml/.yml files in name order, or
/// `-` for stdin), writes every document to stdout, injected where it
/// applies, and what happened to each workload to stderr. Fails (and writes
/// nothing) only when the input cannot be read (exit 2) or parsed (exit 1).
pub fn run(path: &Path, opts: &Options) -> Result<u8, Failure> {
    let mut outputs = Vec::new();
    let mut notes = Vec::new();
    for (source, text) in read_inputs(path)? {
        let out = inject_text(&text, &source, opts, &mut notes)?;
        if !out.is_empty() {
            outputs.push(out);
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(outputs.join("---\n").as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::usage(format!("writing the output: {e}")))?;
    for note in notes {
        eprintln!("{note}");
    }
    Ok(0)
}

/// Each input as (name for messages, text).
fn read_inputs(path: &Path) -> Result<Vec<(String, String)>, Failure> {
    let read_err = |p: &Path, e: std::io::Error| Failure::usage(format!("{}: {e}", p.display()));
    let files: Vec<PathBuf> = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::usage(format!("{}: {e}", super::input::STDIN)))?;
        return Ok(vec![(
            super::input::STDIN.into(),
            utf8(super::input::STDIN, bytes)?,
        )]);
    } else if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| read_err(path, e))? {
            let p = entry.map_err(|e| read_err(path, e))?.path();
            let yaml = matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"));
            if yaml && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut inputs = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| read_err(&f, e))?;
        let name = f.display().to_string();
        let text = utf8(&name, bytes)?;
        inputs.push((name, text));
    }
    Ok(inputs)
}

fn utf8(name: &str, bytes: Vec<u8>) -> Result<String, Failure> {
    String::from_utf8(bytes).map_err(|e| Failure::invalid(format!("{name}: not UTF-8 text: {e}")))
}

// ------------------------------------------------------------ the stream

/// Injects every document of one YAML stream; `---` separates them in the
/// result. Appends one note per workload to `notes`.
pub fn inject_text(
    text: &str,
    source: &str,
    opts: &Options,
    notes: &mut Vec<String>,
) -> Result<String, Failure> {
    let mut pieces = Vec::new();
    for (i, chunk) in split_documents(text).into_iter().enumerate() {
        let doc_no = i + 1;
        let mut value = parse_document(&chunk)
            .map_err(|e| Failure::invalid(format!("{source}: document {doc_no}: {e}")))?;
        let at = format!("{source}: document {doc_no}");
        let mut doc_notes = Vec::new();
        let changed = visit(&mut value, opts, &mut doc_notes);
        let piece = if changed {
            match to_yaml(&value) {
                Ok(yaml) => format!("{}{yaml}", leading_comments(&chunk)),
                Err(e) => {
                    notes.push(format!("{at}: left unchanged: cannot write it back: {e}"));
                    doc_notes.clear();
                    chunk
                }
            }
        } else {
            chunk
        };
        notes.extend(doc_notes.into_iter().map(|n| format!("{at}: {n}")));
        pieces.push(piece);
    }
    Ok(pieces.join("---\n"))
}

/// Splits a YAML stream into the text of each document, at the `---` and
/// `...` marker lines (which YAML forbids inside content, block scalars
/// included). Blank documents are dropped; every piece ends with a newline.
fn split_documents(text: &str) -> Vec<String> {
    fn marker<'a>(line: &'a str, m: &str) -> Option<&'a str> {
        let rest = line.strip_prefix(m)?;
        match rest.chars().next() {
            None | Some(' ' | '\t' | '\r' | '\n') => Some(rest),
            _ => None,
        }
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.split_inclusive('\n') {
        if let Some(rest) = marker(line, "---") {
            docs.push(std::mem::take(&mut current));
            if !rest.trim().is_empty() {
                // `--- # comment` or `--- {a: 1}`: the rest belongs to the
                // document that starts here.
                current.push_str(rest);
            }
        } else if marker(line, "...").is_some() {
            docs.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
        }
    }
    docs.push(current);
    docs.into_iter()
        .filter(|d| !d.trim().is_empty())
        .map(|mut d| {
            if !d.ends_with('\n') {
                d.push('\n');
            }
            d
        })
        .collect()
}

/// One document's value, with merge keys (`<<`) applied and the scalars
/// kubectl reads differently fixed (`kubectl_scalars`). A document of only
/// comments is null.
fn parse_document(chunk: &str) -> Result<Value, String> {
    use serde::Deserialize;
    let mut docs = yaml_serde::Deserializer::from_str(chunk);
    let mut value = match docs.next() {
        Some(doc) => Value::deserialize(doc).map_err(|e| e.to_string())?,
        None => Value::Null,
    };
    if docs.next().is_some() {
        return Err("more than one YAML document where one was expected".into());
    }
    value.apply_merge().map_err(|e| e.to_string())?;
    kubectl_scalars(&mut value);
    Ok(value)
}

/// The comment and blank lines a document starts with, kept when the
/// document is rewritten.
fn leading_comments(chunk: &str) -> String {
    chunk
        .split_inclusive('\n')
        .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        .collect()
}

// ------------------------------------------------------------ documents

/// What happened to one pod template.
#[derive(Debug, PartialEq)]
enum Verdict {
    Injected {
        service: String,
        /// What was left as it was, and why (probes inject did not move).
        notes: Vec<String>,
    },
    AlreadyInjected,
    /// Not injected, and why.
    Skipped(String),
}

/// Injects the pod template(s) of one document. Returns whether anything
/// changed; notes what happened to each workload.
fn visit(doc: &mut Value, opts: &Options, notes: &mut Vec<String>) -> bool {
    let kind = str_at(doc, &["kind"]).unwrap_or_default().to_string();
    let api_version = str_at(doc, &["apiVersion"]).unwrap_or_default();
    let group = match api_version.split_once('/') {
        Some((group, _)) => group.to_string(),
        None => String::new(),
    };
    let name = describe(doc);

    // `List`, and typed lists (`DeploymentList`) as kubectl writes them.
    if kind.ends_with("List") && doc.get("items").is_some() {
        let mut changed = false;
        if let Some(items) = doc.get_mut("items").and_then(Value::as_sequence_mut) {
            for (i, item) in items.iter_mut().enumerate() {
                let mut item_notes = Vec::new();
                changed |= visit(item, opts, &mut item_notes);
                notes.extend(
                    item_notes
                        .into_iter()
                        .map(|n| format!("item {}: {n}", i + 1)),
                );
            }
        }
        return changed;
    }

    // A kind of another API group (a custom resource named the same) is
    // not ours to touch.
    let template_path: &[&str] = match (kind.as_str(), group.as_str()) {
        ("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet", "" | "apps" | "extensions") => {
            &["spec", "template"]
        }
        ("Job", "" | "batch") => &["spec", "template"],
        ("CronJob", "" | "batch") => &["spec", "jobTemplate", "spec", "template"],
        ("Pod", "") => &[],
        _ => return false,
    };
    let workload_meta = doc.get("metadata").cloned().unwrap_or(Value::Null);
    let verdict = match value_at_mut(doc, template_path) {
        Some(template) if template.is_mapping() => {
            let workload = if template_path.is_empty() {
                None
            } else {
                Some(&workload_meta)
            };
            inject_pod(template, workload, opts)
        }
        _ => Verdict::Skipped(format!("no pod template at {}", template_path.join("."))),
    };
    let what = format!("{kind} {name}");
    match verdict {
        Verdict::Injected {
            service,
            notes: pod_notes,
        } => {
            notes.push(format!("{what}: injected (Service {service})"));
            notes.extend(pod_notes.into_iter().map(|n| format!("{what}: {n}")));
            true
        }
        Verdict::AlreadyInjected => {
            notes.push(format!("{what}: already injected, left as is"));
            false
        }
        Verdict::Skipped(why) => {
            notes.push(format!("{what}: not injected: {why}"));
            false
        }
    }
}

/// `namespace/name` (or just the name) for messages.
fn describe(doc: &Value) -> String {
    let name = str_at(doc, &["metadata", "name"])
        .or_else(|| str_at(doc, &["metadata", "generateName"]))
        .unwrap_or("(unnamed)");
    match str_at(doc, &["metadata", "namespace"]) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Adds remora-init, the remora-proxy sidecar and their volumes to one pod
/// (a Pod, or a workload's pod template: a mapping with metadata and spec).
/// `workload` is the metadata of the workload that holds the template.
fn inject_pod(pod: &mut Value, workload: Option<&Value>, opts: &Options) -> Verdict {
    let pod_meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    // The pod template's annotation wins over the workload's.
    let annotation = |key: &str| {
        std::iter::once(&pod_meta)
            .chain(workload)
            .find_map(|meta| scalar_at(meta, &["annotations", key]))
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_mapping_mut) else {
        return Verdict::Skipped("the pod has no spec".into());
    };
    if has_container(spec, PROXY) {
        return Verdict::AlreadyInjected;
    }
    match annotation(ANN_INJECT).as_deref() {
        None | Some("enabled") => {}
        Some("disabled") => return Verdict::Skipped(format!("{ANN_INJECT}: disabled")),
        Some(other) => {
            return Verdict::Skipped(format!(
                "{ANN_INJECT}: {other:?} is neither \"enabled\" nor \"disabled\""
            ))
        }
    }
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Verdict::Skipped(
            "hostNetwork: true: the pod shares the node's network namespace, so its \
             interception rules would capture the node's traffic"
                .into(),
        );
    }
    if let Some(why) = conflicts(spec) {
        return Verdict::Skipped(why);
    }
    let skip = match SkipLists::from_annotations(annotation) {
        Ok(skip) => skip,
        Err(why) => return Verdict::Skipped(why),
    };
    let rewrite_probes = match annotation(ANN_REWRITE_APP_PROBES).as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Verdict::Skipped(format!(
                "{ANN_REWRITE_APP_PROBES}: {other:?} is neither \"true\" nor \"false\""
            ))
        }
    };
    let service = annotation(ANN_SERVICE)
        .or_else(|| workload.and_then(|m| scalar_at(m, &["name"])))
        .or_else(|| scalar_at(&pod_meta, &["name"]))
        .or_else(|| scalar_at(&pod_meta, &["labels", "app"]))
        .filter(|s| !s.is_empty());
    let Some(service) = service else {
        return Verdict::Skipped(format!(
            "no Service name: set the {ANN_SERVICE} annotation, a name, or an app label"
        ));
    };
    let mut notes = Vec::new();
    let moved = if rewrite_probes {
        rewrite_app_probes(spec, &skip, &mut notes)
    } else {
        MovedProbes::new()
    };
    let sidecar = Sidecar {
        service,
        labels: pod_labels(&pod_meta),
        app_probes: app_probes_json(&moved),
    };
    let init = init_container(opts, &skip);
    let proxy = proxy_container(opts, &sidecar);
    // `conflicts` made sure both are lists, null or absent.
    match spec.get_mut("initContainers") {
        Some(Value::Sequence(list)) => {
            list.splice(0..0, [init, proxy]);
        }
        _ => {
            spec.shift_remove("initContainers");
            let list = Value::Sequence(vec![init, proxy]);
            insert_before(spec, "initContainers", list, "containers");
        }
    }
    match spec.get_mut("volumes") {
        Some(Value::Sequence(list)) => list.extend(pod_volumes()),
        _ => {
            spec.insert(key("volumes"), Value::Sequence(pod_volumes()));
        }
    }
    Verdict::Injected {
        service: sidecar.service,
        notes,
    }
}

/// Why the pod cannot take the sidecar as it is, if it cannot: names or
/// ports the sidecar needs are taken, or a list is not a list.
fn conflicts(spec: &Mapping) -> Option<String> {
    for list in ["initContainers", "containers", "volumes"] {
        match spec.get(list) {
            None | Some(Value::Null | Value::Sequence(_)) => {}
            Some(_) => return Some(format!("{list} is not a list")),
        }
    }
    if has_container(spec, INIT) {
        return Some(format!("it already has a container named {INIT}"));
    }
    let volumes = spec.get("volumes").and_then(Value::as_sequence);
    for v in volumes.into_iter().flatten() {
        if let Some(name) = v.get("name").and_then(Value::as_str) {
            if VOLUMES.contains(&name) {
                return Some(format!("it already has a volume named {name}"));
            }
        }
    }
    for c in containers(spec) {
        let ports = c.get("ports").and_then(Value::as_sequence);
        for p in ports.into_iter().flatten() {
            let port = p.get("containerPort").and_then(Value::as_u64);
            if let Some(port @ (INBOUND_PORT | OUTBOUND_PORT | ADMIN_PORT)) = port {
                return Some(format!(
                    "container {} uses port {port}, which the sidecar needs \
                     ({INBOUND_PORT} inbound, {OUTBOUND_PORT} outbound, {ADMIN_PORT} admin)",
                    c.get("name").and_then(Value::as_str).unwrap_or("(unnamed)")
                ));
            }
        }
    }
    None
}

fn containers(spec: &Mapping) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|list| spec.get(list).and_then(Value::as_sequence))
        .flatten()
}

fn has_container(spec: &Mapping, name: &str) -> bool {
    containers(spec).any(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// The pod's labels as the proxy's instance labels: `k=v,k=v`.
fn pod_labels(pod_meta: &Value) -> Option<String> {
    let labels = pod_meta.get("labels").and_then(Value::as_mapping)?;
    let pairs: Vec<String> = labels
        .iter()
        .filter_map(|(k, v)| Some(format!("{}={}", scalar_text(k)?, scalar_text(v)?)))
        .collect();
    (!pairs.is_empty()).then(|| pairs.join(","))
}

/// Traffic `remora-init` leaves alone, from the skip annotations.
#[derive(Debug, Default, PartialEq)]
struct SkipLists {
    inbound_ports: Option<String>,
    outbound_ports: Option<String>,
    outbound_cidrs: Option<String>,
}

impl SkipLists {
    fn from_annotations(annotation: impl Fn(&str) -> Option<String>) -> Result<SkipLists, String> {
        let list = |key: &str, what: &str, check: fn(&str) -> Option<String>| {
            skip_list(key, annotation(key), what, check)
        };
        Ok(SkipLists {
            inbound_ports: list(ANN_SKIP_INBOUND_PORTS, PORTS, port)?,
            outbound_ports: list(ANN_SKIP_OUTBOUND_PORTS, PORTS, port)?,
            outbound_cidrs: list(ANN_SKIP_OUTBOUND_CIDRS, CIDRS, cidr)?,
        })
    }
}

const PORTS: &str = "a port (1-65535) or a range a-b";
const CIDRS: &str = "an IPv4 address block (ip/prefix)";

/// The comma list of annotation `key`, each item checked and normalized by
/// `check`; an item it refuses is an error saying what was expected.
fn skip_list(
    key: &str,
    text: Option<String>,
    what: &str,
    check: fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let Some(text) = text else {
        return Ok(None);
    };
    let mut items = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match check(item) {
            Some(item) => items.push(item),
            None => return Err(format!("{key}: {item:?} is not {what} (in {text:?})")),
        }
    }
    Ok((!items.is_empty()).then(|| items.join(",")))
}

impl SkipLists {
    /// Whether inbound traffic to `port` reaches the app directly.
    fn skips_inbound(&self, port: u64) -> bool {
        let Some(list) = &self.inbound_ports else {
            return false;
        };
        list.split(',').any(|item| {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if (a..=b).contains(&port))
        })
    }
}

/// A port (1 to 65535) or an inclusive range `a-b`, as `remora-proxy init`
/// takes them.
fn port(text: &str) -> Option<String> {
    let one = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            (a <= b).then(|| format!("{a}-{b}"))
        }
        None => one(text).map(|p| p.to_string()),
    }
}

/// An IPv4 address block, `ip/prefix`; a bare address becomes a /32. Only
/// IPv4 traffic is intercepted, so `remora-proxy init` takes IPv4 only.
fn cidr(text: &str) -> Option<String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = match prefix {
        Some(p) => p.parse().ok().filter(|p| *p <= 32)?,
        None => 32,
    };
    Some(format!("{addr}/{prefix}"))
}

// ------------------------------------------------------------ what is added

/// `remora-init`: installs the interception rules, then exits. The image's
/// entrypoint is `/remora-proxy init`; these are its flags.
fn init_container(opts: &Options, skip: &SkipLists) -> Value {
    let mut args = vec![
        s(format!("--proxy-uid={PROXY_UID}")),
        s(format!("--inbound-port={INBOUND_PORT}")),
        s(format!("--outbound-port={OUTBOUND_PORT}")),
        s(format!("--admin-port={ADMIN_PORT}")),
    ];
    let lists = [
        ("--skip-inbound-ports", &skip.inbound_ports),
        ("--skip-outbound-ports", &skip.outbound_ports),
        ("--skip-outbound-cidrs", &skip.outbound_cidrs),
    ];
    for (flag, list) in lists {
        if let Some(list) = list {
            args.push(s(format!("{flag}={list}")));
        }
    }
    map([
        ("name", s(INIT)),
        ("image", s(&opts.init_image)),
        ("args", Value::Sequence(args)),
        (
            "resources",
            map([
                ("requests", map([("cpu", s("10m")), ("memory", s("16Mi"))])),
                ("limits", map([("memory", s("32Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", 0.into()),
                ("runAsNonRoot", false.into()),
                ("allowPrivilegeEscalation", false.into()),
                ("readOnlyRootFilesystem", true.into()),
                (
                    "capabilities",
                    map([
                        ("add", seq(["NET_ADMIN", "NET_RAW"])),
                        ("drop", seq(["ALL"])),
                    ]),
                ),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![map([
                ("name", s(XTABLES_VOLUME)),
                ("mountPath", s("/run")),
            ])]),
        ),
    ])
}

/// What the sidecar of one pod is told about it.
struct Sidecar {
    /// The mesh Service its instance registers under.
    service: String,
    /// The instance's labels, `k=v,k=v`.
    labels: Option<String>,
    /// The app's probes it answers (REMORA_APP_PROBES), if any were moved.
    app_probes: Option<String>,
}

/// `remora-proxy` as a native sidecar: an init container that keeps
/// running (`restartPolicy: Always`).
fn proxy_container(opts: &Options, sidecar: &Sidecar) -> Value {
    let mut env = vec![
        env_value("REMORA_CONTROL_PLANE", &opts.control_plane),
        env_value("REMORA_CONTROL_PLANE_CA", &format!("{CA_DIR}/root.pem")),
        env_value("REMORA_SERVICE", &sidecar.service),
    ];
    env.extend([
        env_field("REMORA_NAMESPACE", "metadata.namespace"),
        env_field("REMORA_IDENTITY_NAMESPACE", "metadata.namespace"),
        env_field("REMORA_IDENTITY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_value("REMORA_BOOTSTRAP_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        env_value("REMORA_STATE_DIR", STATE_DIR),
        env_field("POD_IP", "status.podIP"),
    ]);
    if let Some(labels) = &sidecar.labels {
        env.push(env_value("REMORA_LABELS", labels));
    }
    if let Some(probes) = &sidecar.app_probes {
        env.push(env_value("REMORA_APP_PROBES", probes));
    }
    env.push(env_value("REMORA_DRAIN_TIMEOUT", DRAIN_TIMEOUT));
    let probe = |path: &str| {
        map([(
            "httpGet",
            map([("path", s(path)), ("port", s("remora-admin"))]),
        )])
    };
    let mut startup = probe("/ready");
    if let Some(m) = startup.as_mapping_mut() {
        m.insert(key("periodSeconds"), 1.into());
        m.insert(key("failureThreshold"), 120.into());
    }
    map([
        ("name", s(PROXY)),
        ("image", s(&opts.proxy_image)),
        ("restartPolicy", s("Always")),
        ("env", Value::Sequence(env)),
        (
            "ports",
            Value::Sequence(vec![
                map([
                    ("name", s("remora-inbound")),
                    ("containerPort", INBOUND_PORT.into()),
                ]),
                map([
                    ("name", s("remora-admin")),
                    ("containerPort", ADMIN_PORT.into()),
                ]),
            ]),
        ),
        ("startupProbe", startup),
        ("readinessProbe", probe("/ready")),
        ("livenessProbe", probe("/live")),
        (
            "resources",
            map([
                ("requests", map([("cpu", s("50m")), ("memory", s("32Mi"))])),
                ("limits", map([("memory", s("64Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", PROXY_UID.into()),
                ("runAsGroup", PROXY_UID.into()),
                ("runAsNonRoot", true.into()),
                ("readOnlyRootFilesystem", true.into()),
                ("allowPrivilegeEscalation", false.into()),
                ("capabilities", map([("drop", seq(["ALL"]))])),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![
                mount(TOKEN_VOLUME, TOKEN_DIR, true),
                mount(CA_VOLUME, CA_DIR, true),
                mount(STATE_VOLUME, STATE_DIR, false),
            ]),
        ),
    ])
}

// ------------------------------------------------------------ app probes

/// The probes moved to the sidecar: the path the kubelet now asks the
/// admin port for → what the sidecar does instead, as REMORA_APP_PROBES
/// spells it.
type MovedProbes = BTreeMap<String, serde_json::Value>;

/// The longest probe timeout the sidecar takes (REMORA_APP_PROBES'
/// `timeoutSeconds`, as proxy/src/admin/app_probes.rs accepts it); longer
/// ones are cut to it.
const MAX_PROBE_TIMEOUT_SECONDS: u64 = 600;

/// Points the HTTP and TCP probes of the app containers (and of the pod's
/// own native sidecars, which are probed too) at the sidecar's admin port,
/// and returns what they were. Probes the kubelet does not send through
/// interception (exec, another host, a skipped port, the sidecar's own
/// ports) stay as they are; so do those the sidecar does not make for the
/// kubelet (HTTPS, gRPC) and those it cannot resolve, which are noted.
fn rewrite_app_probes(
    spec: &mut Mapping,
    skip: &SkipLists,
    notes: &mut Vec<String>,
) -> MovedProbes {
    let mut moved = MovedProbes::new();
    for list in ["initContainers", "containers"] {
        let Some(Value::Sequence(items)) = spec.get_mut(list) else {
            continue;
        };
        for c in items {
            let native_sidecar = c.get("restartPolicy").and_then(Value::as_str) == Some("Always");
            if list == "initContainers" && !native_sidecar {
                continue;
            }
            let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            let ports = c.get("ports").cloned().unwrap_or(Value::Null);
            for (field, suffix) in APP_PROBES {
                let Some(probe) = c.get_mut(field) else {
                    continue;
                };
                match moved_probe(probe, &ports, skip) {
                    Ok(was) => {
                        let path = format!("{APP_HEALTH}{name}/{suffix}");
                        point_at_admin(probe, &path);
                        moved.insert(path, was);
                    }
                    Err(Some(why)) => {
                        notes.push(format!("container {name}: {field} left as is: {why}"))
                    }
                    Err(None) => {}
                }
            }
        }
    }
    moved
}

/// What `probe` does, as the sidecar's JSON, when the sidecar should make
/// it for the kubelet; else why not (None: nothing worth saying).
fn moved_probe(
    probe: &Value,
    ports: &Value,
    skip: &SkipLists,
) -> Result<serde_json::Value, Option<String>> {
    // Ports the kubelet reaches without going through the sidecar.
    let direct = |port: u64| {
        [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT].contains(&port) || skip.skips_inbound(port)
    };
    let not_moved = |what: &str, port: u64| {
        format!(
            "{what} probes are not rewritten, and port {port} is intercepted; to let the \
             kubelet reach it directly, list it in {ANN_SKIP_INBOUND_PORTS}"
        )
    };
    if let Some(grpc) = probe.get("grpc") {
        return match grpc.get("port").and_then(Value::as_u64) {
            Some(port) if !direct(port) => Err(Some(not_moved("gRPC", port))),
            _ => Err(None),
        };
    }
    let (http, action) = match (probe.get("httpGet"), probe.get("tcpSocket")) {
        (Some(action), _) => (true, action),
        (None, Some(action)) => (false, action),
        // exec runs in the container: nothing to intercept.
        (None, None) => return Err(None),
    };
    if action
        .get("host")
        .and_then(scalar_text)
        .is_some_and(|h| !h.is_empty())
    {
        // The kubelet probes that host, not the pod.
        return Err(None);
    }
    let port = probe_port(action.get("port"), ports).map_err(Some)?;
    let path = action.get("path").and_then(scalar_text).unwrap_or_default();
    if http && port == ADMIN_PORT && path.starts_with(APP_HEALTH) {
        return Err(Some(format!(
            "it already asks the sidecar for {path} (an earlier inject's rewrite), and \
             the probe it replaced is not known any more: put the original probe back \
             and inject again"
        )));
    }
    if direct(port) {
        return Err(None);
    }
    let timeout = probe
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .filter(|t| *t > 0)
        .unwrap_or(PROBE_TIMEOUT_SECONDS)
        .min(MAX_PROBE_TIMEOUT_SECONDS);
    if !http {
        return Ok(json!({"tcpSocket": {"port": port}, "timeoutSeconds": timeout}));
    }
    let scheme = action
        .get("scheme")
        .and_then(scalar_text)
        .unwrap_or_else(|| "HTTP".into());
    if scheme != "HTTP" {
        return Err(Some(not_moved(&scheme, port)));
    }
    let path = http_path(&path).map_err(Some)?;
    let headers = http_headers(action.get("httpHeaders")).map_err(Some)?;
    let mut get = json!({"port": port, "path": path, "scheme": "HTTP"});
    if !headers.is_empty() {
        get["headers"] = serde_json::Value::Array(headers);
    }
    Ok(json!({"httpGet": get, "timeoutSeconds": timeout}))
}

/// A probe's port as a number: a number, or the name of one of the
/// container's ports.
fn probe_port(port: Option<&Value>, ports: &Value) -> Result<u64, String> {
    let valid = |p: &u64| (1..=65535).contains(p);
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(valid)
            .ok_or_else(|| format!("its port {n} is not 1-65535")),
        Some(Value::String(name)) => ports
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort")?.as_u64())
            .filter(valid)
            .ok_or_else(|| format!("its port {name:?} names none of the container's ports")),
        _ => Err("it has no port".into()),
    }
}

/// The probe's path as the kubelet sends it ("/" when empty), if it needs
/// no escaping.
fn http_path(path: &str) -> Result<String, String> {
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b));
    if plain {
        Ok(path)
    } else {
        Err(format!(
            "its path {path:?} has characters a URL holds only escaped"
        ))
    }
}

/// The probe's `httpHeaders` as `{name, value}` objects.
fn http_headers(list: Option<&Value>) -> Result<Vec<serde_json::Value>, String> {
    let mut headers = Vec::new();
    for h in list.and_then(Value::as_sequence).into_iter().flatten() {
        let name = h.get("name").and_then(scalar_text).unwrap_or_default();
        let value = h.get("value").and_then(scalar_text).unwrap_or_default();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        let text = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !token || !text {
            return Err(format!("its header {name:?} cannot be sent as written"));
        }
        headers.push(json!({"name": name, "value": value}));
    }
    Ok(headers)
}

/// Makes `probe` a GET of `path` on the sidecar's admin port, in place of
/// its httpGet or tcpSocket; its timing fields stay.
fn point_at_admin(probe: &mut Value, path: &str) {
    let Some(m) = probe.as_mapping_mut() else {
        return;
    };
    let get = map([("path", s(path)), ("port", ADMIN_PORT.into())]);
    for (k, v) in std::mem::take(m) {
        match k.as_str() {
            Some("httpGet" | "tcpSocket") => {
                m.insert(key("httpGet"), get.clone());
            }
            _ => {
                m.insert(k, v);
            }
        }
    }
}

/// REMORA_APP_PROBES: a JSON object, one probe a line, so that it reads
/// well as a YAML block.
fn app_probes_json(moved: &MovedProbes) -> Option<String> {
    if moved.is_empty() {
        return None;
    }
    let lines: Vec<String> = moved
        .iter()
        .map(|(path, was)| format!("  {}: {was}", serde_json::Value::from(path.as_str())))
        .collect();
    Some(format!("{{\n{}\n}}", lines.join(",\n")))
}

fn pod_volumes() -> Vec<Value> {
    vec![
        map([
            ("name", s(TOKEN_VOLUME)),
            (
                "projected",
                map([(
                    "sources",
                    Value::Sequence(vec![map([(
                        "serviceAccountToken",
                        map([
                            ("audience", s("remora")),
                            ("expirationSeconds", 3600.into()),
                            ("path", s("token")),
                        ]),
                    )])]),
                )]),
            ),
        ]),
        map([
            ("name", s(CA_VOLUME)),
            ("configMap", map([("name", s(CA_CONFIGMAP))])),
        ]),
        map([
            ("name", s(STATE_VOLUME)),
            ("emptyDir", map([("medium", s("Memory"))])),
        ]),
        map([
            ("name", s(XTABLES_VOLUME)),
            ("emptyDir", Value::Mapping(Mapping::new())),
        ]),
    ]
}

fn env_value(name: &str, value: &str) -> Value {
    map([("name", s(name)), ("value", s(value))])
}

fn env_field(name: &str, path: &str) -> Value {
    map([
        ("name", s(name)),
        (
            "valueFrom",
            map([("fieldRef", map([("fieldPath", s(path))]))]),
        ),
    ])
}

fn mount(name: &str, path: &str, read_only: bool) -> Value {
    let mut m = map([("name", s(name)), ("mountPath", s(path))]);
    if let (true, Some(m)) = (read_only, m.as_mapping_mut()) {
        m.insert(key("readOnly"), true.into());
    }
    m
}

// ------------------------------------------------------------ Value helpers

fn s(text: impl Into<String>) -> Value {
    Value::String(text.into())
}

fn key(text: &str) -> Value {
    Value::String(text.into())
}

fn seq<const N: usize>(items: [&str; N]) -> Value {
    Value::Sequence(items.into_iter().map(s).collect())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Mapping(entries.into_iter().map(|(k, v)| (key(k), v)).collect())
}

fn value_at_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// A scalar at `path` as text (annotation values are strings, but a number
/// written without quotes still means its digits).
fn scalar_at(v: &Value, path: &[&str]) -> Option<String> {
    scalar_text(path.iter().try_fold(v, |v, k| v.get(*k))?)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Inserts `k: v` just before `before` (or at the end), so a new
/// `initContainers` reads before `containers`.
fn insert_before(m: &mut Mapping, k: &str, v: Value, before: &str) {
    let old = std::mem::take(m);
    let mut v = Some(v);
    for (ok, ov) in old {
        if ok.as_str() == Some(before) {
            if let Some(v) = v.take() {
                m.insert(key(k), v);
            }
        }
        m.insert(ok, ov);
    }
    if let Some(v) = v {
        m.insert(key(k), v);
    }
}

// ------------------------------------------------------------ YAML 1.1

/// Fields whose keys are anyone's, so no key there names a known field.
const FREE_FORM: [&str; 7] = [
    "annotations",
    "labels",
    "matchLabels",
    "nodeSelector",
    "data",
    "stringData",
    "binaryData",
];
/// Integer fields written in octal (`defaultMode: 0440`).
const OCTAL_FIELDS: [&str; 2] = ["defaultMode", "mode"];
/// Boolean fields of pods and workloads.
const BOOL_FIELDS: [&str; 20] = [
    "allowPrivilegeEscalation",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "manualSelector",
    "optional",
    "paused",
    "privileged",
    "readOnly",
    "readOnlyRootFilesystem",
    "runAsNonRoot",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "stdin",
    "stdinOnce",
    "suspend",
    "tty",
];

/// kubectl reads YAML 1.1, yaml_serde YAML 1.2: a plain `0440` is 288 to
/// kubectl and the string "0440" here, a plain `yes` is true there and
/// "yes" here. Whether the text was quoted is lost, so fix the fields where
/// only kubectl's reading is valid: octal modes and boolean fields.
fn kubectl_scalars(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m.iter_mut() {
                let k = k.as_str().unwrap_or_default();
                if FREE_FORM.contains(&k) {
                    continue;
                }
                if let Value::String(text) = v {
                    if OCTAL_FIELDS.contains(&k) {
                        if let Some(n) = legacy_octal(text) {
                            *v = n.into();
                        }
                    } else if BOOL_FIELDS.contains(&k) {
                        if let Some(b) = yaml11_bool(text) {
                            *v = Value::Bool(b);
                        }
                    }
                } else {
                    kubectl_scalars(v);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(kubectl_scalars),
        _ => {}
    }
}

fn legacy_octal(text: &str) -> Option<u64> {
    let digits = text.strip_prefix('0').filter(|d| !d.is_empty())?;
    u64::from_str_radix(digits, 8).ok()
}

fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

// ------------------------------------------------------------ writing YAML

/// Writes a document in block style, kubectl's layout (a list under a key
/// is not indented). Strings are plain only when both YAML 1.1 (kubectl)
/// and 1.2 (yaml_serde) read them back as the same string; multi-line
/// strings are literal blocks when that is exact, else double-quoted.
fn to_yaml(v: &Value) -> Result<String, String> {
    let mut out = String::new();
    match v {
        Value::Mapping(m) if !m.is_empty() => write_mapping(&mut out, m, 0)?,
        Value::Sequence(items) if !items.is_empty() => write_sequence(&mut out, items, 0)?,
        scalar => {
            write_scalar(&mut out, scalar, 0)?;
            out.remove(0); // the space after a key or dash
        }
    }
    Ok(out)
}

fn write_mapping(out: &mut String, m: &Mapping, indent: usize) -> Result<(), String> {
    for (k, v) in m {
        push_indent(out, indent);
        out.push_str(&key_text(k)?);
        out.push(':');
        match v {
            Value::Mapping(inner) if !inner.is_empty() => {
                out.push('\n');
                write_mapping(out, inner, indent + 2)?;
            }
            Value::Sequence(items) if !items.is_empty() => {
                out.push('\n');
                write_sequence(out, items, indent)?;
            }
            // File modes in octal, as people write them (YAML 1.1, which
            // kubectl reads; `kubectl_scalars` reads them back here).
            Value::Number(n) if k.as_str().is_some_and(|k| OCTAL_FIELDS.contains(&k)) => {
                match n.as_u64() {
                    Some(mode) => out.push_str(&format!(" 0{mode:o}\n")),
                    None => write_scalar(out, v, indent)?,
                }
            }
            scalar => write_scalar(out, scalar, indent)?,
        }
    }
    Ok(())
}

fn write_sequence(out: &mut String, items: &[Value], indent: usize) -> Result<(), String> {
    for item in items {
        // A collection item is written as if one level deeper, then its
        // first line's indentation becomes the dash.
        let mut nested = String::new();
        match item {
            Value::Mapping(m) if !m.is_empty() => write_mapping(&mut nested, m, indent + 2)?,
            Value::Sequence(s) if !s.is_empty() => write_sequence(&mut nested, s, indent + 2)?,
            scalar => {
                push_indent(out, indent);
                out.push('-');
                write_scalar(out, scalar, indent)?;
                continue;
            }
        }
        push_indent(out, indent);
        out.push_str("- ");
        out.push_str(&nested[indent + 2..]);
    }
    Ok(())
}

/// A scalar (or empty collection) after `key:` or `-`: a space, the value,
/// and the newline; a literal block's lines go at `indent + 2`.
fn write_scalar(out: &mut String, v: &Value, indent: usize) -> Result<(), String> {
    out.push(' ');
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(text) => match literal_chomping(text) {
            Some(chomping) => {
                out.push('|');
                out.push_str(chomping);
                let body = text.trim_end_matches('\n');
                let extra_newlines = text.len() - body.len();
                let lines = body
                    .split('\n')
                    .chain(std::iter::repeat_n("", extra_newlines.saturating_sub(1)));
                for line in lines {
                    out.push('\n');
                    if !line.is_empty() {
                        push_indent(out, indent + 2);
                        out.push_str(line);
                    }
                }
            }
            None => out.push_str(&quoted_if_needed(text)),
        },
        Value::Sequence(_) => out.push_str("[]"),
        Value::Mapping(_) => out.push_str("{}"),
        Value::Tagged(t) => return Err(format!("YAML tags ({}) are not supported", t.tag)),
    }
    out.push('\n');
    Ok(())
}

fn key_text(k: &Value) -> Result<String, String> {
    match k {
        Value::String(text) => Ok(quoted_if_needed(text)),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok("null".into()),
        _ => Err("a mapping key that is not a scalar".into()),
    }
}

fn push_indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// The chomping indicator of a literal block that holds `text` exactly, or
/// None when a literal block cannot: one line, or leading or whitespace-only
/// lines, or characters a block cannot hold.
fn literal_chomping(text: &str) -> Option<&'static str> {
    let body = text.trim_end_matches('\n');
    let ok = body.contains('\n')
        && !body.starts_with([' ', '\t'])
        && body.chars().all(|c| c == '\n' || c == '\t' || printable(c))
        && !body.contains(['\u{85}', '\u{2028}', '\u{2029}', '\u{feff}'])
        && body
            .split('\n')
            .all(|l| l.is_empty() || !l.trim().is_empty());
    if !ok {
        return None;
    }
    Some(match text.len() - body.len() {
        0 => "-",
        1 => "",
        _ => "+",
    })
}

/// Plain when that is unambiguous, else double-quoted.
fn quoted_if_needed(text: &str) -> String {
    if plain_safe(text) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if printable(c) && !matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                out.push(c)
            }
            c => out.push_str(&format!("\\u{:04X}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// YAML's printable characters (no control characters).
fn printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{85}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

/// Whether `text` can be written as a plain scalar in block context and be
/// read back as this string by YAML 1.1 and 1.2 readers alike.
fn plain_safe(text: &str) -> bool {
    let bytes = text.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    let ascii = bytes.iter().all(|b| (b' '..=b'~').contains(b));
    ascii
        && text.trim() == text
        && !b"!&*{}[]|>'\"%@`#,?:".contains(&first)
        && (first != b'-' || bytes.get(1).is_some_and(|b| *b != b' '))
        && !text.starts_with("---")
        && !text.starts_with("...")
        && !text.contains(": ")
        && !text.contains(" #")
        && !text.ends_with(':')
        && !resolves_to_non_string(text)
}

/// Whether a plain scalar with this text could be read as null, a boolean,
/// a number or a timestamp by a YAML 1.1 or 1.2 reader (generously: a few
/// strings are quoted that need not be).
fn resolves_to_non_string(text: &str) -> bool {
    const WORDS: [&str; 16] = [
        "~", "null", "true", "false", "yes", "no", "on", "off", "y", "n", "=", "<<", ".inf",
        "-.inf", "+.inf", ".nan",
    ];
    if WORDS.contains(&text.to_ascii_lowercase().as_str()) {
        return true;
    }
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let numeric_start = match body.as_bytes() {
        [d, ..] if d.is_ascii_digit() => true,
        [b'.', d, ..] if d.is_ascii_digit() => true,
        _ => false,
    };
    numeric_start
        && body
            .chars()
            .all(|c| c.is_ascii_hexdigit() || "xXoObB_.:+-tTzZ ".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(text: &str) -> (String, Vec<String>) {
        inject_with(text, &Options::default())
    }

    fn inject_with(text: &str, opts: &Options) -> (String, Vec<String>) {
        let mut notes = Vec::new();
        let out = inject_text(text, "test.yaml", opts, &mut notes).expect("inject");
        (out, notes)
    }

    fn docs(text: &str) -> Vec<Value> {
        split_documents(text)
            .iter()
            .map(|d| parse_document(d).expect("output parses"))
            .collect()
    }

    fn names(list: Option<&Value>) -> Vec<String> {
        list.and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
        container["env"]
            .as_sequence()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .unwrap_or_else(|| panic!("no env {name}"))
    }

    fn init_containers(spec: &Value) -> (&Value, &Value) {
        let list = spec["initContainers"]
            .as_sequence()
            .expect("initContainers");
        (&list[0], &list[1])
    }

    /// The checks every injected pod spec passes.
    fn assert_injected(spec: &Value, service: &str) {
        let (init, proxy) = init_containers(spec);
        assert_eq!(init["name"], INIT);
        assert_eq!(init["image"], DEFAULT_INIT_IMAGE);
        assert_eq!(init["args"][0], "--proxy-uid=2102");
        assert_eq!(init["securityContext"]["runAsUser"], 0);
        assert_eq!(init["securityContext"]["runAsNonRoot"], false);
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            yaml_serde::from_str::<Value>("[NET_ADMIN, NET_RAW]").unwrap()
        );
        assert_eq!(init["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);

        assert_eq!(proxy["name"], PROXY);
        assert_eq!(proxy["image"], DEFAULT_PROXY_IMAGE);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(env(proxy, "REMORA_SERVICE")["value"], service);
        assert_eq!(
            env(proxy, "REMORA_CONTROL_PLANE")["value"],
            DEFAULT_CONTROL_PLANE
        );
        assert_eq!(
            env(proxy, "REMORA_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(
            env(proxy, "REMORA_IDENTITY_SERVICE_ACCOUNT")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.serviceAccountName"
        );
        assert_eq!(
            env(proxy, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
            "status.podIP"
        );
        assert_eq!(
            env(proxy, "REMORA_BOOTSTRAP_TOKEN_FILE")["value"],
            "/var/run/secrets/remora/serviceaccount/token"
        );
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["startupProbe"]["failureThreshold"], 120);
        assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
        assert_eq!(proxy["resources"]["requests"]["memory"], "32Mi");

        let volumes = names(spec.get("volumes"));
        for v in VOLUMES {
            assert_eq!(volumes.iter().filter(|n| *n == v).count(), 1, "{v}");
        }
        let token = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == TOKEN_VOLUME)
            .unwrap();
        let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(sat["audience"], "remora");
        assert_eq!(sat["expirationSeconds"], 3600);
    }

    const DEPLOYMENT: &str = "\
# The web tier.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v1}
    spec:
      serviceAccountName: web
      containers:
      - name: app
        image: web:1
        ports: [{containerPort: 8080}]
";

    #[test]
    fn deployment_gets_init_container_and_native_sidecar_first() {
        let (out, notes) = inject(DEPLOYMENT);
        let d = &docs(&out)[0];
        let spec = &d["spec"]["template"]["spec"];
        assert_injected(spec, "web");
        assert_eq!(
            names(spec.get("initContainers")),
            ["remora-init", "remora-proxy"]
        );
        assert_eq!(names(spec.get("containers")), ["app"]);
        let (_, proxy) = init_containers(spec);
        assert_eq!(env(proxy, "REMORA_LABELS")["value"], "app=web,version=v1");
        // The proxy finds the app's port from each connection, and its
        // protocol from the mesh config or the first bytes: pinning either
        // would break a multi-port app. No probes, nothing for the admin
        // port to answer.
        for pinned in [
            "REMORA_APP_ADDR",
            "REMORA_APP_PROTOCOL",
            "REMORA_APP_PROBES",
        ] {
            assert!(
                !proxy["env"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|e| e["name"] == pinned),
                "{pinned}"
            );
        }
        // Key order is kept, and initContainers comes before containers.
        let keys: Vec<_> = spec
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "serviceAccountName",
                "initContainers",
                "containers",
                "volumes"
            ]
        );
        assert!(
            out.starts_with("# The web tier.\napiVersion: apps/v1\n"),
            "{out}"
        );
        assert_eq!(
            notes,
            ["test.yaml: document 1: Deployment shop/web: injected (Service web)"]
        );
    }

    #[test]
    fn every_workload_kind_is_injected() {
        let cases = [
            ("apps/v1", "StatefulSet", "spec: {template: {spec: {containers: [{name: a, image: a}]}}}"),
            ("apps/v1", "DaemonSet", "spec: {template: {spec: {containers: [{name: a, image: a}]}}}"),
            ("apps/v1", "ReplicaSet", "spec: {template: {spec: {containers: [{name: a, image: a}]}}}"),
            ("batch/v1", "Job", "spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: a}]}}}"),
            ("batch/v1", "CronJob", "spec: {schedule: '* * * * *', jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: a}]}}}}}"),
            ("v1", "Pod", "spec: {containers: [{name: a, image: a}]}"),
        ];
        for (api, kind, spec) in cases {
            let text = format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: w}}\n{spec}\n");
            let (out, notes) = inject(&text);
            let d = &docs(&out)[0];
            let pod_spec = match kind {
                "Pod" => &d["spec"],
                "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => &d["spec"]["template"]["spec"],
            };
            assert_injected(pod_spec, "w");
            assert_eq!(names(pod_spec.get("containers")), ["a"], "{kind}");
            assert_eq!(notes.len(), 1, "{kind}: {notes:?}");
            assert!(
                notes[0].ends_with("injected (Service w)"),
                "{kind}: {notes:?}"
            );
        }
    }

    #[test]
    fn injecting_twice_gives_the_same_bytes() {
        let text = format!(
            "{DEPLOYMENT}---\napiVersion: v1\nkind: ConfigMap # a comment\nmetadata: {{name: c}}\ndata: {{a: 'yes'}}\n"
        );
        let (once, _) = inject(&text);
        let (twice, notes) = inject(&once);
        assert_eq!(once, twice);
        assert_eq!(
            notes,
            ["test.yaml: document 1: Deployment shop/web: already injected, left as is"]
        );
        // The ConfigMap went through untouched, comment and quotes too.
        assert!(once.ends_with("---\napiVersion: v1\nkind: ConfigMap # a comment\nmetadata: {name: c}\ndata: {a: 'yes'}\n"));
    }

    #[test]
    fn a_pod_with_the_sidecar_among_its_containers_is_left_as_is() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: app, image: a}\n  - {name: remora-proxy, image: old}\n";
        let (out, notes) = inject(text);
        assert_eq!(out, text);
        assert!(
            notes[0].ends_with("already injected, left as is"),
            "{notes:?}"
        );
    }

    #[test]
    fn disabled_annotation_on_template_or_workload_skips() {
        let on_template = DEPLOYMENT.replace(
            "      labels: {app: web, version: v1}\n",
            "      labels: {app: web, version: v1}\n      annotations: {remora.dev/inject: disabled}\n",
        );
        let on_workload = DEPLOYMENT.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations:\n    remora.dev/inject: disabled\n",
        );
        for text in [on_template, on_workload] {
            let (out, notes) = inject(&text);
            assert_eq!(out, text);
            assert!(
                notes[0].ends_with("not injected: remora.dev/inject: disabled"),
                "{notes:?}"
            );
        }
        // The template's annotation wins over the workload's.
        let both = DEPLOYMENT
            .replace("  namespace: shop\n", "  namespace: shop\n  annotations: {remora.dev/inject: disabled}\n")
            .replace(
                "      labels: {app: web, version: v1}\n",
                "      labels: {app: web, version: v1}\n      annotations: {remora.dev/inject: enabled}\n",
            );
        let (out, _) = inject(&both);
        assert_injected(&docs(&out)[0]["spec"]["template"]["spec"], "web");
        // A typo does not inject silently.
        let typo = DEPLOYMENT.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations: {remora.dev/inject: disable}\n",
        );
        let (out, notes) = inject(&typo);
        assert_eq!(out, typo);
        assert!(
            notes[0].contains("neither \"enabled\" nor \"disabled\""),
            "{notes:?}"
        );
    }

    #[test]
    fn host_network_pods_are_refused_and_left_unchanged() {
        for value in ["true", "yes"] {
            let text = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: agent}}\nspec:\n  hostNetwork: {value}\n  containers: [{{name: a, image: a}}]\n");
            let (out, notes) = inject(&text);
            assert_eq!(out, text);
            assert!(
                notes[0].contains("Pod agent: not injected: hostNetwork: true"),
                "{notes:?}"
            );
            assert!(notes[0].contains("node's traffic"), "{notes:?}");
        }
    }

    #[test]
    fn list_items_are_injected_one_by_one() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: a}
  spec: {template: {spec: {containers: [{name: a, image: a}]}}}
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {ports: [{port: 80}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: h}
  spec: {hostNetwork: true, containers: [{name: a, image: a}]}
";
        let (out, notes) = inject(text);
        let d = &docs(&out)[0];
        assert_eq!(d["kind"], "List");
        assert_injected(&d["items"][0]["spec"]["template"]["spec"], "a");
        let original = parse_document(text).unwrap();
        assert_eq!(d["items"][1], original["items"][1]);
        assert_eq!(d["items"][2], original["items"][2]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("test.yaml: document 1: item 1: Deployment a: injected"));
        assert!(
            notes[1].starts_with("test.yaml: document 1: item 3: Pod h: not injected: hostNetwork")
        );
        let (again, _) = inject(&out);
        assert_eq!(again, out);
    }

    #[test]
    fn other_kinds_pass_through_byte_for_byte() {
        let text = "\
# leading comment
---
apiVersion: v1
kind: Service   # stays
metadata: {name: web}
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: example.com/v1
kind: Deployment
metadata: {name: custom}
spec: {template: {spec: {containers: [{name: a, image: a}]}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
data:
  mode: 0440
  flag: \"yes\"
...
";
        let (out, notes) = inject(text);
        assert!(notes.is_empty(), "{notes:?}");
        let expected = text.replace("\n...\n", "\n");
        assert_eq!(out, expected);
    }

    #[test]
    fn skip_annotations_become_init_flags() {
        let text = DEPLOYMENT.replace(
            "      labels: {app: web, version: v1}\n",
            "      labels: {app: web, version: v1}\n      annotations:\n        remora.dev/skip-inbound-ports: \"22, 9000-9010\"\n        remora.dev/skip-outbound-ports: 25\n        remora.dev/skip-outbound-cidrs: 169.254.169.254/32,10.0.0.1\n",
        );
        let (out, _) = inject(&text);
        let d = &docs(&out)[0];
        let (init, _) = init_containers(&d["spec"]["template"]["spec"]);
        let args: Vec<_> = init["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--proxy-uid=2102",
                "--inbound-port=4143",
                "--outbound-port=4140",
                "--admin-port=4191",
                "--skip-inbound-ports=22,9000-9010",
                "--skip-outbound-ports=25",
                "--skip-outbound-cidrs=169.254.169.254/32,10.0.0.1/32",
            ]
        );
        // No annotation, no flag.
        let (out, _) = inject(DEPLOYMENT);
        let d = &docs(&out)[0];
        let (init, _) = init_containers(&d["spec"]["template"]["spec"]);
        assert_eq!(init["args"].as_sequence().unwrap().len(), 4);
    }

    #[test]
    fn invalid_skip_annotations_refuse_the_pod() {
        for (ann, value) in [
            ("skip-inbound-ports", "22,ssh"),
            ("skip-outbound-ports", "70000"),
            ("skip-inbound-ports", "90-80"),
            ("skip-outbound-cidrs", "10.0.0.0/33"),
            ("skip-outbound-cidrs", "fd00::/8"),
        ] {
            let text = DEPLOYMENT.replace(
                "  namespace: shop\n",
                &format!("  namespace: shop\n  annotations: {{remora.dev/{ann}: \"{value}\"}}\n"),
            );
            let (out, notes) = inject(&text);
            assert_eq!(out, text);
            assert!(notes[0].contains(&format!("remora.dev/{ann}")), "{notes:?}");
        }
    }

    #[test]
    fn service_name_from_annotation_name_or_app_label() {
        let annotated = DEPLOYMENT.replace(
            "      labels: {app: web, version: v1}\n",
            "      labels: {app: web, version: v1}\n      annotations: {remora.dev/service: frontend}\n",
        );
        let (out, _) = inject(&annotated);
        assert_injected(&docs(&out)[0]["spec"]["template"]["spec"], "frontend");

        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: worker-\n  labels: {app: worker}\nspec: {containers: [{name: a, image: a}]}\n";
        let (out, _) = inject(pod);
        assert_injected(&docs(&out)[0]["spec"], "worker");

        let nameless = "apiVersion: v1\nkind: Pod\nmetadata: {generateName: x-}\nspec: {containers: [{name: a, image: a}]}\n";
        let (out, notes) = inject(nameless);
        assert_eq!(out, nameless);
        assert!(notes[0].contains("no Service name"), "{notes:?}");
    }

    #[test]
    fn options_choose_images_and_control_plane() {
        let opts = Options {
            control_plane: "https://cp.example:4200".into(),
            proxy_image: "registry.example/remora-proxy:1.2".into(),
            init_image: "registry.example/remora-init:1.2".into(),
        };
        let (out, _) = inject_with(DEPLOYMENT, &opts);
        let d = &docs(&out)[0];
        let (init, proxy) = init_containers(&d["spec"]["template"]["spec"]);
        assert_eq!(init["image"], "registry.example/remora-init:1.2");
        assert_eq!(proxy["image"], "registry.example/remora-proxy:1.2");
        assert_eq!(
            env(proxy, "REMORA_CONTROL_PLANE")["value"],
            "https://cp.example:4200"
        );
    }

    #[test]
    fn existing_init_containers_and_volumes_are_kept_after_ours() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  initContainers:
  - {name: migrate, image: m}
  containers:
  - {name: app, image: a}
  volumes:
  - name: config
    secret: {secretName: s, defaultMode: 0440}
";
        let (out, _) = inject(text);
        let d = &docs(&out)[0];
        assert_eq!(
            names(d["spec"].get("initContainers")),
            ["remora-init", "remora-proxy", "migrate"]
        );
        assert_eq!(
            names(d["spec"].get("volumes")),
            [
                "config",
                "remora-token",
                "remora-ca",
                "remora-state",
                "remora-xtables-lock"
            ]
        );
        // kubectl reads `0440` as octal: the mode is 288, written in octal.
        assert_eq!(d["spec"]["volumes"][0]["secret"]["defaultMode"], 288);
        assert!(out.contains("defaultMode: 0440\n"), "{out}");
    }

    #[test]
    fn name_and_port_conflicts_refuse_the_pod() {
        for (extra, why) in [
            (
                "  - {name: remora-init, image: x}\n",
                "container named remora-init",
            ),
            (
                "  - {name: b, image: b, ports: [{containerPort: 4191}]}\n",
                "uses port 4191",
            ),
        ] {
            let text = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n  - {{name: a, image: a}}\n{extra}");
            let (out, notes) = inject(&text);
            assert_eq!(out, text);
            assert!(notes[0].contains(why), "{notes:?}");
        }
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n  volumes: [{name: remora-state, emptyDir: {}}]\n";
        let (out, notes) = inject(text);
        assert_eq!(out, text);
        assert!(notes[0].contains("volume named remora-state"), "{notes:?}");
    }

    #[test]
    fn unparsable_input_is_an_error() {
        let mut notes = Vec::new();
        let err = inject_text(
            "kind: Pod\n---\nkind: [unclosed\n",
            "bad.yaml",
            &Options::default(),
            &mut notes,
        )
        .unwrap_err();
        assert_eq!(err.code, super::super::failure::EXIT_INVALID);
        assert!(
            err.message.starts_with("bad.yaml: document 2: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn documents_split_at_marker_lines_only() {
        let text = "a: 1\n--- # second\nb: |\n  ---x\n  text\n...\n---\n\n---\nc: 3";
        assert_eq!(
            split_documents(text),
            ["a: 1\n", " # second\nb: |\n  ---x\n  text\n", "c: 3\n"]
        );
    }

    #[test]
    fn strings_are_written_so_both_yaml_versions_read_them_back() {
        let tricky = [
            "yes",
            "No",
            "on",
            "OFF",
            "y",
            "n",
            "true",
            "null",
            "~",
            "",
            " ",
            "0440",
            "012",
            "08",
            "0x1F",
            "1e3",
            "1.0",
            "1_000",
            "1:20",
            "2001-12-14",
            "-1",
            ".5",
            ".inf",
            "=",
            "<<",
            "a: b",
            "a:",
            "#x",
            "x #y",
            "- x",
            "-",
            "--flag=1",
            "---",
            "...",
            "@x",
            "`x",
            "*x",
            "&x",
            "!x",
            "%x",
            "|x",
            ">x",
            "?x",
            ":x",
            "{a}",
            "[a]",
            "a,b",
            "'q'",
            "\"q\"",
            "back\\slash",
            "tab\there",
            "ünïcode",
            "del\u{7f}",
            "multi\nline",
            "multi\nline\n",
            "multi\nline\n\n",
            " lead\nx",
            "x\n  \ny",
            "\nleading newline",
            "cr\r\nlf",
            "50m",
            "32Mi",
            "$(POD_IP)",
            "10.0.0.0/8",
            "https://remora-control.remora-system:4200",
            "22,9000",
            "5s",
        ];
        let mut m = Mapping::new();
        for t in tricky {
            m.insert(s(t), Value::Sequence(vec![s(t), map([("k", s(t))])]));
        }
        let v = Value::Mapping(m);
        let text = to_yaml(&v).unwrap();
        let back: Value = yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, v, "{text}");
        // Plain where it is safe, as kubectl users expect to read it.
        for plain in [
            "key: 50m\n",
            "- --flag=1\n",
            "- $(POD_IP)\n",
            "- 10.0.0.0/8\n",
            "- 5s\n",
        ] {
            let t = to_yaml(&yaml_serde::from_str::<Value>(plain).unwrap()).unwrap();
            assert_eq!(t, plain);
        }
        // YAML 1.1 words and numbers stay strings.
        for (s_, q) in [
            ("yes", "\"yes\""),
            ("0440", "\"0440\""),
            ("1_000", "\"1_000\""),
        ] {
            assert_eq!(quoted_if_needed(s_), q);
        }
    }

    #[test]
    fn layout_is_kubectl_style() {
        let v: Value = yaml_serde::from_str(
            "a:\n  b: [1, {c: d, e: [x]}, [p, z], {}, []]\n  s: \"one\\ntwo\\n\"\nf: {}\n",
        )
        .unwrap();
        assert_eq!(
            to_yaml(&v).unwrap(),
            "a:\n  b:\n  - 1\n  - c: d\n    e:\n    - x\n  - - p\n    - z\n  - {}\n  - []\n  s: |\n    one\n    two\nf: {}\n"
        );
    }

    #[test]
    fn yaml_1_1_scalars_are_read_as_kubectl_reads_them() {
        let v = parse_document(
            "spec:\n  hostNetwork: yes\n  volumes: [{name: a, secret: {defaultMode: 0400, items: [{key: k, path: p, mode: 0644}]}}]\n  containers: [{name: c, env: [{name: on, value: \"yes\"}], securityContext: {readOnlyRootFilesystem: On}}]\nmetadata: {labels: {readOnly: \"yes\"}, annotations: {mode: \"0440\"}}\n",
        )
        .unwrap();
        assert_eq!(v["spec"]["hostNetwork"], true);
        assert_eq!(v["spec"]["volumes"][0]["secret"]["defaultMode"], 256);
        assert_eq!(v["spec"]["volumes"][0]["secret"]["items"][0]["mode"], 420);
        assert_eq!(v["spec"]["containers"][0]["env"][0]["value"], "yes");
        assert_eq!(
            v["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
            true
        );
        assert_eq!(v["metadata"]["labels"]["readOnly"], "yes");
        assert_eq!(v["metadata"]["annotations"]["mode"], "0440");
    }

    /// A Pod whose app probes itself every way the kubelet can.
    const PROBED: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers:
  - name: app
    image: web:1
    ports: [{name: http, containerPort: 8080}, {name: grpc, containerPort: 9000}]
    readinessProbe:
      httpGet:
        path: /ready
        port: http
        httpHeaders: [{name: X-Probe, value: kubelet}]
      periodSeconds: 5
      timeoutSeconds: 3
    livenessProbe:
      tcpSocket: {port: 8080}
      initialDelaySeconds: 10
      failureThreshold: 6
    startupProbe:
      httpGet: {port: 8080}
  - name: extra
    image: extra:1
    readinessProbe: {httpGet: {port: 8443, path: /healthz, scheme: HTTPS}}
    livenessProbe: {grpc: {port: 9000}}
    startupProbe: {exec: {command: [cat, /tmp/started]}}
";

    /// The app probes the sidecar was told about (REMORA_APP_PROBES).
    fn app_probes(proxy: &Value) -> serde_json::Value {
        let text = env(proxy, "REMORA_APP_PROBES")["value"].as_str().unwrap();
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn probe<'a>(spec: &'a Value, container: &str, field: &str) -> &'a Value {
        let c = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == container)
            .unwrap();
        &c[field]
    }

    #[test]
    fn http_and_tcp_probes_of_the_app_move_to_the_admin_port() {
        let (out, notes) = inject(PROBED);
        let spec = &docs(&out)[0]["spec"];
        let want = yaml_serde::from_str::<Value>(
            "httpGet: {path: /app-health/app/readyz, port: 4191}\nperiodSeconds: 5\ntimeoutSeconds: 3\n",
        )
        .unwrap();
        assert_eq!(probe(spec, "app", "readinessProbe"), &want);
        // A tcpSocket becomes an httpGet in its place; the timing stays.
        let want = yaml_serde::from_str::<Value>(
            "httpGet: {path: /app-health/app/livez, port: 4191}\ninitialDelaySeconds: 10\nfailureThreshold: 6\n",
        )
        .unwrap();
        assert_eq!(probe(spec, "app", "livenessProbe"), &want);
        assert_eq!(
            probe(spec, "app", "startupProbe")["httpGet"]["path"],
            "/app-health/app/startupz"
        );

        // The sidecar knows what each was, ports resolved to numbers.
        let (_, proxy) = init_containers(spec);
        assert_eq!(
            app_probes(proxy),
            json!({
                "/app-health/app/readyz": {
                    "httpGet": {"port": 8080, "path": "/ready", "scheme": "HTTP",
                                "headers": [{"name": "X-Probe", "value": "kubelet"}]},
                    "timeoutSeconds": 3
                },
                "/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
                "/app-health/app/startupz": {
                    "httpGet": {"port": 8080, "path": "/", "scheme": "HTTP"},
                    "timeoutSeconds": 1
                }
            })
        );
        // One probe a line: a readable block in the manifest.
        assert!(
            out.contains("      value: |-\n        {\n          \"/app-health/app/livez\": {"),
            "{out}"
        );

        // HTTPS, gRPC and exec probes are left alone; the first two would be
        // intercepted, which the notes say.
        let original = &docs(PROBED)[0]["spec"];
        for field in ["readinessProbe", "livenessProbe", "startupProbe"] {
            assert_eq!(probe(spec, "extra", field), probe(original, "extra", field));
        }
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[1].ends_with("Pod web: container extra: readinessProbe left as is: HTTPS probes are not rewritten, and port 8443 is intercepted; to let the kubelet reach it directly, list it in remora.dev/skip-inbound-ports"), "{notes:?}");
        assert!(
            notes[2].contains("container extra: livenessProbe left as is: gRPC probes"),
            "{notes:?}"
        );

        // Injecting the output again changes nothing.
        let (again, _) = inject(&out);
        assert_eq!(again, out);
    }

    #[test]
    fn probes_of_native_sidecars_move_too_but_not_of_init_containers() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  initContainers:\n  - {name: migrate, image: m, readinessProbe: {tcpSocket: {port: 5432}}}\n  - {name: logs, image: l, restartPolicy: Always, livenessProbe: {tcpSocket: {port: 9880}}}\n  containers: [{name: app, image: a}]\n";
        let (out, _) = inject(text);
        let spec = &docs(&out)[0]["spec"];
        let init = spec["initContainers"].as_sequence().unwrap();
        assert_eq!(init[2]["readinessProbe"]["tcpSocket"]["port"], 5432);
        assert_eq!(
            init[3]["livenessProbe"]["httpGet"]["path"],
            "/app-health/logs/livez"
        );
        assert_eq!(
            app_probes(&init[1]),
            json!({"/app-health/logs/livez": {"tcpSocket": {"port": 9880}, "timeoutSeconds": 1}})
        );
    }

    #[test]
    fn probes_that_bypass_interception_or_cannot_be_resolved_stay() {
        let text = "\
apiVersion: v1
kind: Pod
metadata:
  name: p
  annotations: {remora.dev/skip-inbound-ports: \"9000-9100\"}
spec:
  containers:
  - name: app
    image: a
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {port: 9090, path: /ready}}
    livenessProbe: {httpGet: {port: metrics}}
    startupProbe: {tcpSocket: {port: 8080, host: 10.0.0.9}}
  - name: odd
    image: o
    readinessProbe: {httpGet: {port: 8080, path: /a b}}
    livenessProbe: {httpGet: {port: 8080, httpHeaders: [{name: \"bad name\", value: x}]}}
";
        let (out, notes) = inject(text);
        let spec = &docs(&out)[0]["spec"];
        let original = &docs(text)[0]["spec"];
        for (c, field) in [
            ("app", "readinessProbe"),
            ("app", "livenessProbe"),
            ("app", "startupProbe"),
            ("odd", "readinessProbe"),
            ("odd", "livenessProbe"),
        ] {
            assert_eq!(
                probe(spec, c, field),
                probe(original, c, field),
                "{c} {field}"
            );
        }
        let (_, proxy) = init_containers(spec);
        assert!(!proxy["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "REMORA_APP_PROBES"));
        // A skipped port and another host say nothing; the others do.
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(
            notes[1].ends_with(
                "container app: livenessProbe left as is: its port \"metrics\" names none of the container's ports"
            ),
            "{notes:?}"
        );
        assert!(
            notes[2].contains("odd: readinessProbe left as is: its path \"/a b\""),
            "{notes:?}"
        );
        assert!(
            notes[3].contains("odd: livenessProbe left as is: its header \"bad name\""),
            "{notes:?}"
        );
    }

    #[test]
    fn a_probe_rewritten_before_is_recognised_and_not_moved_again() {
        let (out, _) = inject(PROBED);
        // The sidecar taken out by hand, the rewritten probes kept.
        let mut doc = docs(&out).remove(0);
        let spec = doc["spec"].as_mapping_mut().unwrap();
        spec.remove("initContainers");
        spec.remove("volumes");
        let text = to_yaml(&doc).unwrap();
        let (again, notes) = inject(&text);
        let spec = &docs(&again)[0]["spec"];
        assert_eq!(
            probe(spec, "app", "readinessProbe")["httpGet"]["path"],
            "/app-health/app/readyz"
        );
        assert!(!init_containers(spec).1["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "REMORA_APP_PROBES"));
        assert!(
            notes[1].contains("container app: readinessProbe left as is: it already asks the sidecar for /app-health/app/readyz"),
            "{notes:?}"
        );
    }

    #[test]
    fn rewrite_app_probes_annotation_turns_it_off() {
        let off = PROBED.replace(
            "metadata: {name: web}\n",
            "metadata:\n  name: web\n  annotations: {remora.dev/rewrite-app-probes: \"false\"}\n",
        );
        let (out, notes) = inject(&off);
        let spec = &docs(&out)[0]["spec"];
        let original = &docs(&off)[0]["spec"];
        assert_eq!(spec["containers"], original["containers"]);
        assert!(!init_containers(spec).1["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "REMORA_APP_PROBES"));
        assert_eq!(notes.len(), 1, "{notes:?}");

        let on = off.replace("\"false\"", "\"true\"");
        let (out, _) = inject(&on);
        let spec = &docs(&out)[0]["spec"];
        assert_eq!(probe(spec, "app", "livenessProbe")["httpGet"]["port"], 4191);

        let typo = off.replace("\"false\"", "\"no\"");
        let (out, notes) = inject(&typo);
        assert_eq!(out, typo);
        assert!(
            notes[0].contains(
                "remora.dev/rewrite-app-probes: \"no\" is neither \"true\" nor \"false\""
            ),
            "{notes:?}"
        );
    }

    #[test]
    fn skip_lists_know_their_ports() {
        let skip = SkipLists {
            inbound_ports: Some("22,9000-9010".into()),
            ..SkipLists::default()
        };
        for (port, skipped) in [
            (22, true),
            (9000, true),
            (9005, true),
            (9010, true),
            (23, false),
            (9011, false),
        ] {
            assert_eq!(skip.skips_inbound(port), skipped, "{port}");
        }
        assert!(!SkipLists::default().skips_inbound(22));
    }

    /// The example's app probes back as they were before inject: each
    /// probe REMORA_APP_PROBES lists is made from its entry again.
    fn restore_app_probes(spec: &mut Mapping) {
        let proxy = spec["initContainers"]
            .as_sequence()
            .and_then(|l| l.iter().find(|c| c["name"] == PROXY))
            .expect("remora-proxy in the example");
        let moved = app_probes(proxy);
        let moved = moved.as_object().unwrap();
        let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
            panic!("containers in the example");
        };
        for c in containers {
            for (field, _) in APP_PROBES {
                let Some(probe) = c.get_mut(field).and_then(Value::as_mapping_mut) else {
                    continue;
                };
                let path = probe["httpGet"]["path"].as_str().unwrap_or_default();
                let Some(was) = moved.get(path) else {
                    continue;
                };
                let (kind, action) = was
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(k, _)| *k != "timeoutSeconds")
                    .unwrap();
                let mut action: Value = yaml_serde::to_value(action).unwrap();
                if let Some(a) = action.as_mapping_mut() {
                    a.remove("scheme");
                    if let Some(h) = a.remove("headers") {
                        a.insert(key("httpHeaders"), h);
                    }
                }
                let old = std::mem::take(probe);
                for (k, v) in old {
                    if k == "httpGet" {
                        probe.insert(key(kind), action.clone());
                    } else {
                        probe.insert(k, v);
                    }
                }
            }
        }
    }

    /// deploy/kubernetes/sidecar-example.yaml shows what inject writes: its
    /// Deployment, with the Remora parts taken out and the app's probes as
    /// they were, injects back into it.
    #[test]
    fn sidecar_example_is_what_inject_writes() {
        let text = include_str!("../../../deploy/kubernetes/sidecar-example.yaml");
        let example = split_documents(text)
            .iter()
            .map(|d| parse_document(d).unwrap())
            .find(|d| d["kind"] == "Deployment")
            .expect("a Deployment in sidecar-example.yaml");
        let mut plain = example.clone();
        let spec = plain["spec"]["template"]["spec"].as_mapping_mut().unwrap();
        restore_app_probes(spec);
        for list in ["initContainers", "volumes"] {
            if let Some(Value::Sequence(items)) = spec.get_mut(list) {
                items.retain(|c| {
                    !c["name"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with("remora-")
                });
                if items.is_empty() {
                    spec.remove(list);
                }
            }
        }
        let (out, notes) = inject(&to_yaml(&plain).unwrap());
        assert!(notes[0].ends_with("injected (Service shop)"), "{notes:?}");
        assert_eq!(docs(&out)[0], example);
    }
}
