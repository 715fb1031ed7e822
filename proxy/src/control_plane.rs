//! The control plane's replicas, and the gRPC channel to one of them,
//! shared by the two clients that use them: `identity` (certificates) and
//! `discovery` (config). Neither depends on the other.
//!
//! `--control-plane` is a list: comma-separated URLs, each naming one
//! replica or a name that resolves to several (a Kubernetes headless
//! Service). Before each round of connection attempts every name is
//! resolved again (replicas come and go with their pod addresses), and the
//! addresses are tried in random order, so a fleet of proxies spreads over
//! the replicas and the proxies of a replica that dies spread over the
//! others instead of landing on one. The replica a client used last is
//! tried first; one that just failed is tried last. TLS is verified against
//! the URL's host, whichever address it resolved to: the replica's
//! certificate must name it.

use arc_swap::ArcSwapOption;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Most addresses in `--control-plane`, and most tried in one round. A
/// round tries every address before it backs off, each bounded by the
/// connect timeout (3 s), so 16 unreachable replicas already hold a proxy
/// for most of a minute; a name that by mistake resolves to hundreds of
/// addresses (another workload's headless Service) must not make every
/// sidecar sweep them all. Replicas are stateless and each holds thousands
/// of streams: a control plane needs three, not dozens.
pub const MAX_REPLICAS: usize = 16;

/// How long resolving one name may take before the round goes on without it.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One entry of `--control-plane`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    /// As given (for logs), without a trailing slash.
    url: Arc<str>,
    https: bool,
    /// The host: a DNS name, or an IP without brackets.
    host: String,
    port: u16,
}

/// The control plane: every address it was given, and the replica that
/// answered last.
#[derive(Debug)]
pub struct ControlPlane {
    targets: Vec<Target>,
    https: bool,
    /// The replica either client reached last; tried first in the next round.
    last_good: ArcSwapOption<SocketAddr>,
}

/// One address of one replica, resolved for a round of attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The `--control-plane` URL it came from.
    pub url: Arc<str>,
    /// The address connected to.
    pub addr: SocketAddr,
    /// The name its certificate is verified against (the URL's host).
    pub server_name: String,
    pub https: bool,
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)
    }
}

impl ControlPlane {
    /// Parses `--control-plane`: comma-separated http:// or https:// URLs,
    /// all of the same scheme, at most `MAX_REPLICAS`. A URL listed twice
    /// counts once.
    pub fn parse(list: &str) -> Result<ControlPlane, String> {
        let mut targets: Vec<Target> = Vec::new();
        for item in list.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!("--control-plane {list:?}: an empty entry"));
            }
            let t = parse_url(item)?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.len() > MAX_REPLICAS {
            return Err(format!(
                "--control-plane: {} addresses, at most {MAX_REPLICAS} (every one is tried before backing off; list a name that resolves to the replicas instead)",
                targets.len()
            ));
        }
        let https = targets[0].https;
        if let Some(other) = targets.iter().find(|t| t.https != https) {
            return Err(format!(
                "--control-plane: {} and {} mix http and https; every address must use the same scheme (a mixed list lets whoever can block the https replicas move this proxy to plaintext)",
                targets[0].url, other.url
            ));
        }
        Ok(ControlPlane {
            targets,
            https,
            last_good: ArcSwapOption::empty(),
        })
    }

    /// Whether the control plane is reached over TLS (all or none of it).
    pub fn https(&self) -> bool {
        self.https
    }

    /// The URLs as given.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| &*t.url)
    }

    /// The list as one string, for logs.
    pub fn describe(&self) -> String {
        self.urls().collect::<Vec<_>>().join(",")
    }

    /// The addresses to try this round: every name resolved now, in random
    /// order, the replica that answered last first and `avoid` (the one
    /// that just failed) last, at most `MAX_REPLICAS`. A name that does not
    /// resolve is logged and left out; the round may be empty.
    pub async fn replicas(&self, avoid: Option<SocketAddr>) -> Vec<Replica> {
        let mut found = Vec::new();
        for t in &self.targets {
            for addr in resolve(t).await {
                if !found.iter().any(|r: &Replica| r.addr == addr) {
                    found.push(Replica {
                        url: t.url.clone(),
                        addr,
                        server_name: t.host.clone(),
                        https: t.https,
                    });
                }
            }
        }
        let prefer = self.last_good.load().as_deref().copied();
        order(found, prefer, avoid, &mut fastrand::Rng::new())
    }

    /// `replica` answered: the next round tries it first.
    pub fn answered(&self, replica: &Replica) {
        self.last_good.store(Some(Arc::new(replica.addr)));
    }

    /// `replica` failed: no longer tried first.
    pub fn failed(&self, replica: &Replica) {
        if self.last_good.load().as_deref() == Some(&replica.addr) {
            self.last_good.store(None);
        }
    }
}

