//! Following a range of keys: read it whole, then watch it from the next
//! revision. A watch that breaks (a member died, etcd went away) resumes
//! from the revision after the last event seen, on the next member, so no
//! event is missed; one that cannot resume because etcd compacted that
//! revision away reads the range whole again. The follower sees every key
//! as etcd holds it, in order, after any outage.

use super::pb::watch_client::WatchClient;
use super::pb::{event::EventType, watch_request, KeyValue, WatchCreateRequest, WatchRequest};
use super::Etcd;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What changed in the followed range.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The whole range, as read now (first, and after a compaction).
    Reset(Vec<KeyValue>),
    Put(KeyValue),
    Delete(Vec<u8>),
}

/// How a watch stream ended.
enum Ended {
    /// Its start revision was compacted away: read the range again.
    Compacted,
    /// Broken (or never opened): resume from where it was.
    Broken(String),
    /// Nobody follows any more.
    Dropped,
}

/// Follows `[key, end)`, sending each response's changes as one batch,
/// until the receiver goes away.
pub fn follow(etcd: Etcd, key: Vec<u8>, end: Vec<u8>) -> mpsc::UnboundedReceiver<Vec<Change>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let what = String::from_utf8_lossy(&key).into_owned();
        let mut backoff = Backoff::default();
        let mut broken = false;
        loop {
            // Read the range whole: where the watch starts.
            let start = match etcd.range(&key, &end, 0).await {
                Ok((kvs, rev)) => {
                    if tx.send(vec![Change::Reset(kvs)]).is_err() {
                        return;
                    }
                    rev + 1
                }
                Err(e) => {
                    if !broken {
                        warn!(keys = %what, error = %e, "cannot read from etcd; serving what this replica has and retrying");
                        broken = true;
                    }
                    backoff.wait().await;
                    continue;
                }
            };
            let mut start = start;
            let mut next_member = false;
            loop {
                match watch(&etcd, &key, &end, &mut start, &tx, next_member, &mut broken).await {
                    Ended::Dropped => return,
                    Ended::Compacted => {
                        info!(keys = %what, "etcd compacted past this watch; reading the keys again");
                        break;
                    }
                    Ended::Broken(e) => {
                        if !broken {
                            warn!(keys = %what, error = %e, "etcd watch broken; resuming from revision {start}");
                            broken = true;
                        }
                        next_member = true;
                        backoff.wait().await;
                    }
                }
            }
            backoff.reset();
        }
    });
    rx
}

/// One watch stream from `start`, advancing it past each event seen.
async fn watch(
    etcd: &Etcd,
    key: &[u8],
    end: &[u8],
    start: &mut i64,
    tx: &mpsc::UnboundedSender<Vec<Change>>,
    next_member: bool,
    broken: &mut bool,
) -> Ended {
    let channel = match etcd.stream_channel(next_member).await {
        Ok(c) => c,
        Err(e) => return Ended::Broken(e.to_string()),
    };
    let (req_tx, req_rx) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                start_revision: *start,
                progress_notify: true,
                ..Default::default()
            },
        )),
    };
    let _ = req_tx.send(create).await;
    let mut req = etcd.request(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    // A member that loses its leader cancels the watch rather than going
    // quiet: the stream moves to a member that has one.
    req.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = match WatchClient::new(channel).watch(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            if s.code() == tonic::Code::Unauthenticated {
                etcd.drop_token();
            }
            return Ended::Broken(s.message().to_string());
        }
    };
    if std::mem::take(broken) {
        info!(keys = %String::from_utf8_lossy(key), from = *start, "following etcd again");
    }
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ended::Broken("the watch stream ended".into()),
            Err(s) => {
                if s.code() == tonic::Code::Unauthenticated {
                    etcd.drop_token();
                }
                return Ended::Broken(s.message().to_string());
            }
        };
        if resp.compact_revision != 0 {
            return Ended::Compacted;
        }
        if resp.canceled {
            return Ended::Broken(format!("watch canceled: {}", resp.cancel_reason));
        }
        let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if resp.events.is_empty() {
            // A progress notification: everything up to it was sent.
            if !resp.created && header_rev >= *start {
                *start = header_rev + 1;
            }
            continue;
        }
        let mut batch = Vec::with_capacity(resp.events.len());
        for ev in resp.events {
            let Some(kv) = ev.kv else { continue };
            *start = (*start).max(kv.mod_revision + 1);
            batch.push(match EventType::try_from(ev.r#type) {
                Ok(EventType::Delete) => Change::Delete(kv.key),
                _ => Change::Put(kv),
            });
        }
        if tx.send(batch).is_err() {
            drop(req_tx);
            return Ended::Dropped;
        }
    }
}

/// Retry delays: 100 ms doubling to 2 s, with jitter.
#[derive(Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub async fn wait(&mut self) {
        let base = 100u64 << self.attempt.min(5);
        let ms = base.min(2000);
        let jitter = fastrand::u64(0..=ms / 4);
        self.attempt += 1;
        tokio::time::sleep(Duration::from_millis(ms - ms / 8 + jitter)).await;
    }

    /// Waits since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
