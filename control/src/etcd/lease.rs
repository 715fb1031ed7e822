//! Leases: keys that go by themselves when nobody keeps them.
//!
//! `keep` holds the replica's own lease: granted at start, kept alive every
//! third of its TTL. Keys of what the replica answers for right now (its
//! connected proxies) hang on it, so a replica that dies takes them away
//! after the TTL unless another replica has taken them over. If the lease
//! is lost anyway (etcd unreachable past the TTL), a new one is granted and
//! announced, and the holders put their keys on it again.
//!
//! `Leases::lease` grants short leases for keys that must outlive a
//! connection by a fixed time (an instance for the registration grace, a
//! status for the retention): one lease per TTL and second, shared.

use super::pb::lease_client::LeaseClient;
use super::pb::{LeaseGrantRequest, LeaseKeepAliveRequest};
use super::watch::Backoff;
use super::{Etcd, EtcdError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Grants a lease of `ttl`.
pub async fn grant(etcd: &Etcd, ttl: Duration) -> Result<i64, EtcdError> {
    let req = LeaseGrantRequest {
        ttl: ttl.as_secs().max(1) as i64,
        id: 0,
    };
    let r = etcd
        .call("lease grant", |ch| {
            let r = etcd.request(req);
            async move { LeaseClient::new(ch).lease_grant(r).await }
        })
        .await?
        .into_inner();
    if !r.error.is_empty() {
        return Err(EtcdError::Refused(format!("lease grant: {}", r.error)));
    }
    Ok(r.id)
}

/// The replica's lease: its id now (0 until the first grant), changing
/// when a lost lease is replaced.
pub fn keep(etcd: Etcd, ttl: Duration) -> watch::Receiver<i64> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut next_member = false;
        loop {
            let id = match grant(&etcd, ttl).await {
                Ok(id) => id,
                Err(e) => {
                    if backoff.attempts() == 0 {
                        warn!(error = %e, "cannot grant the replica's etcd lease; retrying");
                    }
                    backoff.wait().await;
                    continue;
                }
            };
            info!(lease = format!("{id:x}"), ttl = ?ttl, "replica lease granted");
            if tx.send(id).is_err() {
                return;
            }
            backoff.reset();
            // Keep it alive until etcd says it is gone.
            loop {
                match keep_alive(&etcd, id, ttl, next_member).await {
                    Kept::Expired => {
                        backoff.reset();
                        warn!(lease = format!("{id:x}"), "the replica's etcd lease expired; granting a new one and putting this replica's keys on it");
                        break;
                    }
                    Kept::Broken(e) => {
                        if backoff.attempts() == 0 {
                            warn!(lease = format!("{id:x}"), error = %e, "etcd lease keep-alive broken; retrying");
                        }
                        next_member = true;
                        backoff.wait().await;
                    }
                }
            }
        }
    });
    rx
}

enum Kept {
    Expired,
    Broken(String),
}

/// One keep-alive stream: a request every third of the TTL, until the
/// lease expires or the stream breaks.
async fn keep_alive(etcd: &Etcd, id: i64, ttl: Duration, next_member: bool) -> Kept {
    let channel = match etcd.stream_channel(next_member).await {
        Ok(c) => c,
        Err(e) => return Kept::Broken(e.to_string()),
    };
    let (req_tx, req_rx) = mpsc::channel(1);
    let mut req = etcd.request(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    req.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let _ = req_tx.send(LeaseKeepAliveRequest { id }).await;
    let mut stream = match LeaseClient::new(channel).lease_keep_alive(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Kept::Broken(s.message().to_string()),
    };
    let every = (ttl / 3).max(Duration::from_millis(300));
    let mut tick = tokio::time::interval(every);
    let mut answered = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if answered.elapsed() > ttl {
                    return Kept::Broken(format!("no keep-alive answer for {ttl:?}"));
                }
                if req_tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    return Kept::Broken("keep-alive stream closed".into());
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(r)) if r.ttl <= 0 => return Kept::Expired,
                Ok(Some(_)) => answered = Instant::now(),
                Ok(None) => return Kept::Broken("keep-alive stream ended".into()),
                Err(s) => return Kept::Broken(s.message().to_string()),
            }
        }
    }
}

/// Short leases shared by the keys that need one of the same TTL within
/// the same second.
pub struct Leases {
    etcd: Etcd,
    granted: Mutex<HashMap<u64, (Instant, i64)>>,
}

impl Leases {
    pub fn new(etcd: Etcd) -> Leases {
        Leases {
            etcd,
            granted: Mutex::default(),
        }
    }

    /// A lease that expires `ttl` from now (up to a second later).
    pub async fn lease(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let secs = ttl.as_secs().max(1);
        if let Some((at, id)) = self
            .granted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&secs)
        {
            if at.elapsed() < Duration::from_secs(1) {
                return Ok(*id);
            }
        }
        let id = grant(&self.etcd, Duration::from_secs(secs)).await?;
        self.granted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(secs, (Instant::now(), id));
        Ok(id)
    }
}
