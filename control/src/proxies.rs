//! The proxies that have a Discovery stream (or had one within the status
//! retention): what each was sent and answered, for `remoractl status` and
//! the push metrics. Each stream holds its proxy's entry, so recording a
//! send or an ACK touches that entry alone: no lookup by node id, no lock
//! over the whole table.

use remora_proto::control::ProxyStatus;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One proxy's stream (a reconnect makes a new one).
pub struct Proxy {
    pub node: String,
    /// The Service it fronts (`namespace/name`), or empty.
    pub service: String,
    /// Tells this stream from the node's earlier and later ones.
    pub conn: u64,
    /// When its stream opened: a version committed later reached it on
    /// connect, not by a push.
    connected_at: Instant,
    connected_since_unix: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connected: bool,
    gone_since: Option<Instant>,
    sent: Arc<str>,
    /// When what was sent was committed; `None` for a version the proxy
    /// already ran when it connected.
    sent_committed_at: Option<Instant>,
    acked: Arc<str>,
    nacked: Arc<str>,
    nack_error: String,
    /// The last version whose push this proxy's ACK was counted for.
    counted: Arc<str>,
}

/// What an ACK or NACK meant.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The first ACK of a version pushed to this proxy: commit → ACK.
    Pushed(Duration),
    /// An ACK that times nothing (a repeat, or what it got on connect).
    Ack,
    Nack,
}

impl Proxy {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot went out on this stream.
    pub fn sent(&self, version: &Arc<str>, committed_at: Instant) {
        let mut st = self.lock();
        st.sent = version.clone();
        st.sent_committed_at = Some(committed_at);
    }

    /// The proxy answered for `version`: ACK when `error` is empty.
    pub fn answered(&self, version: &str, error: &str) -> Answer {
        let mut st = self.lock();
        let v: Arc<str> = if *st.sent == *version {
            st.sent.clone()
        } else {
            Arc::from(version)
        };
        if !error.is_empty() {
            st.nacked = v;
            st.nack_error = error.to_string();
            return Answer::Nack;
        }
        st.acked = v.clone();
        st.nacked = Arc::from("");
        st.nack_error.clear();
        match st.sent_committed_at {
            Some(at) if *st.sent == *version && at >= self.connected_at && st.counted != v => {
                st.counted = v;
                Answer::Pushed(at.elapsed())
            }
            _ => Answer::Ack,
        }
    }

    pub fn connected(&self) -> bool {
        self.lock().connected
    }

    /// The snapshot version it runs (ACKed), or empty.
    pub fn acked(&self) -> Arc<str> {
        self.lock().acked.clone()
    }

    pub fn status(&self, instance: String) -> ProxyStatus {
        let st = self.lock();
        ProxyStatus {
            node_id: self.node.clone(),
            service: self.service.clone(),
            connected: st.connected,
            connected_since_unix: self.connected_since_unix,
            sent_version: st.sent.to_string(),
            acked_version: st.acked.to_string(),
            nacked_version: st.nacked.to_string(),
            nack_error: st.nack_error.clone(),
            instance,
        }
    }
}

pub struct Proxies {
    table: Mutex<BTreeMap<String, Arc<Proxy>>>,
    next_conn: AtomicU64,
    /// How long a proxy whose stream ended stays in the table, seconds.
    retention: AtomicU64,
    /// When the table was last pruned (a connect storm prunes once a
    /// second, not once per connect).
    pruned: Mutex<Option<Instant>>,
}

