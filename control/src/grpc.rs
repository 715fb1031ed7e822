//! The Admin service (what remoractl calls) and its token check, and the
//! one place the control plane's errors become gRPC statuses. Thin: the
//! state and its rules live in `mesh.rs` and the modules it puts together;
//! Discovery is in `discovery.rs` and `fanout.rs`.

use crate::error::MeshError;
use crate::mesh::Mesh;
use crate::store::{Store, StoreError};
use remora_proto::control::admin_server::Admin;
use remora_proto::control::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::warn;

impl From<MeshError> for Status {
    fn from(e: MeshError) -> Status {
        let message = e.to_string();
        match e {
            MeshError::Invalid(_) => Status::invalid_argument(message),
            MeshError::Denied(_) => Status::permission_denied(message),
            MeshError::NotFound(_) => Status::not_found(message),
            // Another writer won the race: the caller may simply retry.
            MeshError::Store(StoreError::Conflict { .. }) => Status::aborted(message),
            MeshError::Store(_) => Status::unavailable(message),
        }
    }
}

/// `Bearer <token>` of a request's `authorization` header.
pub(crate) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Admin calls need the admin token when one is configured. The file is
/// read on every call, so replacing it rotates the token.
#[derive(Clone)]
pub struct AdminAuth {
    pub token_file: Option<Arc<std::path::PathBuf>>,
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(path) = &self.token_file else {
            return Ok(req);
        };
        let want = std::fs::read_to_string(path.as_path()).map_err(|e| {
            warn!(path = %path.display(), error = %e, "admin token file unreadable: every Admin call is refused");
            Status::unavailable("the admin token cannot be checked")
        })?;
        // An emptied file is a mistake, never "no token needed".
        if want.trim().is_empty() {
            warn!(path = %path.display(), "admin token file is empty: every Admin call is refused");
            return Err(Status::unavailable("the admin token cannot be checked"));
        }
        match bearer(&req) {
            Some(got) if crate::review::same_secret(got.as_bytes(), want.trim().as_bytes()) => {
                Ok(req)
            }
            got => {
                warn!(
                    presented = got.is_some(),
                    "Admin call refused: missing or wrong admin token"
                );
                Err(Status::unauthenticated(
                    "Admin requires the admin token (remoractl --token-file)",
                ))
            }
        }
    }
}

pub struct AdminService<S> {
    pub mesh: Arc<Mesh<S>>,
}

fn changed(o: crate::history::Outcome) -> Response<ChangeResponse> {
    Response::new(ChangeResponse {
        version: o.version,
        changed: o.changed,
        summary: o.summary,
    })
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminService<S> {
    async fn apply(&self, r: Request<ApplyRequest>) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        let o = self
            .mesh
            .apply(r.resources.unwrap_or_default(), &r.author)
            .await?;
        Ok(changed(o))
    }

    async fn diff(&self, r: Request<ApplyRequest>) -> Result<Response<DiffResponse>, Status> {
        let changes = self
            .mesh
            .diff(r.into_inner().resources.unwrap_or_default())?
            .into_iter()
            .map(|c| ResourceChange {
                kind: c.key.0.to_string(),
                namespace: c.key.1,
                name: c.key.2,
                action: c.action.as_str().to_string(),
                before: c.before.map(|r| r.yaml()).unwrap_or_default(),
                after: c.after.map(|r| r.yaml()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(DiffResponse { changes }))
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        let o = self
            .mesh
            .delete(&r.kind, &r.namespace, &r.name, &r.author)
            .await?;
        Ok(changed(o))
    }

    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = r.into_inner();
        let (version, cfg) = self.mesh.get(&r.kind, &r.namespace, &r.name)?;
        Ok(Response::new(GetResponse {
            version,
            resources: Some(cfg),
        }))
    }

    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let entries = self
            .mesh
            .history()
            .await?
            .into_iter()
            .map(|r| HistoryEntry {
                version: r.version,
                unix_time: r.unix_time,
                author: r.author,
                summary: r.summary,
            })
            .collect();
        Ok(Response::new(HistoryResponse { entries }))
    }

    async fn rollback(
        &self,
        r: Request<RollbackRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        Ok(changed(self.mesh.rollback(r.version, &r.author).await?))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.mesh.status().await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Refused;

    #[test]
    fn each_error_has_its_status() {
        let code = |e: MeshError| Status::from(e).code();
        assert_eq!(
            code(MeshError::Invalid("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(Refused::Denied("x".into()).into()),
            tonic::Code::PermissionDenied
        );
        let nf = Status::from(MeshError::NotFound("version 3".into()));
        assert_eq!(
            (nf.code(), nf.message()),
            (tonic::Code::NotFound, "version 3 not found")
        );
        let conflict = StoreError::Conflict {
            expected: 1,
            found: 2,
        };
        assert_eq!(code(conflict.into()), tonic::Code::Aborted);
        let io = StoreError::Io {
            path: "p".into(),
            source: std::io::Error::other("disk"),
        };
        assert_eq!(code(io.into()), tonic::Code::Unavailable);
    }
}
