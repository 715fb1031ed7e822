//! The route table of a config: for every Service port, its rules in
//! Gateway API precedence, and the names and addresses that reach it.
//!
//! Compiling a rule (regexes, header edits, metric handles) is the costly
//! part, so compiled routes are kept from one runtime to the next: a route
//! whose resource, clusters and limits did not change is reused as is, and
//! a one-route change costs about that route (plus rebuilding the small
//! per-port tables that point at the rules).

use super::*;
use crate::cluster::compile::Clusters;
use crate::config::{CompileError, Settings};
use crate::metrics::Metrics;
use crate::ratelimit::compile::Limits;
use crate::ratelimit::Limit;
use crate::retry::{RetryBudget, RetryPolicy};
use crate::snapshot::{RefKey, Resources};
use http::header::{HeaderName, HeaderValue};
use http::Method;
use regex::Regex;
use remora_proto::duration::parse_opt;
use remora_proto::model;
use remora_proto::ObjectRef;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// One route compiled for one parent Service port.
pub struct CompiledRoute {
    /// The resource it was compiled from.
    source: Arc<model::HttpRoute>,
    /// The clusters it sends to, in resolution order: reused only while
    /// they are the very same objects.
    clusters: Vec<Arc<Cluster>>,
    /// The limits on its rules.
    limits: Vec<Arc<Limit>>,
    /// Each rule's matchers and the rule.
    rules: Vec<(Vec<Arc<Matcher>>, Arc<Rule>)>,
}

/// Compiled routes by (route, parent Service, port), the resources by
/// identity (`Arc::as_ptr`): a key of the previous table names objects
/// that the previous runtime still holds, so no new object can share it.
pub type RouteCache = hashbrown::HashMap<(usize, usize, u16), Arc<CompiledRoute>>;

/// One Service's part of the table, by the Service's identity: kept whole
/// while what it was built from is the very same objects.
pub type ServiceCache = hashbrown::HashMap<usize, Arc<ServiceEntry>>;

pub struct ServiceEntry {
    /// Keeps the Service alive, so its address stays its key.
    _source: Arc<model::Service>,
    /// The identities it was built from: each port's cluster and compiled
    /// routes, and the Service's limits.
    inputs: Vec<usize>,
    routes: Arc<ServiceRoutes>,
    /// The names that reach it.
    hosts: Vec<Arc<str>>,
    /// The addresses that reach it: (address, port index).
    destinations: Vec<(SocketAddr, usize)>,
}

/// What a compiled table brings with it.
pub struct Table {
    pub routes: RouteTable,
    pub budgets: HashMap<String, Arc<RetryBudget>>,
    pub cache: RouteCache,
    pub services: ServiceCache,
}

/// The previous runtime's parts the route compiler reuses.
pub struct Previous<'a> {
    pub cache: &'a RouteCache,
    pub services: &'a ServiceCache,
    pub budgets: &'a HashMap<String, Arc<RetryBudget>>,
}

