//! Why the control plane refused or failed a request. `grpc.rs` maps each
//! to its gRPC status, in one place.

use crate::admission::Refused;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The request is wrong: invalid config (every error, naming resource
    /// and field), an unknown kind, a malformed Hello.
    #[error("{0}")]
    Invalid(String),
    /// Not this caller's to say or do.
    #[error("{0}")]
    Denied(String),
    /// What the request names does not exist (any more).
    #[error("{0} not found")]
    NotFound(String),
    /// The store failed or another writer committed first; nothing changed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<Refused> for MeshError {
    fn from(r: Refused) -> MeshError {
        match r {
            Refused::Invalid(m) => MeshError::Invalid(m),
            Refused::Denied(m) => MeshError::Denied(m),
        }
    }
}
