//! What a proxy may say about itself on its Discovery stream. The control
//! plane believes nothing beyond what the proxy's credential proves:
//!
//! - its identity is the SPIFFE ID of its certificate, or (before it has
//!   one) the identity its bootstrap credential was reviewed for;
//! - the Service it names must be one whose workloads run as that identity
//!   (same namespace, `serviceAccount`, default the Service's name);
//! - its node id belongs to the identity that first registered it;
//! - the instance it registers is checked like config (an IP address, a
//!   port in range, labels within limits), so a bad one never reaches
//!   another proxy's snapshot.

use remora_proto::control::Instance;
use remora_proto::model::Config;

/// Why a proxy's Hello was refused (`MeshError::Invalid` and `Denied`).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Malformed: refused whoever sends it.
    #[error("{0}")]
    Invalid(String),
    /// Not this caller's to say.
    #[error("{0}")]
    Denied(String),
}

/// A caller's verified identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

impl Caller {
    /// `spiffe://<trust_domain>/ns/<ns>/sa/<sa>` when in `trust_domain`.
    pub fn from_spiffe_id(id: &str, trust_domain: &str) -> Option<Caller> {
        let rest = id.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        if td != trust_domain {
            return None;
        }
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some(Caller {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => None,
        }
    }
}

/// Most labels an instance may carry, and the longest key and value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 63;

/// An instance a proxy registers: refused unless it is well formed.
pub fn check_instance(i: &Instance) -> Result<(), String> {
    let ip: std::net::IpAddr = i.address.parse().map_err(|_| {
        format!(
            "instance address {:?} is not an IP address",
            short(&i.address)
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("instance address {ip} cannot receive traffic"));
    }
    if i.port == 0 || i.port > 65535 {
        return Err(format!("instance port {} is not 1..65535", i.port));
    }
    if i.labels.len() > MAX_LABELS {
        return Err(format!(
            "{} instance labels, at most {MAX_LABELS}",
            i.labels.len()
        ));
    }
    for (k, v) in &i.labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            return Err(format!(
                "instance label key {:?}: 1 to {MAX_LABEL_KEY} letters, digits, '-', '_', '.', '/'",
                short(k)
            ));
        }
        let value_ok = v.len() <= MAX_LABEL_VALUE
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !value_ok {
            return Err(format!(
                "instance label {k}: value {:?}: at most {MAX_LABEL_VALUE} letters, digits, '-', '_', '.'",
                short(v)
            ));
        }
    }
    Ok(())
}

/// The Service `service` (`namespace/name`) of `cfg` may be fronted by
/// `caller`: its namespace, and its serviceAccount (default: its name).
pub fn check_service(cfg: &Config, service: &str, caller: &Caller) -> Result<(), String> {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    let found = cfg.services.iter().find(|s| {
        s.metadata
            .as_ref()
            .is_some_and(|m| m.namespace == ns && m.name == name)
    });
    let Some(svc) = found else {
        return Err(format!(
            "Service {} is not defined: apply it (with its serviceAccount) before its proxies connect",
            short(service)
        ));
    };
    let meta = svc.metadata.clone().unwrap_or_default();
    let sa = svc
        .spec
        .as_ref()
        .map(|s| s.service_account.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(meta.name.as_str());
    if meta.namespace != caller.namespace || sa != caller.service_account {
        return Err(format!(
            "{caller} may not front Service {service}, whose workloads run as {}/{sa}",
            meta.namespace
        ));
    }
    Ok(())
}

/// At most 128 characters of something a caller sent, for messages.
fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(address: &str, port: u32, labels: &[(&str, &str)]) -> Instance {
        Instance {
            address: address.into(),
            port,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn instances_are_checked_like_config() {
        assert!(check_instance(&inst("10.1.2.3", 4143, &[("version", "v2")])).is_ok());
        assert!(check_instance(&inst("::1", 4143, &[])).is_ok());
        let err = |i: Instance| check_instance(&i).unwrap_err();
        assert!(err(inst("not-an-ip", 4143, &[])).contains("not an IP address"));
        assert!(err(inst("0.0.0.0", 4143, &[])).contains("cannot receive"));
        assert!(err(inst("10.1.2.3", 0, &[])).contains("not 1..65535"));
        assert!(err(inst("10.1.2.3", 70000, &[])).contains("not 1..65535"));
        assert!(err(inst("10.1.2.3", 1, &[("", "x")])).contains("label key"));
        assert!(err(inst("10.1.2.3", 1, &[("k", "a b")])).contains("value"));
        let many: Vec<(String, String)> = (0..40).map(|i| (format!("k{i}"), "v".into())).collect();
        let mut i = inst("10.1.2.3", 1, &[]);
        i.labels = many.into_iter().collect();
        assert!(err(i).contains("at most 32"));
        let long = "x".repeat(10_000);
        assert!(err(inst(&long, 1, &[])).len() < 300, "messages stay short");
    }

    #[test]
    fn a_caller_fronts_only_services_of_its_own_identity() {
        let cfg = remora_proto::prepare(
            remora_proto::parse_yaml(
                "kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\n\
                 kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}], serviceAccount: frontend}\n",
                "t",
            )
            .unwrap(),
        )
        .unwrap();
        let caller = |ns: &str, sa: &str| Caller {
            namespace: ns.into(),
            service_account: sa.into(),
        };
        assert!(check_service(&cfg, "shop/api", &caller("shop", "api")).is_ok());
        assert!(check_service(&cfg, "shop/web", &caller("shop", "frontend")).is_ok());
        let e = check_service(&cfg, "shop/web", &caller("shop", "web")).unwrap_err();
        assert!(e.contains("whose workloads run as shop/frontend"), "{e}");
        assert!(check_service(&cfg, "shop/api", &caller("other", "api")).is_err());
        let e = check_service(&cfg, "shop/nope", &caller("shop", "nope")).unwrap_err();
        assert!(e.contains("is not defined"), "{e}");
    }

    #[test]
    fn spiffe_ids_in_our_trust_domain_only() {
        assert_eq!(
            Caller::from_spiffe_id("spiffe://mesh.test/ns/shop/sa/api", "mesh.test"),
            Some(Caller {
                namespace: "shop".into(),
                service_account: "api".into()
            })
        );
        for bad in [
            "spiffe://other/ns/shop/sa/api",
            "spiffe://mesh.test/ns/shop/sa/api/x",
            "spiffe://mesh.test/ns/shop",
            "https://mesh.test/ns/shop/sa/api",
        ] {
            assert_eq!(Caller::from_spiffe_id(bad, "mesh.test"), None, "{bad}");
        }
    }
}
