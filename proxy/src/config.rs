//! What a config compiles with and into what it can fail: the validated
//! config (`Validated`, the only input the compilers take), the proxy-wide
//! settings from flags, and `CompileError`. Every per-concept compiler
//! (`cluster`, `ratelimit`, `route`, `authz`) depends on this module and
//! none on `runtime`, which only puts them in order.

use crate::balance::OutlierConfig;
use crate::pool::PoolConfig;
use crate::retry::BudgetParams;
use crate::tls::MeshTls;
use remora_proto::model::Config;
use remora_proto::{ObjectRef, ValidationErrors};
use std::sync::Arc;
use std::time::Duration;

/// Proxy-wide settings that shape compilation (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub pool: PoolConfig,
    pub outlier: OutlierConfig,
    /// The namespace this proxy runs in: short Service names resolve here.
    pub namespace: String,
    pub default_budget: BudgetParams,
    /// Most route rules a config may have (a memory bound).
    pub max_route_rules: usize,
    /// The Service this proxy fronts, if any: its mTLS mode, authorization
    /// and inbound rate-limit policies apply here.
    pub service: Option<ObjectRef>,
    /// Live keys per rate limit before new keys share an overflow bucket.
    pub ratelimit_max_keys: usize,
    /// Mutual TLS to meshed endpoints, when this proxy has an identity.
    pub tls: Option<Arc<MeshTls>>,
}

impl Default for Settings {
    /// The same values as remora-proxy's flag defaults.
    fn default() -> Settings {
        Settings {
            pool: PoolConfig {
                connect_timeout: Duration::from_secs(1),
                pending_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(90),
                max_connections: 1024,
                max_pending: 1024,
            },
            outlier: OutlierConfig {
                consecutive_failures: 5,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(300),
            },
            namespace: remora_proto::DEFAULT_NAMESPACE.into(),
            default_budget: BudgetParams {
                percent: 20.0,
                min_per_sec: 10,
                window: Duration::from_secs(10),
            },
            max_route_rules: 100_000,
            service: None,
            ratelimit_max_keys: crate::ratelimit::DEFAULT_MAX_KEYS,
            tls: None,
        }
    }
}

/// Why a validated config could not be compiled (validation catches what a
/// user writes; these are what it cannot see, e.g. a proxy-side limit).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("Service {service}: {what}")]
    Service { service: ObjectRef, what: String },
    #[error("{rule}: {what}")]
    Route { rule: String, what: String },
    #[error("RateLimitPolicy {policy}: {what}")]
    Policy { policy: ObjectRef, what: String },
    #[error("Service {service}: {what}")]
    Local { service: ObjectRef, what: String },
    #[error("config has {rules} route rules; this proxy allows at most {max} (--max-route-rules)")]
    TooManyRules { rules: usize, max: usize },
}

/// A config `remora_proto::prepare` accepted (defaults filled, every
/// resource checked): the only input `compile` takes.
pub struct Validated(Config);

impl Validated {
    /// Validates `cfg` (and fills its defaults).
    pub fn prepare(cfg: Config) -> Result<Validated, ValidationErrors> {
        remora_proto::prepare(cfg).map(Validated)
    }

    pub fn config(&self) -> &Config {
        &self.0
    }

    pub fn into_inner(self) -> Config {
        self.0
    }
}
