//! `serve --mqtt`: the MQTT broker the sensors already publish to, read
//! directly, each message acknowledged (PUBACK) only once its outcome is
//! committed, in the order the broker sent them (docs/ARCHITECTURE.md,
//! "MQTT: acknowledged after commit").
//!
//! ```text
//! broker ──PUBLISH (QoS 1, persistent session)──> events thread ──> feeder ──> workers
//!        <──PUBACK, in arrival order── ack thread <── AckWindow <── worker replies
//! ```
//!
//! The events thread only polls the connection (rumqttc's blocking
//! `Connection`, which runs its own small tokio runtime), so keep-alives and
//! acknowledgements flow while the workers are busy or the database is
//! down; the broker's in-flight window (`max_inflight_messages`) bounds what
//! it holds. The database is touched only by the worker threads.

pub mod publish;
mod settings;
mod source;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;

use crate::secret::Secret;

pub use settings::{resolve, MqttFile, MqttFlags};
pub use source::{Source, SourceError, MAX_PACKET_BYTES};

/// The default subscription: one topic per device under `sensors/`.
pub const DEFAULT_TOPIC: &str = "sensors/#";

/// How `serve` reads an MQTT broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttOptions {
    /// The broker's host.
    pub host: String,
    /// The broker's port (1883, or 8883 for `mqtts://`, unless given).
    pub port: u16,
    /// TLS (`mqtts://`, or a CA, certificate or key given).
    pub tls: bool,
    /// Topic filters subscribed at QoS 1.
    pub topics: Vec<String>,
    /// The client id: fixed, so that the broker keeps the session (and what
    /// arrives while the service is down) across restarts.
    pub client_id: String,
    /// User and password, where the broker wants them.
    pub login: Option<(String, Secret)>,
    /// A CA's certificate (PEM) to trust the broker's by, instead of the
    /// system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// This client's certificate and key (PEM), for brokers that verify
    /// clients.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl MqttOptions {
    /// `mqtt://host:port` or `mqtts://host:port`: the broker's address with
    /// no credentials, safe to print.
    pub fn address(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

/// A broker URL taken apart: `mqtt://[user[:password]@]host[:port]` or
/// `mqtts://…`. The user info is percent-decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUrl {
    /// `mqtts://`
    pub tls: bool,
    /// The host (an IPv6 address without its brackets).
    pub host: String,
    /// The port, the scheme's default when absent.
    pub port: u16,
    /// The user, where the URL holds one.
    pub user: Option<String>,
    /// The password, where the URL holds one.
    pub password: Option<Secret>,
}

/// Parses a broker URL; the error never repeats the URL (it may hold a
/// password).
pub fn parse_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("ssl://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("tcp://") {
        (false, rest)
    } else {
        return Err("the broker URL must start with mqtt:// or mqtts://".into());
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, rest),
    };
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "the broker URL's user info is not UTF-8 once decoded".to_string())
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (Some(decode(user)?), Some(Secret::new(decode(password)?))),
            None => (Some(decode(info)?), None),
        },
    };
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("the broker URL's IPv6 address lacks its ']'")?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err("the broker URL has text after its address".into()),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err("the broker URL must name a host: mqtt://host[:port]".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or("the broker URL's port is not a number from 1 to 65535")?,
    };
    Ok(BrokerUrl {
        tls,
        host: host.to_string(),
        port,
        user,
        password,
    })
}

/// What the stats line and the metrics show of the MQTT source.
#[derive(Debug, Default)]
pub struct MqttStatus {
    /// Since when the broker has been unreachable (none: connected).
    pub down_since: Mutex<Option<DateTime<Utc>>>,
    /// The broker refuses this client (credentials, authorization) now.
    pub refused: AtomicBool,
    /// PUBLISH packets received (redeliveries included).
    pub received: AtomicU64,
    /// PUBACKs sent.
    pub acknowledged: AtomicU64,
    /// Messages handed to the workers whose outcome is not back yet.
    pub in_flight: AtomicU64,
    /// Redeliveries received (DUP set).
    pub redelivered: AtomicU64,
}

/// The write token of one MQTT message: the same on every delivery of it
/// in the session (a broker resends an unacknowledged PUBLISH with its
/// packet id, and the same topic and payload), so that a message whose
/// first delivery committed changes nothing when it comes again. FNV-1a of
/// the topic and payload: stable across builds and versions, unlike std's
/// hasher.
pub(crate) fn token(client_id: &str, pkid: u16, topic: &str, payload: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes().chain([0]).chain(payload.iter().copied()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mqtt:{client_id}:{pkid}:{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_taken_apart_and_their_errors_never_repeat_them() {
        let u = parse_url("mqtt://broker.local").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.local", 1883)
        );
        assert!(u.user.is_none() && u.password.is_none());
        let u = parse_url("mqtts://app:p%40ss:w@10.0.0.1:9883/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "10.0.0.1", 9883));
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.unwrap().expose(), "p@ss:w");
        let u = parse_url("mqtts://[::1]").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8883));
        let u = parse_url("mqtt://only-user@h:1").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.password.is_none()),
            (Some("only-user"), true)
        );
        for bad in [
            "http://u:hunter2@h",
            "mqtt://u:hunter2@h:0",
            "mqtt://u:hunter2@h:99999",
            "mqtt://u:hunter2@",
            "mqtt://u:hunter2@h/path",
            "mqtt://u:hunter2@[::1",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_token_is_the_same_for_a_redelivery_and_differs_with_any_part() {
        let t = token("c", 7, "sensors/d1", b"{}");
        assert_eq!(t, token("c", 7, "sensors/d1", b"{}"));
        for other in [
            token("c2", 7, "sensors/d1", b"{}"),
            token("c", 8, "sensors/d1", b"{}"),
            token("c", 7, "sensors/d2", b"{}"),
            token("c", 7, "sensors/d1", b"{ }"),
            // The topic and payload do not run into each other.
            token("c", 7, "sensors/d1{", b"}"),
        ] {
            assert_ne!(t, other);
        }
        assert_eq!(t, "mqtt:c:7:".to_string() + &t[t.len() - 16..]);
    }
}
