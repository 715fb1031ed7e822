//! What each remoractl command does. Each returns the exit code on success
//! (0, or 1 for `diff` with changes) or a `Failure`.

use super::diff;
use super::input;
use super::output::{self, config_counts, ns_name, Table};
use super::{Failure, Kind};
use remora_proto::control::admin_client::AdminClient;
use remora_proto::control::{
    ApplyRequest, ChangeResponse, DeleteRequest, GetRequest, HistoryRequest, RollbackRequest,
};
use remora_proto::model::Config;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Where the control plane is, how long to wait for it, and how to prove
/// who we are.
pub struct Ctx {
    pub server: String,
    pub timeout: Duration,
    pub ca_file: Option<std::path::PathBuf>,
    pub token_file: Option<std::path::PathBuf>,
}

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

impl Ctx {
    /// Connects (eagerly, so an unreachable server fails here with exit 3).
    pub(crate) async fn client(&self) -> Result<Client, Failure> {
        let url = if self.server.contains("://") {
            self.server.clone()
        } else {
            format!("http://{}", self.server)
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Failure::usage(format!("invalid --server URL {:?}: {e}", self.server)))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(f) = &self.ca_file {
                let pem = std::fs::read_to_string(f)
                    .map_err(|e| Failure::usage(format!("--ca-file {}: {e}", f.display())))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Failure::usage(format!("TLS settings: {}", error_chain(&e))))?;
        }
        let token = match &self.token_file {
            Some(f) => {
                let t = std::fs::read_to_string(f)
                    .map_err(|e| Failure::usage(format!("--token-file {}: {e}", f.display())))?;
                let v = format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    Failure::usage(format!("--token-file {}: not a valid token", f.display()))
                })?;
                Some(v)
            }
            None => None,
        };
        let channel = endpoint.connect().await.map_err(|e| {
            Failure::server(format!(
                "cannot reach the control plane at {url}: {}",
                error_chain(&e)
            ))
        })?;
        Ok(AdminClient::with_interceptor(channel, Bearer(token)))
    }

    pub(crate) fn status(&self, s: tonic::Status) -> Failure {
        Failure::from_status(s, &self.server)
    }
}

