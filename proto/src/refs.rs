//! Identifiers parsed once: an object reference (`namespace/name`) and a
//! SPIFFE ID (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`), as
//! small types rather than strings formatted and split in many places.

use crate::model::Metadata;
use std::fmt;
use std::str::FromStr;

/// A resource by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectRef {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The reference of a resource's metadata (normalized: namespaces set).
    pub fn of(meta: Option<&Metadata>) -> ObjectRef {
        meta.map(|m| ObjectRef::new(&m.namespace, &m.name))
            .unwrap_or_default()
    }

    /// `name` in `namespace`, or `ns/name` as written.
    pub fn qualify(namespace: &str, reference: &str) -> ObjectRef {
        match reference.split_once('/') {
            Some((ns, name)) => ObjectRef::new(ns, name),
            None => ObjectRef::new(namespace, reference),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ObjectRef {
    type Err = String;
    fn from_str(s: &str) -> Result<ObjectRef, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectRef::new(ns, name))
            }
            _ => Err(format!("{s:?} is not namespace/name")),
        }
    }
}

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = String;
    /// Exactly `spiffe://<td>/ns/<ns>/sa/<sa>`, every part non-empty.
    fn from_str(s: &str) -> Result<SpiffeId, String> {
        let bad = || format!("{s:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<account>");
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_refs_round_trip_and_qualify() {
        let r: ObjectRef = "shop/api".parse().unwrap();
        assert_eq!(r, ObjectRef::new("shop", "api"));
        assert_eq!(r.to_string(), "shop/api");
        assert_eq!(ObjectRef::qualify("shop", "api"), r);
        assert_eq!(ObjectRef::qualify("x", "shop/api"), r);
        for bad in ["api", "/api", "shop/", "a/b/c"] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids_parse_exactly() {
        let id: SpiffeId = "spiffe://mesh.test/ns/shop/sa/api".parse().unwrap();
        assert_eq!(id, SpiffeId::new("mesh.test", "shop", "api"));
        assert_eq!(id.to_string(), "spiffe://mesh.test/ns/shop/sa/api");
        for bad in [
            "spiffe://mesh.test/ns/shop",
            "spiffe://mesh.test/ns/shop/sa/api/x",
            "spiffe:///ns/shop/sa/api",
            "https://mesh.test/ns/shop/sa/api",
            "spiffe://mesh.test/ns//sa/api",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
