//! The control plane's Prometheus metrics, and the small HTTP server that
//! serves them on the admin address (`--metrics-addr`, loopback by
//! default): `GET /metrics` only.
//!
//! Counters and the push histogram are updated as things happen; what is a
//! count of current state (connected proxies by service and version,
//! snapshot sizes per scope) is computed from that state at each scrape, so
//! it is exact and never keeps a series for a version nobody runs.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub struct Metrics {
    registry: Registry,
    /// Commit of a version → a proxy's ACK of it, one per proxy and version.
    pub push: Histogram,
    /// Commit of the latest version → its last ACK so far.
    pub push_last_ack: Gauge<f64, AtomicU64>,
    pub acks: Counter,
    pub nacks: Counter,
    /// Discovery streams open.
    pub streams: Gauge,
    pub config_version: Gauge,
    pub commits: Counter,
}

impl Metrics {
    /// `state` adds what is computed at each scrape.
    pub fn new(state: Option<Box<dyn Collector>>) -> Metrics {
        let mut registry = Registry::default();
        // 1 ms to ~33 s.
        let push = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "remora_control_push_seconds",
            "From the commit of a version to a proxy's ACK of it: one observation per proxy connected at the commit, per version",
            push.clone(),
        );
        let push_last_ack = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "remora_control_push_last_ack_seconds",
            "From the commit of the latest version to its last ACK so far",
            push_last_ack.clone(),
        );
        let acks = Counter::default();
        registry.register(
            "remora_control_acks",
            "Snapshots proxies applied",
            acks.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "remora_control_nacks",
            "Snapshots proxies rejected",
            nacks.clone(),
        );
        let streams = Gauge::default();
        registry.register(
            "remora_control_streams",
            "Discovery streams open",
            streams.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "remora_control_config_version",
            "The current config version",
            config_version.clone(),
        );
        let commits = Counter::default();
        registry.register(
            "remora_control_commits",
            "Config versions committed by this process",
            commits.clone(),
        );
        if let Some(c) = state {
            registry.register_collector(c);
        }
        Metrics {
            registry,
            push,
            push_last_ack,
            acks,
            nacks,
            streams,
            config_version,
            commits,
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Most scrapes served at once; past it, accepting pauses.
const MAX_CONNECTIONS: usize = 16;
/// A scraper must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "metrics connection ended");
            }
            drop(permit);
        });
    }
}

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// What is counted at each scrape: connected proxies by Service and the
/// version they run, and each scope's snapshot size.
pub struct StateCollector {
    pub proxies: Arc<crate::proxies::Proxies>,
    pub snapshots: Arc<crate::snapshot::Snapshots>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    service: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut census: Vec<_> = self.proxies.census().into_iter().collect();
        census.sort();
        let mut family = encoder.encode_descriptor(
            "remora_control_proxies",
            "Connected proxies by the Service they front and the snapshot version they run",
            None,
            MetricType::Gauge,
        )?;
        for ((service, version), n) in census {
            let labels = ProxyLabels {
                service,
                version: version.to_string(),
            };
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "remora_control_snapshot_bytes",
            "Size of the latest snapshot of each scope (* is the whole mesh)",
            None,
            MetricType::Gauge,
        )?;
        for (scope, size) in self.snapshots.sizes() {
            ConstGauge::new(size as i64).encode(family.encode_family(&ScopeLabels { scope })?)?;
        }
        Ok(())
    }
}