/// Builds the route table of `cfg`.
pub fn table(
    cfg: &Resources,
    clusters: &Clusters,
    limits: &Limits,
    prev: Previous<'_>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Table, CompileError> {
    // Routes by the Services they attach to, built once: compiling is
    // linear in routes, not Services × routes.
    let mut by_parent: hashbrown::HashMap<(&str, &str), Vec<&Arc<model::HttpRoute>>> =
        hashbrown::HashMap::with_capacity(cfg.services.len());
    for r in &cfg.http_routes {
        let mut parents: Vec<(&str, &str)> = r
            .spec
            .iter()
            .flat_map(|s| s.parent_refs.iter())
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        parents.sort_unstable();
        parents.dedup();
        for p in parents {
            by_parent.entry(p).or_default().push(r);
        }
    }

    let mut out = Table {
        routes: RouteTable::default(),
        budgets: HashMap::new(),
        cache: RouteCache::with_capacity(prev.cache.len()),
        services: ServiceCache::with_capacity(cfg.services.len()),
    };
    out.routes.hosts.reserve(cfg.services.len() * 4);
    for svc in &cfg.services {
        let key = RefKey::of(svc.metadata.as_ref());
        let service_limits = limits.on("Service", key, "outbound");
        let ports = clusters
            .services
            .get(&RefKey::of(svc.metadata.as_ref()))
            .map_or(&[][..], |c| c.ports.as_slice());
        let attached = by_parent
            .get(&(key.namespace, key.name))
            .map_or(&[][..], |v| v.as_slice());
        // Each port's compiled routes, reused or compiled now.
        let mut inputs = Vec::new();
        let mut per_port = Vec::with_capacity(ports.len());
        for (port, cluster) in ports {
            inputs.push(Arc::as_ptr(cluster) as usize);
            let mut compiled_routes = Vec::new();
            for route in attached {
                let applies = route
                    .spec
                    .iter()
                    .flat_map(|s| s.parent_refs.iter())
                    .any(|p| {
                        p.namespace == key.namespace
                            && p.name == key.name
                            && (p.port == 0 || p.port as u16 == *port)
                    });
                if !applies {
                    continue;
                }
                let route_key = RefKey::of(route.metadata.as_ref());
                let mut rule_limits = limits.on("HTTPRoute", route_key, "outbound").to_vec();
                rule_limits.extend(service_limits.iter().cloned());
                let ckey = (
                    Arc::as_ptr(route) as usize,
                    Arc::as_ptr(svc) as usize,
                    *port,
                );
                let compiled = match prev.cache.get(&ckey) {
                    Some(c) if still_valid(c, route, cluster, clusters, &rule_limits) => c.clone(),
                    _ => Arc::new(compile_route(
                        route,
                        &ObjectRef::of(route.metadata.as_ref()),
                        cluster,
                        clusters,
                        rule_limits,
                        prev.budgets,
                        s,
                        metrics,
                    )?),
                };
                for (_, rule) in &compiled.rules {
                    if let Some(retry) = &rule.retry {
                        out.budgets.insert(rule.id.clone(), retry.budget.clone());
                    }
                }
                inputs.push(Arc::as_ptr(&compiled) as usize);
                out.cache.insert(ckey, compiled.clone());
                compiled_routes.push(compiled);
            }
            // Ends this port's list.
            inputs.push(0);
            per_port.push(compiled_routes);
        }
        inputs.extend(service_limits.iter().map(|l| Arc::as_ptr(l) as usize));

        let svc_key = Arc::as_ptr(svc) as usize;
        let entry = match prev.services.get(&svc_key) {
            Some(e) if e.inputs == inputs => e.clone(),
            _ => Arc::new(service_entry(
                svc,
                ports,
                per_port,
                service_limits,
                inputs,
                s,
                metrics,
            )),
        };
        for h in &entry.hosts {
            out.routes.hosts.insert(h.clone(), entry.routes.clone());
        }
        for (addr, i) in &entry.destinations {
            // An address two Services share stays with the first.
            out.routes
                .destinations
                .entry(*addr)
                .or_insert_with(|| (entry.routes.clone(), *i));
        }
        out.services.insert(svc_key, entry);
    }
    Ok(out)
}

/// A Service's routes by port (rules in Gateway API precedence, or the
/// fallback straight to the Service when no route is attached), and the
/// names and addresses that reach it.
fn service_entry(
    svc: &Arc<model::Service>,
    ports: &[(u16, Arc<Cluster>)],
    per_port: Vec<Vec<Arc<CompiledRoute>>>,
    service_limits: &[Arc<Limit>],
    inputs: Vec<usize>,
    s: &Settings,
    metrics: &Metrics,
) -> ServiceEntry {
    let id = ObjectRef::of(svc.metadata.as_ref());
    let mut port_routes = Vec::with_capacity(ports.len());
    for ((port, cluster), compiled) in ports.iter().zip(per_port) {
        let mut entries = Vec::new();
        for c in &compiled {
            for (matchers, rule) in &c.rules {
                for m in matchers {
                    entries.push((m.clone(), rule.clone()));
                }
            }
        }
        // Stable: equal precedence keeps route order (name) then rule order.
        entries.sort_by_key(|(m, _)| m.precedence());
        let fallback = compiled.is_empty().then(|| {
            let rule_id = format!("{id}:{port}/default");
            Arc::new(Rule {
                backends: vec![Backend {
                    metrics: metrics.route("outbound", &rule_id, &cluster.id),
                    cluster: cluster.clone(),
                    weight: 1,
                }],
                id: rule_id,
                total_weight: 1,
                request_headers: None,
                response_headers: None,
                mirror: None,
                timeout: None,
                per_try_timeout: None,
                retry: None,
                limits: Limits::set(service_limits.to_vec()),
                allowed_upgrades: Vec::new(),
            })
        });
        port_routes.push(PortRoutes {
            port: *port,
            cluster: cluster.clone(),
            entries,
            fallback,
        });
    }
    let routes = Arc::new(ServiceRoutes {
        id: id.to_string(),
        ports: port_routes,
    });
    let (ns, name) = (&id.namespace, &id.name);
    let mut hosts: Vec<Arc<str>> = Vec::with_capacity(4);
    if *ns == s.namespace {
        hosts.push(name.as_str().into());
    }
    for host in [
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.cluster.local"),
    ] {
        hosts.push(host.into());
    }
    ServiceEntry {
        _source: svc.clone(),
        inputs,
        destinations: destinations(svc, &routes),
        routes,
        hosts,
    }
}

