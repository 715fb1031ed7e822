//! A thin client of etcd's v3 gRPC API: what the etcd store and the state
//! replicas share need (KV ranges, puts, deletes and transactions, watches,
//! leases, password authentication), over tonic, TLS by rustls.
//!
//! Written here rather than taken from the `etcd-client` crate, whose build
//! script needs `protoc`: the workspace builds with protox alone.
//!
//! Every call goes to one endpoint at a time; a call that fails because the
//! member is unreachable or has no leader moves on to the next endpoint, and
//! the client stays there, so losing one member of a cluster costs one
//! failed attempt, not an error.

pub mod lease;
pub mod watch;

use pb::kv_client::KvClient;
use pb::{
    compare, request_op, Compare, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest,
    RequestOp, TxnRequest, TxnResponse,
};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// The generated etcd API (`proto/etcd/`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub use etcdserverpb::*;
    pub use mvccpb::{event, Event, KeyValue};
}

/// How to reach the etcd cluster (`--etcd-*` flags).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// The CA that verifies the members' certificates (https endpoints).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for members that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd's own authentication: a user, and a file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member answered (all down, partitioned, or without a leader).
    #[error("etcd is unavailable ({endpoints}): {message}")]
    Unavailable { endpoints: String, message: String },
    /// A member answered with an error (permissions, a request too big, ...).
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// A flag or file for the client is wrong.
    #[error("{0}")]
    Config(String),
}

/// Longest a single call waits for one member.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response read (a range of many instances or statuses).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    channels: Vec<Channel>,
    /// The endpoint calls go to first: the last one that answered.
    preferred: AtomicUsize,
    endpoints: String,
    /// `(user, password file)` when etcd authentication is on.
    credentials: Option<(String, PathBuf)>,
    /// The current auth token.
    token: Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>,
}

impl Etcd {
    /// A client of the members in `options` (connections are made lazily:
    /// this succeeds with every member down).
    pub fn new(options: &Options) -> Result<Etcd, EtcdError> {
        if options.endpoints.is_empty() {
            return Err(EtcdError::Config("--etcd-endpoints: none given".into()));
        }
        let tls = tls_config(options)?;
        let mut channels = Vec::new();
        for url in &options.endpoints {
            let url = if url.contains("://") {
                url.clone()
            } else if tls.is_some() {
                format!("https://{url}")
            } else {
                format!("http://{url}")
            };
            let mut e = Endpoint::from_shared(url.clone())
                .map_err(|e| EtcdError::Config(format!("--etcd-endpoints {url}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let tls = tls.clone().unwrap_or_else(ClientTlsConfig::new);
                e = e
                    .tls_config(tls)
                    .map_err(|e| EtcdError::Config(format!("--etcd-endpoints {url}: {e}")))?;
            }
            channels.push(e.connect_lazy());
        }
        let credentials = match (&options.user, &options.password_file) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                return Err(EtcdError::Config(
                    "--etcd-user and --etcd-password-file go together".into(),
                ))
            }
        };
        Ok(Etcd {
            inner: Arc::new(Inner {
                channels,
                preferred: AtomicUsize::new(0),
                endpoints: options.endpoints.join(","),
                credentials,
                token: Mutex::new(None),
            }),
        })
    }