impl Default for Proxies {
    fn default() -> Proxies {
        Proxies {
            table: Mutex::default(),
            next_conn: AtomicU64::new(0),
            retention: AtomicU64::new(3600),
            pruned: Mutex::default(),
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Proxies {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Proxy>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_retention(&self, d: Duration) {
        self.retention.store(d.as_secs().max(1), Relaxed);
    }

    /// A proxy's stream opened; it replaces the node's earlier entry. A
    /// proxy that already runs `last_version` (kept on disk, or from before
    /// a control-plane restart) is not sent it again: it counts as sent and
    /// ACKed, so `status` shows it as running the version it runs.
    pub fn connect(&self, node: &str, service: &str, last_version: &str) -> Arc<Proxy> {
        let last: Arc<str> = Arc::from(last_version);
        let proxy = Arc::new(Proxy {
            node: node.to_string(),
            service: service.to_string(),
            conn: self.next_conn.fetch_add(1, Relaxed) + 1,
            connected_at: Instant::now(),
            connected_since_unix: now_unix(),
            state: Mutex::new(State {
                connected: true,
                sent: last.clone(),
                acked: last,
                ..Default::default()
            }),
        });
        self.lock().insert(node.to_string(), proxy.clone());
        proxy
    }

    /// Its stream ended; it stays in the table for the retention period.
    pub fn disconnected(&self, proxy: &Proxy) {
        let mut st = proxy.lock();
        st.connected = false;
        st.gone_since = Some(Instant::now());
    }

    /// The node's current entry.
    pub fn get(&self, node: &str) -> Option<Arc<Proxy>> {
        self.lock().get(node).cloned()
    }

    /// Forgets proxies gone for longer than the retention (`now`, or at
    /// most once a second); true if any went.
    pub fn prune(&self, now: bool) -> bool {
        {
            let mut last = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
            if !now && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let retention = Duration::from_secs(self.retention.load(Relaxed));
        let mut table = self.lock();
        let before = table.len();
        table.retain(|_, p| p.lock().gone_since.is_none_or(|t| t.elapsed() < retention));
        table.len() != before
    }

    /// Every entry, by node id.
    pub fn list(&self) -> Vec<Arc<Proxy>> {
        self.lock().values().cloned().collect()
    }

    pub fn contains(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// Connected proxies by (service, the version they run).
    pub fn census(&self) -> HashMap<(String, Arc<str>), u64> {
        let all: Vec<Arc<Proxy>> = self.lock().values().cloned().collect();
        let mut out = HashMap::new();
        for p in all {
            let st = p.lock();
            if st.connected {
                *out.entry((p.service.clone(), st.acked.clone()))
                    .or_insert(0) += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_timed_once_per_proxy_and_version() {
        let proxies = Proxies::default();
        let p = proxies.connect("a", "shop/api", "");
        let v1: Arc<str> = Arc::from("1.0");
        p.sent(&v1, Instant::now());
        assert!(matches!(p.answered("1.0", ""), Answer::Pushed(_)));
        // The same ACK again, e.g. after a resend: counted once.
        assert_eq!(p.answered("1.0", ""), Answer::Ack);
        let v2: Arc<str> = Arc::from("2.0");
        p.sent(&v2, Instant::now());
        assert_eq!(p.answered("2.0", "too many rules"), Answer::Nack);
        let s = p.status(String::new());
        assert_eq!(
            (s.acked_version.as_str(), s.nacked_version.as_str()),
            ("1.0", "2.0")
        );
        assert_eq!(s.nack_error, "too many rules");
    }

    #[test]
    fn what_a_proxy_gets_on_connect_is_not_a_push() {
        let proxies = Proxies::default();
        let committed = Instant::now();
        let p = proxies.connect("a", "", "");
        p.sent(&Arc::from("1.0"), committed);
        assert_eq!(p.answered("1.0", ""), Answer::Ack);
    }

    #[test]
    fn a_proxy_reconnecting_with_the_current_version_shows_it_acked() {
        let proxies = Proxies::default();
        let p = proxies.connect("a", "", "7.abc");
        let s = p.status(String::new());
        assert_eq!(
            (s.sent_version.as_str(), s.acked_version.as_str()),
            ("7.abc", "7.abc")
        );
        assert!(s.connected);
    }

    #[test]
    fn the_census_counts_connected_proxies_by_service_and_version() {
        let proxies = Proxies::default();
        let a = proxies.connect("a", "shop/api", "1.0");
        proxies.connect("b", "shop/api", "1.0");
        proxies.connect("c", "shop/web", "");
        let census = proxies.census();
        assert_eq!(census[&("shop/api".to_string(), Arc::from("1.0"))], 2);
        assert_eq!(census[&("shop/web".to_string(), Arc::from(""))], 1);
        proxies.disconnected(&a);
        assert_eq!(
            proxies.census()[&("shop/api".to_string(), Arc::from("1.0"))],
            1
        );
        // A reconnect replaces the entry.
        let again = proxies.connect("a", "shop/api", "1.0");
        assert_ne!(again.conn, a.conn);
        assert_eq!(
            proxies.census()[&("shop/api".to_string(), Arc::from("1.0"))],
            2
        );
        assert_eq!(proxies.list().len(), 3);
    }
}
