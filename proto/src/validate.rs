//! Validation: the one place that decides whether a config may take effect.
//! `prepare` fills defaults and checks every resource; any error means the
//! whole config is refused. Each error names the resource and the field path
//! (relative to `spec`, as in `rules[1].backendRefs[0].weight`).

use crate::duration;
use crate::model::*;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// Largest weight a backendRef may carry (Gateway API).
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Upper bound on retries per request: more is a retry storm by design.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Bound on compiled regex size, so a config cannot exhaust memory.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// Declared port protocols; an empty one is detected per connection.
pub const PROTOCOLS: &[&str] = &["http", "http2", "grpc", "tcp"];
/// MeshConfig encodedSlashes values.
pub const ENCODED_SLASHES: &[&str] = &["Reject", "PassThrough"];
/// Most extra upgrade protocols a rule may allow.
pub const MAX_UPGRADES: usize = 8;
/// Headers the client identity header may not be: they mean something to
/// HTTP or to the proxy, and setting them would change the request.
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "authorization",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-remora-orig-proto",
];

/// Most virtual addresses a Service may have.
pub const MAX_ADDRESSES: usize = 16;
/// MeshConfig outboundTrafficPolicy values.
pub const OUTBOUND_POLICIES: &[&str] = &["AllowAny", "RegistryOnly"];
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// One problem with one field of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// `Kind namespace/name`
    pub resource: String,
    /// Path below the resource's spec (or `metadata.name`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.resource, self.field, self.message)
    }
}

/// Every problem found in a config; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Fills defaults (namespaces, kinds) and validates. Returns the config
/// ready to compile, or every error found.
pub fn prepare(mut cfg: Config) -> Result<Config, ValidationErrors> {
    normalize(&mut cfg);
    check(&View::of(&cfg), None)?;
    Ok(cfg)
}

/// A config's resources by reference: what `check` validates. A config
/// held as shared resources (the proxy keeps what did not change between
/// two snapshots) is checked without being copied into a `Config`.
#[derive(Default)]
pub struct View<'a> {
    pub services: Vec<&'a Service>,
    pub http_routes: Vec<&'a HttpRoute>,
    pub rate_limit_policies: Vec<&'a RateLimitPolicy>,
    pub authorization_policies: Vec<&'a AuthorizationPolicy>,
    pub mesh_configs: Vec<&'a MeshConfig>,
}

impl<'a> View<'a> {
    pub fn of(cfg: &'a Config) -> View<'a> {
        View {
            services: cfg.services.iter().collect(),
            http_routes: cfg.http_routes.iter().collect(),
            rate_limit_policies: cfg.rate_limit_policies.iter().collect(),
            authorization_policies: cfg.authorization_policies.iter().collect(),
            mesh_configs: cfg.mesh_configs.iter().collect(),
        }
    }
}

/// Resources that passed `check` before, by position in the `View`, and
/// the context they passed in. A resource's own checks (fields, regexes,
/// references) depend only on the resource and on which Services (with
/// their ports) and HTTPRoutes exist: while that context is the same, a
/// known resource is not checked again. Checks across resources (names
/// defined twice, addresses, one MeshConfig) always run.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// What `check` returned for the config these resources passed in.
    pub context: u64,
    pub services: Vec<bool>,
    pub http_routes: Vec<bool>,
    pub rate_limit_policies: Vec<bool>,
    pub authorization_policies: Vec<bool>,
}

/// Validates a normalized config. Returns the fingerprint of its context
/// (Services with their ports, HTTPRoute names) for a later `Known`, or
/// every error found.
pub fn check(view: &View, known: Option<&Known>) -> Result<u64, ValidationErrors> {
    let mut v = Validator::default();
    let context = v.config(view, known);
    if v.errors.is_empty() {
        Ok(context)
    } else {
        Err(ValidationErrors(v.errors))
    }
}

/// `namespace/name` for a reference written `name` (in `ns`) or `namespace/name`.
pub fn qualify(ns: &str, reference: &str) -> String {
    if reference.contains('/') {
        reference.to_string()
    } else {
        format!("{ns}/{reference}")
    }
}

/// Fills defaults: namespaces, kinds, target ports (an empty protocol
/// stays empty: it means "detect"). `prepare`
/// calls it; the control plane also calls it on partial resource sets so
/// they key the same way as the running config.
pub fn normalize(cfg: &mut Config) {
    cfg.services.iter_mut().for_each(normalize_service);
    cfg.rate_limit_policies
        .iter_mut()
        .for_each(normalize_rate_limit_policy);
    cfg.mesh_configs.iter_mut().for_each(normalize_mesh_config);
    cfg.authorization_policies
        .iter_mut()
        .for_each(normalize_authorization_policy);
    cfg.http_routes.iter_mut().for_each(normalize_route);
}

/// The resource's namespace, defaulted.
fn default_namespace(meta: &mut Option<Metadata>) -> String {
    let m = meta.get_or_insert_with(Default::default);
    if m.namespace.is_empty() {
        m.namespace = crate::DEFAULT_NAMESPACE.to_string();
    }
    m.namespace.clone()
}

pub fn normalize_service(s: &mut Service) {
    default_namespace(&mut s.metadata);
    s.kind = "Service".into();
    for p in s.spec.get_or_insert_with(Default::default).ports.iter_mut() {
        if p.target_port == 0 {
            p.target_port = p.port;
        }
    }
}