    /// The endpoints, for messages.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    fn unavailable(&self, message: impl ToString) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.inner.endpoints.clone(),
            message: message.to_string(),
        }
    }

    /// A request carrying the auth token, if any.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self
            .inner
            .token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            r.metadata_mut().insert("token", t);
        }
        r
    }

    /// Gets a token for the configured user (no-op without one).
    async fn authenticate(&self, channel: Channel) -> Result<(), Status> {
        let Some((user, file)) = &self.inner.credentials else {
            return Ok(());
        };
        let password = std::fs::read_to_string(file).map_err(|e| {
            Status::failed_precondition(format!("--etcd-password-file {}: {e}", file.display()))
        })?;
        let mut auth = pb::auth_client::AuthClient::new(channel);
        let resp = auth
            .authenticate(pb::AuthenticateRequest {
                name: user.clone(),
                password: password.trim_end_matches(['\n', '\r']).to_string(),
            })
            .await?
            .into_inner();
        let token = MetadataValue::try_from(resp.token.as_str())
            .map_err(|_| Status::internal("etcd sent an auth token that is not ASCII"))?;
        *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        Ok(())
    }

    /// Runs `call` on a member: the preferred one first, then each other
    /// one once; a member that is unreachable or without a leader is
    /// skipped, an expired auth token renewed.
    pub async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.inner.channels.len();
        let first = self.inner.preferred.load(Relaxed);
        let mut last = String::new();
        let mut authenticated = false;
        let mut i = 0;
        while i < n {
            let at = (first + i) % n;
            let channel = self.inner.channels[at].clone();
            let needs_token = self.inner.credentials.is_some()
                && self
                    .inner
                    .token
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none();
            if needs_token {
                if let Err(s) = self.authenticate(channel.clone()).await {
                    if retry_elsewhere(&s) {
                        last = s.message().to_string();
                        i += 1;
                        continue;
                    }
                    return Err(EtcdError::Refused(format!(
                        "authenticating: {}",
                        s.message()
                    )));
                }
            }
            match tokio::time::timeout(CALL_TIMEOUT, call(channel)).await {
                Ok(Ok(v)) => {
                    self.inner.preferred.store(at, Relaxed);
                    return Ok(v);
                }
                Ok(Err(s)) if invalid_token(&s) && !authenticated => {
                    // Tokens expire (etcd's --auth-token-ttl): get a new
                    // one and try this member again, once.
                    *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    authenticated = true;
                    continue;
                }
                Ok(Err(s)) if retry_elsewhere(&s) => last = s.message().to_string(),
                Ok(Err(s)) => return Err(EtcdError::Refused(format!("{what}: {}", s.message()))),
                Err(_) => last = format!("no answer within {CALL_TIMEOUT:?}"),
            }
            i += 1;
        }
        Err(self.unavailable(format!("{what}: {last}")))
    }

    /// A channel to the preferred member, for a stream (watch, keepalive);
    /// `next` moves the preference on first, after the stream failed.
    pub(crate) async fn stream_channel(&self, next: bool) -> Result<Channel, EtcdError> {
        let n = self.inner.channels.len();
        if next {
            let _ = self
                .inner
                .preferred
                .fetch_update(Relaxed, Relaxed, |p| Some((p + 1) % n));
        }
        let at = self.inner.preferred.load(Relaxed);
        let channel = self.inner.channels[at].clone();
        let needs_token = self.inner.credentials.is_some()
            && self
                .inner
                .token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none();
        if needs_token {
            self.authenticate(channel.clone())
                .await
                .map_err(|s| self.unavailable(format!("authenticating: {}", s.message())))?;
        }
        Ok(channel)
    }

    /// Forgets the auth token (a stream was refused with an invalid one).
    pub(crate) fn drop_token(&self) {
        *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    // ------------------------------------------------------------ KV

    /// One key, with the store's revision when it was read.
    pub async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let (mut kvs, rev) = self.range(key, &next_key(key), 0).await?;
        Ok((kvs.pop(), rev))
    }

    /// The keys in `[key, end)`, in key order (at most `limit`; 0: all),
    /// and the store's revision when they were read.
    pub async fn range(
        &self,
        key: &[u8],
        end: &[u8],
        limit: i64,
    ) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let req = RangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            limit,
            ..Default::default()
        };
        self.call("range", |ch| {
            let r = self.request(req.clone());
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .range(r)
                    .await
            }
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.kvs, r.header.map_or(0, |h| h.revision))
        })
    }

    /// Every key under `prefix`.
    pub async fn prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        self.range(prefix, &prefix_end(prefix), 0).await
    }

    /// A transaction: `success` if every `compare` holds, else `failure`.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        failure: Vec<RequestOp>,
    ) -> Result<TxnResponse, EtcdError> {
        let req = TxnRequest {
            compare,
            success,
            failure,
        };
        self.call("txn", |ch| {
            let r = self.request(req.clone());
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .txn(r)
                    .await
            }
        })
        .await
        .map(|r| r.into_inner())
    }
}

