//! The circuit breaker: while the database is unreachable, one caller probes
//! it at a time, with capped, jittered exponential backoff, and the others
//! wait for the probe's answer instead of hammering the server.
//!
//! ```text
//! closed ──connection error──▶ open ──backoff elapsed──▶ half-open (one probe)
//!   ▲                           ▲                            │
//!   └──────── probe reached the database ◀───────────────────┤
//!                               └──────── probe failed ◀─────┘
//! ```
//!
//! It also keeps the outage's story for the log: one line when the database
//! goes away, one when it is back, however many workers waited. A database
//! whose disk is full (or that is out of memory) is an outage of its own
//! kind: the same one probe at a time, its own two lines, and its own limit
//! ([`RetryPolicy::resource_wait`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::classify::{Classified, ErrorClass};
use super::retry::{Clock, RetryPolicy, SystemClock};
use crate::metrics::Cause;

/// What kind of outage the circuit is open for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outage {
    /// No connection, or connections that die or stop answering.
    Unreachable,
    /// The database's disk is full.
    DiskFull,
    /// The server is out of memory.
    OutOfMemory,
    /// The database cannot be written (SQLite: a read-only file).
    ReadOnly,
}

impl Outage {
    /// The outage an error of this classification opens, if any.
    pub(super) fn of(classified: &Classified) -> Option<Outage> {
        match (classified.class, classified.cause) {
            (ErrorClass::Connection, _) => Some(Outage::Unreachable),
            (ErrorClass::Resource, _) if classified.sqlstate == Some("SQLITE_READONLY") => {
                Some(Outage::ReadOnly)
            }
            (ErrorClass::Resource, Cause::OutOfMemory) => Some(Outage::OutOfMemory),
            (ErrorClass::Resource, _) => Some(Outage::DiskFull),
            _ => None,
        }
    }

    fn began(self) -> &'static str {
        match self {
            Outage::Unreachable => "database unreachable",
            Outage::DiskFull => "the database's disk is full",
            Outage::OutOfMemory => "the database is out of memory",
            Outage::ReadOnly => "the database is read-only",
        }
    }

    fn ended(self) -> &'static str {
        match self {
            Outage::Unreachable => "database back",
            Outage::DiskFull => "the database's disk has space again",
            Outage::OutOfMemory => "the database has memory again",
            Outage::ReadOnly => "the database is writable again",
        }
    }

    fn limit(self, policy: &RetryPolicy) -> Option<Duration> {
        match self {
            Outage::Unreachable => Some(policy.max_outage),
            Outage::DiskFull | Outage::OutOfMemory | Outage::ReadOnly => policy.resource_wait,
        }
    }
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// The circuit is closed: go ahead.
    Closed,
    /// The circuit is open and this caller is the one probe.
    Probe,
}

/// The circuit stayed open too long; carries when it opened.
#[derive(Debug, Clone)]
pub(super) struct OpenTooLong {
    /// When the outage began.
    pub since: Instant,
    /// What kind of outage it is.
    pub outage: Outage,
    /// The last error, for the caller's error message.
    pub last_error: String,
}

impl std::fmt::Display for OpenTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.outage.began(), self.last_error)
    }
}

#[derive(Debug)]
struct Open {
    outage: Outage,
    since: Instant,
    since_wall: DateTime<Utc>,
    probing: bool,
    next_probe: Instant,
    failed_probes: u32,
    waited: u64,
    last_error: String,
    /// When the outage was last said to go on.
    reminded: Instant,
    reminders: u32,
}

/// An outage is said to go on at most this often.
pub(super) const REMIND_EVERY: Duration = Duration::from_secs(30);

/// Shared by every transaction of one [`super::Database`]. Time and
/// jitter come from a [`Clock`], so its tests need not wait.
#[derive(Debug, Default)]
pub(super) struct Breaker<C = SystemClock> {
    /// The database, as the log names it (its URL without the password).
    name: String,
    open: Mutex<Option<Open>>,
    /// Whether `open` holds an outage: read without the lock on the
    /// success path, written with it held.
    is_open: AtomicBool,
    /// How often the circuit has closed: a failure of a transaction
    /// admitted before the last closing belongs to the outage that ended
    /// (see [`Breaker::failed`]).
    closures: AtomicU64,
    changed: Condvar,
    clock: Mutex<C>,
}