pub fn normalize_rate_limit_policy(p: &mut RateLimitPolicy) {
    let policy_ns = default_namespace(&mut p.metadata);
    p.kind = "RateLimitPolicy".into();
    let spec = p.spec.get_or_insert_with(Default::default);
    let t = spec.target_ref.get_or_insert_with(Default::default);
    if t.kind.is_empty() {
        t.kind = "Service".into();
    }
    if t.namespace.is_empty() {
        t.namespace = policy_ns;
    }
    if t.kind == "HTTPRoute" && spec.direction.is_empty() {
        spec.direction = "outbound".into();
    }
    if spec.direction.is_empty() {
        spec.direction = "inbound".into();
    }
    for l in &mut spec.limits {
        if l.per.is_empty() {
            l.per = "second".into();
        }
        if l.scope.is_empty() {
            l.scope = "Local".into();
        }
    }
}

pub fn normalize_mesh_config(m: &mut MeshConfig) {
    default_namespace(&mut m.metadata);
    m.kind = "MeshConfig".into();
    m.spec.get_or_insert_with(Default::default);
}

pub fn normalize_authorization_policy(p: &mut AuthorizationPolicy) {
    let policy_ns = default_namespace(&mut p.metadata);
    p.kind = "AuthorizationPolicy".into();
    let spec = p.spec.get_or_insert_with(Default::default);
    let t = spec.target_ref.get_or_insert_with(Default::default);
    if t.kind.is_empty() {
        t.kind = "Service".into();
    }
    if t.namespace.is_empty() {
        t.namespace = policy_ns;
    }
}

pub fn normalize_route(r: &mut HttpRoute) {
    let route_ns = default_namespace(&mut r.metadata);
    r.kind = "HTTPRoute".into();
    let spec = r.spec.get_or_insert_with(Default::default);
    for p in &mut spec.parent_refs {
        if p.kind.is_empty() {
            p.kind = "Service".into();
        }
        if p.namespace.is_empty() {
            p.namespace = route_ns.clone();
        }
    }
    let fill = |b: &mut BackendRef| {
        if b.kind.is_empty() {
            b.kind = "Service".into();
        }
        if b.namespace.is_empty() {
            b.namespace = route_ns.clone();
        }
    };
    for rule in &mut spec.rules {
        rule.backend_refs.iter_mut().for_each(fill);
        for f in &mut rule.filters {
            if let Some(b) = f
                .request_mirror
                .as_mut()
                .and_then(|m| m.backend_ref.as_mut())
            {
                fill(b);
            }
        }
    }
}

/// A resource by namespace and name, borrowed from the config.
type Id<'a> = (&'a str, &'a str);
/// Service ports by Service.
type ServicePorts<'a> = foldhash::HashMap<Id<'a>, Vec<u32>>;

fn id_of(meta: Option<&Metadata>) -> Id<'_> {
    meta.map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()))
}

#[derive(Default)]
struct Validator<'a> {
    errors: Vec<ValidationError>,
    /// The resource being checked: its kind and metadata. Named in an
    /// error only, so that a valid config formats no names.
    kind: &'static str,
    meta: Option<&'a Metadata>,
}

impl<'a> Validator<'a> {
    fn at(&mut self, kind: &'static str, meta: Option<&'a Metadata>) {
        self.kind = kind;
        self.meta = meta;
    }

    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            resource: format!("{} {}", self.kind, crate::resource_id(self.meta)),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Checks every resource (but the known ones); returns the context
    /// fingerprint.
    fn config(&mut self, cfg: &View<'a>, known: Option<&Known>) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        // Service ports and route names, for reference checks, and the
        // context fingerprint over them (a fixed seed: fingerprints are
        // compared across applies).
        let mut ctx = foldhash::fast::FixedState::with_seed(0x5265_6d6f_7261).build_hasher();
        let mut services: ServicePorts<'a> =
            HashMap::with_capacity_and_hasher(cfg.services.len(), Default::default());
        for s in &cfg.services {
            let id = id_of(s.metadata.as_ref());
            let ports: Vec<u32> = s
                .spec
                .iter()
                .flat_map(|sp| sp.ports.iter().map(|p| p.port))
                .collect();
            (id, &ports).hash(&mut ctx);
            services.insert(id, ports);
        }
        let routes: foldhash::HashSet<Id<'a>> = cfg
            .http_routes
            .iter()
            .map(|r| id_of(r.metadata.as_ref()))
            .collect();
        for r in &cfg.http_routes {
            id_of(r.metadata.as_ref()).hash(&mut ctx);
        }
        let context = ctx.finish();
        let known = known.filter(|k| k.context == context);
        let is_known = |list: Option<&Vec<bool>>, i: usize| -> bool {
            list.and_then(|l| l.get(i)).copied().unwrap_or(false)
        };

        let mut seen: foldhash::HashSet<(&'static str, Id<'a>)> = HashSet::with_capacity_and_hasher(
            cfg.services.len() + cfg.http_routes.len(),
            Default::default(),
        );
        for (i, s) in cfg.services.iter().enumerate() {
            self.at("Service", s.metadata.as_ref());
            if !seen.insert(("Service", id_of(s.metadata.as_ref()))) {
                self.err("metadata.name", "defined twice");
            }
            if is_known(known.map(|k| &k.services), i) {
                continue;
            }
            self.metadata(s.metadata.as_ref());
            self.service(s.spec.as_ref().expect("normalized"));
            let calls = s.spec.as_ref().map(|sp| sp.calls.as_slice()).unwrap_or(&[]);
            let ns = s.metadata.as_ref().map_or("", |m| m.namespace.as_str());
            self.calls(ns, calls, &services);
        }
        for (i, r) in cfg.http_routes.iter().enumerate() {
            self.at("HTTPRoute", r.metadata.as_ref());
            if !seen.insert(("HTTPRoute", id_of(r.metadata.as_ref()))) {
                self.err("metadata.name", "defined twice");
            }
            if is_known(known.map(|k| &k.http_routes), i) {
                continue;
            }
            self.metadata(r.metadata.as_ref());
            self.route(r.spec.as_ref().expect("normalized"), &services);
        }
        for (i, p) in cfg.rate_limit_policies.iter().enumerate() {
            self.at("RateLimitPolicy", p.metadata.as_ref());
            if !seen.insert(("RateLimitPolicy", id_of(p.metadata.as_ref()))) {
                self.err("metadata.name", "defined twice");
            }
            if is_known(known.map(|k| &k.rate_limit_policies), i) {
                continue;
            }
            self.metadata(p.metadata.as_ref());
            self.rate_limit_policy(p.spec.as_ref().expect("normalized"), &services, &routes);
        }
        for (i, p) in cfg.authorization_policies.iter().enumerate() {
            self.at("AuthorizationPolicy", p.metadata.as_ref());
            if !seen.insert(("AuthorizationPolicy", id_of(p.metadata.as_ref()))) {
                self.err("metadata.name", "defined twice");
            }
            if is_known(known.map(|k| &k.authorization_policies), i) {
                continue;
            }
            self.metadata(p.metadata.as_ref());
            self.authorization_policy(p.spec.as_ref().expect("normalized"), &services, &routes);
        }
        self.mesh_configs(&cfg.mesh_configs);
        self.addresses(&cfg.services);
        context
    }

