//! Compiles a validated config into the immutable runtime the request path
//! reads: route tables, clusters, retry budgets. A new runtime is published
//! with one `ArcSwap::store`; requests in flight keep the `Arc` they loaded.
//! What did not change is carried over from the previous runtime: connection
//! pools, endpoint latency estimates, outlier state, retry budgets.

use crate::authz::{LocalPolicy, MtlsMode};
use crate::balance::OutlierConfig;
use crate::cluster::{Cluster, Endpoint, Protocol, Target};
use crate::metrics::{BackendLabels, Metrics};
use crate::path::EncodedSlashes;
use crate::pool::{ClusterTls, Pool, PoolConfig};
use crate::ratelimit::{KeyPart, Limit, LimitParams, LimiterSet};
use crate::retry::{BudgetParams, RetryBudget, RetryPolicy};
use crate::route::*;
use crate::tls::MeshTls;
use http::header::{HeaderName, HeaderValue};
use http::Method;
use regex::Regex;
use remora_proto::duration::parse_opt;
use remora_proto::model::{self, Config};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Proxy-wide settings that shape compilation (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub pool: PoolConfig,
    pub outlier: OutlierConfig,
    /// The namespace this proxy runs in: short Service names resolve here.
    pub namespace: String,
    pub default_budget: BudgetParams,
    /// Most route rules a config may have (a memory bound).
    pub max_route_rules: usize,
    /// `namespace/name` of the Service this proxy fronts, if any: its
    /// inbound rate-limit policies apply here.
    pub service: Option<String>,
    /// Live keys per rate limit before new keys share an overflow bucket.
    pub ratelimit_max_keys: usize,
    /// Mutual TLS to meshed endpoints, when this proxy has an identity.
    pub tls: Option<Arc<MeshTls>>,
}

impl Default for Settings {
    /// The same values as remora-proxy's flag defaults.
    fn default() -> Settings {
        Settings {
            pool: PoolConfig {
                connect_timeout: Duration::from_secs(1),
                pending_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(90),
                max_connections: 1024,
                max_pending: 1024,
            },
            outlier: OutlierConfig {
                consecutive_failures: 5,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(300),
            },
            namespace: remora_proto::DEFAULT_NAMESPACE.into(),
            default_budget: BudgetParams {
                percent: 20.0,
                min_per_sec: 10,
                window: Duration::from_secs(10),
            },
            max_route_rules: 100_000,
            service: None,
            ratelimit_max_keys: crate::ratelimit::DEFAULT_MAX_KEYS,
            tls: None,
        }
    }
}

pub struct Runtime {
    pub version: String,
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub budgets: HashMap<String, Arc<RetryBudget>>,
    /// Every rate limit by `namespace/policy/limit` (kept across swaps).
    pub limits: HashMap<String, Arc<Limit>>,
    /// Limits on traffic into the local app.
    pub inbound_limits: Arc<LimiterSet>,
    /// mTLS mode, identity header and authorization for the local Service.
    pub local: LocalPolicy,
    /// Declared protocols of the local app's ports (targetPorts).
    pub local_ports: HashMap<u16, Protocol>,
    /// What intercepted connections to addresses of no Service get.
    pub outbound_policy: OutboundPolicy,
    /// What a request path with an encoded slash gets.
    pub encoded_slashes: EncodedSlashes,
    /// Upgrade protocols (besides websocket) the local Service's routes
    /// allow: what the inbound side forwards.
    pub local_upgrades: Vec<String>,
}

/// MeshConfig's outboundTrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Forwarded as plain TCP to where the app meant to go.
    AllowAny,
    /// Refused.
    RegistryOnly,
}

impl Runtime {
    /// The runtime before any config arrived: no routes.
    pub fn empty() -> Runtime {
        Runtime {
            version: String::new(),
            config: Arc::new(Config::default()),
            routes: RouteTable::default(),
            clusters: HashMap::new(),
            budgets: HashMap::new(),
            limits: HashMap::new(),
            inbound_limits: Arc::new(LimiterSet::default()),
            local: LocalPolicy::default(),
            local_ports: HashMap::new(),
            outbound_policy: OutboundPolicy::AllowAny,
            encoded_slashes: EncodedSlashes::Reject,
            local_upgrades: Vec::new(),
        }
    }
}

