//! The gRPC test service (tests/proto/echo.proto): unary, server, client
//! and bidi streaming, failures on request, and custom trailers. Used by
//! the gRPC suites.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status, Streaming};

pub mod echo {
    tonic::include_proto!("remora.test.echo.v1");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest, StreamRequest};

// ------------------------------------------------------------ the server

pub struct EchoService {
    pub name: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let tag = req
            .metadata()
            .get("x-request-tag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = req.into_inner();
        if r.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(r.sleep_ms.into())).await;
        }
        if r.fail_code != 0 {
            return Err(Status::new(Code::from_i32(r.fail_code), r.message));
        }
        let mut resp = Response::new(EchoReply {
            message: r.message,
            seq: 0,
            server: self.name.clone(),
        });
        if let Some(tag) = tag {
            resp.metadata_mut()
                .insert("x-echoed-tag", tag.parse().unwrap());
        }
        Ok(resp)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let r = req.into_inner();
        let name = self.name.clone();
        let prefix = r.message.clone();
        let items = (0..r.count).map(move |i| {
            Ok(EchoReply {
                message: format!("{prefix}-{i}"),
                seq: i,
                server: name.clone(),
            })
        });
        // The stream ends with a status carrying custom trailing metadata:
        // tonic sends it as the HTTP/2 trailers of the response.
        let mut md = MetadataMap::new();
        md.insert("x-echo-trailer", r.message.parse().unwrap());
        let code = Code::from_i32(r.end_code);
        let msg = if code == Code::Ok { "" } else { "stream ended" };
        let end = Status::with_metadata(code, msg, md);
        let stream = tokio_stream::iter(items).chain(tokio_stream::once(Err(end)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = req.into_inner();
        let mut parts = Vec::new();
        while let Some(m) = stream.message().await? {
            parts.push(m.message);
        }
        Ok(Response::new(EchoReply {
            message: parts.join(","),
            seq: parts.len() as u32,
            server: self.name.clone(),
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let name = self.name.clone();
        let mut seq = 0;
        let out = req.into_inner().map(move |m| {
            let m = m?;
            seq += 1;
            Ok(EchoReply {
                message: m.message.to_uppercase(),
                seq,
                server: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A tonic server (on a free loopback port unless told); stopped on drop.
pub struct GrpcServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    pub async fn start(name: &str) -> GrpcServer {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), name)
            .await
            .expect("bind grpc server")
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr, name: &str) -> std::io::Result<GrpcServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let svc = EchoServer::new(EchoService {
            name: name.to_string(),
        });
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .expect("grpc server");
        });
        Ok(GrpcServer { addr, task })
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