    /// At most one MeshConfig, with known values.
    fn mesh_configs(&mut self, all: &[&'a MeshConfig]) {
        for (i, m) in all.iter().enumerate() {
            self.at("MeshConfig", m.metadata.as_ref());
            if i > 0 {
                self.err(
                    "metadata.name",
                    "a mesh has one MeshConfig; another one is already defined",
                );
            }
            self.metadata(m.metadata.as_ref());
            let spec = m.spec.as_ref().expect("normalized");
            let policy = spec.outbound_traffic_policy.as_str();
            if !policy.is_empty() && !OUTBOUND_POLICIES.contains(&policy) {
                self.err(
                    "outboundTrafficPolicy",
                    format!("{policy:?} is not one of {}", OUTBOUND_POLICIES.join(", ")),
                );
            }
            let slashes = spec.encoded_slashes.as_str();
            if !slashes.is_empty() && !ENCODED_SLASHES.contains(&slashes) {
                self.err(
                    "encodedSlashes",
                    format!("{slashes:?} is not one of {}", ENCODED_SLASHES.join(", ")),
                );
            }
        }
    }

    /// Virtual addresses are IPs, and no address:port belongs to two Services.
    fn addresses(&mut self, services: &[&'a Service]) {
        let mut owner: HashMap<(std::net::IpAddr, u32), Id<'a>> = HashMap::new();
        for s in services {
            let spec = s.spec.as_ref().expect("normalized");
            if spec.addresses.is_empty() {
                continue;
            }
            let id = id_of(s.metadata.as_ref());
            self.at("Service", s.metadata.as_ref());
            if spec.addresses.len() > MAX_ADDRESSES {
                self.err(
                    "addresses",
                    format!("at most {MAX_ADDRESSES} addresses per Service"),
                );
            }
            for (i, a) in spec.addresses.iter().enumerate() {
                let Ok(ip) = a.parse::<std::net::IpAddr>() else {
                    self.err(
                        format!("addresses[{i}]"),
                        format!("{a:?} is not an IP address"),
                    );
                    continue;
                };
                if ip.is_unspecified() || ip.is_loopback() {
                    self.err(
                        format!("addresses[{i}]"),
                        format!("{a} cannot be a Service address"),
                    );
                    continue;
                }
                for p in &spec.ports {
                    match owner.get(&(ip, p.port)) {
                        Some(other) if *other != id => self.err(
                            format!("addresses[{i}]"),
                            format!(
                                "{ip}:{} is also an address of Service {}/{}",
                                p.port, other.0, other.1
                            ),
                        ),
                        _ => {
                            owner.insert((ip, p.port), id);
                        }
                    }
                }
            }
        }
    }

    /// A policy's target exists and is a Service or an HTTPRoute.
    fn target_ref(
        &mut self,
        t: Option<&PolicyTargetRef>,
        services: &ServicePorts,
        routes: &foldhash::HashSet<Id>,
    ) {
        let empty = PolicyTargetRef::default();
        let t = t.unwrap_or(&empty);
        let id = (t.namespace.as_str(), t.name.as_str());
        let target = format_args!("{}/{}", t.namespace, t.name);
        match t.kind.as_str() {
            "Service" if !services.contains_key(&id) => {
                self.err("targetRef.name", format!("Service {target} is not defined"))
            }
            "HTTPRoute" if !routes.contains(&id) => self.err(
                "targetRef.name",
                format!("HTTPRoute {target} is not defined"),
            ),
            "Service" | "HTTPRoute" => {}
            other => self.err(
                "targetRef.kind",
                format!("{other:?} is not one of Service, HTTPRoute"),
            ),
        }
    }

    fn rate_limit_policy(
        &mut self,
        spec: &RateLimitPolicySpec,
        services: &ServicePorts,
        routes: &foldhash::HashSet<Id>,
    ) {
        self.target_ref(spec.target_ref.as_ref(), services, routes);
        let t = spec.target_ref.clone().unwrap_or_default();
        match spec.direction.as_str() {
            "inbound" if t.kind == "HTTPRoute" => self.err(
                "direction",
                "an HTTPRoute runs on the callers' proxies: only outbound applies",
            ),
            "inbound" | "outbound" => {}
            other => self.err(
                "direction",
                format!("{other:?} is not one of inbound, outbound"),
            ),
        }
        if spec.limits.is_empty() {
            self.err("limits", "at least one limit is required");
        }
        let mut names = HashSet::new();
        for (i, l) in spec.limits.iter().enumerate() {
            let f = format!("limits[{i}]");
            if l.name.is_empty() {
                self.err(format!("{f}.name"), "is required");
            } else if !names.insert(l.name.as_str()) {
                self.err(format!("{f}.name"), format!("{:?} is used twice", l.name));
            }
            if l.requests == 0 {
                self.err(format!("{f}.requests"), "must be at least 1");
            }
            if !["second", "minute", "hour"].contains(&l.per.as_str()) {
                self.err(
                    format!("{f}.per"),
                    format!("{:?} is not one of second, minute, hour", l.per),
                );
            }
            if l.burst == Some(0) {
                self.err(format!("{f}.burst"), "must be at least 1");
            }
            for (k, key) in l.key.iter().enumerate() {
                let kf = format!("{f}.key[{k}]");
                match key.r#type.as_str() {
                    "Total" | "ClientIdentity" | "SourceAddress" => {}
                    "Header" => {
                        if let Err(e) = header_name(&key.name) {
                            self.err(format!("{kf}.name"), e);
                        }
                    }
                    other => self.err(
                        format!("{kf}.type"),
                        format!(
                            "{other:?} is not one of Total, ClientIdentity, Header, SourceAddress"
                        ),
                    ),
                }
            }
            for (o, ov) in l.overrides.iter().enumerate() {
                let of = format!("{f}.overrides[{o}]");
                if ov.value.is_empty() {
                    self.err(format!("{of}.value"), "is required");
                }
                if ov.requests == 0 {
                    self.err(format!("{of}.requests"), "must be at least 1");
                }
                if ov.burst == Some(0) {
                    self.err(format!("{of}.burst"), "must be at least 1");
                }
            }
            match l.scope.as_str() {
                "Local" => {}
                "Mesh" if t.kind == "Service" && spec.direction == "inbound" => {}
                "Mesh" => self.err(
                    format!("{f}.scope"),
                    "Mesh is shared by the replicas of a Service: it needs an inbound Service target",
                ),
                other => self.err(format!("{f}.scope"), format!("{other:?} is not one of Local, Mesh")),
            }
        }
    }

    fn metadata(&mut self, meta: Option<&Metadata>) {
        let Some(m) = meta else { return };
        if let Err(e) = dns_label(&m.name) {
            self.err("metadata.name", e);
        }
        if let Err(e) = dns_label(&m.namespace) {
            self.err("metadata.namespace", e);
        }
    }

    fn service(&mut self, spec: &ServiceSpec) {
        if spec.ports.is_empty() {
            self.err("ports", "at least one port is required");
        }
        let mut ports = HashSet::new();
        for (i, p) in spec.ports.iter().enumerate() {
            let f = format!("ports[{i}]");
            if p.port == 0 || p.port > 65535 {
                self.err(format!("{f}.port"), "must be 1..65535");
            } else if !ports.insert(p.port) {
                self.err(
                    format!("{f}.port"),
                    format!("port {} is listed twice", p.port),
                );
            }
            if p.target_port > 65535 {
                self.err(format!("{f}.targetPort"), "must be 1..65535");
            }
            if !p.protocol.is_empty() && !PROTOCOLS.contains(&p.protocol.as_str()) {
                self.err(
                    format!("{f}.protocol"),
                    format!("{:?} is not one of {}", p.protocol, PROTOCOLS.join(", ")),
                );
            }
        }
        for (i, e) in spec.endpoints.iter().enumerate() {
            let f = format!("endpoints[{i}]");
            if e.address.parse::<std::net::IpAddr>().is_err() {
                self.err(
                    format!("{f}.address"),
                    format!("{:?} is not an IP address", e.address),
                );
            }
            if e.port > 65535 {
                self.err(format!("{f}.port"), "must be 1..65535");
            }
        }
        if let Some(m) = &spec.mtls {
            if !["", "Strict", "Permissive", "Disabled"].contains(&m.mode.as_str()) {
                self.err(
                    "mtls.mode",
                    format!("{:?} is not one of Strict, Permissive, Disabled", m.mode),
                );
            }
            if !m.client_identity_header.is_empty() {
                if let Err(e) = header_name(&m.client_identity_header) {
                    self.err("mtls.clientIdentityHeader", e);
                } else if RESERVED_HEADERS
                    .contains(&m.client_identity_header.to_ascii_lowercase().as_str())
                {
                    self.err(
                        "mtls.clientIdentityHeader",
                        format!(
                            "{:?} means something to HTTP or to the proxy; choose another name (e.g. x-client-id)",
                            m.client_identity_header
                        ),
                    );
                }
            }
        }
        if !spec.service_account.is_empty() {
            if let Err(e) = dns_label(&spec.service_account) {
                self.err("serviceAccount", e);
            }
        }
    }

    fn authorization_policy(
        &mut self,
        spec: &AuthorizationPolicySpec,
        services: &ServicePorts,
        routes: &foldhash::HashSet<Id>,
    ) {
        self.target_ref(spec.target_ref.as_ref(), services, routes);
        for (i, f) in spec.from.iter().enumerate() {
            let field = format!("from[{i}]");
            let set = [&f.identity, &f.namespace, &f.trust_domain]
                .iter()
                .filter(|v| !v.is_empty())
                .count();
            if set != 1 {
                self.err(
                    field.clone(),
                    "set exactly one of identity, namespace, trustDomain",
                );
            }
            if !f.identity.is_empty() {
                let ok = f
                    .identity
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.split_once('/'))
                    .is_some_and(|(td, path)| !td.is_empty() && !path.is_empty());
                if !ok {
                    self.err(
                        format!("{field}.identity"),
                        format!(
                            "{:?} is not a SPIFFE ID (spiffe://<trust domain>/ns/<namespace>/sa/<account>)",
                            f.identity
                        ),
                    );
                }
            }
            if !f.namespace.is_empty() {
                if let Err(e) = dns_label(&f.namespace) {
                    self.err(format!("{field}.namespace"), e);
                }
            }
            if !f.trust_domain.is_empty()
                && (f.trust_domain.contains('/') || f.trust_domain.contains(':'))
            {
                self.err(
                    format!("{field}.trustDomain"),
                    format!("{:?} is not a trust domain name", f.trust_domain),
                );
            }
        }
    }

