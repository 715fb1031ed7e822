//! The immutable runtime the request path reads, and the sequence that
//! compiles a validated config into it. Each concept compiles its own part
//! (`cluster/compile.rs`, `ratelimit/compile.rs`, `route/compile.rs`,
//! `authz.rs`); this file only puts them in order. A new runtime is
//! published with one `ArcSwap::store`; requests in flight keep the `Arc`
//! they loaded. What did not change is carried over from the previous
//! runtime: connection pools, endpoint latency estimates, outlier state,
//! rate-limit buckets, retry budgets, and compiled routes.

use crate::authz::LocalPolicy;
use crate::cluster::compile::Clusters;
use crate::metrics::Metrics;
use crate::path::EncodedSlashes;
use crate::ratelimit::{Limit, LimiterSet};
use crate::retry::RetryBudget;
use crate::route::compile::{RouteCache, ServiceCache};
use crate::route::RouteTable;
use crate::snapshot::{DecodeCache, RefKey, Resources};
use std::collections::HashMap;
use std::sync::Arc;

pub use crate::config::{CompileError, PrepareError, Settings, Validated};

pub struct Runtime {
    pub version: String,
    /// The config it was compiled from.
    pub config: Resources,
    pub routes: RouteTable,
    pub clusters: Clusters,
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
    /// Each Service's part of the route table, for the next compile.
    pub(crate) service_cache: ServiceCache,
    /// This config's resources by their encoded bytes, for the next
    /// snapshot's decode.
    pub decode_cache: DecodeCache,
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
            config: Resources::default(),
            routes: RouteTable::default(),
            clusters: Clusters::default(),
            budgets: HashMap::new(),
            limits: HashMap::new(),
            inbound_limits: Arc::new(LimiterSet::default()),
            local: LocalPolicy::default(),
            outbound_policy: OutboundPolicy::AllowAny,
            encoded_slashes: EncodedSlashes::Reject,
            route_cache: RouteCache::new(),
            service_cache: ServiceCache::new(),
            decode_cache: DecodeCache::default(),
        }
    }
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
    let (cfg, decode_cache) = cfg.into_parts();
    crate::config::check_rule_count(cfg.route_rules(), s)?;
    let clusters = crate::cluster::compile::clusters(&cfg, &prev.clusters, s, metrics)?;
    let limits = crate::ratelimit::compile::limits(&cfg, &prev.limits, s, metrics)?;
    let inbound_limits = Arc::new(LimiterSet {
        limits: s
            .service
            .as_ref()
            .map(|svc| {
                limits
                    .on("Service", RefKey::new(&svc.namespace, &svc.name), "inbound")
                    .to_vec()
            })
            .unwrap_or_default(),
    });
    let previous = crate::route::compile::Previous {
        cache: &prev.route_cache,
        services: &prev.service_cache,
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
        config: cfg,
        routes: table.routes,
        clusters,
        budgets: table.budgets,
        limits: limits.by_id,
        inbound_limits,
        local,
        outbound_policy,
        encoded_slashes,
        route_cache: table.cache,
        service_cache: table.services,
        decode_cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Lookup;
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
        let c1 = v1.clusters.by_id["default/a:80"].clone();
        c1.endpoints[0].load.observe(Duration::from_millis(40));

        // Nothing changed: the compiled route is reused whole.
        let key = ("r", 80);
        let same = compile(cfg(one, "10ms").adopt(&v1.config), "1b".into(), &v1, &s, &m).unwrap();
        assert!(crate::route::compile::same_compiled(
            &v1.route_cache,
            &same.route_cache,
            &key
        ));

        // Only a route changed: the cluster is the very same object, the
        // route is compiled again.
        let v2 = compile(cfg(one, "20ms").adopt(&v1.config), "2".into(), &v1, &s, &m).unwrap();
        assert!(!crate::route::compile::same_compiled(
            &v1.route_cache,
            &v2.route_cache,
            &key
        ));
        assert!(Arc::ptr_eq(&c1, &v2.clusters.by_id["default/a:80"]));
        // The retry budget's parameters did not change: same budget.
        assert!(Arc::ptr_eq(
            &v1.budgets["default/r/rule-0"],
            &v2.budgets["default/r/rule-0"]
        ));

        // An endpoint joined: a new cluster, but the pool and the known
        // endpoint's latency estimate carry over.
        let v3 = compile(cfg(two, "20ms").adopt(&v2.config), "3".into(), &v2, &s, &m).unwrap();
        let c3 = &v3.clusters.by_id["default/a:80"];
        assert!(!Arc::ptr_eq(&c1, c3));
        assert!(Arc::ptr_eq(&c1.pool, &c3.pool));
        assert!(Arc::ptr_eq(&c1.endpoints[0].load, &c3.endpoints[0].load));
        assert_eq!(c3.endpoints.len(), 2);
    }

    /// A snapshot's encoded config, as the control plane sends it.
    fn encoded(yaml: &str) -> bytes::Bytes {
        use prost::Message;
        let cfg = remora_proto::prepare(remora_proto::parse_yaml(yaml, "t").unwrap()).unwrap();
        cfg.encode_to_vec().into()
    }

    const SNAPSHOT: &str = "kind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n---\n\
        kind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 80}]\n---\n\
        kind: HTTPRoute\nmetadata: {name: r1}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{backendRefs: [{name: b}], timeouts: {request: T1}}]\n---\n\
        kind: HTTPRoute\nmetadata: {name: r2}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{matches: [{path: {type: RegularExpression, value: \"/x[0-9]+\"}}]}]\n";

    #[tokio::test]
    async fn snapshots_reuse_and_skip_checking_what_did_not_change() {
        let (s, m) = (Settings::default(), Metrics::new());
        let snap = |t1: &str| encoded(&SNAPSHOT.replace("T1", t1));
        let apply = |bytes: &bytes::Bytes, prev: &Runtime| {
            let v = Validated::from_snapshot(bytes, &prev.decode_cache, &s)?;
            Ok::<_, PrepareError>(compile(v, "v".into(), prev, &s, &m)?)
        };
        let v1 = apply(&snap("1s"), &Runtime::empty()).unwrap();
        // r1 changed: r2 and the Services are the same objects, r2 is not
        // compiled again, and neither is the Service entry of b.
        let v2 = apply(&snap("2s"), &v1).unwrap();
        assert!(Arc::ptr_eq(
            &v1.config.http_routes[1],
            &v2.config.http_routes[1]
        ));
        assert!(!Arc::ptr_eq(
            &v1.config.http_routes[0],
            &v2.config.http_routes[0]
        ));
        let same = crate::route::compile::same_compiled;
        assert!(same(&v1.route_cache, &v2.route_cache, &("r2", 80)));
        assert!(!same(&v1.route_cache, &v2.route_cache, &("r1", 80)));
        let b = |rt: &Runtime| rt.routes.hosts["b"].clone();
        assert!(Arc::ptr_eq(&b(&v1), &b(&v2)), "b's routes kept whole");

        // A bad change is still caught, and the running runtime's cache is
        // untouched by the refusal.
        let bad = SNAPSHOT.replace("T1", "1s").replace("/x[0-9]+", "/x[0-9");
        let Err(e) = apply(&encoded_unchecked(&bad), &v2) else {
            panic!("a bad regex passed")
        };
        assert!(e.to_string().contains("HTTPRoute default/r2"), "{e}");

        // The context changed (Service b is gone): r1, unchanged, is
        // checked again and refused for its dangling backendRef.
        let without_b = SNAPSHOT.replace("T1", "2s").replacen(
            "kind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 80}]\n---\n",
            "",
            1,
        );
        let Err(e) = apply(&encoded_unchecked(&without_b), &v2) else {
            panic!("a route to a missing Service passed")
        };
        assert!(
            e.to_string().contains("Service default/b is not defined"),
            "{e}"
        );
    }

    /// Encodes a config without validating it (what a buggy or hostile
    /// control plane could send).
    fn encoded_unchecked(yaml: &str) -> bytes::Bytes {
        use prost::Message;
        let mut cfg = remora_proto::parse_yaml(yaml, "t").unwrap();
        remora_proto::validate::normalize(&mut cfg);
        cfg.encode_to_vec().into()
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
