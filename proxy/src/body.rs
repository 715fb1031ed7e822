//! The one body type on the request path. A concrete enum rather than a boxed
//! trait object: no allocation per request, and trailers (gRPC status) pass
//! through untouched because `Incoming` frames are forwarded as they are.
//! A streamed body may be watched by its exchange's timeouts
//! (`exchange.rs`): it then fails when the exchange goes idle or its
//! deadline passes, which aborts the stream on both sides.

use crate::exchange::{Exchange, TimedOut, Watch};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum Body {
    Empty,
    /// A buffered body (replayable for retries and mirrors).
    Full(Option<Bytes>),
    /// Streamed from the peer as it arrives.
    Incoming(Incoming),
    /// Streamed, under the exchange's idle timeout and deadline.
    Watched(Incoming, Watch),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let b = bytes.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }

    /// A streamed body under `exchange`'s timeouts (an ended one needs none).
    pub fn watched(body: Incoming, exchange: &Exchange) -> Body {
        use http_body::Body as _;
        if body.is_end_stream() {
            Body::Incoming(body)
        } else {
            Body::Watched(body, Watch::new(exchange.clone()))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Watched(b, watch) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(frame) => {
                    watch.moved();
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => match watch.poll_expired(cx) {
                    Poll::Ready(why) => Poll::Ready(Some(Err(Box::new(why) as BoxError))),
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(b) | Body::Watched(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(b) | Body::Watched(b, _) => b.size_hint(),
        }
    }
}

/// Whether an error that ended a body was the exchange's timeout.
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> Option<TimedOut> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<TimedOut>() {
            return Some(*t);
        }
        cur = err.source();
    }
    None
}
