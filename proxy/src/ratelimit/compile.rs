//! The limits of a config: one `Limit` per RateLimitPolicy limit, indexed
//! by what it attaches to. A limit whose parameters did not change keeps
//! its buckets across swaps.

use super::{KeyPart, Limit, LimitParams, LimiterSet};
use crate::config::{CompileError, Settings};
use crate::metrics::Metrics;
use crate::snapshot::{RefKey, Resources};
use http::header::HeaderName;
use remora_proto::ObjectRef;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Limits by target, for one (target kind, direction).
type ByTarget = hashbrown::HashMap<ObjectRef, Vec<Arc<Limit>>>;

/// Every limit, by id (`namespace/policy/limit`) and by attachment.
#[derive(Default)]
pub struct Limits {
    pub by_id: HashMap<String, Arc<Limit>>,
    /// By (target kind, direction): a handful of entries.
    attached: Vec<((String, String), ByTarget)>,
}

impl Limits {
    /// The limits on `kind` `namespace/name` in `direction`.
    pub fn on(&self, kind: &str, target: RefKey<'_>, direction: &str) -> &[Arc<Limit>] {
        self.attached
            .iter()
            .find(|((k, d), _)| k == kind && d == direction)
            .and_then(|(_, by)| by.get(&target))
            .map_or(&[], |v| v.as_slice())
    }

    fn attach(&mut self, kind: &str, target: ObjectRef, direction: &str, limit: Arc<Limit>) {
        let i = match self
            .attached
            .iter()
            .position(|((k, d), _)| k == kind && d == direction)
        {
            Some(i) => i,
            None => {
                let key = (kind.to_string(), direction.to_string());
                self.attached.push((key, ByTarget::default()));
                self.attached.len() - 1
            }
        };
        self.attached[i].1.entry(target).or_default().push(limit);
    }

    /// A set of limits, or none when empty.
    pub fn set(limits: Vec<Arc<Limit>>) -> Option<Arc<LimiterSet>> {
        (!limits.is_empty()).then(|| Arc::new(LimiterSet { limits }))
    }
}

/// Compiles every RateLimitPolicy limit of `cfg`; `prev` are the running
/// ones.
pub fn limits(
    cfg: &Resources,
    prev: &HashMap<String, Arc<Limit>>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Limits, CompileError> {
    let mut out = Limits::default();
    if cfg.rate_limit_policies.is_empty() {
        return Ok(out);
    }
    // The Services' replica counts, for mesh-wide limits.
    let replicas: HashMap<ObjectRef, u32> = cfg
        .services
        .iter()
        .map(|svc| {
            let n = svc.spec.as_ref().map_or(0, |sp| sp.endpoints.len());
            (ObjectRef::of(svc.metadata.as_ref()), n.max(1) as u32)
        })
        .collect();
    for p in &cfg.rate_limit_policies {
        let pid = ObjectRef::of(p.metadata.as_ref());
        let spec = p.spec.clone().unwrap_or_default();
        let t = spec.target_ref.unwrap_or_default();
        let target = ObjectRef::new(&t.namespace, &t.name);
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
                            "Header" => {
                                KeyPart::Header(HeaderName::from_bytes(k.name.as_bytes()).map_err(
                                    |e| CompileError::Policy {
                                        policy: pid.clone(),
                                        what: format!("key header {:?}: {e}", k.name),
                                    },
                                )?)
                            }
                            _ => KeyPart::Total,
                        })
                    })
                    .collect::<Result<_, CompileError>>()?
            };
            // A mesh-wide limit is shared by the Service's live replicas:
            // each enforces an equal share.
            let share = match l.scope.as_str() {
                "Mesh" => replicas.get(&target).copied().unwrap_or(1),
                _ => 1,
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
            let policy = pid.to_string();
            let limit = match prev.get(&id) {
                Some(old)
                    if old.params == params
                        && old.dry_run == spec.dry_run
                        && old.headers == headers =>
                {
                    old.clone()
                }
                _ => Arc::new(Limit::new(
                    &policy,
                    &l.name,
                    params,
                    spec.dry_run,
                    headers,
                    metrics.decisions(&policy, &l.name),
                    governor::clock::DefaultClock::default(),
                )),
            };
            out.attach(&t.kind, target.clone(), &spec.direction, limit.clone());
            out.by_id.insert(id, limit);
        }
    }
    // A stable order per attachment (policies arrive sorted; keep it).
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(requests: u32) -> Resources {
        let yaml = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{{address: 10.0.0.1}}, {{address: 10.0.0.2}}]\n---\n\
             kind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: a}}\n  limits:\n  - {{name: total, requests: {requests}, scope: Mesh}}\n  - {{name: per-user, requests: 5, key: [{{type: Header, name: x-user}}]}}\n"
        );
        Resources::from_config(
            remora_proto::prepare(remora_proto::parse_yaml(&yaml, "t").unwrap()).unwrap(),
        )
    }

    #[test]
    fn limits_attach_to_their_target_and_keep_their_buckets() {
        let (s, m) = (Settings::default(), Metrics::new());
        let l1 = limits(&cfg(100), &HashMap::new(), &s, &m).unwrap();
        let a = || RefKey::new("default", "a");
        assert_eq!(l1.on("Service", a(), "inbound").len(), 2);
        assert!(l1.on("Service", a(), "outbound").is_empty());
        assert!(l1.on("HTTPRoute", a(), "outbound").is_empty());
        // Mesh scope: shared by the two replicas.
        assert_eq!(l1.by_id["default/p/total"].params.share, 2);
        let l2 = limits(&cfg(100), &l1.by_id, &s, &m).unwrap();
        assert!(Arc::ptr_eq(
            &l1.by_id["default/p/total"],
            &l2.by_id["default/p/total"]
        ));
        let l3 = limits(&cfg(200), &l2.by_id, &s, &m).unwrap();
        assert!(!Arc::ptr_eq(
            &l2.by_id["default/p/total"],
            &l3.by_id["default/p/total"]
        ));
        assert!(Arc::ptr_eq(
            &l2.by_id["default/p/per-user"],
            &l3.by_id["default/p/per-user"]
        ));
    }
}
