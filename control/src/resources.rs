//! A config as a set of resources keyed by (kind, namespace, name): upsert,
//! delete, diff. Resources are kept sorted, so equal sets are equal configs.

use remora_proto::model::{
    AuthorizationPolicy, Config, HttpRoute, MeshConfig, RateLimitPolicy, Service,
};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Service(Service),
    HttpRoute(HttpRoute),
    RateLimitPolicy(RateLimitPolicy),
    AuthorizationPolicy(AuthorizationPolicy),
    MeshConfig(MeshConfig),
}

/// (kind, namespace, name)
pub type Key = (&'static str, String, String);

impl Resource {
    pub fn key(&self) -> Key {
        let (kind, meta) = match self {
            Resource::Service(s) => ("Service", s.metadata.as_ref()),
            Resource::HttpRoute(r) => ("HTTPRoute", r.metadata.as_ref()),
            Resource::RateLimitPolicy(p) => ("RateLimitPolicy", p.metadata.as_ref()),
            Resource::AuthorizationPolicy(p) => ("AuthorizationPolicy", p.metadata.as_ref()),
            Resource::MeshConfig(m) => ("MeshConfig", m.metadata.as_ref()),
        };
        let meta = meta.cloned().unwrap_or_default();
        (kind, meta.namespace, meta.name)
    }

    pub fn yaml(&self) -> String {
        match self {
            Resource::Service(s) => remora_proto::yaml::resource_yaml(s),
            Resource::HttpRoute(r) => remora_proto::yaml::resource_yaml(r),
            Resource::RateLimitPolicy(p) => remora_proto::yaml::resource_yaml(p),
            Resource::AuthorizationPolicy(p) => remora_proto::yaml::resource_yaml(p),
            Resource::MeshConfig(m) => remora_proto::yaml::resource_yaml(m),
        }
    }
}

pub fn describe(k: &Key) -> String {
    format!("{} {}/{}", k.0, k.1, k.2)
}

/// Canonical kind name for user input (service, svc, routes, ...).
pub fn kind_name(kind: &str) -> Option<&'static str> {
    match kind.to_ascii_lowercase().as_str() {
        "service" | "services" | "svc" => Some("Service"),
        "httproute" | "httproutes" | "route" | "routes" => Some("HTTPRoute"),
        "ratelimitpolicy" | "ratelimitpolicies" | "ratelimit" | "ratelimits" | "rlp" => {
            Some("RateLimitPolicy")
        }
        "authorizationpolicy" | "authorizationpolicies" | "authz" | "ap" => {
            Some("AuthorizationPolicy")
        }
        "meshconfig" | "meshconfigs" | "mesh" => Some("MeshConfig"),
        _ => None,
    }
}

pub fn split(cfg: &Config) -> BTreeMap<Key, Resource> {
    let mut m = BTreeMap::new();
    for s in &cfg.services {
        let r = Resource::Service(s.clone());
        m.insert(r.key(), r);
    }
    for h in &cfg.http_routes {
        let r = Resource::HttpRoute(h.clone());
        m.insert(r.key(), r);
    }
    for p in &cfg.rate_limit_policies {
        let r = Resource::RateLimitPolicy(p.clone());
        m.insert(r.key(), r);
    }
    for p in &cfg.authorization_policies {
        let r = Resource::AuthorizationPolicy(p.clone());
        m.insert(r.key(), r);
    }
    for c in &cfg.mesh_configs {
        let r = Resource::MeshConfig(c.clone());
        m.insert(r.key(), r);
    }
    m
}

pub fn join(set: BTreeMap<Key, Resource>) -> Config {
    let mut cfg = Config::default();
    for r in set.into_values() {
        match r {
            Resource::Service(s) => cfg.services.push(s),
            Resource::HttpRoute(h) => cfg.http_routes.push(h),
            Resource::RateLimitPolicy(p) => cfg.rate_limit_policies.push(p),
            Resource::AuthorizationPolicy(p) => cfg.authorization_policies.push(p),
            Resource::MeshConfig(m) => cfg.mesh_configs.push(m),
        }
    }
    cfg
}

/// `base` with every resource of `add` inserted or replaced.
pub fn upsert(base: &Config, add: &Config) -> Config {
    let mut set = split(base);
    set.extend(split(add));
    join(set)
}

/// One resource's change between two configs.
pub struct Change {
    pub key: Key,
    pub action: &'static str,
    pub before: Option<Resource>,
    pub after: Option<Resource>,
}

pub fn diff(before: &Config, after: &Config) -> Vec<Change> {
    let (b, a) = (split(before), split(after));
    let mut keys: Vec<&Key> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let (x, y) = (b.get(k), a.get(k));
            let action = match (x, y) {
                (None, Some(_)) => "created",
                (Some(_), None) => "deleted",
                (Some(x), Some(y)) if x == y => "unchanged",
                _ => "updated",
            };
            Change {
                key: k.clone(),
                action,
                before: x.cloned(),
                after: y.cloned(),
            }
        })
        .collect()
}

/// "created HTTPRoute default/web, updated Service default/api"
pub fn summary(changes: &[Change]) -> String {
    let changed: Vec<String> = changes
        .iter()
        .filter(|c| c.action != "unchanged")
        .map(|c| format!("{} {}", c.action, describe(&c.key)))
        .collect();
    match changed.len() {
        0 => "no changes".into(),
        n if n <= 5 => changed.join(", "),
        n => format!("{}, and {} more", changed[..5].join(", "), n - 5),
    }
}
