//! What the inbound side enforces for the local Service: its mTLS mode,
//! the header that carries the caller's identity to the app, and its
//! AuthorizationPolicies. Compiled with the rest of the config, so a policy
//! change swaps atomically with everything else.

use crate::cluster::Protocol;
use crate::route::Matcher;
use crate::snapshot::Resources;
pub use crate::tls::MtlsMode;
use http::header::HeaderName;
use http::Request;
use remora_proto::model;
use remora_proto::ObjectRef;
use std::collections::HashMap;
use std::sync::Arc;

/// The local Service's inbound policy.
pub struct LocalPolicy {
    pub mode: MtlsMode,
    /// Where the app gets the caller's verified SPIFFE ID.
    pub identity_header: Option<HeaderName>,
    pub authz: Option<Authz>,
    /// The declared protocols of the Service's ports, by the port the app
    /// listens on (targetPort); undeclared ports are detected.
    pub ports: HashMap<u16, Protocol>,
    /// Every match of every rule of the routes attached to the Service,
    /// by precedence: which rule an inbound request hit, for its route's
    /// AuthorizationPolicies and its rule's allowed Upgrades.
    pub rules: Vec<(Matcher, Arc<LocalRule>)>,
}

/// A rule of one of the local Service's routes, as the inbound side sees it.
#[derive(Debug)]
pub struct LocalRule {
    pub route: ObjectRef,
    /// The Upgrade protocols the rule allows (besides websocket).
    pub upgrades: Vec<String>,
}

impl LocalPolicy {
    /// The rule a request hits (on its normalized path), if any.
    pub fn rule_for<B>(&self, req: &Request<B>) -> Option<&LocalRule> {
        self.rules
            .iter()
            .find(|(m, _)| m.matches(req))
            .map(|(_, r)| &**r)
    }
}

impl Default for LocalPolicy {
    fn default() -> LocalPolicy {
        LocalPolicy {
            mode: MtlsMode::Strict,
            identity_header: None,
            authz: None,
            ports: HashMap::new(),
            rules: Vec::new(),
        }
    }
}

/// One caller pattern.
#[derive(Debug, PartialEq)]
enum Principal {
    Identity(String),
    Namespace(String),
    TrustDomain(String),
}

impl Principal {
    fn matches(&self, id: &str) -> bool {
        match self {
            Principal::Identity(want) => id == want,
            Principal::Namespace(ns) => crate::tls::namespace(id) == Some(ns.as_str()),
            Principal::TrustDomain(td) => crate::tls::trust_domain(id) == Some(td.as_str()),
        }
    }
}

/// The policies on one target: any of their principals allows.
struct Allow {
    /// "Service ns/name" or "HTTPRoute ns/name", for metrics and logs.
    target: String,
    from: Vec<Principal>,
}

impl Allow {
    fn allows(&self, id: Option<&str>) -> bool {
        id.is_some_and(|id| self.from.iter().any(|p| p.matches(id)))
    }
}

pub struct Authz {
    service: Option<Allow>,
    routes: HashMap<ObjectRef, Allow>,
}

/// A refusal: the target whose policies did not allow the caller.
pub struct Denied {
    pub target: String,
}

impl Authz {
    /// Allowed, or the target that refused; the allowing target is
    /// returned too, for the decision metric. `route`: the local route the
    /// request hit (`LocalPolicy::rule_for`).
    pub fn check(&self, route: Option<&ObjectRef>, id: Option<&str>) -> Result<Vec<&str>, Denied> {
        let mut allowed = Vec::new();
        if let Some(a) = &self.service {
            if !a.allows(id) {
                return Err(Denied {
                    target: a.target.clone(),
                });
            }
            allowed.push(a.target.as_str());
        }
        if let Some(a) = route.and_then(|r| self.routes.get(r)) {
            if !a.allows(id) {
                return Err(Denied {
                    target: a.target.clone(),
                });
            }
            allowed.push(a.target.as_str());
        }
        Ok(allowed)
    }
}

impl Authz {
    /// For an opaque TCP connection: only the Service's policies apply
    /// (a route's rules have nothing to match on bytes). The allowing
    /// target, if any, is returned for the decision metric.
    pub fn check_connection(&self, id: Option<&str>) -> Result<Option<&str>, Denied> {
        match &self.service {
            Some(a) if !a.allows(id) => Err(Denied {
                target: a.target.clone(),
            }),
            Some(a) => Ok(Some(a.target.as_str())),
            None => Ok(None),
        }
    }
}