/// The clusters a route (for one parent port) sends to, in order.
fn resolve_all(
    route: &model::HttpRoute,
    parent: &Arc<Cluster>,
    clusters: &Clusters,
) -> Result<Vec<Arc<Cluster>>, String> {
    let mut out = vec![parent.clone()];
    for rule in route.spec.iter().flat_map(|s| s.rules.iter()) {
        for b in &rule.backend_refs {
            out.push(clusters.resolve(&b.namespace, &b.name, b.port)?.clone());
        }
        for f in &rule.filters {
            if let Some(b) = f
                .request_mirror
                .as_ref()
                .and_then(|m| m.backend_ref.as_ref())
            {
                out.push(clusters.resolve(&b.namespace, &b.name, b.port)?.clone());
            }
        }
    }
    Ok(out)
}

/// Whether a compiled route can be reused: it was compiled from this very
/// resource (the cache key says so), and it sends to the very same
/// clusters and counts against the very same limits.
fn still_valid(
    c: &CompiledRoute,
    route: &Arc<model::HttpRoute>,
    parent: &Arc<Cluster>,
    clusters: &Clusters,
    limits: &[Arc<Limit>],
) -> bool {
    Arc::ptr_eq(&c.source, route)
        && c.limits.len() == limits.len()
        && c.limits.iter().zip(limits).all(|(a, b)| Arc::ptr_eq(a, b))
        && resolve_all(route, parent, clusters).is_ok_and(|now| {
            now.len() == c.clusters.len()
                && now.iter().zip(&c.clusters).all(|(a, b)| Arc::ptr_eq(a, b))
        })
}

