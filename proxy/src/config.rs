//! What a config compiles with and into what it can fail: the validated
//! config (`Validated`, the only input the compilers take), the proxy-wide
//! settings from flags, and `CompileError`. Every per-concept compiler
//! (`cluster`, `ratelimit`, `route`, `authz`) depends on this module and
//! none on `runtime`, which only puts them in order.

use crate::balance::OutlierConfig;
use crate::pool::PoolConfig;
use crate::retry::BudgetParams;
use crate::snapshot::{DecodeCache, Resources};
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

/// A config that passed validation (defaults filled, every resource
/// checked): the only input `compile` takes.
pub struct Validated {
    resources: Resources,
    /// What the next snapshot's incremental decode reuses (empty for a
    /// config from a file).
    cache: DecodeCache,
}

/// Why a config was refused before compiling.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] crate::snapshot::DecodeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

impl Validated {
    /// Validates `cfg` (and fills its defaults): a config from a file.
    pub fn prepare(cfg: Config) -> Result<Validated, ValidationErrors> {
        let cfg = remora_proto::prepare(cfg)?;
        Ok(Validated {
            resources: Resources::from_config(cfg),
            cache: DecodeCache::default(),
        })
    }

    /// Decodes and validates a snapshot's encoded config, reusing (and not
    /// checking again) every resource `prev` already had.
    pub fn from_snapshot(
        encoded: &bytes::Bytes,
        prev: &DecodeCache,
        s: &Settings,
    ) -> Result<Validated, PrepareError> {
        let d = crate::snapshot::decode(encoded, prev)?;
        check_rule_count(d.resources.route_rules(), s)?;
        let context = remora_proto::validate::check(&d.resources.view(), Some(&d.known))?;
        let mut cache = d.cache;
        cache.set_context(context);
        Ok(Validated {
            resources: d.resources,
            cache,
        })
    }

    /// Shares every resource that equals the running one's (see
    /// `Resources::adopt`): for a config parsed again from a file.
    pub fn adopt(mut self, running: &Resources) -> Validated {
        self.resources.adopt(running);
        self
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    pub fn into_parts(self) -> (Resources, DecodeCache) {
        (self.resources, self.cache)
    }
}

/// Refuses more route rules than `--max-route-rules` (cheap: callers run
/// it before validating).
pub fn check_rule_count(rules: usize, s: &Settings) -> Result<(), CompileError> {
    if rules > s.max_route_rules {
        return Err(CompileError::TooManyRules {
            rules,
            max: s.max_route_rules,
        });
    }
    Ok(())
}
