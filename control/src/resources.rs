//! A config as sets of resources keyed by (kind, namespace, name): upsert,
//! remove, diff. Each kind's list is kept sorted by namespace and name
//! (`canonicalize`), so equal sets are equal configs, a resource is found by
//! binary search, and a one-resource change touches one resource instead of
//! copying the whole config into a map and back.

use remora_proto::model::{
    AuthorizationPolicy, Config, HttpRoute, MeshConfig, Metadata, RateLimitPolicy, Service,
};
use std::cmp::Ordering;

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

/// A resource kind held in a `Config` list.
trait Kind: Clone + PartialEq {
    const KIND: &'static str;
    fn metadata(&self) -> Option<&Metadata>;
    fn wrap(self) -> Resource;
    fn list(cfg: &Config) -> &Vec<Self>;
    fn list_mut(cfg: &mut Config) -> &mut Vec<Self>;
}

macro_rules! kind {
    ($t:ty, $name:literal, $variant:ident, $field:ident) => {
        impl Kind for $t {
            const KIND: &'static str = $name;
            fn metadata(&self) -> Option<&Metadata> {
                self.metadata.as_ref()
            }
            fn wrap(self) -> Resource {
                Resource::$variant(self)
            }
            fn list(cfg: &Config) -> &Vec<Self> {
                &cfg.$field
            }
            fn list_mut(cfg: &mut Config) -> &mut Vec<Self> {
                &mut cfg.$field
            }
        }
    };
}

kind!(Service, "Service", Service, services);
kind!(HttpRoute, "HTTPRoute", HttpRoute, http_routes);
kind!(
    RateLimitPolicy,
    "RateLimitPolicy",
    RateLimitPolicy,
    rate_limit_policies
);
kind!(
    AuthorizationPolicy,
    "AuthorizationPolicy",
    AuthorizationPolicy,
    authorization_policies
);
kind!(MeshConfig, "MeshConfig", MeshConfig, mesh_configs);

/// (namespace, name) of a resource.
fn id<T: Kind>(r: &T) -> (&str, &str) {
    r.metadata()
        .map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()))
}

fn key<T: Kind>(r: &T) -> Key {
    let (ns, name) = id(r);
    (T::KIND, ns.to_string(), name.to_string())
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

/// Calls `$f::<Kind>($args)` for every kind.
macro_rules! each_kind {
    ($f:ident($($arg:expr),*)) => {{
        $f::<Service>($($arg),*);
        $f::<HttpRoute>($($arg),*);
        $f::<RateLimitPolicy>($($arg),*);
        $f::<AuthorizationPolicy>($($arg),*);
        $f::<MeshConfig>($($arg),*);
    }};
}

/// Sorts each kind's list by namespace and name; of resources with the
/// same key, the last one stays. Cheap when already sorted.
pub fn canonicalize(cfg: &mut Config) {
    fn one<T: Kind>(cfg: &mut Config) {
        let v = T::list_mut(cfg);
        if v.windows(2).all(|w| id(&w[0]) < id(&w[1])) {
            return;
        }
        // Stable: among equal keys the input order stays, and the last wins.
        v.sort_by(|a, b| id(a).cmp(&id(b)));
        let mut out: Vec<T> = Vec::with_capacity(v.len());
        for r in v.drain(..) {
            match out.last_mut() {
                Some(last) if id(last) == id(&r) => *last = r,
                _ => out.push(r),
            }
        }
        *v = out;
    }
    each_kind!(one(cfg));
}

/// Inserts every resource of `add` into `cfg` (canonical), replacing the
/// one with the same key.
pub fn upsert(cfg: &mut Config, add: Config) {
    fn one<T: Kind>(cfg: &mut Config, add: Vec<T>) {
        let v = T::list_mut(cfg);
        for r in add {
            match v.binary_search_by(|x| id(x).cmp(&id(&r))) {
                Ok(i) => v[i] = r,
                Err(i) => v.insert(i, r),
            }
        }
    }
    one(cfg, add.services);
    one(cfg, add.http_routes);
    one(cfg, add.rate_limit_policies);
    one(cfg, add.authorization_policies);
    one(cfg, add.mesh_configs);
}

/// Removes the resource `key` from `cfg` (canonical); false if absent.
pub fn remove(cfg: &mut Config, key: &Key) -> bool {
    fn one<T: Kind>(cfg: &mut Config, key: &Key) -> bool {
        if key.0 != T::KIND {
            return false;
        }
        let v = T::list_mut(cfg);
        match v.binary_search_by(|x| id(x).cmp(&(key.1.as_str(), key.2.as_str()))) {
            Ok(i) => {
                v.remove(i);
                true
            }
            Err(_) => false,
        }
    }
    one::<Service>(cfg, key)
        || one::<HttpRoute>(cfg, key)
        || one::<RateLimitPolicy>(cfg, key)
        || one::<AuthorizationPolicy>(cfg, key)
        || one::<MeshConfig>(cfg, key)
}

/// The resources of `cfg` whose key passes `keep`, copied.
pub fn filter(cfg: &Config, keep: impl Fn(&str, &str, &str) -> bool) -> Config {
    fn one<T: Kind>(cfg: &Config, out: &mut Config, keep: &dyn Fn(&str, &str, &str) -> bool) {
        *T::list_mut(out) = T::list(cfg)
            .iter()
            .filter(|r| {
                let (ns, name) = id(*r);
                keep(T::KIND, ns, name)
            })
            .cloned()
            .collect();
    }
    let mut out = Config::default();
    each_kind!(one(cfg, &mut out, &keep));
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Deleted,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
            Action::Unchanged => "unchanged",
        }
    }
}

