//! The YAML people write: Kubernetes-style documents, one resource each,
//! `kind` choosing the message. Field names are the proto fields in
//! camelCase, and unknown fields are errors, so a typo never passes silently.

use crate::model::{AuthorizationPolicy, Config, HttpRoute, MeshConfig, RateLimitPolicy, Service};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Why a config could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{source_name}: document {doc}: {message}")]
    Syntax {
        source_name: String,
        doc: usize,
        message: String,
    },
    #[error("{source_name}: {resource}: {field}: {message}")]
    Field {
        source_name: String,
        resource: String,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(#[from] crate::ValidationErrors),
    #[error("{path}: config files total more than {max} bytes")]
    TooLarge { path: String, max: u64 },
}

/// Most bytes a config file or directory may hold, as for a config from
/// the control plane: past this a typo (a log file in the config
/// directory) would cost the proxy its memory.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The kinds a config document may have.
const KINDS: &str = "Service, HTTPRoute, RateLimitPolicy, AuthorizationPolicy or MeshConfig";

/// Parses one YAML text (several `---` documents) into a config. `source`
/// names it in errors. The result is parsed, not yet validated.
pub fn parse_yaml(text: &str, source: &str) -> Result<Config, LoadError> {
    let mut cfg = Config::default();
    add_yaml(&mut cfg, text, source)?;
    Ok(cfg)
}

fn add_yaml(cfg: &mut Config, text: &str, source: &str) -> Result<(), LoadError> {
    use serde::Deserialize;
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = yaml_serde::Value::deserialize(doc).map_err(|e| LoadError::Syntax {
            source_name: source.to_string(),
            doc: doc_no,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let name = describe(&value);
        match kind {
            "Service" => {
                cfg.services
                    .push(typed::<Service>(value.clone(), source, "Service", &name)?)
            }
            "HTTPRoute" => cfg.http_routes.push(typed::<HttpRoute>(
                value.clone(),
                source,
                "HTTPRoute",
                &name,
            )?),
            "RateLimitPolicy" => cfg.rate_limit_policies.push(typed::<RateLimitPolicy>(
                value.clone(),
                source,
                "RateLimitPolicy",
                &name,
            )?),
            "AuthorizationPolicy" => cfg
                .authorization_policies
                .push(typed::<AuthorizationPolicy>(
                    value.clone(),
                    source,
                    "AuthorizationPolicy",
                    &name,
                )?),
            "MeshConfig" => cfg.mesh_configs.push(typed::<MeshConfig>(
                value.clone(),
                source,
                "MeshConfig",
                &name,
            )?),
            "" => {
                return Err(LoadError::Syntax {
                    source_name: source.to_string(),
                    doc: doc_no,
                    message: format!("missing `kind` ({KINDS})"),
                })
            }
            other => {
                return Err(LoadError::Syntax {
                    source_name: source.to_string(),
                    doc: doc_no,
                    message: format!("unknown kind {other:?} (expected {KINDS})"),
                })
            }
        }
    }
    Ok(())
}

/// `namespace/name` read loosely from an untyped document, for errors.
fn describe(value: &yaml_serde::Value) -> String {
    let meta = value.get("metadata");
    let field = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    format!(
        "{}/{}",
        field("namespace").unwrap_or_else(|| crate::DEFAULT_NAMESPACE.into()),
        field("name").unwrap_or_else(|| "<unnamed>".into())
    )
}

fn typed<T: DeserializeOwned>(
    value: yaml_serde::Value,
    source: &str,
    kind: &str,
    name: &str,
) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = path.strip_prefix("spec.").unwrap_or(&path).to_string();
        LoadError::Field {
            source_name: source.to_string(),
            resource: format!("{kind} {name}"),
            field,
            message: e.into_inner().to_string(),
        }
    })
}

/// The files a config path stands for: the file itself, or every `.yaml`
/// and `.yml` file directly in a directory, in name order.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |e| LoadError::Io {
        path: path.display().to_string(),
        source: e,
    };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let yaml = matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml") | Some("yml")
        );
        // Kubernetes ConfigMap mounts keep dot-prefixed staging entries.
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if yaml && !hidden && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The bytes of a config file or directory, read but not yet parsed: a
/// watcher fingerprints them each interval and parses only when they
/// changed.
pub struct RawConfig {
    files: Vec<(String, Vec<u8>)>,
}

impl RawConfig {
    /// Reads the YAML files at `path` (a file, or a directory's `*.yaml`
    /// and `*.yml`), at most `MAX_CONFIG_BYTES` in all.
    pub fn read(path: &Path) -> Result<RawConfig, LoadError> {
        use std::io::Read;
        let mut files = Vec::new();
        let mut left = MAX_CONFIG_BYTES;
        for file in config_files(path)? {
            let name = file.display().to_string();
            let io = |e| LoadError::Io {
                path: name.clone(),
                source: e,
            };
            let mut bytes = Vec::new();
            // One byte more than allowed tells "too large" from "exactly".
            let n = std::fs::File::open(&file)
                .and_then(|f| f.take(left + 1).read_to_end(&mut bytes))
                .map_err(io)? as u64;
            if n > left {
                return Err(LoadError::TooLarge {
                    path: path.display().to_string(),
                    max: MAX_CONFIG_BYTES,
                });
            }
            left -= n;
            files.push((name, bytes));
        }
        Ok(RawConfig { files })
    }

