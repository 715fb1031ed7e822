//! remoractl's building blocks: reading config input, talking to the
//! control plane, and rendering results. The command-line surface itself
//! (clap) lives in `src/bin/remoractl.rs`.

pub mod commands;
pub mod diff;
pub mod failure;
pub mod inject;
pub mod input;
pub mod output;
pub mod status;
pub mod token;

pub use failure::Failure;

/// The two resource kinds the control plane manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    HttpRoute,
}

impl Kind {
    /// Accepts the usual spellings, case-insensitively: `service`,
    /// `services`, `svc`, `Service`; `httproute`, `httproutes`, `route`,
    /// `routes`, `HTTPRoute`.
    pub fn parse(text: &str) -> Result<Kind, String> {
        match text.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Ok(Kind::Service),
            "httproute" | "httproutes" | "route" | "routes" => Ok(Kind::HttpRoute),
            _ => Err(format!(
                "unknown kind {text:?} (expected Service/services/svc or HTTPRoute/httproutes/route/routes)"
            )),
        }
    }

    /// The kind as the API spells it.
    pub fn api_name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.api_name())
    }
}
