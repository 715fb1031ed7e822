//! `remoractl status`: every proxy and what it runs, a summary line with
//! the latest push's latencies, and `--wait`, which a CI/CD pipeline runs
//! after `apply`: exit 0 once every connected proxy ACKed the current
//! version, non-zero naming the laggards when one NACKs it or time runs
//! out.

use super::commands::{emit, Ctx, Format};
use super::output::{self, Table};
use super::Failure;
use remora_proto::control::{ProxyStatus, PushSummary, StatusRequest, StatusResponse};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How often `--wait` asks.
const POLL: Duration = Duration::from_millis(200);

/// Where a proxy stands against the snapshot version being pushed.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// It runs the current version.
    Ack,
    /// It rejected the current version (and runs the one it had).
    Nack(String),
    /// The current version is on its way or awaits its answer.
    Pending,
    /// Disconnected, and not on the current version.
    Gone,
}

impl State {
    pub fn of(p: &ProxyStatus, current: &str) -> State {
        if current.is_empty() {
            return if p.connected {
                State::Pending
            } else {
                State::Gone
            };
        }
        if p.acked_version == current {
            State::Ack
        } else if p.nacked_version == current {
            State::Nack(p.nack_error.clone())
        } else if p.connected {
            State::Pending
        } else {
            State::Gone
        }
    }

    fn label(&self) -> String {
        match self {
            State::Ack => "ACK".into(),
            State::Nack(e) => format!("NACK: {}", one_line(e)),
            State::Pending => "PENDING".into(),
            State::Gone => "-".into(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            State::Ack => "ACK",
            State::Nack(_) => "NACK",
            State::Pending => "PENDING",
            State::Gone => "DISCONNECTED",
        }
    }
}

fn one_line(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.replace('\n', "; ")
    }
}

/// Counts over the connected proxies.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub proxies: usize,
    pub connected: usize,
    pub current: usize,
    pub nacks: usize,
    pub pending: usize,
}

impl Summary {
    pub fn of(s: &StatusResponse) -> Summary {
        let mut out = Summary {
            proxies: s.proxies.len(),
            ..Default::default()
        };
        for p in s.proxies.iter().filter(|p| p.connected) {
            out.connected += 1;
            match State::of(p, &s.snapshot_version) {
                State::Ack => out.current += 1,
                State::Nack(_) => out.nacks += 1,
                State::Pending | State::Gone => out.pending += 1,
            }
        }
        out
    }
}