fn parse_url(item: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("--control-plane {item:?}: {why}");
    let uri: http::Uri = item
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("expected an http:// or https:// URL")),
    };
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Err(bad("no host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Target {
        url: Arc::from(item.trim_end_matches('/')),
        https,
        host: host.to_string(),
        port,
    })
}

/// A target's addresses now: its IP, or what its name resolves to.
async fn resolve(t: &Target) -> Vec<SocketAddr> {
    if let Ok(ip) = t.host.parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, t.port)];
    }
    let lookup = tokio::net::lookup_host((t.host.as_str(), t.port));
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            warn!(url = %t.url, error = %e, "control-plane name does not resolve");
            vec![]
        }
        Err(_) => {
            warn!(url = %t.url, timeout = ?RESOLVE_TIMEOUT, "control-plane name did not resolve in time");
            vec![]
        }
    }
}

/// Shuffled, `prefer` first, `avoid` last, at most `MAX_REPLICAS`.
fn order(
    mut replicas: Vec<Replica>,
    prefer: Option<SocketAddr>,
    avoid: Option<SocketAddr>,
    rng: &mut fastrand::Rng,
) -> Vec<Replica> {
    rng.shuffle(&mut replicas);
    if let Some(i) = replicas
        .iter()
        .position(|r| Some(r.addr) == prefer && prefer != avoid)
    {
        let r = replicas.remove(i);
        replicas.insert(0, r);
    }
    if let Some(i) = replicas.iter().position(|r| Some(r.addr) == avoid) {
        let r = replicas.remove(i);
        replicas.push(r);
    }
    replicas.truncate(MAX_REPLICAS);
    replicas
}

/// Refusals of this proxy's own credentials or request, which every
/// replica gives alike: the next replica is not asked in the same round.
/// Anything else (Unavailable, a reset, a replica at its connection cap, an
/// internal error) may be the replica's own trouble, so the next is tried.
pub fn is_definitive(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
    )
}

