//! The Discovery stream on the wire, served by hand next to tonic's
//! generated services. tonic's generated server encodes every message
//! into a buffer of each stream's own: a snapshot sent to 10,000 streams
//! was copied 10,000 times, and each stream's buffer grew to the largest
//! snapshot and stayed there. Here a snapshot is encoded once per scope
//! (`snapshot::frame`) and each stream writes that same `Bytes`: the cost
//! of a stream is a reference count, whatever the snapshot's size.
//! Requests (Hello, ACK, NACK, Register, Deregister) are small; tonic
//! decodes them, into a buffer that starts small.

use crate::discovery::{DiscoveryService, MAX_REQUEST_BYTES};
use crate::store::Store;
use http_body_util::StreamBody;
use prost::Message;
use remora_proto::control::DiscoveryRequest;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::server::NamedService;
use tonic::Status;

/// The gRPC service name and its one method.
pub const SERVICE: &str = "remora.control.v1.Discovery";
const STREAM: &str = "/remora.control.v1.Discovery/Stream";

/// Discovery as a tower service for tonic's router.
pub struct DiscoveryServer<S> {
    inner: Arc<DiscoveryService<S>>,
}

impl<S> DiscoveryServer<S> {
    pub fn new(service: DiscoveryService<S>) -> DiscoveryServer<S> {
        DiscoveryServer {
            inner: Arc::new(service),
        }
    }
}

impl<S> Clone for DiscoveryServer<S> {
    fn clone(&self) -> Self {
        DiscoveryServer {
            inner: self.inner.clone(),
        }
    }
}

impl<S> NamedService for DiscoveryServer<S> {
    const NAME: &'static str = SERVICE;
}

impl<S: Store> tower_service::Service<http::Request<Body>> for DiscoveryServer<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != STREAM {
            return Box::pin(async {
                Ok(Status::unimplemented("no such method in Discovery").into_http())
            });
        }
        let (parts, body) = req.into_parts();
        let incoming =
            tonic::Streaming::new_request(RequestDecoder, body, None, Some(MAX_REQUEST_BYTES));
        let request = tonic::Request::from_http(http::Request::from_parts(parts, incoming));
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match inner.open(request).await {
                Ok(frames) => {
                    let mut resp = http::Response::new(Body::new(StreamBody::new(frames)));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    resp
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Decodes what proxies send.
struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DiscoveryRequest>, Status> {
        DiscoveryRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
    }

    /// A stream's read buffer starts at 512 bytes (tonic's default is
    /// 8 KiB, times 10,000 streams) and grows only for a bigger message.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(512, 32 << 10)
    }
}
