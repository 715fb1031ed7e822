//! The rescue step: every failure on the request path is a `ProxyError`, and
//! this is the one place that turns it into an HTTP status (or, for gRPC, a
//! grpc-status), so no handler improvises a 502.

use crate::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for host {0:?}")]
    NoRoute(String),
    #[error("no endpoints for backend {0}")]
    NoEndpoints(String),
    #[error("backend {0} has no weight: every backendRef is 0")]
    NoBackend(String),
    #[error("backend {0} is over its connection and pending-request limits")]
    Overflow(String),
    #[error("request timed out")]
    Timeout,
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    #[error("upstream {0} failed: {1}")]
    Upstream(String, String),
    #[error("request body larger than {0} bytes could not be buffered")]
    BodyTooLarge(usize),
    #[error("reading request body failed: {0}")]
    ClientBody(String),
    #[error("rate limited")]
    RateLimited,
    #[error("the caller is not allowed by the authorization policy on {0}")]
    Forbidden(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("this proxy has no config or no workload certificate yet")]
    NotReady,
}

/// gRPC status codes used here (grpc/doc/statuscodes.md).
const GRPC_DEADLINE_EXCEEDED: u8 = 4;
const GRPC_UNIMPLEMENTED: u8 = 12;
const GRPC_UNAVAILABLE: u8 = 14;
const GRPC_RESOURCE_EXHAUSTED: u8 = 8;
const GRPC_INTERNAL: u8 = 13;
const GRPC_PERMISSION_DENIED: u8 = 7;

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints(_) | ProxyError::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect(..) | ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::NoRoute(_) => GRPC_UNIMPLEMENTED,
            ProxyError::Timeout => GRPC_DEADLINE_EXCEEDED,
            ProxyError::Overflow(_) | ProxyError::RateLimited => GRPC_RESOURCE_EXHAUSTED,
            ProxyError::Forbidden(_) => GRPC_PERMISSION_DENIED,
            ProxyError::NoBackend(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadRequest(_) => GRPC_INTERNAL,
            _ => GRPC_UNAVAILABLE,
        }
    }

    /// A short machine-readable reason, sent as `x-remora-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::NoBackend(_) => "no-backend",
            ProxyError::Overflow(_) => "overflow",
            ProxyError::Timeout => "timeout",
            ProxyError::Connect(..) => "connect",
            ProxyError::Upstream(..) => "upstream",
            ProxyError::BodyTooLarge(_) => "body-too-large",
            ProxyError::ClientBody(_) => "client-body",
            ProxyError::RateLimited => "rate-limited",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::NotReady => "not-ready",
        }
    }

    /// The response the client sees. gRPC callers get a trailers-only
    /// response (HTTP 200 with grpc-status), as gRPC requires.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let msg = self.to_string();
        let mut resp = if grpc {
            let mut r = Response::new(Body::Empty);
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(self.grpc_status() as u16));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&msg)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Body::full(format!("{msg}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut()
            .insert("x-remora-error", HeaderValue::from_static(self.reason()));
        resp
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only_with_status() {
        let r = ProxyError::Timeout.into_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        let r = ProxyError::Timeout.into_response(false);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()["x-remora-error"], "timeout");
    }
}