/// The endpoint of one replica: connects to its address, names the URL's
/// host in requests and, for https, verifies the replica's certificate
/// against that host (SNI too) with `roots` (PEM: `--control-plane-ca`,
/// and the mesh's current trust bundle, so a root rotation carries over),
/// presenting a client certificate (chain PEM, key PEM) when given.
pub fn endpoint(
    replica: &Replica,
    roots: &[&str],
    client: Option<(&str, &str)>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let scheme = if replica.https { "https" } else { "http" };
    let mut e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", replica.addr))?;
    // The authority the requests carry: the name, not the address.
    let authority = match replica.server_name.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", replica.addr.port()),
        _ => format!("{}:{}", replica.server_name, replica.addr.port()),
    };
    if let Ok(origin) = format!("{scheme}://{authority}").parse::<http::Uri>() {
        e = e.origin(origin);
    }
    if replica.https {
        let mut tls =
            tonic::transport::ClientTlsConfig::new().domain_name(replica.server_name.clone());
        for ca in roots {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((chain, key)) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        e = e.tls_config(tls)?;
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(addr: &str) -> Replica {
        Replica {
            url: Arc::from("https://cp:4200"),
            addr: addr.parse().unwrap(),
            server_name: "cp".into(),
            https: true,
        }
    }

    #[test]
    fn parses_a_list_of_urls() {
        let cp = ControlPlane::parse(
            "https://remora-control.remora-system:4200, https://10.0.0.7:4200/,https://[::1]:4200,https://cp",
        )
        .unwrap();
        assert!(cp.https());
        let t = &cp.targets;
        assert_eq!(t.len(), 4);
        assert_eq!(
            (t[0].host.as_str(), t[0].port),
            ("remora-control.remora-system", 4200)
        );
        assert_eq!(&*t[1].url, "https://10.0.0.7:4200");
        assert_eq!(t[2].host, "::1");
        assert_eq!(t[3].port, 443, "https without a port");
        assert_eq!(
            ControlPlane::parse("http://a:1,http://a:1")
                .unwrap()
                .targets
                .len(),
            1,
            "a repeated URL counts once"
        );
    }

    #[test]
    fn refuses_lists_it_cannot_use_safely() {
        for bad in [
            "",
            "http://a:1,,http://b:1",
            "a:4200",
            "ftp://a:1",
            "http://a:1,https://b:1",
            "https://",
        ] {
            assert!(ControlPlane::parse(bad).is_err(), "{bad:?} accepted");
        }
        let many: Vec<String> = (0..=MAX_REPLICAS)
            .map(|i| format!("https://10.0.0.{i}:4200"))
            .collect();
        let err = ControlPlane::parse(&many.join(",")).unwrap_err();
        assert!(err.contains("at most 16"), "{err}");
        assert!(ControlPlane::parse(&many[..MAX_REPLICAS].join(",")).is_ok());
    }

    #[test]
    fn order_tries_the_last_good_replica_first_and_the_failed_one_last() {
        let all: Vec<Replica> = (1..=5)
            .map(|i| replica(&format!("10.0.0.{i}:4200")))
            .collect();
        let (good, bad) = (all[2].addr, all[4].addr);
        for seed in 0..50 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let o = order(all.clone(), Some(good), Some(bad), &mut rng);
            assert_eq!(o.len(), 5);
            assert_eq!(o[0].addr, good);
            assert_eq!(o[4].addr, bad);
            // The one that failed is last even when it answered before.
            let o = order(all.clone(), Some(bad), Some(bad), &mut rng);
            assert_eq!(o[4].addr, bad);
        }
    }

    #[test]
    fn order_spreads_proxies_over_the_replicas() {
        let all: Vec<Replica> = (1..=3)
            .map(|i| replica(&format!("10.0.0.{i}:4200")))
            .collect();
        let mut first = std::collections::HashMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let o = order(all.clone(), None, Some(all[0].addr), &mut rng);
            *first.entry(o[0].addr).or_insert(0) += 1;
        }
        // Replica 1 failed: its proxies move to 2 and 3 alike, never to 1.
        assert!(!first.contains_key(&all[0].addr));
        assert!(
            first[&all[1].addr] > 100 && first[&all[2].addr] > 100,
            "{first:?}"
        );
    }

    #[test]
    fn order_is_bounded() {
        let all: Vec<Replica> = (0..40)
            .map(|i| replica(&format!("10.0.1.{i}:4200")))
            .collect();
        let o = order(all, None, None, &mut fastrand::Rng::with_seed(1));
        assert_eq!(o.len(), MAX_REPLICAS);
    }

    #[tokio::test]
    async fn resolves_names_and_keeps_ips() {
        let cp = ControlPlane::parse("http://127.0.0.1:4200,http://localhost:4201").unwrap();
        let r = cp.replicas(None).await;
        let addrs: Vec<String> = r.iter().map(|r| r.addr.to_string()).collect();
        assert!(addrs.contains(&"127.0.0.1:4200".to_string()), "{addrs:?}");
        assert!(
            r.iter()
                .any(|r| r.server_name == "localhost" && r.addr.port() == 4201),
            "{r:?}"
        );
        // The last good one first.
        let second = r.iter().find(|r| r.addr.port() == 4201).unwrap().clone();
        cp.answered(&second);
        assert_eq!(cp.replicas(None).await[0], second);
        cp.failed(&second);
        assert!(cp.last_good.load().is_none());
    }

    #[test]
    fn endpoint_connects_to_the_address_and_verifies_the_name() {
        let r = Replica {
            url: Arc::from("https://remora-control:4200"),
            addr: "10.0.0.9:4200".parse().unwrap(),
            server_name: "remora-control".into(),
            https: true,
        };
        let e = endpoint(&r, &[], None).unwrap();
        assert_eq!(e.uri().to_string(), "https://10.0.0.9:4200/");
        let plain = Replica {
            https: false,
            addr: "[::1]:4200".parse().unwrap(),
            server_name: "::1".into(),
            ..r
        };
        assert_eq!(
            endpoint(&plain, &[], None).unwrap().uri().to_string(),
            "http://[::1]:4200/"
        );
    }
}