#[allow(clippy::too_many_arguments)]
fn compile_route(
    route: &Arc<model::HttpRoute>,
    route_id: &ObjectRef,
    parent: &Arc<Cluster>,
    clusters: &Clusters,
    limits: Vec<Arc<Limit>>,
    budgets: &HashMap<String, Arc<RetryBudget>>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<CompiledRoute, CompileError> {
    let at = |rule: &str, what: String| CompileError::Route {
        rule: rule.to_string(),
        what,
    };
    let set = Limits::set(limits.clone());
    let mut rules = Vec::new();
    for (i, rule) in route.spec.iter().flat_map(|s| s.rules.iter()).enumerate() {
        let rule_id = if rule.name.is_empty() {
            format!("{route_id}/rule-{i}")
        } else {
            format!("{route_id}/{}", rule.name)
        };
        let mut compiled = compile_rule(&rule_id, rule, parent, clusters, budgets, s, metrics)
            .map_err(|e| at(&rule_id, e))?;
        compiled.limits = set.clone();
        let matchers = compile_matches(rule)
            .map_err(|e| at(&rule_id, e))?
            .into_iter()
            .map(Arc::new)
            .collect();
        rules.push((matchers, Arc::new(compiled)));
    }
    let clusters =
        resolve_all(route, parent, clusters).map_err(|e| at(&route_id.to_string(), e))?;
    Ok(CompiledRoute {
        source: route.clone(),
        clusters,
        limits,
        rules,
    })
}

fn compile_rule(
    rule_id: &str,
    rule: &model::HttpRouteRule,
    parent: &Arc<Cluster>,
    clusters: &Clusters,
    budgets: &HashMap<String, Arc<RetryBudget>>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Rule, String> {
    let resolve = |b: &model::BackendRef| -> Result<Arc<Cluster>, String> {
        clusters.resolve(&b.namespace, &b.name, b.port).cloned()
    };
    let mut backends = Vec::new();
    if rule.backend_refs.is_empty() {
        let cluster = parent.clone();
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
            let budget = match budgets.get(rule_id) {
                Some(old) if old.params() == params => old.clone(),
                _ => Arc::new(RetryBudget::new(params)),
            };
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

/// Where intercepted connections to `svc` arrive: its virtual addresses on
/// each port, and its endpoints on the port the app listens on (a meshed
/// endpoint registers its proxy's inbound port, but the app behind it
/// listens on the targetPort). With the index of the port's routes.
fn destinations(svc: &model::Service, routes: &ServiceRoutes) -> Vec<(SocketAddr, usize)> {
    let mut out = Vec::new();
    let Some(spec) = &svc.spec else { return out };
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
        out.extend(vips.chain(endpoints).map(|a| (a, i)));
    }
    out
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
pub fn compile_matches(rule: &model::HttpRouteRule) -> Result<Vec<Matcher>, String> {
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

/// For tests: the route named `key.0` compiled for port `key.1`.
#[cfg(test)]
pub(crate) fn compiled<'a>(c: &'a RouteCache, key: &(&str, u16)) -> Option<&'a Arc<CompiledRoute>> {
    c.iter()
        .find(|((_, _, port), r)| {
            *port == key.1 && r.source.metadata.as_ref().is_some_and(|m| m.name == key.0)
        })
        .map(|(_, r)| r)
}

/// For tests: whether route `key.0` for port `key.1` in `a` and `b` is the
/// very same compiled object.
#[cfg(test)]
pub(crate) fn same_compiled(a: &RouteCache, b: &RouteCache, key: &(&str, u16)) -> bool {
    match (compiled(a, key), compiled(b, key)) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::compile::clusters;
    use crate::ratelimit::compile::limits;

    const MESH: &str = "\
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}, {port: 81}]
  addresses: [10.96.0.10]
  endpoints: [{address: 10.0.0.1, port: 8080}]
---
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 10.0.0.2, port: 8080}]
---
kind: HTTPRoute
metadata: {name: a}
spec:
  parentRefs: [{name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
    timeouts: {request: TIMEOUT}
  - matches: [{path: {type: Exact, value: /a/exact}}]
---
kind: HTTPRoute
metadata: {name: b}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /b}}]
    backendRefs: [{name: api, namespace: shop, port: 80}]
";

    struct Compiled {
        resources: Resources,
        clusters: Clusters,
        limits: Limits,
        table: Table,
    }

    /// Compiles `yaml` as a file config after `prev` (its equal resources
    /// adopted, as `source::apply` does).
    fn compile(yaml: &str, prev: Option<&Compiled>) -> Compiled {
        let (s, m) = (Settings::default(), Metrics::new());
        let mut cfg = Resources::from_config(
            remora_proto::prepare(remora_proto::parse_yaml(yaml, "t").unwrap()).unwrap(),
        );
        let (empty_c, empty_l, empty_r, empty_s, empty_b) = (
            Clusters::default(),
            HashMap::new(),
            RouteCache::new(),
            ServiceCache::new(),
            HashMap::new(),
        );
        let (pc, pl, cache, services, budgets) = match prev {
            Some(p) => {
                cfg.adopt(&p.resources);
                (
                    &p.clusters,
                    &p.limits.by_id,
                    &p.table.cache,
                    &p.table.services,
                    &p.table.budgets,
                )
            }
            None => (&empty_c, &empty_l, &empty_r, &empty_s, &empty_b),
        };
        let clusters = clusters(&cfg, pc, &s, &m).unwrap();
        let limits = limits(&cfg, pl, &s, &m).unwrap();
        let previous = Previous {
            cache,
            services,
            budgets,
        };
        let table = table(&cfg, &clusters, &limits, previous, &s, &m).unwrap();
        Compiled {
            resources: cfg,
            clusters,
            limits,
            table,
        }
    }

    fn key(route: &'static str, port: u16) -> (&'static str, u16) {
        (route, port)
    }

    fn rule_ids(c: &Compiled, host: &str, port: usize) -> Vec<String> {
        c.table.routes.hosts[host].ports[port]
            .entries
            .iter()
            .map(|(_, r)| r.id.clone())
            .collect()
    }

    #[tokio::test]
    async fn rules_by_precedence_per_port_and_fallback_without_routes() {
        let c = compile(&MESH.replace("TIMEOUT", "1s"), None);
        // Port 80: both routes, the exact path first, then the longer
        // prefix... here /a and /b have equal length: route order.
        assert_eq!(
            rule_ids(&c, "web", 0),
            ["default/a/rule-1", "default/a/rule-0", "default/b/rule-0"]
        );
        // Port 81: only the route without a port.
        assert_eq!(rule_ids(&c, "web", 1), ["default/b/rule-0"]);
        // No route on shop/api: straight to the Service.
        let api = &c.table.routes.hosts["api.shop"].ports[0];
        assert!(api.entries.is_empty());
        assert_eq!(api.fallback.as_ref().unwrap().id, "shop/api:80/default");
        assert!(c.table.routes.hosts["web"].ports[0].fallback.is_none());
    }

    #[tokio::test]
    async fn names_and_addresses_that_reach_a_service() {
        let c = compile(&MESH.replace("TIMEOUT", "1s"), None);
        let hosts = &c.table.routes.hosts;
        for h in [
            "web",
            "web.default",
            "web.default.svc.cluster.local",
            "api.shop.svc",
        ] {
            assert!(hosts.contains_key(h), "{h}");
        }
        // A short name resolves only in the proxy's own namespace.
        assert!(!hosts.contains_key("api"));
        // The virtual address on each port, and the endpoint's own port.
        let d = &c.table.routes;
        assert_eq!(
            d.destination(&"10.96.0.10:81".parse().unwrap())
                .unwrap()
                .port,
            81
        );
        assert_eq!(
            d.destination(&"10.0.0.2:8080".parse().unwrap())
                .unwrap()
                .port,
            80
        );
        assert!(d.destination(&"10.96.0.10:82".parse().unwrap()).is_none());
    }

    #[tokio::test]
    async fn only_what_changed_is_compiled_again() {
        let v1 = compile(&MESH.replace("TIMEOUT", "1s"), None);
        let same = compile(&MESH.replace("TIMEOUT", "1s"), Some(&v1));
        for k in [key("a", 80), key("b", 80), key("b", 81)] {
            assert!(
                same_compiled(&v1.table.cache, &same.table.cache, &k),
                "{k:?}"
            );
        }
        // Route a changed: a is compiled again, b is kept on both ports.
        let v2 = compile(&MESH.replace("TIMEOUT", "2s"), Some(&same));
        assert!(!same_compiled(
            &same.table.cache,
            &v2.table.cache,
            &key("a", 80)
        ));
        assert!(same_compiled(
            &same.table.cache,
            &v2.table.cache,
            &key("b", 80)
        ));
        assert!(same_compiled(
            &same.table.cache,
            &v2.table.cache,
            &key("b", 81)
        ));
        let rule = &v2.table.routes.hosts["web"].ports[0].entries[1].1;
        assert_eq!(rule.timeout, Some(Duration::from_secs(2)));

        // A backend's endpoints changed: the routes that send to it are
        // compiled again (they hold the cluster), the others are kept.
        let moved = MESH
            .replace("TIMEOUT", "2s")
            .replace("10.0.0.2, port: 8080", "10.0.0.3, port: 8080");
        let v3 = compile(&moved, Some(&v2));
        assert!(same_compiled(
            &v2.table.cache,
            &v3.table.cache,
            &key("a", 80)
        ));
        assert!(!same_compiled(
            &v2.table.cache,
            &v3.table.cache,
            &key("b", 80)
        ));

        // A limit attached to route a: a is compiled again with it.
        let limited = format!(
            "{moved}---\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: HTTPRoute, name: a}}\n  direction: outbound\n  limits: [{{name: l, requests: 5}}]\n"
        );
        let v4 = compile(&limited, Some(&v3));
        assert!(!same_compiled(
            &v3.table.cache,
            &v4.table.cache,
            &key("a", 80)
        ));
        assert!(same_compiled(
            &v3.table.cache,
            &v4.table.cache,
            &key("b", 80)
        ));
        let rule = &v4.table.routes.hosts["web"].ports[0].entries[0].1;
        assert_eq!(rule.limits.as_ref().map(|l| l.limits.len()), Some(1));

        // A route removed leaves the cache.
        let without_b = MESH.replace("TIMEOUT", "1s");
        let without_b = &without_b[..without_b.rfind("---\nkind: HTTPRoute").unwrap()];
        let v5 = compile(without_b, Some(&v4));
        assert!(compiled(&v5.table.cache, &key("b", 80)).is_none());
        assert_eq!(rule_ids(&v5, "web", 1), Vec::<String>::new());
    }

    #[test]
    fn matches_compile_to_anchored_regexes_and_match_all_by_default() {
        let rule = model::HttpRouteRule::default();
        let all = compile_matches(&rule).unwrap();
        assert_eq!(all.len(), 1);
        let m = model::HttpRouteMatch {
            path: Some(model::HttpPathMatch {
                r#type: "RegularExpression".into(),
                value: "/v[0-9]+".into(),
            }),
            ..Default::default()
        };
        let m = compile_match(&m).unwrap();
        let req = |p: &str| http::Request::get(p).body(()).unwrap();
        assert!(m.matches(&req("/v12")));
        assert!(!m.matches(&req("/v12/x")), "anchored at the end");
        assert!(!m.matches(&req("/x/v12")), "anchored at the start");
        assert!(all[0].matches(&req("/anything")));
    }
}