impl Breaker<SystemClock> {
    /// A closed breaker for the database named `name`.
    pub(super) fn new(name: String) -> Self {
        Breaker {
            name,
            ..Breaker::default()
        }
    }
}

/// One call's passage through the breaker, across its retries: it counts
/// once among the transactions that waited for an outage.
#[derive(Debug)]
pub(super) struct Call<'b, C> {
    breaker: &'b Breaker<C>,
    counted: bool,
    /// How often the circuit had closed when the last admission was given.
    admitted: Option<u64>,
}

impl<C: Clock> Call<'_, C> {
    /// Waits until the circuit is closed or this caller may probe. Gives up
    /// waiting when the circuit has been open for as long as the policy
    /// waits for its kind of outage.
    pub(super) fn admit(&mut self, policy: &RetryPolicy) -> Result<Admission, OpenTooLong> {
        let admission = self.breaker.admit(policy, &mut self.counted)?;
        self.admitted = Some(self.breaker.closures.load(Ordering::Acquire));
        Ok(admission)
    }

    /// The attempt admitted last failed with an outage (see
    /// [`Breaker::failed`]).
    pub(super) fn failed(
        &self,
        admission: Admission,
        outage: Outage,
        error: &str,
        policy: &RetryPolicy,
    ) {
        self.breaker
            .failed(admission, self.admitted, outage, error, policy)
    }
}

impl<C: Clock> Breaker<C> {
    /// A breaker on `clock`.
    #[cfg(test)]
    pub(super) fn with_clock(clock: C) -> Self {
        Breaker {
            name: "the test database".into(),
            open: Mutex::new(None),
            is_open: AtomicBool::new(false),
            closures: AtomicU64::new(0),
            changed: Condvar::new(),
            clock: Mutex::new(clock),
        }
    }

