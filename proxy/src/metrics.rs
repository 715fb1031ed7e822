//! Prometheus metrics. Families are registered once; the request path holds
//! pre-resolved handles (resolved when a config is compiled), so counting a
//! request is a couple of atomic adds, never a label lookup.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub route: String,
    pub backend: String,
    pub code_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: &'static str,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub policy: String,
    pub limit: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub policy: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// One opaque TCP flow: which listener, which Service port (or the local
/// app's port, or `passthrough`), and which way the bytes went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub listener: &'static str,
    pub target: String,
    /// `client_to_server` or `server_to_client`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpConnLabels {
    pub listener: &'static str,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub listener: &'static str,
    /// http1, http2, tls, opaque, timeout, closed, or declared.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub target: String,
    pub result: &'static str,
}

/// One of the app's kubelet probes answered on the admin port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppProbeLabels {
    /// The probe's path, /app-health/<container>/<readyz|livez|startupz>.
    pub probe: String,
    /// pass, fail, timeout, error, or overloaded.
    pub result: &'static str,
}

/// A privileged admin endpoint: /config or /shutdown.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminPathLabels {
    pub path: &'static str,
}

/// The control-plane replica the Discovery stream is on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// The `--control-plane` URL it came from.
    pub url: String,
    /// The address connected to (ip:port).
    pub address: String,
}

/// A client of the control plane: discovery or identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Decision counters of one limit: allowed, limited, dry-run would-limit,
/// and the checks its full key table sent to the overflow bucket.
#[derive(Clone, Default)]
pub struct Decisions {
    pub allowed: Counter,
    pub limited: Counter,
    pub dry_run: Counter,
    pub overflow: Counter,
}