    fn calls(&mut self, ns: &str, calls: &[String], services: &ServicePorts) {
        for (i, c) in calls.iter().enumerate() {
            let id = c.split_once('/').unwrap_or((ns, c));
            if !services.contains_key(&id) {
                self.err(
                    format!("calls[{i}]"),
                    format!("Service {}/{} is not defined", id.0, id.1),
                );
            }
        }
    }

    fn route(&mut self, spec: &HttpRouteSpec, services: &ServicePorts) {
        if spec.parent_refs.is_empty() {
            self.err("parentRefs", "at least one parent Service is required");
        }
        for (i, p) in spec.parent_refs.iter().enumerate() {
            let f = format!("parentRefs[{i}]");
            if p.kind != "Service" {
                self.err(
                    format!("{f}.kind"),
                    format!("{:?} is not supported (Service)", p.kind),
                );
                continue;
            }
            self.service_ref(&f, &p.namespace, &p.name, p.port, false, services);
        }
        for (r, rule) in spec.rules.iter().enumerate() {
            let f = format!("rules[{r}]");
            for (m, mat) in rule.matches.iter().enumerate() {
                self.route_match(&format!("{f}.matches[{m}]"), mat);
            }
            for (k, filter) in rule.filters.iter().enumerate() {
                self.filter(&format!("{f}.filters[{k}]"), filter, services);
            }
            for (b, backend) in rule.backend_refs.iter().enumerate() {
                let bf = format!("{f}.backendRefs[{b}]");
                self.backend(&bf, backend, services);
            }
            if let Some(t) = &rule.timeouts {
                let request = self.duration(&format!("{f}.timeouts.request"), &t.request);
                let per_try =
                    self.duration(&format!("{f}.timeouts.backendRequest"), &t.backend_request);
                if let (Some(req), Some(try_)) = (request, per_try) {
                    if try_ > req {
                        self.err(
                            format!("{f}.timeouts.backendRequest"),
                            "must not be longer than timeouts.request",
                        );
                    }
                }
            }
            if let Some(retry) = &rule.retry {
                self.retry(&format!("{f}.retry"), retry);
            }
            if rule.allowed_upgrades.len() > MAX_UPGRADES {
                self.err(
                    format!("{f}.allowedUpgrades"),
                    format!("at most {MAX_UPGRADES} protocols"),
                );
            }
            for (u, proto) in rule.allowed_upgrades.iter().enumerate() {
                let uf = format!("{f}.allowedUpgrades[{u}]");
                let token = !proto.is_empty()
                    && proto.len() <= 64
                    && proto
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
                if !token {
                    self.err(uf, format!("{proto:?} is not a protocol name"));
                } else if proto.eq_ignore_ascii_case("h2c") {
                    self.err(
                        uf,
                        "h2c is never forwarded: an h2c tunnel would carry requests past routing, authorization and rate limits",
                    );
                }
            }
        }
    }

