//! The immutable runtime the request path reads, and the sequence that
//! compiles a validated config into it. Each concept compiles its own part
//! (`cluster/compile.rs`, `ratelimit/compile.rs`, `route/compile.rs`,
//! `authz.rs`); this file only puts them in order. A new runtime is
//! published with one `ArcSwap::store`; requests in flight keep the `Arc`
//! they loaded. What did not change is carried over from the previous
//! runtime: connection pools, endpoint latency estimates, outlier state,
//! rate-limit buckets, retry budgets, and compiled routes.

use crate::authz::LocalPolicy;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::path::EncodedSlashes;
use crate::ratelimit::{Limit, LimiterSet};
use crate::retry::RetryBudget;
use crate::route::compile::RouteCache;
use crate::route::RouteTable;
use remora_proto::model::Config;
use std::collections::HashMap;
use std::sync::Arc;

pub use crate::config::{CompileError, Settings, Validated};

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
    /// What the inbound side enforces for the local Service: mTLS mode,
    /// identity header, authorization, its ports' protocols and Upgrades.
    pub local: LocalPolicy,
    /// What intercepted connections to addresses of no Service get.
    pub outbound_policy: OutboundPolicy,
    /// What a request path with an encoded slash gets.
    pub encoded_slashes: EncodedSlashes,
    /// Compiled routes, for the next compile to reuse.
    pub(crate) route_cache: RouteCache,
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
            outbound_policy: OutboundPolicy::AllowAny,
            encoded_slashes: EncodedSlashes::Reject,
            route_cache: RouteCache::new(),
        }
    }
}

/// Refuses a config with more route rules than `--max-route-rules` (cheap:
/// callers run it before validating).
pub fn check_rule_count(cfg: &Config, s: &Settings) -> Result<(), CompileError> {
    let rules: usize = cfg
        .http_routes
        .iter()
        .map(|r| r.spec.as_ref().map_or(0, |s| s.rules.len()))
        .sum();
    if rules > s.max_route_rules {
        return Err(CompileError::TooManyRules {
            rules,
            max: s.max_route_rules,
        });
    }
    Ok(())
}

/// Builds a runtime from a validated config, reusing what did not change
/// in `prev`.
pub fn compile(
    cfg: Validated,
    version: String,
    prev: &Runtime,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Runtime, CompileError> {
    let cfg = cfg.into_inner();
    check_rule_count(&cfg, s)?;
    let clusters = crate::cluster::compile::clusters(&cfg, &prev.clusters, s, metrics)?;
    let limits = crate::ratelimit::compile::limits(&cfg, &prev.limits, s, metrics)?;
    let inbound_limits = Arc::new(LimiterSet {
        limits: s
            .service
            .as_ref()
            .map(|svc| limits.on("Service", svc, "inbound").to_vec())
            .unwrap_or_default(),
    });
    let previous = crate::route::compile::Previous {
        cache: &prev.route_cache,
        budgets: &prev.budgets,
    };
    let table = crate::route::compile::table(&cfg, &clusters, &limits, previous, s, metrics)?;
    let local =
        crate::authz::compile(&cfg, s.service.as_ref()).map_err(|what| CompileError::Local {
            service: s.service.clone().unwrap_or_default(),
            what,
        })?;
    let mesh = cfg.mesh_configs.first().and_then(|m| m.spec.as_ref());
    let outbound_policy = match mesh {
        Some(m) if m.outbound_traffic_policy == "RegistryOnly" => OutboundPolicy::RegistryOnly,
        _ => OutboundPolicy::AllowAny,
    };
    let encoded_slashes = match mesh {
        Some(m) if m.encoded_slashes == "PassThrough" => EncodedSlashes::PassThrough,
        _ => EncodedSlashes::Reject,
    };
    Ok(Runtime {
        version,
        config: Arc::new(cfg),
        routes: table.routes,
        clusters: clusters.by_id,
        budgets: table.budgets,
        limits: limits.by_id,
        inbound_limits,
        local,
        outbound_policy,
        encoded_slashes,
        route_cache: table.cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Lookup;
    use remora_proto::ObjectRef;
    use std::time::Duration;

    fn cfg(endpoints: &str, backoff: &str) -> Validated {
        let yaml = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{endpoints}]\n---\n\
             kind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: a}}]\n  rules:\n  - retry: {{codes: [503], backoff: {backoff}}}\n"
        );
        Validated::prepare(remora_proto::parse_yaml(&yaml, "t").unwrap()).unwrap()
    }

    #[tokio::test]
    async fn unchanged_state_survives_a_swap() {
        let (s, m) = (Settings::default(), Metrics::new());
        let one = "{address: 127.0.0.1, port: 1001}";
        let two = "{address: 127.0.0.1, port: 1001}, {address: 127.0.0.1, port: 1002}";
        let v1 = compile(cfg(one, "10ms"), "1".into(), &Runtime::empty(), &s, &m).unwrap();
        let c1 = v1.clusters["default/a:80"].clone();
        c1.endpoints[0].load.observe(Duration::from_millis(40));

        // Nothing changed: the compiled route is reused whole.
        let key = (
            ObjectRef::new("default", "r"),
            ObjectRef::new("default", "a"),
            80,
        );
        let same = compile(cfg(one, "10ms"), "1b".into(), &v1, &s, &m).unwrap();
        assert!(crate::route::compile::same_compiled(
            &v1.route_cache,
            &same.route_cache,
            &key
        ));

        // Only a route changed: the cluster is the very same object, the
        // route is compiled again.
        let v2 = compile(cfg(one, "20ms"), "2".into(), &v1, &s, &m).unwrap();
        assert!(!crate::route::compile::same_compiled(
            &v1.route_cache,
            &v2.route_cache,
            &key
        ));
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