/// The TLS settings of `options`, if it has any.
fn tls_config(options: &Options) -> Result<Option<ClientTlsConfig>, EtcdError> {
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| EtcdError::Config(format!("{flag} {}: {e}", p.display())))
    };
    let mut tls = ClientTlsConfig::new();
    let mut any = false;
    if let Some(ca) = &options.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read("--etcd-ca-file", ca)?));
        any = true;
    }
    match (&options.cert_file, &options.key_file) {
        (Some(c), Some(k)) => {
            let id = Identity::from_pem(read("--etcd-cert-file", c)?, read("--etcd-key-file", k)?);
            tls = tls.identity(id);
            any = true;
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Config(
                "--etcd-cert-file and --etcd-key-file go together".into(),
            ))
        }
    }
    Ok(any.then_some(tls))
}

/// Whether another member may succeed where this one failed.
fn retry_elsewhere(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    ) || s.message().contains("no leader")
        || s.message().contains("leader changed")
        || s.message().contains("timed out")
}

fn invalid_token(s: &Status) -> bool {
    s.code() == Code::Unauthenticated && s.message().contains("invalid auth token")
}

/// The first key after `key` (a range of exactly `key`).
pub fn next_key(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// ------------------------------------------------------------ ops

pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        })),
    }
}

/// Moves `key` to another lease, keeping its value.
pub fn relet(key: impl Into<Vec<u8>>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            lease,
            ignore_value: true,
            ..Default::default()
        })),
    }
}

pub fn get(key: impl Into<Vec<u8>>) -> RequestOp {
    let key = key.into();
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            range_end: next_key(&key),
            key,
            ..Default::default()
        })),
    }
}

/// Deletes the keys in `[key, end)` (`end` empty: `key` alone).
pub fn delete(key: impl Into<Vec<u8>>, end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.into(),
                range_end: end,
                ..Default::default()
            },
        )),
    }
}

/// A transaction inside a transaction (its own compare).
pub fn nested(compare: Vec<Compare>, success: Vec<RequestOp>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestTxn(TxnRequest {
            compare,
            success,
            failure: vec![],
        })),
    }
}

fn compare(key: impl Into<Vec<u8>>, target: compare::TargetUnion) -> Compare {
    let t = match target {
        compare::TargetUnion::Version(_) => compare::CompareTarget::Version,
        compare::TargetUnion::CreateRevision(_) => compare::CompareTarget::Create,
        compare::TargetUnion::ModRevision(_) => compare::CompareTarget::Mod,
        compare::TargetUnion::Value(_) => compare::CompareTarget::Value,
        compare::TargetUnion::Lease(_) => compare::CompareTarget::Lease,
    };
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: t as i32,
        key: key.into(),
        target_union: Some(target),
        range_end: vec![],
    }
}

/// `key` does not exist.
pub fn absent(key: impl Into<Vec<u8>>) -> Compare {
    compare(key, compare::TargetUnion::CreateRevision(0))
}

/// `key` holds `value`.
pub fn value_is(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Compare {
    compare(key, compare::TargetUnion::Value(value.into()))
}

/// `key` is attached to `lease`.
pub fn lease_is(key: impl Into<Vec<u8>>, lease: i64) -> Compare {
    compare(key, compare::TargetUnion::Lease(lease))
}

/// The key-values a transaction's `i`th operation (a get) read.
pub fn range_result(r: &TxnResponse, i: usize) -> Vec<KeyValue> {
    match r.responses.get(i).and_then(|o| o.response.as_ref()) {
        Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.clone(),
        _ => vec![],
    }
}

/// How many keys a transaction's `i`th operation (a delete) removed.
pub fn deleted(r: &TxnResponse, i: usize) -> i64 {
    match r.responses.get(i).and_then(|o| o.response.as_ref()) {
        Some(pb::response_op::Response::ResponseDeleteRange(d)) => d.deleted,
        _ => 0,
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_end_where_the_prefix_ends() {
        assert_eq!(prefix_end(b"/remora/"), b"/remora0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(next_key(b"k"), b"k\0".to_vec());
    }

    #[tokio::test]
    async fn half_a_client_certificate_or_credential_is_refused() {
        let o = Options {
            endpoints: vec!["127.0.0.1:2379".into()],
            cert_file: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(matches!(Etcd::new(&o), Err(EtcdError::Config(_))));
        let o = Options {
            endpoints: vec!["127.0.0.1:2379".into()],
            user: Some("remora".into()),
            ..Default::default()
        };
        assert!(matches!(Etcd::new(&o), Err(EtcdError::Config(_))));
        assert!(Etcd::new(&Options::default()).is_err());
    }
}