    fn route_match(&mut self, f: &str, m: &HttpRouteMatch) {
        if let Some(p) = &m.path {
            let value = if p.value.is_empty() {
                "/"
            } else {
                p.value.as_str()
            };
            match p.r#type.as_str() {
                "" | "PathPrefix" | "Exact" => {
                    if !value.starts_with('/') {
                        self.err(format!("{f}.path.value"), "must start with /");
                    }
                    if value.contains(['?', '#']) {
                        self.err(format!("{f}.path.value"), "must not contain ? or #");
                    }
                }
                "RegularExpression" => self.regex(&format!("{f}.path.value"), value),
                other => self.err(
                    format!("{f}.path.type"),
                    format!("{other:?} is not one of Exact, PathPrefix, RegularExpression"),
                ),
            }
        }
        for (i, h) in m.headers.iter().enumerate() {
            let hf = format!("{f}.headers[{i}]");
            self.kv_match(&hf, &h.r#type, &h.name, &h.value, true);
        }
        for (i, q) in m.query_params.iter().enumerate() {
            let qf = format!("{f}.queryParams[{i}]");
            self.kv_match(&qf, &q.r#type, &q.name, &q.value, false);
        }
        if !m.method.is_empty() && !METHODS.contains(&m.method.as_str()) {
            self.err(
                format!("{f}.method"),
                format!("{:?} is not an HTTP method", m.method),
            );
        }
    }

    fn kv_match(&mut self, f: &str, ty: &str, name: &str, value: &str, header: bool) {
        if header {
            if let Err(e) = header_name(name) {
                self.err(format!("{f}.name"), e);
            }
        } else if name.is_empty() {
            self.err(format!("{f}.name"), "must not be empty");
        }
        match ty {
            "" | "Exact" => {}
            "RegularExpression" => self.regex(&format!("{f}.value"), value),
            other => self.err(
                format!("{f}.type"),
                format!("{other:?} is not one of Exact, RegularExpression"),
            ),
        }
    }

    fn regex(&mut self, f: &str, pattern: &str) {
        if let Err(e) = regex::RegexBuilder::new(pattern)
            .size_limit(MAX_REGEX_BYTES)
            .build()
        {
            self.err(f, format!("invalid regular expression: {e}"));
        }
    }

    fn filter(&mut self, f: &str, filter: &HttpRouteFilter, services: &ServicePorts) {
        let (field, present) = match filter.r#type.as_str() {
            "RequestHeaderModifier" => {
                ("requestHeaderModifier", filter.request_header_modifier.is_some())
            }
            "ResponseHeaderModifier" => {
                ("responseHeaderModifier", filter.response_header_modifier.is_some())
            }
            "RequestMirror" => ("requestMirror", filter.request_mirror.is_some()),
            other => {
                return self.err(
                    format!("{f}.type"),
                    format!(
                        "{other:?} is not one of RequestHeaderModifier, ResponseHeaderModifier, RequestMirror"
                    ),
                )
            }
        };
        if !present {
            return self.err(
                format!("{f}.{field}"),
                format!("required when type is {}", filter.r#type),
            );
        }
        let headers = filter
            .request_header_modifier
            .iter()
            .chain(filter.response_header_modifier.iter())
            .next();
        if let Some(h) = headers {
            let hf = format!("{f}.{field}");
            for (list, items) in [("set", &h.set), ("add", &h.add)] {
                for (i, kv) in items.iter().enumerate() {
                    if let Err(e) = header_name(&kv.name) {
                        self.err(format!("{hf}.{list}[{i}].name"), e);
                    }
                    if kv.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                        self.err(
                            format!("{hf}.{list}[{i}].value"),
                            "must not contain CR, LF or NUL",
                        );
                    }
                }
            }
            for (i, name) in h.remove.iter().enumerate() {
                if let Err(e) = header_name(name) {
                    self.err(format!("{hf}.remove[{i}]"), e);
                }
            }
        }
        if let Some(m) = &filter.request_mirror {
            let mf = format!("{f}.requestMirror");
            match &m.backend_ref {
                Some(b) => self.backend(&format!("{mf}.backendRef"), b, services),
                None => self.err(format!("{mf}.backendRef"), "is required"),
            }
            if m.percent.is_some_and(|p| p > 100) {
                self.err(format!("{mf}.percent"), "must be at most 100");
            }
        }
    }