    /// A fingerprint of every file's name and bytes.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.files.hash(&mut h);
        h.finish()
    }

    /// Parses the files, in name order, into one config (not validated).
    pub fn parse(&self) -> Result<Config, LoadError> {
        let mut cfg = Config::default();
        for (name, bytes) in &self.files {
            add_yaml(&mut cfg, &String::from_utf8_lossy(bytes), name)?;
        }
        Ok(cfg)
    }
}

/// Reads and parses a file or directory of YAML.
pub fn load_path(path: &Path) -> Result<Config, LoadError> {
    RawConfig::read(path)?.parse()
}

/// Renders a config back to YAML documents (for remoractl).
pub fn to_yaml(cfg: &Config) -> String {
    let mut out = String::new();
    for s in &cfg.services {
        out.push_str("---\n");
        out.push_str(&resource_yaml(s));
    }
    for r in &cfg.http_routes {
        out.push_str("---\n");
        out.push_str(&resource_yaml(r));
    }
    for p in &cfg.rate_limit_policies {
        out.push_str("---\n");
        out.push_str(&resource_yaml(p));
    }
    for p in &cfg.authorization_policies {
        out.push_str("---\n");
        out.push_str(&resource_yaml(p));
    }
    for m in &cfg.mesh_configs {
        out.push_str("---\n");
        out.push_str(&resource_yaml(m));
    }
    out
}

/// One resource as YAML, without the empty defaults (null, "", [], {})
/// that proto3 types carry. Zeros and `false` stay: `weight: 0` means
/// something.
pub fn resource_yaml<T: serde::Serialize>(r: &T) -> String {
    fn prune(v: &mut yaml_serde::Value) -> bool {
        use yaml_serde::Value;
        match v {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Sequence(items) => {
                items.iter_mut().for_each(|i| {
                    prune(i);
                });
                !items.is_empty()
            }
            Value::Mapping(m) => {
                m.retain(|_, v| prune(v));
                !m.is_empty()
            }
            _ => true,
        }
    }
    match yaml_serde::to_value(r) {
        Ok(mut v) => {
            prune(&mut v);
            yaml_serde::to_string(&v).unwrap_or_default()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-yaml-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn raw_config_reads_yaml_files_in_order_and_fingerprints_them() {
        let d = scratch_dir("raw");
        std::fs::write(d.join("b.yaml"), "kind: Service\nmetadata: {name: b}\n").unwrap();
        std::fs::write(d.join("a.yml"), "kind: Service\nmetadata: {name: a}\n").unwrap();
        std::fs::write(d.join(".staging.yaml"), "not: [yaml").unwrap();
        std::fs::write(d.join("notes.txt"), "ignored").unwrap();
        let raw = RawConfig::read(&d).unwrap();
        let cfg = raw.parse().unwrap();
        let names: Vec<_> = cfg
            .services
            .iter()
            .map(|s| s.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let fp = raw.fingerprint();
        assert_eq!(RawConfig::read(&d).unwrap().fingerprint(), fp, "stable");
        std::fs::write(d.join("b.yaml"), "kind: Service\nmetadata: {name: c}\n").unwrap();
        assert_ne!(
            RawConfig::read(&d).unwrap().fingerprint(),
            fp,
            "content counts"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn raw_config_refuses_more_than_the_bound_without_reading_it_all() {
        let d = scratch_dir("big");
        std::fs::write(d.join("a.yaml"), "kind: Service\nmetadata: {name: a}\n").unwrap();
        // Sparse: costs no disk.
        let f = std::fs::File::create(d.join("b.yaml")).unwrap();
        f.set_len(MAX_CONFIG_BYTES).unwrap();
        let err = RawConfig::read(&d).err().expect("too large");
        assert!(matches!(err, LoadError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains("more than 67108864 bytes"),
            "{err}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn parses_documents_by_kind() {
        let cfg = parse_yaml(
            r#"
kind: Service
metadata: {name: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 127.0.0.1, port: 8080}]
---
kind: HTTPRoute
metadata: {name: checkout, namespace: shop}
spec:
  parentRefs: [{name: shop}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /cart}}]
    backendRefs: [{name: shop, weight: 90}]
"#,
            "test.yaml",
        )
        .unwrap();
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(cfg.http_routes.len(), 1);
        let rule = &cfg.http_routes[0].spec.as_ref().unwrap().rules[0];
        assert_eq!(rule.backend_refs[0].weight, Some(90));
        assert_eq!(rule.matches[0].path.as_ref().unwrap().r#type, "PathPrefix");
    }

    #[test]
    fn unknown_field_names_resource_and_path() {
        let err = parse_yaml(
            "kind: HTTPRoute\nmetadata: {name: checkout, namespace: shop}\nspec:\n  rules:\n  - backendRefs: [{name: a, wieght: 3}]\n",
            "f.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("HTTPRoute shop/checkout"), "{err}");
        assert!(err.contains("rules[0].backendRefs[0]"), "{err}");
        assert!(err.contains("wieght"), "{err}");
    }

    #[test]
    fn yaml_output_drops_empty_defaults_and_round_trips() {
        let text = "kind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{backendRefs: [{name: a, weight: 0}]}]\n";
        let cfg = parse_yaml(text, "t").unwrap();
        let out = to_yaml(&cfg);
        assert!(
            !out.contains("null") && !out.contains("''") && !out.contains("[]"),
            "{out}"
        );
        assert!(out.contains("weight: 0"), "{out}");
        assert_eq!(parse_yaml(&out, "t").unwrap(), cfg);
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let err = parse_yaml("kind: Gateway\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown kind \"Gateway\""), "{err}");
    }
}