/// The policy for `service` (`namespace/name`) from a prepared config;
/// the error names what was wrong, for `CompileError::Local`.
pub fn compile(cfg: &Resources, service: Option<&ObjectRef>) -> Result<LocalPolicy, String> {
    let Some(service) = service else {
        return Ok(LocalPolicy::default());
    };
    let spec = cfg
        .services
        .iter()
        .find(|s| ObjectRef::of(s.metadata.as_ref()) == *service)
        .and_then(|s| s.spec.as_ref());
    let mtls = spec.and_then(|s| s.mtls.clone()).unwrap_or_default();
    let ports = spec
        .into_iter()
        .flat_map(|sp| sp.ports.iter())
        .filter_map(|p| Some((p.target_port as u16, Protocol::parse(&p.protocol)?)))
        .filter(|(_, proto)| *proto != Protocol::Detect)
        .collect();
    let identity_header = match mtls.client_identity_header.as_str() {
        "" => None,
        h => Some(HeaderName::try_from(h).map_err(|e| format!("mtls.clientIdentityHeader: {e}"))?),
    };

    let mut service_allow: Option<Allow> = None;
    let mut routes: HashMap<ObjectRef, Allow> = HashMap::new();
    for p in &cfg.authorization_policies {
        let Some(spec) = &p.spec else { continue };
        let t = spec.target_ref.clone().unwrap_or_default();
        let target_id = ObjectRef::new(t.namespace, t.name);
        let from = spec.from.iter().filter_map(principal);
        match t.kind.as_str() {
            "HTTPRoute" => routes
                .entry(target_id.clone())
                .or_insert_with(|| Allow {
                    target: format!("HTTPRoute {target_id}"),
                    from: vec![],
                })
                .from
                .extend(from),
            _ if target_id == *service => service_allow
                .get_or_insert_with(|| Allow {
                    target: format!("Service {target_id}"),
                    from: vec![],
                })
                .from
                .extend(from),
            _ => {}
        }
    }

    // Route matching, only for routes of the local Service that a policy
    // targets (and every route that could shadow them).
    let mut rules = Vec::new();
    let mut local_routes = std::collections::HashSet::new();
    for r in &cfg.http_routes {
        let Some(rs) = &r.spec else { continue };
        let attached = rs
            .parent_refs
            .iter()
            .any(|p| p.namespace == service.namespace && p.name == service.name);
        if !attached {
            continue;
        }
        let rid = ObjectRef::of(r.metadata.as_ref());
        local_routes.insert(rid.clone());
        for rule in &rs.rules {
            let local = Arc::new(LocalRule {
                route: rid.clone(),
                upgrades: rule.allowed_upgrades.clone(),
            });
            for m in crate::route::compile::compile_matches(rule)? {
                rules.push((m, local.clone()));
            }
        }
    }
    routes.retain(|r, _| local_routes.contains(r));
    // Stable: equal precedence keeps route order, then rule order.
    rules.sort_by_key(|(m, _)| m.precedence());
    let authz = (service_allow.is_some() || !routes.is_empty()).then_some(Authz {
        service: service_allow,
        routes,
    });
    Ok(LocalPolicy {
        mode: MtlsMode::parse(&mtls.mode),
        identity_header,
        authz,
        ports,
        rules,
    })
}