    /// A new call's passage (see [`Call`]).
    pub(super) fn call(&self) -> Call<'_, C> {
        Call {
            breaker: self,
            counted: false,
            admitted: None,
        }
    }

    fn now(&self) -> Instant {
        self.clock.lock().expect("breaker clock lock").now()
    }

    fn jitter(&self, ceiling: Duration) -> Duration {
        self.clock
            .lock()
            .expect("breaker clock lock")
            .jitter(ceiling)
    }

    fn admit(&self, policy: &RetryPolicy, counted: &mut bool) -> Result<Admission, OpenTooLong> {
        if !self.is_open.load(Ordering::Acquire) {
            return Ok(Admission::Closed);
        }
        let mut open = self.open.lock().expect("breaker lock");
        loop {
            let Some(o) = open.as_mut() else {
                return Ok(Admission::Closed);
            };
            if !*counted {
                *counted = true;
                o.waited += 1;
            }
            let now = self.now();
            let limit = o.outage.limit(policy);
            if limit.is_some_and(|limit| now.saturating_duration_since(o.since) >= limit) {
                return Err(OpenTooLong {
                    since: o.since,
                    outage: o.outage,
                    last_error: o.last_error.clone(),
                });
            }
            if !o.probing && now >= o.next_probe {
                o.probing = true;
                return Ok(Admission::Probe);
            }
            let until = if o.probing {
                now + Duration::from_millis(50)
            } else {
                o.next_probe
            };
            let until = match limit.and_then(|limit| o.since.checked_add(limit)) {
                Some(end) => until.min(end),
                None => until,
            };
            open = self
                .changed
                .wait_timeout(open, until.saturating_duration_since(now))
                .expect("breaker lock")
                .0;
        }
    }

    /// A failure that is an outage (see [`Outage::of`]) of a transaction
    /// admitted when the circuit had closed `admitted` times: opens the
    /// circuit, or schedules the next probe after a failed one. A
    /// transaction admitted before the circuit last closed fails late for
    /// the outage that has ended (a connection cut off mid-query waits out
    /// its deadline, or its TCP retransmission, after the database is
    /// back): it is retried like any other, but opens no new outage. If
    /// the database is down again, the next failure says so.
    pub(super) fn failed(
        &self,
        admission: Admission,
        admitted: Option<u64>,
        outage: Outage,
        error: &str,
        policy: &RetryPolicy,
    ) {
        let mut open = self.open.lock().expect("breaker lock");
        let now = self.now();
        match open.as_mut() {
            None if admitted.is_some_and(|n| n < self.closures.load(Ordering::Acquire)) => {
                log::info!(
                    "a transaction begun before the database came back failed: {error}; retrying it"
                );
            }
            None => {
                let since_wall = Utc::now();
                let waiting = match outage.limit(policy) {
                    Some(limit) if limit.is_zero() => String::new(),
                    Some(limit) => match chrono::Duration::from_std(limit)
                        .ok()
                        .and_then(|limit| since_wall.checked_add_signed(limit))
                    {
                        Some(end) => format!(
                            "; waiting for {} until {}",
                            self.name,
                            end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                        None => format!("; waiting for {} as long as it takes", self.name),
                    },
                    None => format!("; waiting for {} as long as it takes", self.name),
                };
                let since = since_wall.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                log::warn!(
                    event = "outage_began", outage = outage.began(), peer = self.name.as_str(),
                    since = since.as_str(), error = error;
                    "{} since {since}: {error}{waiting}",
                    outage.began()
                );
                *open = Some(Open {
                    outage,
                    since: now,
                    since_wall,
                    probing: false,
                    next_probe: now + self.jitter(policy.ceiling(1)),
                    failed_probes: 0,
                    waited: 0,
                    last_error: error.to_string(),
                    reminded: now,
                    reminders: 0,
                });
                self.is_open.store(true, Ordering::Release);
            }
            Some(o) => {
                o.last_error = error.to_string();
                if now.saturating_duration_since(o.reminded) >= REMIND_EVERY {
                    o.reminded = now;
                    o.reminders += 1;
                    let seconds = now.saturating_duration_since(o.since).as_secs_f64();
                    log::warn!(
                        event = "outage_continues", outage = o.outage.began(),
                        peer = self.name.as_str(), seconds = seconds, error = error;
                        "still waiting for {} ({}, {seconds:.0} s so far): {error}",
                        self.name,
                        o.outage.began()
                    );
                }
                if admission == Admission::Probe {
                    o.probing = false;
                    o.failed_probes += 1;
                    o.next_probe = now + self.jitter(policy.ceiling(o.failed_probes + 1));
                    log::debug!("probe {} failed: {error}", o.failed_probes);
                }
            }
        }
        self.changed.notify_all();
    }

    /// The database answered (a commit, or any error that is not about the
    /// connection) to a transaction admitted as `admission`: closes the
    /// circuit. Returns how long it was open. An outage is over only when a
    /// probe says so: a transaction let in before the outage began may
    /// still get its answer after the outage was opened (a commit read
    /// just after the server went down; seen in CI: "back after 0.0 s",
    /// then the same outage logged a second time), and a small one may
    /// still fit in a full disk while the next one fails again.
    pub(super) fn reached(&self, admission: Admission) -> Option<Duration> {
        if admission != Admission::Probe {
            return None;
        }
        let mut open = self.open.lock().expect("breaker lock");
        let o = open.take()?;
        self.is_open.store(false, Ordering::Release);
        self.closures.fetch_add(1, Ordering::AcqRel);
        let now = self.now();
        let down = now.saturating_duration_since(o.since);
        let since = o
            .since_wall
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        log::info!(
            event = "outage_ended", outage = o.outage.ended(), peer = self.name.as_str(),
            seconds = down.as_secs_f64(), since = since.as_str(), waited = o.waited;
            "{} after {:.1} s (since {since}), {} transactions waited",
            o.outage.ended(),
            down.as_secs_f64(),
            o.waited
        );
        self.changed.notify_all();
        Some(down)
    }

    /// Since when the database has been unreachable, if it is.
    pub(super) fn down_since(&self) -> Option<DateTime<Utc>> {
        self.open
            .lock()
            .expect("breaker lock")
            .as_ref()
            .map(|o| o.since_wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Time that moves only when the test says; no jitter.
    #[derive(Debug, Clone)]
    struct ManualClock(Arc<Mutex<Instant>>);

    impl ManualClock {
        fn new() -> Self {
            ManualClock(Arc::new(Mutex::new(Instant::now())))
        }
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&mut self) -> Instant {
            *self.0.lock().unwrap()
        }
        fn sleep(&mut self, duration: Duration) {
            self.advance(duration)
        }
        fn jitter(&mut self, _ceiling: Duration) -> Duration {
            Duration::ZERO
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_outage: Duration::from_secs(10),
            ..RetryPolicy::default()
        }
    }

    const DOWN: Outage = Outage::Unreachable;

    impl Breaker<ManualClock> {
        /// A failure of a transaction admitted just now.
        fn failed_now(&self, admission: Admission, outage: Outage, error: &str, p: &RetryPolicy) {
            let admitted = Some(self.closures.load(Ordering::Acquire));
            self.failed(admission, admitted, outage, error, p)
        }
    }

    #[test]
    fn a_closed_circuit_admits_everyone() {
        let b = Breaker::with_clock(ManualClock::new());
        assert_eq!(b.call().admit(&policy()).unwrap(), Admission::Closed);
        assert!(b.reached(Admission::Closed).is_none());
    }

    #[test]
    fn an_open_circuit_lets_one_probe_at_a_time_and_closes_when_it_succeeds() {
        let b = Breaker::with_clock(ManualClock::new());
        let p = policy();
        b.failed_now(Admission::Closed, DOWN, "refused", &p);
        let probes = AtomicU32::new(0);
        let concurrent = AtomicU32::new(0);
        let max_concurrent = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut call = b.call();
                    loop {
                        match call.admit(&p).unwrap() {
                            Admission::Closed => return,
                            Admission::Probe => {
                                let now = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
                                max_concurrent.fetch_max(now, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(5));
                                concurrent.fetch_sub(1, Ordering::SeqCst);
                                if probes.fetch_add(1, Ordering::SeqCst) < 3 {
                                    b.failed_now(Admission::Probe, DOWN, "still refused", &p);
                                } else {
                                    b.reached(Admission::Probe);
                                }
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(
            max_concurrent.load(Ordering::SeqCst),
            1,
            "never two probes at once"
        );
        assert_eq!(probes.load(Ordering::SeqCst), 4);
        assert!(b.down_since().is_none());
    }

    #[test]
    fn waiting_ends_when_the_circuit_stayed_open_for_the_limit() {
        let clock = ManualClock::new();
        let b = Breaker::with_clock(clock.clone());
        b.failed_now(Admission::Closed, DOWN, "refused", &policy());
        let mut call = b.call();
        assert_eq!(call.admit(&policy()).unwrap(), Admission::Probe);
        clock.advance(Duration::from_secs(10));
        let err = call.admit(&policy()).unwrap_err();
        assert_eq!(err.last_error, "refused");
        assert_eq!(err.to_string(), "database unreachable: refused");
        assert_eq!(
            b.reached(Admission::Probe),
            Some(Duration::from_secs(10)),
            "the outage lasted the clock's 10 s"
        );
    }

    #[test]
    fn each_call_counts_once_among_those_that_waited() {
        let b = Breaker::with_clock(ManualClock::new());
        b.failed_now(Admission::Closed, DOWN, "refused", &policy());
        let (mut one, mut two) = (b.call(), b.call());
        for _ in 0..3 {
            let admission = one.admit(&policy()).unwrap();
            b.failed_now(admission, DOWN, "refused", &policy());
        }
        two.admit(&policy()).unwrap();
        assert_eq!(b.open.lock().unwrap().as_ref().unwrap().waited, 2);
    }

    #[test]
    fn an_answer_to_a_transaction_let_in_before_the_outage_does_not_end_it() {
        let b = Breaker::with_clock(ManualClock::new());
        b.failed_now(
            Admission::Closed,
            DOWN,
            "server closed the connection",
            &policy(),
        );
        // A commit read just after the server went down (seen in CI: the
        // outage ended after 0.0 s and was logged again at the next error).
        assert!(b.reached(Admission::Closed).is_none());
        assert!(b.down_since().is_some(), "still down");
        assert_eq!(b.call().admit(&policy()).unwrap(), Admission::Probe);
        assert!(b.reached(Admission::Probe).is_some(), "a probe ends it");
        assert_eq!(b.call().admit(&policy()).unwrap(), Admission::Closed);
    }

    #[test]
    fn a_full_disk_is_its_own_outage_with_its_own_limit() {
        let b = Breaker::with_clock(ManualClock::new());
        b.failed_now(
            Admission::Closed,
            Outage::DiskFull,
            "database or disk is full",
            &policy(),
        );
        // ingest: a full disk is not waited for, however long max_outage is.
        let err = b.call().admit(&policy()).unwrap_err();
        assert_eq!(err.outage, Outage::DiskFull);
        assert!(err.to_string().starts_with("the database's disk is full"));
        // serve: waited for, one probe at a time.
        let serve = RetryPolicy {
            resource_wait: None,
            ..policy()
        };
        // A transaction let in before the disk filled that still fit says
        // nothing; the probe does.
        assert!(b.reached(Admission::Closed).is_none());
        assert!(b.down_since().is_some());
        assert_eq!(b.call().admit(&serve).unwrap(), Admission::Probe);
        assert!(b.reached(Admission::Probe).is_some());
        assert_eq!(b.call().admit(&policy()).unwrap(), Admission::Closed);
    }

    #[test]
    fn a_long_outage_is_recalled_at_most_every_30_s() {
        let clock = ManualClock::new();
        let b = Breaker::with_clock(clock.clone());
        let p = RetryPolicy {
            max_outage: Duration::MAX,
            ..policy()
        };
        b.failed_now(Admission::Closed, DOWN, "refused", &p);
        let reminders = || b.open.lock().unwrap().as_ref().unwrap().reminders;
        for (advance, expected) in [(1, 0), (28, 0), (1, 1), (10, 1), (19, 1), (1, 2)] {
            clock.advance(Duration::from_secs(advance));
            let admission = b.call().admit(&p).unwrap();
            b.failed_now(admission, DOWN, "refused", &p);
            assert_eq!(reminders(), expected, "after {advance} s more");
        }
        // An outage with no limit is never given up on.
        clock.advance(Duration::from_secs(365 * 24 * 3600));
        assert!(b.call().admit(&p).is_ok());
    }

    #[test]
    fn a_late_failure_of_a_transaction_begun_before_the_recovery_opens_no_new_outage() {
        let clock = ManualClock::new();
        let b = Breaker::with_clock(clock.clone());
        let p = policy();
        // Admitted while all was well; its connection then hangs.
        let mut stuck = b.call();
        assert_eq!(stuck.admit(&p).unwrap(), Admission::Closed);
        clock.advance(Duration::from_secs(1));
        b.failed_now(Admission::Closed, DOWN, "refused", &p);
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.call().admit(&p).unwrap(), Admission::Probe);
        assert!(b.reached(Admission::Probe).is_some());
        // Its deadline ends it after the database came back.
        clock.advance(Duration::from_secs(5));
        stuck.failed(Admission::Closed, DOWN, "no answer for 35 s", &p);
        assert!(b.down_since().is_none(), "the ended outage is not reopened");
        // Its retry, and anything admitted after the recovery, says so if
        // the database is down again.
        assert_eq!(stuck.admit(&p).unwrap(), Admission::Closed);
        clock.advance(Duration::from_millis(1));
        stuck.failed(Admission::Closed, DOWN, "refused", &p);
        assert!(b.down_since().is_some());
    }
}
