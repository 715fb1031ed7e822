//! `remoractl token NAMESPACE/SERVICEACCOUNT`: a new bootstrap token for one
//! identity, outside Kubernetes. The token goes to stdout (for the
//! workload's --bootstrap-token-file); the control plane's tokens file gets
//! only its hash (`namespace/serviceAccount sha256:<hex>`), appended with
//! --tokens-file or printed on stderr to add by hand.

use super::Failure;
use std::io::Write;
use std::path::Path;

/// 32 random bytes, hex: 256 bits, nothing to escape anywhere.
fn new_token() -> Result<String, Failure> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| Failure::server("the system's random source failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run(identity: &str, tokens_file: Option<&Path>) -> Result<u8, Failure> {
    let line = {
        let Some((ns, sa)) = identity.split_once('/') else {
            return Err(Failure::usage(format!(
                "{identity:?}: expected NAMESPACE/SERVICEACCOUNT"
            )));
        };
        for (field, v) in [("namespace", ns), ("service account", sa)] {
            remora_control::ca::check_label(field, v).map_err(|e| Failure::usage(e.to_string()))?;
        }
        identity.to_string()
    };
    let token = new_token()?;
    let entry = format!("{line} {}\n", remora_control::review::token_hash(&token));
    match tokens_file {
        Some(path) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.append(true).create(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            opts.open(path)
                .and_then(|mut f| f.write_all(entry.as_bytes()))
                .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
            eprintln!("added to {}: {}", path.display(), entry.trim_end());
        }
        None => eprint!("add this line to the control plane's --bootstrap-tokens file:\n{entry}"),
    }
    println!("{token}");
    Ok(0)
}
