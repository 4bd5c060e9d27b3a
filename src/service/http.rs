//! `--metrics-listen`: `/metrics` (the families of the metrics file, fresh
//! at each scrape) and `/healthz` over HTTP, on a thread of their own.
//!
//! `/healthz` answers from the last check of a prober thread that asks the
//! database every second on a connection of its own, outside the pool and
//! the retry loop, so that an idle service notices an outage as soon as a
//! busy one: 200 `ok` while the last check passed, 503 with the reason
//! while it failed, while the breaker has the database down, or while a
//! check has gone unanswered for [`SILENT`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::db::Database;

/// How often the prober asks the database.
pub const EVERY: Duration = Duration::from_secs(1);

/// A check that has not ended after this long counts as failed.
pub const SILENT: Duration = Duration::from_secs(3);

/// The HTTP listener of `--metrics-listen`.
pub struct MetricsListener(tiny_http::Server);

impl MetricsListener {
    /// Binds it (at start, so that a bad or taken address is an error
    /// before the service says it is ready).
    pub fn bind(addr: SocketAddr) -> anyhow::Result<MetricsListener> {
        tiny_http::Server::http(addr)
            .map(MetricsListener)
            .map_err(|e| anyhow!("cannot serve metrics on {addr} (--metrics-listen): {e}"))
    }
}

/// The last check's outcome.
pub(super) struct Health {
    last: Mutex<Checked>,
}

struct Checked {
    at: Instant,
    result: Result<(), String>,
    /// Since when the checks fail, if they do.
    failing_since: Option<DateTime<Utc>>,
}

impl Health {
    pub(super) fn new() -> Health {
        Health {
            last: Mutex::new(Checked {
                at: Instant::now(),
                result: Err("not checked yet".into()),
                failing_since: None,
            }),
        }
    }

    fn set(&self, result: Result<(), String>) {
        let mut last = self.last.lock().expect("health lock");
        last.failing_since = match (&result, last.failing_since) {
            (Ok(()), _) => None,
            (Err(_), Some(since)) => Some(since),
            (Err(_), None) => Some(Utc::now()),
        };
        last.at = Instant::now();
        last.result = result;
    }

    /// Since when the database is down, as `/metrics` says it: the
    /// breaker's outage, or else the checks' failure.
    pub(super) fn down_since(&self, db: &Database) -> Option<DateTime<Utc>> {
        db.down_since().or_else(|| {
            self.verdict(None).err()?;
            let since = self.last.lock().expect("health lock").failing_since;
            Some(since.unwrap_or_else(Utc::now))
        })
    }

    /// `Ok` or why not, as `/healthz` says it; `down_since`: the
    /// breaker's outage, if the service's own transactions found one.
    pub(super) fn verdict(&self, down_since: Option<DateTime<Utc>>) -> Result<(), String> {
        let (at, result) = {
            let last = self.last.lock().expect("health lock");
            (last.at, last.result.clone())
        };
        if let Some(since) = down_since {
            let why = result
                .err()
                .unwrap_or_else(|| "the service's transactions fail".into());
            return Err(format!(
                "database unreachable since {}: {why}",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        let silent = at.elapsed();
        if silent > SILENT + EVERY {
            return Err(format!(
                "the database has not answered a check for {:.0} s",
                silent.as_secs_f64()
            ));
        }
        result
    }
}

/// Checks the database every [`EVERY`] until `stopped` disconnects.
pub(super) fn probe(db: &Database, health: &Health, stopped: Receiver<()>) {
    loop {
        health.set(db.probe());
        match stopped.recv_timeout(EVERY) {
            Err(RecvTimeoutError::Timeout) | Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Answers `/metrics` with `metrics()` and `/healthz` from `health` until
/// `stopped` disconnects.
pub(super) fn serve(
    MetricsListener(server): MetricsListener,
    db: &Database,
    health: &Health,
    metrics: impl Fn() -> String,
    stopped: Receiver<()>,
) {
    let text = |body: String, status: u16, content_type: &str| {
        tiny_http::Response::from_string(body)
            .with_status_code(status)
            .with_header(
                tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("a valid header"),
            )
    };
    while let Err(TryRecvError::Empty) = stopped.try_recv() {
        let request = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("metrics listener: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let path = request.url().split('?').next().unwrap_or_default();
        let response = match (request.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                text(metrics(), 200, "text/plain; version=0.0.4; charset=utf-8")
            }
            (tiny_http::Method::Get, "/healthz") => match health.verdict(db.down_since()) {
                Ok(()) => text("ok\n".into(), 200, "text/plain; charset=utf-8"),
                Err(why) => text(format!("{why}\n"), 503, "text/plain; charset=utf-8"),
            },
            (tiny_http::Method::Get, _) => text(
                "not found: /metrics and /healthz are served here\n".into(),
                404,
                "text/plain; charset=utf-8",
            ),
            _ => text(
                "method not allowed\n".into(),
                405,
                "text/plain; charset=utf-8",
            ),
        };
        if let Err(e) = request.respond(response) {
            log::debug!("metrics listener: a client went away: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_the_last_check_the_breaker_and_a_silent_check() {
        let health = Health::new();
        assert_eq!(health.verdict(None), Err("not checked yet".to_string()));
        health.set(Ok(()));
        assert_eq!(health.verdict(None), Ok(()));
        // The service's transactions found the database down first.
        let since = Utc::now();
        let why = health.verdict(Some(since)).unwrap_err();
        assert!(why.starts_with("database unreachable since "), "{why}");
        health.set(Err("connection refused".into()));
        let failing = health.last.lock().unwrap().failing_since.unwrap();
        health.set(Err("connection refused".into()));
        assert_eq!(
            health.last.lock().unwrap().failing_since,
            Some(failing),
            "since the first"
        );
        assert_eq!(health.verdict(None), Err("connection refused".to_string()));
        // A check still running after SILENT + EVERY: its peer is silent.
        health.set(Ok(()));
        health.last.lock().unwrap().at = Instant::now() - (SILENT + EVERY + Duration::from_secs(1));
        let why = health.verdict(None).unwrap_err();
        assert!(
            why.starts_with("the database has not answered a check for 5 s"),
            "{why}"
        );
        health.set(Ok(()));
        assert_eq!(health.last.lock().unwrap().failing_since, None);
    }
}