/// Every metric the proxy exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
    pub errors: Family<ErrorLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub upstream_overflow: Family<BackendLabels, Counter>,
    pub outlier_ejections: Family<BackendLabels, Counter>,
    pub mirrors: Family<BackendLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_info: Family<VersionLabels, Gauge>,
    /// Validate + compile + swap of each applied config.
    pub config_apply_seconds: Histogram,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub connections_total: Family<ListenerLabels, Counter>,
    pub tcp_bytes: Family<TcpLabels, Counter>,
    pub tcp_connections: Family<TcpConnLabels, Counter>,
    pub protocol_detections: Family<DetectLabels, Counter>,
    pub unknown_destinations: Family<ResultLabels, Counter>,
    pub control_plane_connected: Gauge,
    /// One series, value 1, while the Discovery stream is up: which replica.
    pub control_plane_replica: Family<ReplicaLabels, Gauge>,
    pub control_plane_failovers: Family<ClientLabels, Counter>,
    pub ratelimit_decisions: Family<DecisionLabels, Counter>,
    pub ratelimit_overflow: Family<LimitLabels, Counter>,
    pub identity_cert_expiry: DeadlineGauge,
    pub identity_rotations: Family<ResultLabels, Counter>,
    pub identity_trust_roots: Gauge,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub plaintext_refused: Counter,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub app_probes: Family<AppProbeLabels, Counter>,
    pub admin_refused: Family<AdminPathLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("remora");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by direction, route, backend and status class",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, retries included",
            request_duration.clone(),
        );
        let errors = Family::default();
        registry.register(
            "proxy_errors",
            "Requests the proxy answered itself, by reason (no-route, timeout, connect, overflow, ...)",
            errors.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries by route and result (attempted, budget_exhausted, not_retryable)",
            retries.clone(),
        );
        let upstream_overflow = Family::default();
        registry.register(
            "upstream_overflow",
            "Requests refused with 503 because a backend was over its connection and pending limits",
            upstream_overflow.clone(),
        );
        let outlier_ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            outlier_ejections.clone(),
        );
        let mirrors = Family::default();
        registry.register(
            "mirrored_requests",
            "Requests copied to a mirror backend",
            mirrors.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Config changes seen, by result (applied, rejected)",
            config_reloads.clone(),
        );
        let config_info = Family::default();
        registry.register(
            "config_info",
            "The running config version (value 1)",
            config_info.clone(),
        );
        let config_apply_seconds = latency_histogram();
        registry.register(
            "config_apply_seconds",
            "Time to validate, compile and publish each applied config, off the data-plane threads",
            config_apply_seconds.clone(),
        );
        let connections_active = Family::default();
        registry.register(
            "connections_active",
            "Open client connections by listener",
            connections_active.clone(),
        );
        let connections_total = Family::default();
        registry.register(
            "connections",
            "Accepted client connections by listener",
            connections_total.clone(),
        );
        let tcp_bytes = Family::default();
        registry.register(
            "tcp_bytes",
            "Bytes forwarded on opaque TCP connections, by listener, target (Service port, app port or passthrough) and flow",
            tcp_bytes.clone(),
        );
        let tcp_connections = Family::default();
        registry.register(
            "tcp_connections",
            "Opaque TCP connections forwarded, by listener and target",
            tcp_connections.clone(),
        );
        let protocol_detections = Family::default();
        registry.register(
            "protocol_detections",
            "Connections by what their first bytes said (http1, http2, tls, opaque, timeout, closed), or declared when the port's protocol is",
            protocol_detections.clone(),
        );
        let unknown_destinations = Family::default();
        registry.register(
            "outbound_unknown_destinations",
            "Intercepted connections to an address of no Service, by result (passthrough under AllowAny, refused under RegistryOnly)",
            unknown_destinations.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the Discovery stream to the control plane is up",
            control_plane_connected.clone(),
        );
        let control_plane_replica = Family::default();
        registry.register(
            "control_plane_replica_info",
            "The control-plane replica the Discovery stream is on, by --control-plane URL and address (value 1; no sample while disconnected)",
            control_plane_replica.clone(),
        );
        let control_plane_failovers = Family::<ClientLabels, Counter>::default();
        registry.register(
            "control_plane_failovers",
            "Moves to another control-plane replica because the one in use failed, by client: discovery (the stream came back on another replica), identity (a certificate request succeeded at a replica after an earlier one failed)",
            control_plane_failovers.clone(),
        );
        for client in ["discovery", "identity"] {
            let _ = control_plane_failovers.get_or_create(&ClientLabels { client });
        }
        let ratelimit_decisions = Family::default();
        registry.register(
            "ratelimit_decisions",
            "Rate-limit decisions by policy, limit and result (allowed, limited, dry_run_limited)",
            ratelimit_decisions.clone(),
        );
        let ratelimit_overflow = Family::default();
        registry.register(
            "ratelimit_overflow",
            "Rate-limit checks of keys not yet tracked that shared the limit's overflow bucket because its key table was full (--ratelimit-max-keys), by policy and limit",
            ratelimit_overflow.clone(),
        );
        let identity_cert_expiry = DeadlineGauge::default();
        registry.register(
            "identity_cert_expiry_seconds",
            "Seconds until the proxy's identity certificate expires (no sample without one)",
            identity_cert_expiry.clone(),
        );
        let identity_rotations = Family::default();
        registry.register(
            "identity_rotations",
            "Identity certificate requests, the first and each renewal, by result (ok, error)",
            identity_rotations.clone(),
        );
        let identity_trust_roots = Gauge::default();
        registry.register(
            "identity_trust_roots",
            "Root certificates in the trust bundle the proxy verifies peers against",
            identity_trust_roots.clone(),
        );
        let tls_handshakes = Family::default();
        registry.register(
            "tls_handshakes",
            "Mutual TLS handshakes between proxies, by direction (inbound, outbound) and result (ok, error)",
            tls_handshakes.clone(),
        );
        let plaintext_refused = Counter::default();
        registry.register(
            "inbound_plaintext_refused",
            "Plaintext connections the inbound listener closed because the Service's mTLS mode is Strict",
            plaintext_refused.clone(),
        );
        let authz_decisions = Family::default();
        registry.register(
            "authz_decisions",
            "AuthorizationPolicy decisions on inbound requests, by target and result (allowed, denied)",
            authz_decisions.clone(),
        );
        let app_probes = Family::default();
        registry.register(
            "app_probes",
            "The app's kubelet probes answered on the admin port (/app-health/...), by probe path and result (pass, fail, timeout, error, overloaded)",
            app_probes.clone(),
        );
        let admin_refused = Family::<AdminPathLabels, Counter>::default();
        registry.register(
            "admin_refused",
            "Calls to the admin port's /config and POST /shutdown refused: not from loopback and without the admin token, by path",
            admin_refused.clone(),
        );
        for path in ["/config", "/shutdown"] {
            let _ = admin_refused.get_or_create(&AdminPathLabels { path });
        }
        Arc::new(Metrics {
            registry,
            requests,
            request_duration,
            errors,
            retries,
            upstream_overflow,
            outlier_ejections,
            mirrors,
            config_reloads,
            config_info,
            config_apply_seconds,
            connections_active,
            connections_total,
            tcp_bytes,
            tcp_connections,
            protocol_detections,
            unknown_destinations,
            control_plane_connected,
            control_plane_replica,
            control_plane_failovers,
            ratelimit_decisions,
            ratelimit_overflow,
            identity_cert_expiry,
            identity_rotations,
            identity_trust_roots,
            tls_handshakes,
            plaintext_refused,
            authz_decisions,
            app_probes,
            admin_refused,
        })
    }

    /// Handles for one (direction, route, backend), resolved once.
    pub fn route(&self, direction: &'static str, route: &str, backend: &str) -> RouteMetrics {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let by_class = CLASSES.map(|c| {
            self.requests.get_or_create_owned(&RequestLabels {
                direction,
                route: route.to_string(),
                backend: backend.to_string(),
                code_class: c,
            })
        });
        let duration = self.request_duration.get_or_create_owned(&RouteLabels {
            direction,
            route: route.to_string(),
        });
        RouteMetrics { by_class, duration }
    }

    /// Creates a listener's series up front, so they exist (at zero) as
    /// soon as the proxy is ready.
    pub fn listener(&self, listener: &'static str) {
        let l = ListenerLabels { listener };
        let _ = self.connections_active.get_or_create(&l);
        let _ = self.connections_total.get_or_create(&l);
    }

    /// Decision counters for one limit, resolved once.
    pub fn decisions(&self, policy: &str, limit: &str) -> Decisions {
        let c = |result| {
            self.ratelimit_decisions
                .get_or_create_owned(&DecisionLabels {
                    policy: policy.to_string(),
                    limit: limit.to_string(),
                    result,
                })
        };
        Decisions {
            allowed: c("allowed"),
            limited: c("limited"),
            dry_run: c("dry_run_limited"),
            overflow: self.ratelimit_overflow.get_or_create_owned(&LimitLabels {
                policy: policy.to_string(),
                limit: limit.to_string(),
            }),
        }
    }

    /// Counters for one TCP target, resolved once per connection.
    pub fn tcp(&self, listener: &'static str, target: &str) -> TcpCounters {
        let c = |flow| {
            self.tcp_bytes.get_or_create_owned(&TcpLabels {
                listener,
                target: target.to_string(),
                flow,
            })
        };
        self.tcp_connections
            .get_or_create(&TcpConnLabels {
                listener,
                target: target.to_string(),
            })
            .inc();
        TcpCounters {
            to_server: c("client_to_server"),
            to_client: c("server_to_client"),
        }
    }

    pub fn detected(&self, listener: &'static str, result: &'static str) {
        self.protocol_detections
            .get_or_create(&DetectLabels { listener, result })
            .inc();
    }

    pub fn app_probe(&self, probe: &str, result: &'static str) {
        self.app_probes
            .get_or_create(&AppProbeLabels {
                probe: probe.to_string(),
                result,
            })
            .inc();
    }

    pub fn admin_refused(&self, path: &'static str) {
        self.admin_refused
            .get_or_create(&AdminPathLabels { path })
            .inc();
    }

    /// The Discovery stream is up, on the replica at `address`.
    pub fn control_plane_up(&self, url: &str, address: std::net::SocketAddr) {
        self.control_plane_replica.clear();
        self.control_plane_replica
            .get_or_create(&ReplicaLabels {
                url: url.to_string(),
                address: address.to_string(),
            })
            .set(1);
        self.control_plane_connected.set(1);
    }

    /// The Discovery stream is down.
    pub fn control_plane_down(&self) {
        self.control_plane_connected.set(0);
        self.control_plane_replica.clear();
    }

    /// The failover counter of one control-plane client.
    pub fn control_plane_failovers(&self, client: &'static str) -> Counter {
        self.control_plane_failovers
            .get_or_create_owned(&ClientLabels { client })
    }

    pub fn error(&self, direction: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Byte counters of one opaque connection's target.
#[derive(Clone)]
pub struct TcpCounters {
    pub to_server: Counter,
    pub to_client: Counter,
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, elapsed: std::time::Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// A gauge of the seconds left until a deadline, computed when scraped so
/// it counts down between updates. No sample while no deadline is set.
#[derive(Clone, Debug, Default)]
pub struct DeadlineGauge {
    /// Milliseconds since the Unix epoch; 0 when unset.
    at_ms: Arc<AtomicU64>,
}

impl DeadlineGauge {
    pub fn set(&self, at: SystemTime) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.at_ms.store(ms.max(1), Relaxed);
    }

    pub fn clear(&self) {
        self.at_ms.store(0, Relaxed);
    }

    /// Seconds until the deadline (0 once it has passed), if one is set.
    pub fn seconds_left(&self) -> Option<f64> {
        let at = self.at_ms.load(Relaxed);
        if at == 0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Some(at.saturating_sub(now) as f64 / 1000.0)
    }
}

impl EncodeMetric for DeadlineGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.seconds_left() {
            Some(s) => encoder.encode_gauge(&s),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}
