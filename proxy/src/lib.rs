//! remora-proxy: the data plane. `main.rs` wires flags to these modules; the
//! request path is `proxy.rs`, read top to bottom.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod cluster;
pub mod config;
pub mod control_plane;
pub mod detect;
pub mod discovery;
pub mod error;
pub mod exchange;
pub mod forward;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod tcp;
pub mod tls;
pub mod transport;
pub mod tunnel;