/// An error and its sources, `a: b: c` (tonic's top-level transport error
/// alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// Writes to stdout; a closed pipe (`remoractl get | head`) is not an error.
pub(crate) fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Who a change is recorded as: `--author`, else `$USER@$HOSTNAME`, else
/// `remoractl`.
pub fn author(given: Option<String>) -> String {
    if let Some(a) = given.filter(|a| !a.is_empty()) {
        return a;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let user = env("USER").or_else(|| env("LOGNAME"));
    let host = env("HOSTNAME").or_else(|| {
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
    });
    match (user, host) {
        (Some(u), Some(h)) => format!("{u}@{}", h.trim()),
        (Some(u), None) => u,
        _ => "remoractl".to_string(),
    }
}

// ------------------------------------------------------------------ check

/// Offline validation: parse and `prepare`, no server.
pub fn check(file: &Path) -> Result<u8, Failure> {
    let cfg = input::load(file)?;
    match remora_proto::prepare(cfg) {
        Ok(cfg) => {
            emit(&format!(
                "ok: {} services, {} HTTP routes\n",
                cfg.services.len(),
                cfg.http_routes.len()
            ));
            Ok(0)
        }
        Err(errs) => Err(Failure::invalid(errs.to_string())),
    }
}

// ------------------------------------------------------------------ apply

pub async fn apply(ctx: &Ctx, file: &Path, author: String) -> Result<u8, Failure> {
    let resources = input::load_nonempty(file)?;
    let counts = config_counts(&resources);
    let mut client = ctx.client().await?;
    let resp = client
        .apply(ApplyRequest {
            resources: Some(resources),
            author,
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    if resp.changed {
        let detail = if resp.summary.is_empty() {
            counts
        } else {
            format!("{counts}: {}", resp.summary)
        };
        emit(&format!("applied: version {} ({detail})\n", resp.version));
    } else {
        emit(&format!("unchanged: version {}\n", resp.version));
    }
    Ok(0)
}

// ------------------------------------------------------------------- diff

/// Exit 0 without changes, 1 with changes.
pub async fn diff(ctx: &Ctx, file: &Path, all: bool) -> Result<u8, Failure> {
    let resources = input::load_nonempty(file)?;
    let mut client = ctx.client().await?;
    let resp = client
        .diff(ApplyRequest {
            resources: Some(resources),
            author: String::new(),
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    let mut out = String::new();
    let (mut created, mut updated, mut deleted) = (0, 0, 0);
    for c in &resp.changes {
        let (mark, body) = match c.action.as_str() {
            "created" => {
                created += 1;
                ('+', whole(&c.after, '+'))
            }
            "updated" => {
                updated += 1;
                ('~', diff::unified(&c.before, &c.after, 3))
            }
            "deleted" => {
                deleted += 1;
                ('-', whole(&c.before, '-'))
            }
            "unchanged" | "" => {
                if !all {
                    continue;
                }
                ('=', Vec::new())
            }
            _ => {
                // An action this remoractl does not know: show it anyway,
                // and count it as a change.
                updated += 1;
                ('?', diff::unified(&c.before, &c.after, 3))
            }
        };
        let ns = if c.namespace.is_empty() {
            remora_proto::DEFAULT_NAMESPACE
        } else {
            &c.namespace
        };
        let action = if c.action.is_empty() {
            "unchanged"
        } else {
            &c.action
        };
        out.push_str(&format!("{mark} {} {ns}/{} ({action})\n", c.kind, c.name));
        for line in body {
            out.push_str("  ");
            out.push_str(&line);
            out.push('\n');
        }
    }
    let changes = created + updated + deleted;
    if changes == 0 {
        out.push_str("no changes\n");
    } else {
        out.push_str(&format!(
            "{}: {created} created, {updated} updated, {deleted} deleted\n",
            output::count(changes, "change", "changes")
        ));
    }
    emit(&out);
    Ok(if changes == 0 { 0 } else { 1 })
}

fn whole(text: &str, prefix: char) -> Vec<String> {
    text.lines().map(|l| format!("{prefix}{l}")).collect()
}

// -------------------------------------------------------------------- get

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a short summary of each resource.
    Table,
    /// YAML documents, ready for `remoractl apply -f -`.
    Yaml,
    /// The config as pretty-printed JSON.
    Json,
}

pub async fn get(
    ctx: &Ctx,
    kind: Option<Kind>,
    name: Option<String>,
    namespace: Option<String>,
    format: Format,
) -> Result<u8, Failure> {
    // A name is looked up in "default" unless told otherwise; a listing
    // without -n covers every namespace.
    let namespace = match (&name, namespace) {
        (_, Some(ns)) => Some(ns),
        (Some(_), None) => Some(remora_proto::DEFAULT_NAMESPACE.to_string()),
        (None, None) => None,
    };
    let mut client = ctx.client().await?;
    let resp = client
        .get(GetRequest {
            kind: kind.map(|k| k.api_name().to_string()).unwrap_or_default(),
            namespace: namespace.clone().unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    let mut cfg = resp.resources.unwrap_or_default();
    // Filter here too, so the output is right whatever the server matched.
    let keep = |k: Kind, meta: Option<&remora_proto::model::Metadata>| {
        let (ns, n) = ns_name(meta);
        kind.is_none_or(|want| want == k)
            && namespace.as_ref().is_none_or(|want| *want == ns)
            && name.as_ref().is_none_or(|want| *want == n)
    };
    cfg.services
        .retain(|s| keep(Kind::Service, s.metadata.as_ref()));
    cfg.http_routes
        .retain(|r| keep(Kind::HttpRoute, r.metadata.as_ref()));
    if let (Some(k), Some(n)) = (kind, &name) {
        if cfg.services.is_empty() && cfg.http_routes.is_empty() {
            let ns = namespace.unwrap_or_default();
            return Err(Failure::invalid(format!("{k} {ns}/{n} not found")));
        }
    }
    match format {
        Format::Yaml => emit(&remora_proto::yaml::to_yaml(&cfg)),
        Format::Json => {
            let json = serde_json::to_string_pretty(&cfg)
                .map_err(|e| Failure::server(format!("cannot render JSON: {e}")))?;
            emit(&format!("{json}\n"));
        }
        Format::Table => emit(&table(resp.version, &cfg)),
    }
    Ok(0)
}

fn table(version: u64, cfg: &Config) -> String {
    let mut out = format!("config version {version}\n");
    if cfg.services.is_empty() && cfg.http_routes.is_empty() {
        out.push_str("no resources\n");
        return out;
    }
    let mut t = Table::new(&["KIND", "NAMESPACE", "NAME", "SUMMARY"]);
    for s in &cfg.services {
        let (ns, name) = ns_name(s.metadata.as_ref());
        t.row(vec!["Service".into(), ns, name, output::service_summary(s)]);
    }
    for r in &cfg.http_routes {
        let (ns, name) = ns_name(r.metadata.as_ref());
        t.row(vec!["HTTPRoute".into(), ns, name, output::route_summary(r)]);
    }
    out.push_str(&t.render());
    out
}

// ----------------------------------------------------------------- delete

pub async fn delete(
    ctx: &Ctx,
    kind: Kind,
    name: String,
    namespace: Option<String>,
    author: String,
) -> Result<u8, Failure> {
    let namespace = namespace.unwrap_or_else(|| remora_proto::DEFAULT_NAMESPACE.to_string());
    let mut client = ctx.client().await?;
    let resp: ChangeResponse = client
        .delete(DeleteRequest {
            kind: kind.api_name().to_string(),
            namespace: namespace.clone(),
            name: name.clone(),
            author,
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    if resp.changed {
        emit(&format!(
            "deleted: {kind} {namespace}/{name} (version {})\n",
            resp.version
        ));
    } else {
        emit(&format!(
            "unchanged: {kind} {namespace}/{name} was not there (version {})\n",
            resp.version
        ));
    }
    Ok(0)
}

// ---------------------------------------------------------------- history

pub async fn history(ctx: &Ctx, format: Format) -> Result<u8, Failure> {
    let mut client = ctx.client().await?;
    let resp = client
        .history(HistoryRequest {})
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    if format != Format::Table {
        let entries: Vec<serde_json::Value> = resp
            .entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "version": e.version,
                    "time": output::utc(e.unix_time),
                    "author": e.author,
                    "summary": e.summary,
                })
            })
            .collect();
        emit(&super::status::render(&serde_json::json!(entries), format)?);
        return Ok(0);
    }
    if resp.entries.is_empty() {
        emit("no versions yet\n");
        return Ok(0);
    }
    let mut t = Table::new(&["VERSION", "TIME", "AUTHOR", "SUMMARY"]);
    for e in &resp.entries {
        t.row(vec![
            e.version.to_string(),
            output::utc(e.unix_time),
            dash(&e.author),
            dash(&e.summary),
        ]);
    }
    emit(&t.render());
    Ok(0)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        // Keep one row per entry.
        s.replace('\n', "; ")
    }
}

// --------------------------------------------------------------- rollback

pub async fn rollback(ctx: &Ctx, version: u64, author: String) -> Result<u8, Failure> {
    let mut client = ctx.client().await?;
    let resp = client
        .rollback(RollbackRequest { version, author })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    if resp.changed {
        emit(&format!(
            "rolled back to version {version}'s config as version {}\n",
            resp.version
        ));
    } else {
        emit(&format!(
            "unchanged: version {} already has version {version}'s config\n",
            resp.version
        ));
    }
    Ok(0)
}
