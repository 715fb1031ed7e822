//! Rendering: aligned tables, UTC timestamps, resource summaries.

use remora_proto::model::{Config, HttpRoute, Metadata, Service};

/// A plain text table: columns separated by two spaces, padded to the
/// widest cell, the last column unpadded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                if i + 1 < row.len() {
                    let pad = widths[i] - c.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Unix seconds as UTC `YYYY-MM-DDTHH:MM:SSZ`; `-` for 0 (unknown).
pub fn utc(unix: i64) -> String {
    if unix == 0 {
        return "-".to_string();
    }
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `n thing` / `n things`.
pub fn count(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// `2 services, 1 HTTPRoute` (a kind with none left out).
pub fn config_counts(cfg: &Config) -> String {
    let mut parts = Vec::new();
    if !cfg.services.is_empty() {
        parts.push(count(cfg.services.len(), "service", "services"));
    }
    if !cfg.http_routes.is_empty() {
        parts.push(count(cfg.http_routes.len(), "HTTPRoute", "HTTPRoutes"));
    }
    if !cfg.rate_limit_policies.is_empty() {
        parts.push(count(
            cfg.rate_limit_policies.len(),
            "RateLimitPolicy",
            "RateLimitPolicies",
        ));
    }
    if !cfg.authorization_policies.is_empty() {
        parts.push(count(
            cfg.authorization_policies.len(),
            "AuthorizationPolicy",
            "AuthorizationPolicies",
        ));
    }
    if !cfg.mesh_configs.is_empty() {
        parts.push(count(cfg.mesh_configs.len(), "MeshConfig", "MeshConfigs"));
    }
    if parts.is_empty() {
        "no resources".to_string()
    } else {
        parts.join(", ")
    }
}

/// (namespace, name) of a resource, the namespace defaulted.
pub fn ns_name(meta: Option<&Metadata>) -> (String, String) {
    match meta {
        Some(m) => (
            if m.namespace.is_empty() {
                remora_proto::DEFAULT_NAMESPACE.to_string()
            } else {
                m.namespace.clone()
            },
            m.name.clone(),
        ),
        None => (remora_proto::DEFAULT_NAMESPACE.to_string(), String::new()),
    }
}

/// `ports 80/http,9090/grpc->9091; 3 endpoints`
pub fn service_summary(s: &Service) -> String {
    let Some(spec) = &s.spec else {
        return "no spec".to_string();
    };
    let ports: Vec<String> = spec
        .ports
        .iter()
        .map(|p| {
            let proto = if p.protocol.is_empty() {
                "auto"
            } else {
                &p.protocol
            };
            let mut s = format!("{}/{proto}", p.port);
            if p.target_port != 0 && p.target_port != p.port {
                s.push_str(&format!("->{}", p.target_port));
            }
            s
        })
        .collect();
    format!(
        "ports {}; {}",
        if ports.is_empty() {
            "-".to_string()
        } else {
            ports.join(",")
        },
        count(spec.endpoints.len(), "endpoint", "endpoints")
    )
}

/// `parents default/web:80; 2 rules`
pub fn route_summary(r: &HttpRoute) -> String {
    let Some(spec) = &r.spec else {
        return "no spec".to_string();
    };
    let (route_ns, _) = ns_name(r.metadata.as_ref());
    let parents: Vec<String> = spec
        .parent_refs
        .iter()
        .map(|p| {
            let ns = if p.namespace.is_empty() {
                route_ns.as_str()
            } else {
                p.namespace.as_str()
            };
            let mut s = format!("{ns}/{}", p.name);
            if p.port != 0 {
                s.push_str(&format!(":{}", p.port));
            }
            s
        })
        .collect();
    format!(
        "parents {}; {}",
        if parents.is_empty() {
            "-".to_string()
        } else {
            parents.join(",")
        },
        count(spec.rules.len(), "rule", "rules")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(1), "1970-01-01T00:00:01Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(0), "-");
    }

    #[test]
    fn aligns_tables() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["xyz".into(), "1".into(), "last".into()]);
        assert_eq!(t.render(), "A    LONGER  C\nxyz  1       last\n");
    }

    #[test]
    fn counts_every_kind() {
        let cfg = remora_proto::parse_yaml(
            "kind: Service\nmetadata: {name: a}\n---\nkind: AuthorizationPolicy\nmetadata: {name: p}\n---\nkind: AuthorizationPolicy\nmetadata: {name: q}\n---\nkind: RateLimitPolicy\nmetadata: {name: r}\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            config_counts(&cfg),
            "1 service, 1 RateLimitPolicy, 2 AuthorizationPolicies"
        );
        assert_eq!(config_counts(&Config::default()), "no resources");
    }
}
