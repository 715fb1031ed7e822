//! Timeouts that cover a whole exchange, bodies included (Gateway API
//! semantics): `timeouts.request` runs until the whole response has been
//! received and `backendRequest` until each try's whole response, not only
//! until response headers; and a stream idle timeout (no byte either way)
//! applies to every stream, so a peer that stalls mid-body is cut off.
//!
//! One `Exchange` is shared by the request body going up, the wait for the
//! response head, and the response body coming down: each byte that moves
//! resets the idle clock for all three. A body's timer is made only when
//! the body actually has to wait (a small response that is already there
//! costs no timer).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why an exchange was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimedOut {
    #[error("no byte either way for the stream idle timeout")]
    Idle,
    #[error("the request timeout passed before the response ended")]
    Deadline,
}

/// The clocks of one exchange.
#[derive(Clone, Debug)]
pub struct Exchange {
    inner: Arc<Clock>,
    /// The end of the request (or this try's) timeout, if there is one.
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Clock {
    start: Instant,
    /// Milliseconds after `start` of the last byte either way.
    last_ms: AtomicU64,
    idle: Duration,
}

impl Exchange {
    pub fn new(idle: Duration, deadline: Option<Instant>) -> Exchange {
        Exchange {
            inner: Arc::new(Clock {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
                idle,
            }),
            deadline,
        }
    }

    /// The same exchange with an earlier deadline (one try's).
    pub fn within(&self, deadline: Option<Instant>) -> Exchange {
        let deadline = match (self.deadline, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Exchange {
            inner: self.inner.clone(),
            deadline,
        }
    }

    /// A byte moved.
    pub fn touch(&self) {
        let ms = self.inner.start.elapsed().as_millis() as u64;
        self.inner.last_ms.store(ms, Relaxed);
    }

    /// When the exchange is cut off if nothing moves, and why.
    fn expiry(&self) -> (Instant, TimedOut) {
        let idle_at = self.inner.start
            + Duration::from_millis(self.inner.last_ms.load(Relaxed))
            + self.inner.idle;
        match self.deadline {
            Some(d) if d <= idle_at => (d, TimedOut::Deadline),
            _ => (idle_at, TimedOut::Idle),
        }
    }

    /// Runs `f` unless the exchange times out first (idle, reset by bytes
    /// moving elsewhere in the exchange, or the deadline).
    pub async fn bound<F: Future>(&self, f: F) -> Result<F::Output, TimedOut> {
        tokio::pin!(f);
        loop {
            let (at, _) = self.expiry();
            tokio::select! {
                biased;
                out = &mut f => return Ok(out),
                _ = tokio::time::sleep_until(at) => {
                    // Bytes may have moved meanwhile: look again.
                    let (again, why) = self.expiry();
                    if again <= Instant::now() {
                        return Err(why);
                    }
                }
            }
        }
    }
}

/// The timer of one body, made when it first has to wait.
#[derive(Debug)]
pub struct Watch {
    exchange: Exchange,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Watch {
    pub fn new(exchange: Exchange) -> Watch {
        Watch {
            exchange,
            sleep: None,
        }
    }

    /// A frame arrived.
    pub fn moved(&mut self) {
        self.exchange.touch();
    }

    /// The body is waiting: Ready(Err) once the exchange timed out.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<TimedOut> {
        loop {
            let (at, why) = self.exchange.expiry();
            if at <= Instant::now() {
                return Poll::Ready(why);
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Fired: check again (bytes may have moved elsewhere).
                Poll::Ready(()) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_is_reset_by_bytes_anywhere_in_the_exchange() {
        let ex = Exchange::new(Duration::from_secs(10), None);
        let other = ex.clone();
        let t0 = Instant::now();
        let toucher = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                other.touch();
            }
        });
        let r = ex.bound(std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut::Idle));
        // Last touch at 18 s, idle 10 s.
        assert_eq!(t0.elapsed().as_secs(), 28);
        toucher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_holds_whatever_moves() {
        let t0 = Instant::now();
        let ex = Exchange::new(Duration::from_secs(10), Some(t0 + Duration::from_secs(15)));
        let try_ = ex.within(Some(t0 + Duration::from_secs(4)));
        let r = try_.bound(std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut::Deadline));
        assert_eq!(t0.elapsed().as_secs(), 4);
        let other = ex.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                other.touch();
            }
        });
        assert_eq!(
            ex.bound(std::future::pending::<()>()).await,
            Err(TimedOut::Deadline)
        );
        assert_eq!(t0.elapsed().as_secs(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_fires_only_when_the_exchange_is_quiet() {
        let ex = Exchange::new(Duration::from_secs(5), None);
        let mut w = Watch::new(ex.clone());
        let t0 = Instant::now();
        std::future::poll_fn(|cx| {
            if t0.elapsed() < Duration::from_secs(3) {
                // Simulate a frame now and then, as a body would.
                w.moved();
            }
            w.poll_expired(cx)
                .map(|why| assert_eq!(why, TimedOut::Idle))
        })
        .await;
        assert!(t0.elapsed() >= Duration::from_secs(5));
    }
}