const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Builds a runtime from a config that `remora_proto::prepare` accepted.
pub fn compile(
    cfg: Config,
    version: String,
    prev: &Runtime,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Runtime, String> {
    let mut clusters = HashMap::new();
    // Service id -> (port -> (protocol, cluster id))
    let mut ports: HashMap<String, Vec<(u16, String)>> = HashMap::new();
    for svc in &cfg.services {
        let id = remora_proto::resource_id(svc.metadata.as_ref());
        let spec = svc.spec.clone().unwrap_or_default();
        // With an identity, calls to the Service's meshed endpoints are mTLS,
        // unless the Service turned it off.
        let mode = spec.mtls.as_ref().map(|m| m.mode.as_str()).unwrap_or("");
        let tls = s
            .tls
            .as_ref()
            .filter(|_| MtlsMode::parse(mode) != MtlsMode::Disabled)
            .map(|mesh| {
                let meta = svc.metadata.clone().unwrap_or_default();
                ClusterTls {
                    mesh: mesh.clone(),
                    namespace: meta.namespace,
                    service_account: if spec.service_account.is_empty() {
                        meta.name
                    } else {
                        spec.service_account.clone()
                    },
                    app_port: 0,
                }
            });
        for p in &spec.ports {
            let protocol = Protocol::parse(&p.protocol)
                .ok_or_else(|| format!("Service {id}: unknown protocol {:?}", p.protocol))?;
            let cid = format!("{id}:{}", p.port);
            let tls = tls.clone().map(|t| ClusterTls {
                app_port: p.target_port as u16,
                ..t
            });
            let mut targets = Vec::new();
            for e in &spec.endpoints {
                let ip: IpAddr = e
                    .address
                    .parse()
                    .map_err(|_| format!("Service {id}: bad address {:?}", e.address))?;
                let port = if e.port != 0 { e.port } else { p.target_port };
                targets.push(Target {
                    addr: SocketAddr::new(ip, port as u16),
                    tls: e.meshed && tls.is_some(),
                });
            }
            let cluster = build_cluster(
                &cid,
                protocol,
                &targets,
                tls.clone(),
                prev.clusters.get(&cid),
                s,
                metrics,
            );
            clusters.insert(cid.clone(), cluster);
            ports
                .entry(id.clone())
                .or_default()
                .push((p.port as u16, cid));
        }
    }

    let limits = compile_limits(&cfg, prev, s, metrics)?;
    // (target kind, target id, direction) -> limits
    let attached = |kind: &str, id: &str, direction: &str| -> Vec<Arc<Limit>> {
        limits
            .values()
            .filter(|(t, _)| t.0 == kind && t.1 == id && t.2 == direction)
            .map(|(_, l)| l.clone())
            .collect()
    };
    let set = |v: Vec<Arc<Limit>>| (!v.is_empty()).then(|| Arc::new(LimiterSet { limits: v }));
    let inbound_limits = Arc::new(LimiterSet {
        limits: s
            .service
            .as_deref()
            .map(|svc| attached("Service", svc, "inbound"))
            .unwrap_or_default(),
    });

    // Routes by the Services they attach to, built once: compiling is linear
    // in routes, not Services × routes.
    let mut routes_by_parent: HashMap<String, Vec<&model::HttpRoute>> = HashMap::new();
    for r in &cfg.http_routes {
        let mut parents: Vec<String> = r
            .spec
            .iter()
            .flat_map(|s| {
                s.parent_refs
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
            })
            .collect();
        parents.sort();
        parents.dedup();
        for p in parents {
            routes_by_parent.entry(p).or_default().push(r);
        }
    }

    let mut budgets = HashMap::new();
    let mut table = RouteTable::default();
    for svc in &cfg.services {
        let meta = svc.metadata.clone().unwrap_or_default();
        let id = format!("{}/{}", meta.namespace, meta.name);
        let mut port_routes = Vec::new();
        let attached_to = &attached;
        for (port, cid) in ports.get(&id).into_iter().flatten() {
            let mut entries = Vec::new();
            let mut attached = false;
            for route in routes_by_parent.get(&id).into_iter().flatten() {
                let (Some(rmeta), Some(spec)) = (route.metadata.as_ref(), route.spec.as_ref())
                else {
                    continue;
                };
                let applies = spec.parent_refs.iter().any(|p| {
                    p.namespace == meta.namespace
                        && p.name == meta.name
                        && (p.port == 0 || p.port as u16 == *port)
                });
                if !applies {
                    continue;
                }
                attached = true;
                let route_id = format!("{}/{}", rmeta.namespace, rmeta.name);
                let mut rule_limits = attached_to("HTTPRoute", &route_id, "outbound");
                rule_limits.extend(attached_to("Service", &id, "outbound"));
                let rule_limits = set(rule_limits);
                for (i, rule) in spec.rules.iter().enumerate() {
                    let rule_id = if rule.name.is_empty() {
                        format!("{}/{}/rule-{i}", rmeta.namespace, rmeta.name)
                    } else {
                        format!("{}/{}/{}", rmeta.namespace, rmeta.name, rule.name)
                    };
                    let mut compiled = compile_rule(
                        &rule_id,
                        rule,
                        cid,
                        &clusters,
                        &ports,
                        prev,
                        &mut budgets,
                        s,
                        metrics,
                    )?;
                    compiled.limits = rule_limits.clone();
                    let compiled = Arc::new(compiled);
                    for m in compile_matches(rule)? {
                        entries.push((m, compiled.clone()));
                    }
                }
            }
            // Stable: equal precedence keeps route order (name) then rule order.
            entries.sort_by_key(|(m, _)| m.precedence());
            let fallback = (!attached).then(|| {
                let cluster = clusters[cid].clone();
                Arc::new(Rule {
                    id: format!("{id}:{port}/default"),
                    backends: vec![Backend {
                        metrics: metrics.route("outbound", &format!("{id}:{port}/default"), cid),
                        cluster,
                        weight: 1,
                    }],
                    total_weight: 1,
                    request_headers: None,
                    response_headers: None,
                    mirror: None,
                    timeout: None,
                    per_try_timeout: None,
                    retry: None,
                    limits: set(attached_to("Service", &id, "outbound")),
                    allowed_upgrades: Vec::new(),
                })
            });
            port_routes.push(PortRoutes {
                port: *port,
                cluster: clusters[cid].clone(),
                entries,
                fallback,
            });
        }
        let routes = Arc::new(ServiceRoutes {
            id: id.clone(),
            ports: port_routes,
        });
        add_destinations(&mut table, svc, &routes);
        let (ns, name) = (&meta.namespace, &meta.name);
        if *ns == s.namespace {
            table.hosts.insert(name.clone(), routes.clone());
        }
        for host in [
            format!("{name}.{ns}"),
            format!("{name}.{ns}.svc"),
            format!("{name}.{ns}.svc.cluster.local"),
        ] {
            table.hosts.insert(host, routes.clone());
        }
    }

    let local = crate::authz::compile(&cfg, s.service.as_deref())?;
    let local_ports = local_ports(&cfg, s.service.as_deref());
    let mesh = cfg.mesh_configs.first().and_then(|m| m.spec.as_ref());
    let outbound_policy = match mesh {
        Some(m) if m.outbound_traffic_policy == "RegistryOnly" => OutboundPolicy::RegistryOnly,
        _ => OutboundPolicy::AllowAny,
    };
    let encoded_slashes = match mesh {
        Some(m) if m.encoded_slashes == "PassThrough" => EncodedSlashes::PassThrough,
        _ => EncodedSlashes::Reject,
    };
    let local_upgrades = local_upgrades(&cfg, s.service.as_deref());
    Ok(Runtime {
        version,
        config: Arc::new(cfg),
        routes: table,
        clusters,
        budgets,
        limits: limits.into_iter().map(|(k, (_, l))| (k, l)).collect(),
        inbound_limits,
        local,
        local_ports,
        outbound_policy,
        encoded_slashes,
        local_upgrades,
    })
}

/// The Upgrade protocols the routes of the local Service allow.
fn local_upgrades(cfg: &Config, service: Option<&str>) -> Vec<String> {
    let Some(service) = service else {
        return Vec::new();
    };
    let mut out: Vec<String> = cfg
        .http_routes
        .iter()
        .filter_map(|r| r.spec.as_ref())
        .filter(|spec| {
            spec.parent_refs
                .iter()
                .any(|p| format!("{}/{}", p.namespace, p.name) == service)
        })
        .flat_map(|spec| {
            spec.rules
                .iter()
                .flat_map(|r| r.allowed_upgrades.iter().cloned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where intercepted connections to `svc` arrive: its virtual addresses on
/// each port, and its endpoints on the port the app listens on (a meshed
/// endpoint registers its proxy's inbound port, but the app behind it
/// listens on the targetPort). An address two Services share stays with
/// the first.
fn add_destinations(table: &mut RouteTable, svc: &model::Service, routes: &Arc<ServiceRoutes>) {
    let Some(spec) = &svc.spec else { return };
    for p in &spec.ports {
        let Some(i) = routes
            .ports
            .iter()
            .position(|r| u32::from(r.port) == p.port)
        else {
            continue;
        };
        let vips = spec
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok());
        let vips = vips.map(|ip| SocketAddr::new(ip, p.port as u16));
        let endpoints = spec.endpoints.iter().filter_map(|e| {
            let ip = e.address.parse::<IpAddr>().ok()?;
            let port = if e.meshed || e.port == 0 {
                p.target_port
            } else {
                e.port
            };
            Some(SocketAddr::new(ip, port as u16))
        });
        for addr in vips.chain(endpoints) {
            table
                .destinations
                .entry(addr)
                .or_insert_with(|| (routes.clone(), i));
        }
    }
}

/// The declared protocols of the local Service's ports, by the port the
/// app listens on (targetPort).
fn local_ports(cfg: &Config, service: Option<&str>) -> HashMap<u16, Protocol> {
    let Some(service) = service else {
        return HashMap::new();
    };
    let spec = cfg
        .services
        .iter()
        .find(|s| remora_proto::resource_id(s.metadata.as_ref()) == service)
        .and_then(|s| s.spec.as_ref());
    spec.into_iter()
        .flat_map(|sp| sp.ports.iter())
        .filter_map(|p| Some((p.target_port as u16, Protocol::parse(&p.protocol)?)))
        .filter(|(_, proto)| *proto != Protocol::Detect)
        .collect()
}

/// A cluster for `addrs`, reusing the previous one whole when nothing
/// changed, and its pool and per-endpoint state when only endpoints did.
pub fn build_cluster(
    id: &str,
    protocol: Protocol,
    targets: &[Target],
    tls: Option<ClusterTls>,
    prev: Option<&Arc<Cluster>>,
    s: &Settings,
    metrics: &Metrics,
) -> Arc<Cluster> {
    if let Some(p) = prev {
        if p.same_shape(protocol, targets) && p.pool.same_tls(tls.as_ref()) {
            return p.clone();
        }
    }
    let pool = match prev {
        Some(p) if p.protocol == protocol && p.pool.same_tls(tls.as_ref()) => p.pool.clone(),
        _ => Arc::new(Pool::new(s.pool, protocol.is_h2(), tls)),
    };
    let endpoints = targets
        .iter()
        .filter_map(|t| {
            let load = prev.and_then(|p| p.load_of(t.addr)).unwrap_or_default();
            Endpoint::new(*t, load)
        })
        .collect();
    let labels = BackendLabels {
        backend: id.to_string(),
    };
    Arc::new(Cluster {
        id: id.to_string(),
        protocol,
        endpoints,
        pool,
        outlier: s.outlier,
        overflow: metrics.upstream_overflow.get_or_create_owned(&labels),
        ejections: metrics.outlier_ejections.get_or_create_owned(&labels),
    })
}

#[allow(clippy::too_many_arguments)]
fn compile_rule(
    rule_id: &str,
    rule: &model::HttpRouteRule,
    parent_cluster: &str,
    clusters: &HashMap<String, Arc<Cluster>>,
    ports: &HashMap<String, Vec<(u16, String)>>,
    prev: &Runtime,
    budgets: &mut HashMap<String, Arc<RetryBudget>>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Rule, String> {
    let resolve = |b: &model::BackendRef| -> Result<Arc<Cluster>, String> {
        let sid = format!("{}/{}", b.namespace, b.name);
        let svc_ports = ports
            .get(&sid)
            .ok_or_else(|| format!("{rule_id}: Service {sid} not found"))?;
        let cid = match b.port {
            0 => {
                &svc_ports
                    .first()
                    .ok_or_else(|| format!("{rule_id}: Service {sid} has no ports"))?
                    .1
            }
            p => {
                &svc_ports
                    .iter()
                    .find(|(port, _)| *port as u32 == p)
                    .ok_or_else(|| format!("{rule_id}: Service {sid} has no port {p}"))?
                    .1
            }
        };
        Ok(clusters[cid].clone())
    };

    let mut backends = Vec::new();
    if rule.backend_refs.is_empty() {
        let cluster = clusters[parent_cluster].clone();
        backends.push(Backend {
            metrics: metrics.route("outbound", rule_id, &cluster.id),
            cluster,
            weight: 1,
        });
    }
    for b in &rule.backend_refs {
        let cluster = resolve(b)?;
        backends.push(Backend {
            metrics: metrics.route("outbound", rule_id, &cluster.id),
            cluster,
            weight: b.weight.unwrap_or(1),
        });
    }
    let total_weight = backends.iter().map(|b| b.weight as u64).sum();

    let (mut request_headers, mut response_headers, mut mirror) = (None, None, None);
    for f in &rule.filters {
        if let Some(h) = &f.request_header_modifier {
            request_headers = Some(header_mod(h)?);
        }
        if let Some(h) = &f.response_header_modifier {
            response_headers = Some(header_mod(h)?);
        }
        if let Some(m) = &f.request_mirror {
            let b = m.backend_ref.as_ref().ok_or("mirror without backendRef")?;
            mirror = Some(Mirror {
                cluster: resolve(b)?,
                percent: m.percent.unwrap_or(100),
            });
        }
    }

    let (mut timeout, mut per_try_timeout) = (None, None);
    if let Some(t) = &rule.timeouts {
        timeout = parse_opt(&t.request)?;
        per_try_timeout = parse_opt(&t.backend_request)?;
    }

    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            let mut params = s.default_budget;
            if let Some(b) = &r.budget {
                if let Some(p) = b.percent {
                    params.percent = p;
                }
                if let Some(m) = b.min_retries_per_second {
                    params.min_per_sec = m;
                }
                if let Some(w) = parse_opt(&b.interval)? {
                    params.window = w;
                }
            }
            let budget = match prev.budgets.get(rule_id) {
                Some(old) if old.params() == params => old.clone(),
                _ => Arc::new(RetryBudget::new(params)),
            };
            budgets.insert(rule_id.to_string(), budget.clone());
            Some(RetryPolicy {
                codes: r.codes.iter().map(|&c| c as u16).collect(),
                attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
                backoff: parse_opt(&r.backoff)?.unwrap_or(DEFAULT_RETRY_BACKOFF),
                non_idempotent: r.non_idempotent,
                budget,
            })
        }
    };

    Ok(Rule {
        id: rule_id.to_string(),
        backends,
        total_weight,
        request_headers,
        response_headers,
        mirror,
        timeout,
        per_try_timeout,
        retry,
        limits: None,
        allowed_upgrades: rule.allowed_upgrades.clone(),
    })
}

/// (target kind, target `namespace/name`, direction)
type PolicyTarget = (String, String, String);

/// Compiles every RateLimitPolicy limit, keeping the buckets of limits whose
/// parameters did not change.
fn compile_limits(
    cfg: &Config,
    prev: &Runtime,
    s: &Settings,
    metrics: &Metrics,
) -> Result<HashMap<String, (PolicyTarget, Arc<Limit>)>, String> {
    let mut out = HashMap::new();
    for p in &cfg.rate_limit_policies {
        let pid = remora_proto::resource_id(p.metadata.as_ref());
        let spec = p.spec.clone().unwrap_or_default();
        let t = spec.target_ref.unwrap_or_default();
        let target_id = format!("{}/{}", t.namespace, t.name);
        for l in &spec.limits {
            let per = match l.per.as_str() {
                "minute" => Duration::from_secs(60),
                "hour" => Duration::from_secs(3600),
                _ => Duration::from_secs(1),
            };
            let key = if l.key.is_empty() {
                vec![KeyPart::Total]
            } else {
                l.key
                    .iter()
                    .map(|k| {
                        Ok(match k.r#type.as_str() {
                            "ClientIdentity" => KeyPart::ClientIdentity,
                            "SourceAddress" => KeyPart::SourceAddress,
                            "Header" => KeyPart::Header(
                                HeaderName::from_bytes(k.name.as_bytes())
                                    .map_err(|e| e.to_string())?,
                            ),
                            _ => KeyPart::Total,
                        })
                    })
                    .collect::<Result<_, String>>()?
            };
            // A mesh-wide limit is shared by the Service's live replicas:
            // each enforces an equal share.
            let share = if l.scope == "Mesh" {
                cfg.services
                    .iter()
                    .find(|svc| remora_proto::resource_id(svc.metadata.as_ref()) == target_id)
                    .and_then(|svc| svc.spec.as_ref())
                    .map_or(1, |sp| sp.endpoints.len().max(1) as u32)
            } else {
                1
            };
            let params = LimitParams {
                requests: l.requests,
                per,
                burst: l.burst.unwrap_or(l.requests),
                key,
                overrides: l
                    .overrides
                    .iter()
                    .map(|o| (o.value.clone(), o.requests, o.burst.unwrap_or(o.requests)))
                    .collect(),
                share,
                max_keys: s.ratelimit_max_keys,
            };
            let headers = spec.response_headers.unwrap_or(true);
            let id = format!("{pid}/{}", l.name);
            let limit = match prev.limits.get(&id) {
                Some(old)
                    if old.params == params
                        && old.dry_run == spec.dry_run
                        && old.headers == headers =>
                {
                    old.clone()
                }
                _ => Arc::new(Limit::new(
                    &pid,
                    &l.name,
                    params,
                    spec.dry_run,
                    headers,
                    metrics.decisions(&pid, &l.name),
                    governor::clock::DefaultClock::default(),
                )),
            };
            let target = (t.kind.clone(), target_id.clone(), spec.direction.clone());
            out.insert(id, (target, limit));
        }
    }
    Ok(out)
}

fn header_mod(h: &model::HttpHeaderFilter) -> Result<HeaderMod, String> {
    let pair = |kv: &model::HttpHeader| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::from_bytes(kv.name.as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(&kv.value).map_err(|e| e.to_string())?,
        ))
    };
    Ok(HeaderMod {
        set: h.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: h.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: h
            .remove
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
    })
}