/// One resource's change between two configs; `before` and `after` are
/// there for changed resources only.
pub struct Change {
    pub key: Key,
    pub action: Action,
    pub before: Option<Resource>,
    pub after: Option<Resource>,
}

/// Every resource of two canonical configs and what happened to it,
/// sorted by key. Walks both lists side by side: unchanged resources are
/// compared, never copied.
pub fn diff(before: &Config, after: &Config) -> Vec<Change> {
    fn one<T: Kind>(b: &Config, a: &Config, out: &mut Vec<Change>) {
        let (mut x, mut y) = (T::list(b).iter().peekable(), T::list(a).iter().peekable());
        loop {
            let order = match (x.peek(), y.peek()) {
                (None, None) => return,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(p), Some(q)) => id(*p).cmp(&id(*q)),
            };
            let change = match order {
                Ordering::Less => {
                    let p = x.next().expect("peeked");
                    Change {
                        key: key(p),
                        action: Action::Deleted,
                        before: Some(p.clone().wrap()),
                        after: None,
                    }
                }
                Ordering::Greater => {
                    let q = y.next().expect("peeked");
                    Change {
                        key: key(q),
                        action: Action::Created,
                        before: None,
                        after: Some(q.clone().wrap()),
                    }
                }
                Ordering::Equal => {
                    let (p, q) = (x.next().expect("peeked"), y.next().expect("peeked"));
                    if p == q {
                        Change {
                            key: key(p),
                            action: Action::Unchanged,
                            before: None,
                            after: None,
                        }
                    } else {
                        Change {
                            key: key(p),
                            action: Action::Updated,
                            before: Some(p.clone().wrap()),
                            after: Some(q.clone().wrap()),
                        }
                    }
                }
            };
            out.push(change);
        }
    }
    let mut out = Vec::new();
    each_kind!(one(before, after, &mut out));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// "created HTTPRoute default/web, updated Service default/api"
pub fn summary(changes: &[Change]) -> String {
    let changed: Vec<String> = changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .map(|c| format!("{} {}", c.action.as_str(), describe(&c.key)))
        .collect();
    match changed.len() {
        0 => "no changes".into(),
        n if n <= 5 => changed.join(", "),
        n => format!("{}, and {} more", changed[..5].join(", "), n - 5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        let mut c = remora_proto::parse_yaml(yaml, "t").unwrap();
        remora_proto::validate::normalize(&mut c);
        canonicalize(&mut c);
        c
    }

    fn names(c: &Config) -> Vec<String> {
        c.services
            .iter()
            .map(|s| s.metadata.as_ref().unwrap().name.clone())
            .collect()
    }

    const TWO: &str = "kind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n---\n\
                       kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";

    #[test]
    fn canonical_lists_are_sorted_and_the_last_duplicate_wins() {
        let c = cfg(&format!(
            "{TWO}---\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{port: 81}}]}}\n"
        ));
        assert_eq!(names(&c), ["a", "b"]);
        assert_eq!(c.services[0].spec.as_ref().unwrap().ports[0].port, 81);
    }

    #[test]
    fn upsert_and_remove_keep_the_order() {
        let mut c = cfg(TWO);
        upsert(
            &mut c,
            cfg(
                "kind: Service\nmetadata: {name: aa}\nspec: {ports: [{port: 80}]}\n---\n\
                 kind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 82}]}\n",
            ),
        );
        assert_eq!(names(&c), ["a", "aa", "b"]);
        assert_eq!(c.services[2].spec.as_ref().unwrap().ports[0].port, 82);
        let key = ("Service", "default".to_string(), "aa".to_string());
        assert!(remove(&mut c, &key));
        assert!(!remove(&mut c, &key));
        assert!(!remove(
            &mut c,
            &("HTTPRoute", "default".into(), "a".into())
        ));
        assert_eq!(names(&c), ["a", "b"]);
    }

    #[test]
    fn diff_names_each_change_and_copies_only_changed_resources() {
        let before = cfg(TWO);
        let mut after = before.clone();
        upsert(
            &mut after,
            cfg(
                "kind: Service\nmetadata: {name: c}\nspec: {ports: [{port: 80}]}\n---\n\
                 kind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 82}]}\n",
            ),
        );
        remove(&mut after, &("Service", "default".into(), "a".into()));
        let d = diff(&before, &after);
        let got: Vec<(String, &str, bool, bool)> = d
            .iter()
            .map(|c| {
                (
                    c.key.2.clone(),
                    c.action.as_str(),
                    c.before.is_some(),
                    c.after.is_some(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), "deleted", true, false),
                ("b".to_string(), "updated", true, true),
                ("c".to_string(), "created", false, true),
            ]
        );
        assert_eq!(
            summary(&d),
            "deleted Service default/a, updated Service default/b, created Service default/c"
        );
        let same = diff(&before, &before);
        assert!(same
            .iter()
            .all(|c| c.action == Action::Unchanged && c.before.is_none()));
        assert_eq!(summary(&same), "no changes");
    }

    #[test]
    fn filter_copies_what_matches() {
        let c = cfg(TWO);
        let only_b = filter(&c, |kind, _, name| kind == "Service" && name == "b");
        assert_eq!(names(&only_b), ["b"]);
    }
}
