//! `remora-proxy init`: the iptables rules that send a pod's TCP traffic
//! through its sidecar (an init container with NET_ADMIN runs it in the
//! pod's network namespace, before the app and the proxy start).
//!
//! In the `nat` table, two chains of our own:
//! - `REMORA_INBOUND` (from PREROUTING): TCP arriving for the pod goes to
//!   the inbound listener, except the proxy's own ports and
//!   `--skip-inbound-ports`.
//! - `REMORA_OUTPUT` (from OUTPUT): TCP the pod sends goes to the outbound
//!   listener, except the proxy's own traffic (its uid: else its upstream
//!   connections would loop back into it), loopback, `--skip-outbound-ports`
//!   and `--skip-outbound-cidrs`.
//!
//! The chains are written with `iptables-restore --noflush`: declaring a
//! chain flushes it, so a second run replaces our rules (same result) and
//! nothing else in the table is touched; the jumps into them are added
//! once. `--uninstall` removes the jumps and the chains.
//!
//! IPv4 only: the listeners are IPv4, so IPv6 traffic is left alone (a
//! dual-stack pod's IPv6 connections do not go through the mesh).

use std::net::IpAddr;
use std::process::{Command, Stdio};

pub const INBOUND_CHAIN: &str = "REMORA_INBOUND";
const IPTABLES: &str = "iptables";
const IPTABLES_RESTORE: &str = "iptables-restore";
pub const OUTPUT_CHAIN: &str = "REMORA_OUTPUT";

/// What to redirect and what to leave alone.
#[derive(Clone, Debug)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// Ports or ranges (`a-b`) whose inbound traffic reaches the app directly.
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<Cidr>,
}

/// A port or an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{s:?} is not a port (1-65535) or a range a-b")),
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("{s:?}: the range is backwards"));
                }
                Ok(PortRange(a, b))
            }
            None => port(s).map(|p| PortRange(p, p)),
        }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            // iptables multiport writes ranges with a colon.
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

/// An address block, `ip/prefix` (a bare IP is one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpAddr, pub u8);

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address block (ip/prefix)");
        let (ip, len) = match s.trim().split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s.trim(), None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        if ip.is_ipv6() {
            return Err(format!(
                "{s:?}: only IPv4 traffic is intercepted, so only IPv4 blocks apply"
            ));
        }
        let max = 32;
        let len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr(ip, len))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{0} not found: install iptables in the init image (Debian: apt-get install iptables)"
    )]
    Missing(&'static str),
    #[error("{command} failed ({status}): {stderr}{hint}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },
    #[error("running {0}: {1}")]
    Io(&'static str, std::io::Error),
}

const PERMISSION_HINT: &str = "\nremora-proxy init changes the pod's network namespace: it needs root and the NET_ADMIN and NET_RAW capabilities (in Kubernetes, the init container's securityContext)";

/// Groups of at most this many ports per multiport match (a range counts
/// twice; iptables allows 15).
const PORTS_PER_RULE: usize = 7;

/// The `iptables-restore` input that (re)writes our chains.
pub fn ruleset(cfg: &InitConfig) -> String {
    let mut out = String::from("*nat\n");
    out.push_str(&format!(
        ":{INBOUND_CHAIN} - [0:0]\n:{OUTPUT_CHAIN} - [0:0]\n"
    ));
    let mut rule = |chain: &str, spec: String| out.push_str(&format!("-A {chain} {spec}\n"));

    // Inbound: the proxy's own ports stay its own; the rest goes to it.
    let own = [cfg.inbound_port, cfg.admin_port, cfg.outbound_port]
        .map(|p| PortRange(p, p))
        .to_vec();
    for group in own
        .chunks(PORTS_PER_RULE)
        .chain(cfg.skip_inbound_ports.chunks(PORTS_PER_RULE))
    {
        rule(
            INBOUND_CHAIN,
            format!("-p tcp -m multiport --dports {} -j RETURN", join(group)),
        );
    }
    rule(
        INBOUND_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_port),
    );

    // Outbound: never the proxy's own connections (they would loop), never
    // loopback (the app talking to itself or to the proxy's listeners).
    rule(
        OUTPUT_CHAIN,
        format!("-m owner --uid-owner {} -j RETURN", cfg.proxy_uid),
    );
    rule(OUTPUT_CHAIN, "-o lo -j RETURN".into());
    rule(OUTPUT_CHAIN, "-d 127.0.0.0/8 -j RETURN".into());
    for group in cfg.skip_outbound_ports.chunks(PORTS_PER_RULE) {
        rule(
            OUTPUT_CHAIN,
            format!("-p tcp -m multiport --dports {} -j RETURN", join(group)),
        );
    }
    for c in &cfg.skip_outbound_cidrs {
        rule(OUTPUT_CHAIN, format!("-d {c} -j RETURN"));
    }
    rule(
        OUTPUT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.outbound_port),
    );
    out.push_str("COMMIT\n");
    out
}

