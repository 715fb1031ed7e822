//! Reading config input: a YAML file, a directory of them, or stdin (`-`).

use super::Failure;
use remora_proto::model::Config;
use remora_proto::LoadError;
use std::io::Read;
use std::path::Path;

/// The name stdin goes by in messages.
pub const STDIN: &str = "<stdin>";

/// Reads and parses (does not validate) the config at `path`. Unreadable
/// input is a usage error (exit 2); a parse error names the file, resource
/// and field (exit 1).
pub fn load(path: &Path) -> Result<Config, Failure> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::usage(format!("{STDIN}: {e}")))?;
        let text = String::from_utf8_lossy(&bytes);
        remora_proto::parse_yaml(&text, STDIN).map_err(load_failure)
    } else {
        remora_proto::load_path(path).map_err(load_failure)
    }
}

/// Like `load`, but an input without any resource is an error: applying or
/// diffing nothing is almost always a wrong path.
pub fn load_nonempty(path: &Path) -> Result<Config, Failure> {
    let cfg = load(path)?;
    if remora_proto::resource_count(&cfg) == 0 {
        let name = if path == Path::new("-") {
            STDIN.to_string()
        } else {
            path.display().to_string()
        };
        return Err(Failure::invalid(format!("{name}: no resources found")));
    }
    Ok(cfg)
}

fn load_failure(e: LoadError) -> Failure {
    match e {
        LoadError::Io { .. } => Failure::usage(e.to_string()),
        _ => Failure::invalid(e.to_string()),
    }
}