    fn backend(&mut self, f: &str, b: &BackendRef, services: &ServicePorts) {
        if b.kind != "Service" {
            self.err(
                format!("{f}.kind"),
                format!("{:?} is not supported (Service)", b.kind),
            );
            return;
        }
        if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
            self.err(
                format!("{f}.weight"),
                format!("must be at most {MAX_WEIGHT}"),
            );
        }
        self.service_ref(f, &b.namespace, &b.name, b.port, true, services);
    }

    fn service_ref(
        &mut self,
        f: &str,
        ns: &str,
        name: &str,
        port: u32,
        need_port: bool,
        services: &ServicePorts,
    ) {
        if name.is_empty() {
            return self.err(format!("{f}.name"), "is required");
        }
        let Some(ports) = services.get(&(ns, name)) else {
            return self.err(
                format!("{f}.name"),
                format!("Service {ns}/{name} is not defined"),
            );
        };
        if port != 0 && !ports.contains(&port) {
            self.err(
                format!("{f}.port"),
                format!("Service {ns}/{name} has no port {port}"),
            );
        } else if port == 0 && need_port && ports.len() > 1 {
            self.err(
                format!("{f}.port"),
                format!("required: Service {ns}/{name} has several ports"),
            );
        }
    }

    fn duration(&mut self, f: &str, text: &str) -> Option<std::time::Duration> {
        match duration::parse_opt(text) {
            Ok(d) => d,
            Err(e) => {
                self.err(f, e);
                None
            }
        }
    }

    fn retry(&mut self, f: &str, r: &HttpRouteRetry) {
        for (i, c) in r.codes.iter().enumerate() {
            if !(400..=599).contains(c) {
                self.err(format!("{f}.codes[{i}]"), "must be a status code 400..599");
            }
        }
        if r.attempts.is_some_and(|a| a > MAX_RETRY_ATTEMPTS) {
            self.err(
                format!("{f}.attempts"),
                format!("must be at most {MAX_RETRY_ATTEMPTS}"),
            );
        }
        self.duration(&format!("{f}.backoff"), &r.backoff);
        if let Some(b) = &r.budget {
            if b.percent.is_some_and(|p| !(0.0..=1000.0).contains(&p)) {
                self.err(format!("{f}.budget.percent"), "must be 0..1000");
            }
            if !b.interval.is_empty() {
                match duration::parse(&b.interval) {
                    Ok(d)
                        if d < std::time::Duration::from_secs(1)
                            || d > std::time::Duration::from_secs(60) =>
                    {
                        self.err(format!("{f}.budget.interval"), "must be 1s..60s")
                    }
                    Ok(_) => {}
                    Err(e) => self.err(format!("{f}.budget.interval"), e),
                }
            }
        }
    }
}

fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be a DNS label: 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        ))
    }
}

fn header_name(s: &str) -> Result<(), String> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !s.is_empty() && s.len() <= 256 && s.bytes().all(tchar) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a valid header name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_yaml;

    const BASE: &str = r#"
kind: Service
metadata: {name: shop, namespace: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 127.0.0.1, port: 8080}]
"#;

    fn check(route: &str) -> Result<Config, ValidationErrors> {
        prepare(parse_yaml(&format!("{BASE}---\n{route}"), "t.yaml").unwrap())
    }

    #[test]
    fn weight_error_names_resource_and_field() {
        let err = check(
            r#"
kind: HTTPRoute
metadata: {name: checkout, namespace: shop}
spec:
  parentRefs: [{name: shop}]
  rules:
  - backendRefs: [{name: shop}]
  - backendRefs: [{name: shop, weight: 2000000}]
"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "HTTPRoute shop/checkout: rules[1].backendRefs[0].weight: must be at most 1000000"
        );
    }

    #[test]
    fn reports_every_error_at_once() {
        let err = check(
            r#"
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{name: nope}]
  rules:
  - matches: [{path: {type: Glob, value: /x}, method: FETCH, headers: [{name: "bad name", value: x}]}]
    timeouts: {request: 1s, backendRequest: 2s}
    retry: {codes: [200], attempts: 50, backoff: soon}
    filters: [{type: RequestMirror}]
    backendRefs: [{name: shop, port: 81}]
"#,
        )
        .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "parentRefs[0].name",
            "rules[0].matches[0].path.type",
            "rules[0].matches[0].headers[0].name",
            "rules[0].matches[0].method",
            "rules[0].filters[0].requestMirror",
            "rules[0].backendRefs[0].port",
            "rules[0].timeouts.backendRequest",
            "rules[0].retry.codes[0]",
            "rules[0].retry.attempts",
            "rules[0].retry.backoff",
        ] {
            assert!(fields.contains(&want), "missing {want} in {fields:?}");
        }
    }

    #[test]
    fn bad_regex_and_service_fields() {
        let err = prepare(
            parse_yaml(
                r#"
kind: Service
metadata: {name: Bad_Name}
spec:
  ports: [{port: 0, protocol: udp}]
  endpoints: [{address: not-an-ip}]
---
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: Bad_Name}]
  rules: [{matches: [{path: {type: RegularExpression, value: "(unclosed"}}]}]
"#,
                "t.yaml",
            )
            .unwrap(),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "Service default/Bad_Name: metadata.name",
            "Service default/Bad_Name: ports[0].port: must be 1..65535",
            "Service default/Bad_Name: ports[0].protocol",
            "Service default/Bad_Name: endpoints[0].address",
            "HTTPRoute default/r: rules[0].matches[0].path.value: invalid regular expression",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }

    #[test]
    fn bad_rate_limit_policies_name_the_field() {
        let err = check(
            r#"
kind: RateLimitPolicy
metadata: {name: limits, namespace: shop}
spec:
  targetRef: {name: shop}
  limits:
  - {name: zero, requests: 0}
  - {name: badkey, requests: 5, key: [{type: Cookie}]}
  - {name: noburst, requests: 5, burst: 0, per: fortnight}
  - {name: mesh-out, requests: 5, scope: Galaxy}
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "RateLimitPolicy shop/limits: limits[0].requests: must be at least 1",
            "RateLimitPolicy shop/limits: limits[1].key[0].type: \"Cookie\" is not one of",
            "RateLimitPolicy shop/limits: limits[2].burst: must be at least 1",
            "RateLimitPolicy shop/limits: limits[2].per:",
            "RateLimitPolicy shop/limits: limits[3].scope:",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let ok = check(
            "kind: RateLimitPolicy\nmetadata: {name: l, namespace: shop}\nspec:\n  targetRef: {name: shop}\n  limits: [{name: all, requests: 10, scope: Mesh, key: [{type: Header, name: x-user}]}]\n",
        )
        .unwrap();
        let spec = ok.rate_limit_policies[0].spec.as_ref().unwrap();
        assert_eq!(
            (spec.direction.as_str(), spec.limits[0].per.as_str()),
            ("inbound", "second")
        );
    }

    #[test]
    fn bad_mtls_and_authorization_policies_name_the_field() {
        let err = check(
            r#"
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 80}]
  mtls: {mode: Sometimes, clientIdentityHeader: "bad header"}
  serviceAccount: Not_A_Label
---
kind: AuthorizationPolicy
metadata: {name: callers, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: nowhere}
  from:
  - {identity: "https://x/y"}
  - {namespace: ops, trustDomain: mesh.local}
  - {}
  - {namespace: Ops}
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "Service shop/api: mtls.mode: \"Sometimes\" is not one of Strict, Permissive, Disabled",
            "Service shop/api: mtls.clientIdentityHeader:",
            "Service shop/api: serviceAccount:",
            "AuthorizationPolicy shop/callers: targetRef.name: HTTPRoute shop/nowhere is not defined",
            "AuthorizationPolicy shop/callers: from[0].identity: \"https://x/y\" is not a SPIFFE ID",
            "AuthorizationPolicy shop/callers: from[1]: set exactly one of",
            "AuthorizationPolicy shop/callers: from[2]: set exactly one of",
            "AuthorizationPolicy shop/callers: from[3].namespace:",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let ok = check(
            "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  targetRef: {name: shop}\n  from: [{identity: 'spiffe://mesh.local/ns/web/sa/web'}, {trustDomain: mesh.local}]\n",
        )
        .unwrap();
        let t = ok.authorization_policies[0]
            .spec
            .as_ref()
            .unwrap()
            .target_ref
            .clone()
            .unwrap();
        assert_eq!((t.kind.as_str(), t.namespace.as_str()), ("Service", "shop"));
    }

    #[test]
    fn mesh_config_and_service_addresses() {
        let svc = "kind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n  addresses: [10.96.0.10]\n---\n";
        let ok = format!("{svc}kind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{outboundTrafficPolicy: RegistryOnly}}\n");
        let cfg = check(&ok).unwrap();
        assert_eq!(
            cfg.mesh_configs[0]
                .spec
                .as_ref()
                .unwrap()
                .outbound_traffic_policy,
            "RegistryOnly"
        );

        let bad = format!("{svc}kind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{outboundTrafficPolicy: Open}}\n---\nkind: MeshConfig\nmetadata: {{name: other}}\n");
        let errs = check(&bad).unwrap_err().to_string();
        assert!(errs.contains("MeshConfig default/mesh: outboundTrafficPolicy: \"Open\" is not one of AllowAny, RegistryOnly"), "{errs}");
        assert!(
            errs.contains("MeshConfig default/other: metadata.name: a mesh has one MeshConfig"),
            "{errs}"
        );

        let clash = format!("{svc}kind: Service\nmetadata: {{name: b}}\nspec:\n  ports: [{{port: 80}}]\n  addresses: [10.96.0.10, not-an-ip, 127.0.0.1]\n");
        let errs = check(&clash).unwrap_err().to_string();
        assert!(errs.contains("Service default/b: addresses[0]: 10.96.0.10:80 is also an address of Service default/a"), "{errs}");
        assert!(
            errs.contains("addresses[1]: \"not-an-ip\" is not an IP address"),
            "{errs}"
        );
        assert!(
            errs.contains("addresses[2]: 127.0.0.1 cannot be a Service address"),
            "{errs}"
        );
    }

    #[test]
    fn upgrades_identity_header_and_encoded_slashes_are_checked() {
        let route = |upgrades: &str| {
            format!("kind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: shop}}]\n  rules: [{{allowedUpgrades: [{upgrades}]}}]\n")
        };
        assert!(check(&route("websocket, my-proto/1")).is_ok());
        let errs = check(&route("H2C")).unwrap_err().to_string();
        assert!(
            errs.contains("rules[0].allowedUpgrades[0]: h2c is never forwarded"),
            "{errs}"
        );
        let errs = check(&route("'a b'")).unwrap_err().to_string();
        assert!(errs.contains("is not a protocol name"), "{errs}");

        let svc = |h: &str| {
            format!("kind: Service\nmetadata: {{name: x}}\nspec:\n  ports: [{{port: 80}}]\n  mtls: {{clientIdentityHeader: {h}}}\n")
        };
        assert!(check(&svc("x-client-id")).is_ok());
        for h in [
            "Host",
            "content-length",
            "Connection",
            "x-remora-orig-proto",
        ] {
            let errs = check(&svc(h)).unwrap_err().to_string();
            assert!(
                errs.contains("mtls.clientIdentityHeader") && errs.contains("means something"),
                "{h}: {errs}"
            );
        }

        let mesh = |v: &str| {
            format!("kind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{encodedSlashes: {v}}}\n")
        };
        assert!(check(&mesh("PassThrough")).is_ok());
        let errs = check(&mesh("Decode")).unwrap_err().to_string();
        assert!(
            errs.contains("encodedSlashes: \"Decode\" is not one of Reject, PassThrough"),
            "{errs}"
        );
    }

    #[test]
    fn valid_config_fills_defaults() {
        let cfg = check(
            "kind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: shop}]\n  rules: [{backendRefs: [{name: shop}]}]\n",
        )
        .unwrap();
        let svc = &cfg.services[0].spec.as_ref().unwrap().ports[0];
        // An undeclared protocol stays empty: detected per connection.
        assert_eq!((svc.protocol.as_str(), svc.target_port), ("", 80));
        let b = &cfg.http_routes[0].spec.as_ref().unwrap().rules[0].backend_refs[0];
        assert_eq!(b.namespace, "shop");
    }
}