fn join(ports: &[PortRange]) -> String {
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The jumps from the built-in chains into ours.
fn jumps() -> [[&'static str; 6]; 2] {
    [
        ["-t", "nat", "PREROUTING", "-p", "tcp", INBOUND_CHAIN],
        ["-t", "nat", "OUTPUT", "-p", "tcp", OUTPUT_CHAIN],
    ]
}

/// Runs `cmd args`, feeding `input` on stdin; an error says what failed.
fn run(cmd: &'static str, args: &[&str], input: Option<&str>) -> Result<(), InitError> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => InitError::Missing(cmd),
            _ => InitError::Io(cmd, e),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| InitError::Io(cmd, e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::Io(cmd, e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let denied = stderr.contains("Permission denied")
        || stderr.contains("Operation not permitted")
        || stderr.contains("you must be root");
    Err(InitError::Failed {
        command: format!("{cmd} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr,
        hint: if denied { PERMISSION_HINT } else { "" },
    })
}

/// Whether a rule exists (`iptables -C`).
fn exists(table_chain_rule: &[&str]) -> bool {
    let mut args = vec![table_chain_rule[0], table_chain_rule[1], "-C"];
    args.extend_from_slice(&table_chain_rule[2..]);
    let jump = args.len() - 1;
    args.insert(jump, "-j");
    run(IPTABLES, &args, None).is_ok()
}

/// Installs (or refreshes) the rules.
pub fn install(cfg: &InitConfig) -> Result<(), InitError> {
    run(IPTABLES_RESTORE, &["--noflush"], Some(&ruleset(cfg)))?;
    for j in jumps() {
        if !exists(&j) {
            // -A: after whatever the platform put there (a CNI's rules).
            run(
                IPTABLES,
                &[j[0], j[1], "-A", j[2], j[3], j[4], "-j", j[5]],
                None,
            )?;
        }
    }
    Ok(())
}

/// Removes the jumps and our chains; what is already gone is fine.
pub fn uninstall() -> Result<(), InitError> {
    for j in jumps() {
        // Every copy, should there be several.
        let mut guard = 0;
        while exists(&j) && guard < 16 {
            run(
                IPTABLES,
                &[j[0], j[1], "-D", j[2], j[3], j[4], "-j", j[5]],
                None,
            )?;
            guard += 1;
        }
    }
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        if run(IPTABLES, &["-t", "nat", "-F", chain], None).is_ok() {
            run(IPTABLES, &["-t", "nat", "-X", chain], None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InitConfig {
        InitConfig {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: vec!["22".parse().unwrap()],
            skip_outbound_ports: vec!["25".parse().unwrap(), "3000-3010".parse().unwrap()],
            skip_outbound_cidrs: vec!["169.254.169.254".parse().unwrap()],
        }
    }

    #[test]
    fn ruleset_redirects_and_excludes() {
        let r = ruleset(&cfg());
        let want = "*nat\n\
            :REMORA_INBOUND - [0:0]\n\
            :REMORA_OUTPUT - [0:0]\n\
            -A REMORA_INBOUND -p tcp -m multiport --dports 4143,4191,4140 -j RETURN\n\
            -A REMORA_INBOUND -p tcp -m multiport --dports 22 -j RETURN\n\
            -A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143\n\
            -A REMORA_OUTPUT -m owner --uid-owner 2102 -j RETURN\n\
            -A REMORA_OUTPUT -o lo -j RETURN\n\
            -A REMORA_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
            -A REMORA_OUTPUT -p tcp -m multiport --dports 25,3000:3010 -j RETURN\n\
            -A REMORA_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
            -A REMORA_OUTPUT -p tcp -j REDIRECT --to-ports 4140\n\
            COMMIT\n";
        assert_eq!(r, want);
    }

    #[test]
    fn long_port_lists_are_split() {
        let mut c = cfg();
        c.skip_outbound_ports = (1..=20).map(|p| PortRange(p, p)).collect();
        let r = ruleset(&c);
        assert_eq!(r.matches("--dports 1,2,3,4,5,6,7 -j RETURN").count(), 1);
        assert_eq!(r.matches("-A REMORA_OUTPUT -p tcp -m multiport").count(), 3);
    }

    #[test]
    fn parses_ports_ranges_and_blocks() {
        assert_eq!("80".parse::<PortRange>(), Ok(PortRange(80, 80)));
        assert_eq!("80-90".parse::<PortRange>(), Ok(PortRange(80, 90)));
        assert!("90-80".parse::<PortRange>().is_err());
        assert!("0".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().is_err());
    }
}
