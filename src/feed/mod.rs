//! The NATS JetStream feed: several `serve` instances share one replicated
//! stream, partitioned by device, each partition applied by exactly one
//! instance at a time (docs/ARCHITECTURE.md, "Scale-out").
//!
//! ```text
//! producer ──sensors.<device>──> server mapping partition() ──> <stream>.p.<n>.0
//!   <stream>.p.<n>.>  ──durable pull consumer p<n>-<token>──> owner of n
//!   owner: fetch ──> feeder thread ──> workers (fence checked in each transaction)
//!          <── ack after commit <── ack thread <── worker replies
//! ```
//!
//! Ownership lives in a JetStream key-value bucket (`<stream>-owners`): a
//! key per partition whose revision is the owner's fencing token, and a key
//! per running instance; the bucket's TTL ends a lease that is not renewed.
//! The async side (one single-threaded tokio runtime on its own thread) only
//! talks to NATS; the database is touched only by blocking threads.

pub mod connect;
mod fetch;
mod handle;
mod lease;
mod ownership;
pub mod publish;
mod settle;
mod setup;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use connect::{Login, NatsAuth, Tls};
pub use handle::{Feed, FeedError};
pub use lease::fair_share;

/// The subject prefix producers publish to: `sensors.<device token>` (MQTT
/// topic `sensors/<device key>`).
pub const INPUT_PREFIX: &str = "sensors";

/// A header set by `send --nats` on a line longer than the line limit,
/// whose head alone was published: the line's full length in bytes.
pub const TRUNCATED_HEADER: &str = "Normalizer-Truncated";

/// How an instance uses the feed. Defaults in `impl Default`.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsOptions {
    /// The cluster's client URLs, comma-separated, without credentials
    /// (see [`connect::split_credentials`]): safe to print.
    pub servers: String,
    /// How to log in and check the servers.
    pub auth: NatsAuth,
    /// The stream.
    pub stream: String,
    /// Partitions of the stream, when `serve` creates it; an existing
    /// stream must have as many.
    pub partitions: u32,
    /// The stream's (and the ownership bucket's) replicas, when `serve`
    /// creates them.
    pub replicas: usize,
    /// How long an ownership lease lasts unrenewed: an instance that died
    /// loses its partitions after this long.
    pub lease: Duration,
    /// Messages in flight per partition (fetched, not yet acknowledged).
    pub max_in_flight: usize,
    /// How long the server waits for an acknowledgement before it
    /// redelivers; in-flight messages are marked in progress well before.
    pub ack_wait: Duration,
    /// This instance's name in the ownership bucket (unique per process).
    pub instance: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            servers: "nats://127.0.0.1:4222".to_string(),
            auth: NatsAuth::default(),
            stream: "normalizer".to_string(),
            partitions: 16,
            replicas: 1,
            lease: Duration::from_secs(10),
            max_in_flight: 1000,
            ack_wait: Duration::from_secs(30),
            instance: default_instance(),
        }
    }
}

impl NatsOptions {
    /// The key-value bucket of ownership records.
    pub fn bucket(&self) -> String {
        format!("{}-owners", self.stream)
    }

    /// The fence key of partition `n`.
    pub fn fence_key(&self, n: u32) -> Arc<str> {
        format!("{}/{n}", self.stream).into()
    }
}

/// `<host>-<pid>-<random>`, with only the characters a key may hold.
fn default_instance() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "host".to_string()
    };
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The client URLs of `servers` (comma-separated).
pub fn server_addrs(servers: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    servers
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", connect::redact_servers(servers)))
}

/// A device key as one subject token: bytes other than ASCII letters,
/// digits, `-` and `_` become `%XX`, so every key the contract allows
/// (UTF-8, `/`, `.`, spaces) routes, and two keys never share a token. A
/// line whose device cannot be read goes to token `%`.
pub fn subject_token(device: Option<&str>) -> String {
    let Some(device) = device.filter(|d| !d.is_empty()) else {
        return "%".to_string();
    };
    let mut out = String::with_capacity(device.len());
    for b in device.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the stats line, `status` and the metrics show of the feed.
#[derive(Debug, Default)]
pub struct FeedStatus {
    /// Partitions this instance owns now, with their state.
    pub partitions: Mutex<BTreeMap<u32, PartitionStatus>>,
    /// Messages delivered more than once (redelivered by the server).
    pub redeliveries: AtomicU64,
    /// Messages acknowledged.
    pub acknowledged: AtomicU64,
    /// Messages whose transaction ended at its fence: another instance
    /// had claimed their partition.
    pub fenced: AtomicU64,
    /// Since when NATS has been unreachable, if it is.
    pub down_since: Mutex<Option<DateTime<Utc>>>,
    /// The outage was logged (it lasted long enough to count).
    pub down_logged: AtomicBool,
    /// The server refuses this instance's credentials now (it did accept
    /// them at start): nothing is fetched until it accepts them again.
    pub refused: AtomicBool,
    /// Instances seen in the ownership bucket at the last look.
    pub instances: AtomicU64,
    /// Whether the feed is set up and consuming.
    pub ready: AtomicBool,
}

/// One owned partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionStatus {
    /// The fencing token this instance holds it with.
    pub token: i64,
    /// Messages of the partition not yet delivered to this instance.
    pub pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_key_becomes_one_distinct_subject_token() {
        assert_eq!(subject_token(Some("dev-00001")), "dev-00001");
        assert_eq!(
            subject_token(Some("Raum 2.OG/Süd-Fenster")),
            "Raum%202%2EOG%2FS%C3%BCd-Fenster"
        );
        assert_eq!(subject_token(None), "%");
        assert_eq!(subject_token(Some("")), "%");
        // `%` itself is encoded, so no key can collide with another's code.
        assert_ne!(subject_token(Some("a%2E")), subject_token(Some("a.")));
        for key in ["a b", "a.b", "a*b", "a>b", "a\tb", "ü"] {
            let token = subject_token(Some(key));
            assert!(
                token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_%".contains(c)),
                "{key:?} -> {token:?}"
            );
        }
    }
}
