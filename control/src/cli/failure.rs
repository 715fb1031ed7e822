//! Errors with the exit code they map to. Exit codes:
//! 0 success; 1 invalid input or rejected by the server; 2 usage error or
//! unreadable input; 3 server unreachable or other server error; 4 (status
//! --wait) not every connected proxy runs the current version.

use std::fmt;

pub const EXIT_INVALID: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_SERVER: u8 = 3;
pub const EXIT_NOT_CONVERGED: u8 = 4;

/// A command that failed: what to print on stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Invalid input, or the server rejected the request (exit 1).
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_INVALID,
            message: message.into(),
        }
    }

    /// Usage error or unreadable input (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// Server unreachable or failing (exit 3).
    pub fn server(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_SERVER,
            message: message.into(),
        }
    }

    /// `status --wait`: a proxy NACKed the current version, or some had
    /// not ACKed it in time (exit 4).
    pub fn not_converged(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_NOT_CONVERGED,
            message: message.into(),
        }
    }

    /// Maps a gRPC status: the rejections a user can fix (InvalidArgument,
    /// NotFound, FailedPrecondition) keep the server's message verbatim and
    /// exit 1; anything else is a server problem (exit 3).
    pub fn from_status(status: tonic::Status, server: &str) -> Failure {
        use tonic::Code;
        let msg = status.message();
        match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => {
                Failure::invalid(msg.to_string())
            }
            // The control plane answered: its store (etcd) is away.
            Code::Unavailable if msg.starts_with("the config store is unavailable") => {
                Failure::server(format!("{server}: {msg}"))
            }
            Code::Unavailable => Failure::server(format!(
                "control plane at {server} is unavailable: {}",
                or_code(msg, status.code())
            )),
            Code::DeadlineExceeded | Code::Cancelled => Failure::server(format!(
                "request to {server} timed out: {}",
                or_code(msg, status.code())
            )),
            // A credential problem is the caller's to fix: like a usage error.
            Code::Unauthenticated | Code::PermissionDenied => Failure::usage(format!(
                "the control plane at {server} refused the credentials: {}",
                or_code(msg, status.code())
            )),
            Code::Unimplemented => Failure::server(format!(
                "the control plane at {server} does not implement this call: {}",
                or_code(msg, status.code())
            )),
            code => Failure::server(format!(
                "control plane error ({code:?}): {}",
                or_code(msg, code)
            )),
        }
    }
}

fn or_code(msg: &str, code: tonic::Code) -> String {
    if msg.is_empty() {
        code.description().to_string()
    } else {
        msg.to_string()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
