//! A config as shared resources, and the incremental decode of snapshots.
//!
//! The control plane sends the whole config in every snapshot; between two
//! snapshots usually one resource changed (a route edited, a Service's
//! endpoints moved). Decoding and validating all of it again would cost in
//! proportion to the mesh. Instead the encoded config is split into its
//! resources' byte ranges (zero-copy), each looked up by its bytes among
//! the previous snapshot's: an unchanged resource is the previous `Arc`,
//! already decoded, normalized and validated; only new bytes are decoded.
//! The validator then checks only those (`remora_proto::validate::Known`),
//! and the compilers see unchanged resources as the very same objects.

use bytes::{Buf, Bytes};
use prost::encoding::{decode_key, decode_varint, WireType};
use prost::Message;
use remora_proto::model::{
    AuthorizationPolicy, Config, HttpRoute, MeshConfig, RateLimitPolicy, Service,
};
use remora_proto::validate::{self, Known, View};
use serde::ser::SerializeStruct;
use std::collections::HashMap;
use std::sync::Arc;

/// An `ObjectRef` by borrowed names: looks up maps keyed by `ObjectRef`
/// without building one (two `String`s) per lookup. Hashes exactly as
/// `ObjectRef` does (field by field, `str` each).
#[derive(Clone, Copy, Hash)]
pub struct RefKey<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> RefKey<'a> {
    pub fn new(namespace: &'a str, name: &'a str) -> RefKey<'a> {
        RefKey { namespace, name }
    }

    pub fn of(meta: Option<&'a remora_proto::model::Metadata>) -> RefKey<'a> {
        meta.map_or(RefKey::new("", ""), |m| RefKey::new(&m.namespace, &m.name))
    }
}

impl hashbrown::Equivalent<remora_proto::ObjectRef> for RefKey<'_> {
    fn equivalent(&self, key: &remora_proto::ObjectRef) -> bool {
        self.namespace == key.namespace && self.name == key.name
    }
}

/// A config whose resources are shared: what did not change between two
/// snapshots is the same `Arc` in both.
#[derive(Clone, Default)]
pub struct Resources {
    pub services: Vec<Arc<Service>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub rate_limit_policies: Vec<Arc<RateLimitPolicy>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub mesh_configs: Vec<Arc<MeshConfig>>,
}

impl Resources {
    /// Wraps a (normalized) config's resources.
    pub fn from_config(cfg: Config) -> Resources {
        fn arcs<T>(v: Vec<T>) -> Vec<Arc<T>> {
            v.into_iter().map(Arc::new).collect()
        }
        Resources {
            services: arcs(cfg.services),
            http_routes: arcs(cfg.http_routes),
            rate_limit_policies: arcs(cfg.rate_limit_policies),
            authorization_policies: arcs(cfg.authorization_policies),
            mesh_configs: arcs(cfg.mesh_configs),
        }
    }

    pub fn view(&self) -> View<'_> {
        fn refs<T>(v: &[Arc<T>]) -> Vec<&T> {
            v.iter().map(|a| &**a).collect()
        }
        View {
            services: refs(&self.services),
            http_routes: refs(&self.http_routes),
            rate_limit_policies: refs(&self.rate_limit_policies),
            authorization_policies: refs(&self.authorization_policies),
            mesh_configs: refs(&self.mesh_configs),
        }
    }

    /// Makes every resource equal to the same-named one of `prev` that very
    /// object: a config parsed again from a file then compiles like an
    /// unchanged snapshot, reusing what the compilers built for it.
    pub fn adopt(&mut self, prev: &Resources) {
        fn adopt<T: PartialEq>(
            new: &mut [Arc<T>],
            old: &[Arc<T>],
            meta: fn(&T) -> Option<&remora_proto::model::Metadata>,
        ) {
            let by_name: HashMap<(&str, &str), &Arc<T>> = old
                .iter()
                .filter_map(|o| meta(o).map(|m| ((m.namespace.as_str(), m.name.as_str()), o)))
                .collect();
            for n in new.iter_mut() {
                let found =
                    meta(n).and_then(|m| by_name.get(&(m.namespace.as_str(), m.name.as_str())));
                if let Some(o) = found.filter(|o| ***o == *n) {
                    *n = (*o).clone();
                }
            }
        }
        adopt(&mut self.services, &prev.services, |r| r.metadata.as_ref());
        adopt(&mut self.http_routes, &prev.http_routes, |r| {
            r.metadata.as_ref()
        });
        adopt(
            &mut self.rate_limit_policies,
            &prev.rate_limit_policies,
            |r| r.metadata.as_ref(),
        );
        adopt(
            &mut self.authorization_policies,
            &prev.authorization_policies,
            |r| r.metadata.as_ref(),
        );
        adopt(&mut self.mesh_configs, &prev.mesh_configs, |r| {
            r.metadata.as_ref()
        });
    }

    /// HTTPRoute rules in all, for `--max-route-rules`.
    pub fn route_rules(&self) -> usize {
        self.http_routes
            .iter()
            .map(|r| r.spec.as_ref().map_or(0, |s| s.rules.len()))
            .sum()
    }
}