fn anchored(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(remora_proto::validate::MAX_REGEX_BYTES)
        .build()
        .map_err(|e| e.to_string())
}

fn value_match(ty: &str, value: &str) -> Result<ValueMatch, String> {
    Ok(match ty {
        "RegularExpression" => ValueMatch::Regex(anchored(value)?),
        _ => ValueMatch::Exact(value.to_string()),
    })
}

/// A rule's matches, compiled; a rule without matches matches everything.
pub(crate) fn compile_matches(rule: &model::HttpRouteRule) -> Result<Vec<Matcher>, String> {
    if rule.matches.is_empty() {
        return Ok(vec![compile_match(&model::HttpRouteMatch::default())?]);
    }
    rule.matches.iter().map(compile_match).collect()
}

fn compile_match(m: &model::HttpRouteMatch) -> Result<Matcher, String> {
    let path = match &m.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => match p.r#type.as_str() {
            "Exact" => PathMatch::Exact(p.value.clone()),
            "RegularExpression" => PathMatch::Regex(anchored(&p.value)?),
            _ => PathMatch::Prefix(p.value.trim_end_matches('/').to_string()),
        },
    };
    let method = if m.method.is_empty() {
        None
    } else {
        Some(Method::from_bytes(m.method.as_bytes()).map_err(|e| e.to_string())?)
    };
    let headers = m
        .headers
        .iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
            Ok((name, value_match(&h.r#type, &h.value)?))
        })
        .collect::<Result<_, String>>()?;
    let query = m
        .query_params
        .iter()
        .map(|q| Ok((q.name.clone(), value_match(&q.r#type, &q.value)?)))
        .collect::<Result<_, String>>()?;
    Ok(Matcher {
        path,
        method,
        headers,
        query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: &str, backoff: &str) -> Config {
        let yaml = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{endpoints}]\n---\n\
             kind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: a}}]\n  rules:\n  - retry: {{codes: [503], backoff: {backoff}}}\n"
        );
        remora_proto::prepare(remora_proto::parse_yaml(&yaml, "t").unwrap()).unwrap()
    }

    #[tokio::test]
    async fn unchanged_state_survives_a_swap() {
        let (s, m) = (Settings::default(), Metrics::new());
        let one = "{address: 127.0.0.1, port: 1001}";
        let two = "{address: 127.0.0.1, port: 1001}, {address: 127.0.0.1, port: 1002}";
        let v1 = compile(cfg(one, "10ms"), "1".into(), &Runtime::empty(), &s, &m).unwrap();
        let c1 = v1.clusters["default/a:80"].clone();
        c1.endpoints[0].load.observe(Duration::from_millis(40));

        // Only a route changed: the cluster is the very same object.
        let v2 = compile(cfg(one, "20ms"), "2".into(), &v1, &s, &m).unwrap();
        assert!(Arc::ptr_eq(&c1, &v2.clusters["default/a:80"]));
        // The retry budget's parameters did not change: same budget.
        assert!(Arc::ptr_eq(
            &v1.budgets["default/r/rule-0"],
            &v2.budgets["default/r/rule-0"]
        ));

        // An endpoint joined: a new cluster, but the pool and the known
        // endpoint's latency estimate carry over.
        let v3 = compile(cfg(two, "20ms"), "3".into(), &v2, &s, &m).unwrap();
        let c3 = &v3.clusters["default/a:80"];
        assert!(!Arc::ptr_eq(&c1, c3));
        assert!(Arc::ptr_eq(&c1.pool, &c3.pool));
        assert!(Arc::ptr_eq(&c1.endpoints[0].load, &c3.endpoints[0].load));
        assert_eq!(c3.endpoints.len(), 2);
    }

    #[tokio::test]
    async fn routes_resolve_by_short_and_qualified_names() {
        let (s, m) = (Settings::default(), Metrics::new());
        let rt = compile(
            cfg("{address: 127.0.0.1, port: 1001}", "10ms"),
            "1".into(),
            &Runtime::empty(),
            &s,
            &m,
        )
        .unwrap();
        for host in [
            "a",
            "a:80",
            "a.default",
            "a.default.svc.cluster.local:80",
            "A.Default",
        ] {
            let req = http::Request::get("/")
                .header("host", host)
                .body(())
                .unwrap();
            assert!(matches!(rt.routes.find(&req), Lookup::Found(_)), "{host}");
        }
        let req = http::Request::get("/")
            .header("host", "a:81")
            .body(())
            .unwrap();
        assert!(matches!(rt.routes.find(&req), Lookup::UnknownHost));
    }
}