/// "12.3 ms", "1.20 s".
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `3 proxies connected, 2 on the current version, 1 NACK, 0 pending;
/// last push (2.ab12cd34): 2 ACKs, p50 12.0 ms, p99 14.1 ms, last ACK 14.1 ms`
fn summary_line(s: &StatusResponse) -> String {
    let n = Summary::of(s);
    let mut line = format!(
        "{} connected, {} on the current version, {}, {} pending",
        output::count(n.connected, "proxy", "proxies"),
        n.current,
        output::count(n.nacks, "NACK", "NACKs"),
        n.pending
    );
    if n.proxies > n.connected {
        line.push_str(&format!(" ({} disconnected)", n.proxies - n.connected));
    }
    match &s.last_push {
        Some(p) if !p.snapshot_version.is_empty() && p.acks > 0 => line.push_str(&format!(
            "; last push ({}): {}, p50 {}, p99 {}, last ACK {}",
            p.snapshot_version,
            output::count(p.acks as usize, "ACK", "ACKs"),
            secs(p.p50_seconds),
            secs(p.p99_seconds),
            secs(p.last_ack_seconds)
        )),
        Some(p) if !p.snapshot_version.is_empty() => line.push_str(&format!(
            "; last push ({}): no ACKs from proxies connected at its commit yet",
            p.snapshot_version
        )),
        _ => {}
    }
    line.push('\n');
    line
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub fn table(s: &StatusResponse) -> String {
    let mut out = format!(
        "config version {}, snapshot version {}\n",
        s.config_version,
        dash(&s.snapshot_version)
    );
    if s.proxies.is_empty() {
        out.push_str("no proxies\n");
        return out;
    }
    out.push_str(&summary_line(s));
    let mut t = Table::new(&[
        "NODE",
        "SERVICE",
        "CONNECTED",
        "VERSION",
        "STATE",
        "INSTANCE",
        "SINCE",
    ]);
    for p in &s.proxies {
        t.row(vec![
            p.node_id.clone(),
            dash(&p.service),
            if p.connected { "yes" } else { "no" }.to_string(),
            dash(&p.acked_version),
            State::of(p, &s.snapshot_version).label(),
            dash(&p.instance),
            output::utc(p.connected_since_unix),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn push_json(p: &PushSummary) -> Value {
    json!({
        "snapshotVersion": p.snapshot_version,
        "committedAt": output::utc(p.committed_unix_ms.div_euclid(1000)),
        "acks": p.acks,
        "p50Seconds": p.p50_seconds,
        "p99Seconds": p.p99_seconds,
        "lastAckSeconds": p.last_ack_seconds,
    })
}

pub fn document(s: &StatusResponse) -> Value {
    let n = Summary::of(s);
    let proxies: Vec<Value> = s
        .proxies
        .iter()
        .map(|p| {
            let state = State::of(p, &s.snapshot_version);
            json!({
                "node": p.node_id,
                "service": p.service,
                "connected": p.connected,
                "connectedSince": output::utc(p.connected_since_unix),
                "version": p.acked_version,
                "state": state.name(),
                "nackedVersion": p.nacked_version,
                "nackError": p.nack_error,
                "sentVersion": p.sent_version,
                "instance": p.instance,
            })
        })
        .collect();
    json!({
        "configVersion": s.config_version,
        "snapshotVersion": s.snapshot_version,
        "summary": {
            "proxies": n.proxies,
            "connected": n.connected,
            "current": n.current,
            "nacks": n.nacks,
            "pending": n.pending,
        },
        "lastPush": s.last_push.as_ref().map(push_json),
        "proxies": proxies,
    })
}

/// YAML of a document, or JSON (commands render their own tables).
pub fn render(v: &Value, format: Format) -> Result<String, Failure> {
    match format {
        Format::Yaml => yaml_serde::to_string(v)
            .map_err(|e| Failure::server(format!("cannot render YAML: {e}"))),
        Format::Json | Format::Table => serde_json::to_string_pretty(v)
            .map(|t| t + "\n")
            .map_err(|e| Failure::server(format!("cannot render JSON: {e}"))),
    }
}

fn show(s: &StatusResponse, format: Format) -> Result<(), Failure> {
    let text = match format {
        Format::Table => table(s),
        f => render(&document(s), f)?,
    };
    emit(&text);
    Ok(())
}

/// Whether every connected proxy runs the current version; the laggards
/// otherwise, NACKs first.
pub fn converged(s: &StatusResponse) -> Result<(), Vec<String>> {
    let mut nacks = Vec::new();
    let mut pending = Vec::new();
    for p in s.proxies.iter().filter(|p| p.connected) {
        match State::of(p, &s.snapshot_version) {
            State::Ack => {}
            State::Nack(e) => nacks.push(format!("{} (NACK: {})", p.node_id, one_line(&e))),
            _ => pending.push(format!(
                "{} (PENDING, runs {})",
                p.node_id,
                dash(&p.acked_version)
            )),
        }
    }
    nacks.extend(pending);
    if nacks.is_empty() {
        Ok(())
    } else {
        Err(nacks)
    }
}

/// The snapshot being pushed is the current config's (not one published
/// before the last commit).
fn published(s: &StatusResponse) -> bool {
    s.snapshot_version
        .split('.')
        .next()
        .is_some_and(|v| v == s.config_version.to_string())
}

pub async fn run(ctx: &Ctx, format: Format, wait: Option<Duration>) -> Result<u8, Failure> {
    let mut client = ctx.client().await?;
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let s = client
            .status(StatusRequest {})
            .await
            .map_err(|e| ctx.status(e))?
            .into_inner();
        let Some(deadline) = deadline else {
            show(&s, format)?;
            return Ok(0);
        };
        let outcome = published(&s).then(|| converged(&s));
        let nacked = matches!(&outcome, Some(Err(l)) if l.iter().any(|x| x.contains("(NACK:")));
        let timed_out = Instant::now() >= deadline;
        match outcome {
            Some(Ok(())) => {
                show(&s, format)?;
                return Ok(0);
            }
            Some(Err(laggards)) if nacked || timed_out => {
                show(&s, format)?;
                return Err(not_converged(&s, &laggards, nacked, wait));
            }
            None if timed_out => {
                show(&s, format)?;
                return Err(Failure::not_converged(format!(
                    "config version {} was not published within {:?}",
                    s.config_version,
                    wait.unwrap_or_default()
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

fn not_converged(
    s: &StatusResponse,
    laggards: &[String],
    nacked: bool,
    wait: Option<Duration>,
) -> Failure {
    let why = if nacked {
        format!("a proxy rejected snapshot version {}", s.snapshot_version)
    } else {
        format!(
            "not every connected proxy ACKed snapshot version {} within {:?}",
            s.snapshot_version,
            wait.unwrap_or_default()
        )
    };
    Failure::not_converged(format!(
        "{why}: {} of {}: {}",
        laggards.len(),
        output::count(Summary::of(s).connected, "proxy", "proxies"),
        laggards.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(node: &str, connected: bool, acked: &str, nacked: &str) -> ProxyStatus {
        ProxyStatus {
            node_id: node.into(),
            connected,
            acked_version: acked.into(),
            sent_version: acked.into(),
            nacked_version: nacked.into(),
            nack_error: if nacked.is_empty() {
                String::new()
            } else {
                "over --max-route-rules".into()
            },
            ..Default::default()
        }
    }

    fn status(proxies: Vec<ProxyStatus>) -> StatusResponse {
        StatusResponse {
            config_version: 2,
            snapshot_version: "2.ab".into(),
            proxies,
            last_push: Some(PushSummary {
                snapshot_version: "2.ab".into(),
                committed_unix_ms: 1_700_000_000_000,
                acks: 2,
                p50_seconds: 0.012,
                p99_seconds: 0.0141,
                last_ack_seconds: 0.0141,
            }),
        }
    }

    #[test]
    fn states_compare_with_the_version_being_pushed() {
        let s = status(vec![
            proxy("a", true, "2.ab", ""),
            proxy("b", true, "1.ab", "2.ab"),
            proxy("c", true, "1.ab", ""),
            proxy("d", false, "1.ab", ""),
            proxy("e", false, "2.ab", ""),
        ]);
        let states: Vec<String> = s
            .proxies
            .iter()
            .map(|p| State::of(p, &s.snapshot_version).label())
            .collect();
        assert_eq!(
            states,
            ["ACK", "NACK: over --max-route-rules", "PENDING", "-", "ACK"]
        );
        assert_eq!(
            Summary::of(&s),
            Summary {
                proxies: 5,
                connected: 3,
                current: 1,
                nacks: 1,
                pending: 1
            }
        );
        let t = table(&s);
        assert!(
            t.contains("3 proxies connected, 1 on the current version, 1 NACK, 1 pending (2 disconnected); last push (2.ab): 2 ACKs, p50 12.0 ms, p99 14.1 ms, last ACK 14.1 ms"),
            "{t}"
        );
        assert_eq!(
            converged(&s).unwrap_err(),
            ["b (NACK: over --max-route-rules)", "c (PENDING, runs 1.ab)"]
        );
        let doc = document(&s);
        assert_eq!(doc["proxies"][1]["state"], "NACK");
        assert_eq!(doc["summary"]["current"], 1);
        assert_eq!(doc["lastPush"]["p50Seconds"], 0.012);
    }

    #[test]
    fn converged_needs_every_connected_proxy_on_the_current_version() {
        let s = status(vec![
            proxy("a", true, "2.ab", ""),
            proxy("d", false, "1.ab", ""),
        ]);
        assert_eq!(converged(&s), Ok(()));
        assert!(published(&s));
        // A snapshot of the config before the last commit is not it.
        let mut earlier = s.clone();
        earlier.snapshot_version = "1.ab".into();
        assert!(!published(&earlier));
        assert_eq!(converged(&status(vec![])), Ok(()));
    }
}