/// Serialized as the `Config` it holds (for the admin API's /config).
impl serde::Serialize for Resources {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Seq<'a, T>(&'a [Arc<T>]);
        impl<T: serde::Serialize> serde::Serialize for Seq<'_, T> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|a| &**a))
            }
        }
        let mut st = s.serialize_struct("Config", 5)?;
        st.serialize_field("services", &Seq(&self.services))?;
        st.serialize_field("httpRoutes", &Seq(&self.http_routes))?;
        st.serialize_field("rateLimitPolicies", &Seq(&self.rate_limit_policies))?;
        st.serialize_field("authorizationPolicies", &Seq(&self.authorization_policies))?;
        st.serialize_field("meshConfigs", &Seq(&self.mesh_configs))?;
        st.end()
    }
}

/// Resources by their encoded bytes (foldhash: hashing a whole snapshot's
/// bytes at each apply is the cost here, and SipHash is 3x slower).
type ByBytes<T> = hashbrown::HashMap<Bytes, Arc<T>>;

/// The resources of the last applied snapshot, by their encoded bytes.
/// Only a snapshot that was applied becomes the cache, so every resource in
/// it passed validation (in the context `Known::context` names).
#[derive(Default)]
pub struct DecodeCache {
    services: ByBytes<Service>,
    http_routes: ByBytes<HttpRoute>,
    rate_limit_policies: ByBytes<RateLimitPolicy>,
    authorization_policies: ByBytes<AuthorizationPolicy>,
    mesh_configs: ByBytes<MeshConfig>,
    context: u64,
}

impl DecodeCache {
    /// The validation context of the cached resources.
    pub fn set_context(&mut self, context: u64) {
        self.context = context;
    }
}

/// A decoded snapshot: its resources, the cache for the next one, and
/// which resources came from the previous cache (known valid).
pub struct Decoded {
    pub resources: Resources,
    pub cache: DecodeCache,
    pub known: Known,
}

/// Why a snapshot's config does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Prost(#[from] prost::DecodeError),
    #[error("a resource runs past the end of the config")]
    Truncated,
}

/// One kind's resources: decoded or reused, in order.
struct Kind<T> {
    items: Vec<Arc<T>>,
    reused: Vec<bool>,
    by_bytes: ByBytes<T>,
}

impl<T> Default for Kind<T> {
    fn default() -> Kind<T> {
        Kind {
            items: Vec::new(),
            reused: Vec::new(),
            by_bytes: ByBytes::default(),
        }
    }
}

impl<T: Message + Default> Kind<T> {
    fn add(
        &mut self,
        bytes: Bytes,
        prev: &ByBytes<T>,
        normalize: fn(&mut T),
    ) -> Result<(), prost::DecodeError> {
        let (item, reused) = match prev.get(&bytes) {
            Some(a) => (a.clone(), true),
            None => {
                let mut t = T::decode(bytes.clone())?;
                normalize(&mut t);
                (Arc::new(t), false)
            }
        };
        self.by_bytes.insert(bytes, item.clone());
        self.items.push(item);
        self.reused.push(reused);
        Ok(())
    }
}