fn principal(s: &model::AuthorizationSource) -> Option<Principal> {
    if !s.identity.is_empty() {
        Some(Principal::Identity(s.identity.clone()))
    } else if !s.namespace.is_empty() {
        Some(Principal::Namespace(s.namespace.clone()))
    } else if !s.trust_domain.is_empty() {
        Some(Principal::TrustDomain(s.trust_domain.clone()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> LocalPolicy {
        let base = "kind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 80}]\n  mtls: {mode: Permissive, clientIdentityHeader: x-client-id}\n---\n\
            kind: HTTPRoute\nmetadata: {name: admin, namespace: shop}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /admin}}]\n    backendRefs: [{name: api}]\n---\n";
        let cfg = remora_proto::yaml::parse_yaml(&format!("{base}{yaml}"), "test").unwrap();
        let cfg = Resources::from_config(remora_proto::prepare(cfg).unwrap());
        compile(&cfg, Some(&ObjectRef::new("shop", "api"))).unwrap()
    }

    /// The authorization decision for a request to `path` from `id`.
    fn check<'a>(p: &'a LocalPolicy, path: &str, id: Option<&str>) -> Result<Vec<&'a str>, Denied> {
        let rule = p.rule_for(&req(path));
        p.authz.as_ref().unwrap().check(rule.map(|r| &r.route), id)
    }

    fn req(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
    const OPS: &str = "spiffe://mesh.test/ns/ops/sa/admin";
    const OTHER_TD: &str = "spiffe://other.test/ns/shop/sa/web";

    #[test]
    fn no_policy_allows_everyone_and_mode_and_header_compile() {
        let p = policy("");
        assert!(p.authz.is_none());
        assert_eq!(p.mode, MtlsMode::Permissive);
        assert_eq!(p.identity_header.unwrap().as_str(), "x-client-id");
    }

    #[test]
    fn ports_and_upgrades_of_the_local_service_only() {
        let cfg = remora_proto::parse_yaml(
            "kind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 80, targetPort: 8080, protocol: http}, {port: 90, targetPort: 9090, protocol: tcp}, {port: 91, targetPort: 9191, protocol: \"\"}]\n---\n\
             kind: Service\nmetadata: {name: other, namespace: shop}\nspec:\n  ports: [{port: 70, targetPort: 7070, protocol: tcp}]\n---\n\
             kind: HTTPRoute\nmetadata: {name: ws, namespace: shop}\nspec:\n  parentRefs: [{name: api}]\n  rules: [{allowedUpgrades: [websocket, x-custom]}, {allowedUpgrades: [x-custom]}]\n---\n\
             kind: HTTPRoute\nmetadata: {name: elsewhere, namespace: shop}\nspec:\n  parentRefs: [{name: other}]\n  rules: [{allowedUpgrades: [x-other]}]\n",
            "t",
        )
        .unwrap();
        let cfg = Resources::from_config(remora_proto::prepare(cfg).unwrap());
        let p = compile(&cfg, Some(&ObjectRef::new("shop", "api"))).unwrap();
        // By the port the app listens on; a port left to detection is not
        // declared.
        assert_eq!(p.ports.get(&8080), Some(&Protocol::Http1));
        assert_eq!(p.ports.get(&9090), Some(&Protocol::Tcp));
        assert_eq!(p.ports.get(&9191), None);
        assert_eq!(p.ports.get(&7070), None);
        // Each rule's own Upgrades, and none of another Service's routes.
        let upgrades: Vec<_> = p.rules.iter().map(|(_, r)| r.upgrades.clone()).collect();
        assert_eq!(upgrades, [vec!["websocket", "x-custom"], vec!["x-custom"]]);
        assert!(p
            .rules
            .iter()
            .all(|(_, r)| r.route == ObjectRef::new("shop", "ws")));
        // A proxy that fronts no Service has nothing local.
        let none = compile(&cfg, None).unwrap();
        assert!(none.ports.is_empty() && none.rules.is_empty() && none.authz.is_none());
    }

    #[test]
    fn an_inbound_request_gets_the_upgrades_of_the_rule_it_hits_only() {
        let cfg = remora_proto::parse_yaml(
            "kind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 80}]\n---\n\
             kind: HTTPRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /stream}}]\n    allowedUpgrades: [x-custom]\n  - {}\n",
            "t",
        )
        .unwrap();
        let cfg = Resources::from_config(remora_proto::prepare(cfg).unwrap());
        let p = compile(&cfg, Some(&ObjectRef::new("shop", "api"))).unwrap();
        let upgrades = |path: &str| p.rule_for(&req(path)).map(|r| r.upgrades.clone());
        assert_eq!(upgrades("/stream/1"), Some(vec!["x-custom".to_string()]));
        // Another rule of the same route allows nothing but websocket.
        assert_eq!(upgrades("/other"), Some(vec![]));
    }

    #[test]
    fn service_policy_by_identity_namespace_and_trust_domain() {
        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {name: api}\n  from: [{identity: 'spiffe://mesh.test/ns/shop/sa/web'}]\n");
        assert!(check(&p, "/", Some(WEB)).is_ok());
        assert!(check(&p, "/", Some(OPS)).is_err());
        assert!(check(&p, "/", None).is_err(), "plaintext has no identity");

        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {name: api}\n  from: [{namespace: ops}]\n");
        assert!(check(&p, "/", Some(OPS)).is_ok());
        assert!(check(&p, "/", Some(WEB)).is_err());

        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {name: api}\n  from: [{trustDomain: mesh.test}]\n");
        assert!(check(&p, "/", Some(OPS)).is_ok());
        let denied = check(&p, "/", Some(OTHER_TD)).err().unwrap();
        assert_eq!(denied.target, "Service shop/api");
    }

    #[test]
    fn connections_are_checked_against_service_policies_only() {
        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {name: api}\n  from: [{namespace: shop}]\n---\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec:\n  targetRef: {kind: HTTPRoute, name: admin}\n  from: [{namespace: ops}]\n");
        let a = p.authz.as_ref().unwrap();
        assert_eq!(
            a.check_connection(Some(WEB)).ok(),
            Some(Some("Service shop/api"))
        );
        assert_eq!(
            a.check_connection(Some(OPS)).err().unwrap().target,
            "Service shop/api"
        );
        assert!(
            a.check_connection(None).is_err(),
            "plaintext has no identity"
        );

        // Only a route policy: it has nothing to match on a connection.
        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec:\n  targetRef: {kind: HTTPRoute, name: admin}\n  from: [{namespace: ops}]\n");
        assert_eq!(
            p.authz.unwrap().check_connection(Some(WEB)).ok(),
            Some(None)
        );
    }

    #[test]
    fn route_policy_applies_to_its_route_only() {
        let p = policy("kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {kind: HTTPRoute, name: admin}\n  from: [{namespace: ops}]\n");
        assert!(check(&p, "/admin/users", Some(OPS)).is_ok());
        let denied = check(&p, "/admin/users", Some(WEB)).err().unwrap();
        assert_eq!(denied.target, "HTTPRoute shop/admin");
        assert!(
            check(&p, "/orders", Some(WEB)).is_ok(),
            "another path is not the route's"
        );
    }
}
