//! remora-proto: the one model shared by the proxy, the control plane and
//! remoractl. It owns the protobuf schema (config and gRPC services), the
//! YAML mapping and the validation, so every component gives the same
//! answer about a config.
#![forbid(unsafe_code)]

/// Generated code, nested as the proto packages are.
pub mod pb {
    pub mod remora {
        pub mod config {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                include!(concat!(env!("OUT_DIR"), "/remora.config.v1.rs"));
            }
        }
        pub mod control {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                include!(concat!(env!("OUT_DIR"), "/remora.control.v1.rs"));
            }
        }
        pub mod transport {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                include!(concat!(env!("OUT_DIR"), "/remora.transport.v1.rs"));
            }
        }
    }
}

/// Config types (package `remora.config.v1`).
pub use pb::remora::config::v1 as model;
/// Control-plane services and messages (package `remora.control.v1`).
pub use pb::remora::control::v1 as control;
/// The header one proxy sends another after the mTLS handshake.
pub use pb::remora::transport::v1 as transport;

pub mod duration;
pub mod refs;
pub mod validate;
pub mod yaml;

pub use refs::{ObjectRef, SpiffeId};
pub use validate::{prepare, ValidationError, ValidationErrors};
pub use yaml::{load_path, parse_yaml, LoadError, RawConfig, MAX_CONFIG_BYTES};

/// The namespace a resource lands in when it names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` of a resource, as used in errors and logs.
pub fn resource_id(meta: Option<&model::Metadata>) -> String {
    match meta {
        Some(m) => format!("{}/{}", m.namespace, m.name),
        None => "<unnamed>".to_string(),
    }
}

/// How many resources a config holds, of every kind.
pub fn resource_count(cfg: &model::Config) -> usize {
    cfg.services.len()
        + cfg.http_routes.len()
        + cfg.rate_limit_policies.len()
        + cfg.authorization_policies.len()
        + cfg.mesh_configs.len()
}