/// Decodes an encoded `Config`, reusing every resource whose bytes the
/// previous snapshot had. Field numbers are `Config`'s (config.proto);
/// unknown fields are skipped, as prost would.
pub fn decode(encoded: &Bytes, prev: &DecodeCache) -> Result<Decoded, DecodeError> {
    let mut services = Kind::default();
    let mut http_routes = Kind::default();
    let mut rate_limit_policies = Kind::default();
    let mut authorization_policies = Kind::default();
    let mut mesh_configs = Kind::default();
    let mut buf = encoded.clone();
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf)?;
        if wire != WireType::LengthDelimited {
            prost::encoding::skip_field(wire, tag, &mut buf, Default::default())?;
            continue;
        }
        let len = decode_varint(&mut buf)?;
        if len > buf.remaining() as u64 {
            return Err(DecodeError::Truncated);
        }
        let item = buf.split_to(len as usize);
        match tag {
            1 => services.add(item, &prev.services, validate::normalize_service)?,
            2 => http_routes.add(item, &prev.http_routes, validate::normalize_route)?,
            3 => rate_limit_policies.add(
                item,
                &prev.rate_limit_policies,
                validate::normalize_rate_limit_policy,
            )?,
            4 => authorization_policies.add(
                item,
                &prev.authorization_policies,
                validate::normalize_authorization_policy,
            )?,
            5 => mesh_configs.add(item, &prev.mesh_configs, validate::normalize_mesh_config)?,
            _ => {}
        }
    }
    let known = Known {
        context: prev.context,
        services: services.reused,
        http_routes: http_routes.reused,
        rate_limit_policies: rate_limit_policies.reused,
        authorization_policies: authorization_policies.reused,
    };
    Ok(Decoded {
        resources: Resources {
            services: services.items,
            http_routes: http_routes.items,
            rate_limit_policies: rate_limit_policies.items,
            authorization_policies: authorization_policies.items,
            mesh_configs: mesh_configs.items,
        },
        cache: DecodeCache {
            services: services.by_bytes,
            http_routes: http_routes.by_bytes,
            rate_limit_policies: rate_limit_policies.by_bytes,
            authorization_policies: authorization_policies.by_bytes,
            mesh_configs: mesh_configs.by_bytes,
            context: 0,
        },
        known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        remora_proto::prepare(remora_proto::parse_yaml(yaml, "t").unwrap()).unwrap()
    }

    const MESH: &str = "kind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n---\n\
        kind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 80}]\n---\n\
        kind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{backendRefs: [{name: b}]}]\n";

    #[test]
    fn decodes_like_prost_and_reuses_unchanged_resources() {
        let cfg = config(MESH);
        let bytes = Bytes::from(cfg.encode_to_vec());
        let first = decode(&bytes, &DecodeCache::default()).unwrap();
        // The same resources as a whole-message decode.
        let whole = Config::decode(bytes.clone()).unwrap();
        assert_eq!(
            first
                .resources
                .services
                .iter()
                .map(|s| (**s).clone())
                .collect::<Vec<_>>(),
            whole.services
        );
        assert_eq!(*first.resources.http_routes[0], whole.http_routes[0]);
        assert_eq!(first.known.services, [false, false]);

        // Service b's spec changed: a and the route are the same objects.
        let mut changed = cfg.clone();
        changed.services[1].spec.as_mut().unwrap().service_account = "other".into();
        let bytes2 = Bytes::from(changed.encode_to_vec());
        let second = decode(&bytes2, &first.cache).unwrap();
        assert!(Arc::ptr_eq(
            &first.resources.services[0],
            &second.resources.services[0]
        ));
        assert!(!Arc::ptr_eq(
            &first.resources.services[1],
            &second.resources.services[1]
        ));
        assert!(Arc::ptr_eq(
            &first.resources.http_routes[0],
            &second.resources.http_routes[0]
        ));
        assert_eq!(second.known.services, [true, false]);
        assert_eq!(second.known.http_routes, [true]);
        assert_eq!(
            second.resources.services[1]
                .spec
                .as_ref()
                .unwrap()
                .service_account,
            "other"
        );
    }

    #[test]
    fn truncated_or_malformed_snapshots_are_errors_not_panics() {
        let bytes = Bytes::from(config(MESH).encode_to_vec());
        for cut in [1, 2, bytes.len() / 2, bytes.len() - 1] {
            let _ = decode(&bytes.slice(..cut), &DecodeCache::default());
        }
        // A length past the end.
        let bad = Bytes::from_static(&[0x12, 0x7f, 0x01]);
        assert!(decode(&bad, &DecodeCache::default()).is_err());
        // A field of the wrong wire type is skipped.
        let varint = Bytes::from_static(&[0x08, 0x01]);
        assert!(decode(&varint, &DecodeCache::default())
            .unwrap()
            .resources
            .services
            .is_empty());
    }

    #[test]
    fn serializes_as_the_config_it_holds() {
        let cfg = config(MESH);
        let r = Resources::from_config(cfg.clone());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::to_value(&cfg).unwrap()
        );
    }
}
