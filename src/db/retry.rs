//! The retry loop: bounded, jittered, and the only place that sleeps.
//!
//! The loop knows nothing of connections: each attempt is a closure that
//! returns a value or a classified error, and time comes from a [`Clock`], so
//! the decisions can be tested against a scripted fake without real time
//! passing (see the tests below). [`super::Database::transaction`] supplies
//! the attempt that checks out a connection and runs one transaction.

use std::time::{Duration, Instant};

use rand::Rng;

use super::classify::{Classified, DbError, ErrorClass, Reason};

/// How long and how often to retry. Defaults live in `impl Default`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The backoff ceiling of the first retry; it doubles with each retry.
    pub base_delay: Duration,
    /// The backoff ceiling never grows beyond this.
    pub max_delay: Duration,
    /// Connection and transient errors are retried until they have lasted this
    /// long without a success in between; then the caller gives up.
    pub max_outage: Duration,
    /// Attempts in all for an error the classifier does not recognize.
    pub unrecognized_attempts: u32,
    /// When set, the call ends as [`Failure::Rejected`] after this many
    /// failures inside a transaction: transient errors, or the connection
    /// lost after it was made (not a refused connection: that is an outage,
    /// waited out). A batch uses it to split itself rather than retry a large
    /// transaction that keeps failing (`None`: until `max_outage`, as single
    /// messages are).
    pub transient_attempts: Option<u32>,
    /// How long a shortage of disk space or memory on the database's side is
    /// waited out: `Some(ZERO)` stops at once (`ingest`: the operator must
    /// free space), `None` waits until it is over (`serve`).
    pub resource_wait: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(250),
            max_outage: Duration::from_secs(300),
            unrecognized_attempts: 3,
            transient_attempts: None,
            resource_wait: Some(Duration::ZERO),
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the jittered delay before retry number `retry` (1-based):
    /// `min(max_delay, base_delay * 2^(retry-1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// Whether an error of `class` is retried after `attempts` attempts, the
    /// first failure having been `failing_for` ago.
    pub fn should_retry(&self, class: ErrorClass, attempts: u32, failing_for: Duration) -> bool {
        match class {
            ErrorClass::Permanent => false,
            ErrorClass::Unrecognized => attempts < self.unrecognized_attempts,
            ErrorClass::Connection | ErrorClass::Transient => failing_for < self.max_outage,
            ErrorClass::Resource => self.resource_wait.is_none_or(|wait| failing_for < wait),
        }
    }

    /// How long an outage of this class is waited out (`None`: for ever).
    pub fn wait_limit(&self, class: ErrorClass) -> Option<Duration> {
        match class {
            ErrorClass::Resource => self.resource_wait,
            _ => Some(self.max_outage),
        }
    }
}

/// Where an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Checking a connection out of the pool.
    Checkout,
    /// BEGIN.
    Begin,
    /// The transaction's own statements.
    Body,
    /// COMMIT: whether it landed is unknown when the connection broke.
    Commit,
}

/// A failed attempt.
#[derive(Debug)]
pub(super) enum AttemptError {
    /// The database said no.
    Failed {
        /// The error.
        error: DbError,
        /// Its classification.
        classified: Classified,
        /// Where it happened.
        stage: Stage,
        /// When the outage this error belongs to began, if it began before
        /// this call's first failure (the circuit breaker knows).
        outage_since: Option<Instant>,
    },
    /// The transaction's code panicked; the message is the panic's.
    Panicked(String),
}

impl AttemptError {
    /// A failed attempt, classified, at `stage`.
    pub(super) fn failed(error: DbError, stage: Stage) -> AttemptError {
        AttemptError::Failed {
            classified: super::classify::classify(&error),
            error,
            stage,
            outage_since: None,
        }
    }

    /// The same, as part of an outage that began at `outage`.
    pub(super) fn since(self, outage: Instant) -> AttemptError {
        match self {
            AttemptError::Failed {
                error,
                classified,
                stage,
                ..
            } => AttemptError::Failed {
                error,
                classified,
                stage,
                outage_since: Some(outage),
            },
            panicked => panicked,
        }
    }
}

/// Why a call did not succeed. Cloneable: one failure ends every job of a
/// batch, and each copy says what the original said.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// A permanent error, or an unrecognized one that persisted.
    #[error("{}", rejected(error))]
    Rejected {
        /// The last error.
        error: Reason,
    },
    /// The transaction's code panicked.
    #[error("the transaction panicked: {0}")]
    Panicked(String),
    /// The caller is shutting down: the transaction was not retried again.
    #[error("cancelled by shutdown after: {error}")]
    Cancelled {
        /// The last error.
        error: Reason,
    },
    /// The database is out of disk space or memory, and the policy does
    /// not wait for it (or waited as long as it does).
    #[error("{}: {error}", shortage_of(error).0)]
    OutOfResources {
        /// The last error.
        error: Reason,
    },
    /// The transaction ended at its fence: another instance took the
    /// partition over, and nothing of it was committed here.
    #[error(
        "not committed: partition {0} is no longer this instance's (another instance claimed it)"
    )]
    Fenced(String),
    /// Connection or transient errors lasted longer than `max_outage`.
    #[error("gave up after {:.0} s of database errors: {error}", failing_for.as_secs_f64())]
    GaveUp {
        /// The last error.
        error: Reason,
        /// How long the errors lasted.
        failing_for: Duration,
    },
}

/// A connection refused for good (bad credentials, a bad URL) is not a
/// transaction the database rejected: say what happened.
fn rejected(error: &Reason) -> String {
    match error.refused() {
        Some(_) => error.to_string(),
        None => format!("the database rejected the transaction: {error}"),
    }
}

impl Failure {
    /// Why no connection could be had, when that is why the call failed
    /// for good (bad credentials, a bad URL).
    pub fn refused_connection(&self) -> Option<&str> {
        match self {
            Failure::Rejected { error } => error.refused(),
            _ => None,
        }
    }

    /// Whether this failure stops the run instead of dead-lettering a
    /// message: the database, not the message, is the problem (an outage
    /// waited out to its limit, a shutdown, a full disk). Such a failure is
    /// never bisected: the same batch would fail the same way at any size.
    pub fn is_stop(&self) -> bool {
        matches!(
            self,
            Failure::GaveUp { .. }
                | Failure::Cancelled { .. }
                | Failure::OutOfResources { .. }
                | Failure::Fenced(_)
        )
    }

    /// Whether the database could not be had for as long as the policy
    /// waits: the run stops and says where to resume (exit 3).
    pub fn is_gave_up(&self) -> bool {
        matches!(
            self,
            Failure::GaveUp { .. } | Failure::OutOfResources { .. }
        )
    }
}

/// What a resource error is short of, and what the operator must do: for
/// messages ("the database's disk is full", "free space").
pub(crate) fn shortage_of(error: &Reason) -> (&'static str, &'static str) {
    let classified = error.classified();
    match classified.cause {
        _ if classified.sqlstate == Some("SQLITE_READONLY") => {
            ("the database is read-only", "make it writable")
        }
        crate::metrics::Cause::OutOfMemory => ("the database is out of memory", "free memory"),
        _ => ("the database's disk is full", "free space"),
    }
}

/// Time and randomness for the loop; faked in tests.
pub(super) trait Clock {
    /// The current instant.
    fn now(&mut self) -> Instant;
    /// Waits.
    fn sleep(&mut self, duration: Duration);
    /// A uniformly random duration in `[0, ceiling]` (full jitter).
    fn jitter(&mut self, ceiling: Duration) -> Duration;
}

/// The real clock: the only code in the crate that sleeps.
#[derive(Debug, Default)]
pub(super) struct SystemClock;

impl Clock for SystemClock {
    fn now(&mut self) -> Instant {
        Instant::now()
    }
    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration)
    }
    fn jitter(&mut self, ceiling: Duration) -> Duration {
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// What the loop reports as it goes, for logs and counters.
pub(super) trait Observer {
    /// An attempt failed and will be retried after `delay`.
    fn retrying(&mut self, error: &AttemptError, attempt: u32, delay: Duration);
    /// An attempt succeeded after `retries` retries.
    fn succeeded(&mut self, retries: u32);
    /// The loop stops without success.
    fn stopped(&mut self, failure: &Failure, attempts: u32);
    /// Whether to stop retrying because the program is shutting down.
    fn cancelled(&self) -> bool {
        false
    }
}

/// What to do after a failed attempt.
#[derive(Debug)]
pub(super) enum Decision {
    /// Retry after a delay drawn from `[0, ceiling]`; `error` is what failed.
    Retry {
        /// The failed attempt's error, for the observer.
        error: AttemptError,
        /// The longest the delay may be.
        ceiling: Duration,
    },
    /// Stop with this failure.
    Stop(Failure),
}

/// The retry decision of one call, apart from the loop that sleeps: it
/// takes each failed attempt and answers "retry within D" or "stop with
/// this failure", so it can be tested as a table without time passing.
#[derive(Debug)]
pub(super) struct Retrying<'p> {
    policy: &'p RetryPolicy,
    attempts: u32,
    failing_since: Option<Instant>,
    in_transaction_failures: u32,
}

impl<'p> Retrying<'p> {
    /// A call that has not failed yet.
    pub(super) fn new(policy: &'p RetryPolicy) -> Self {
        Retrying {
            policy,
            attempts: 0,
            failing_since: None,
            in_transaction_failures: 0,
        }
    }

    /// Attempts failed so far.
    pub(super) fn failures(&self) -> u32 {
        self.attempts
    }

    /// Decides after attempt number `failures() + 1` failed at `now`;
    /// `cancelled` says the program is shutting down.
    pub(super) fn decide(
        &mut self,
        error: AttemptError,
        now: Instant,
        cancelled: bool,
    ) -> Decision {
        self.attempts += 1;
        let AttemptError::Failed {
            classified,
            stage,
            outage_since,
            ..
        } = &error
        else {
            let AttemptError::Panicked(message) = error else {
                unreachable!("an attempt error is failed or panicked")
            };
            return Decision::Stop(Failure::Panicked(message));
        };
        let (class, stage, outage_since) = (classified.class, *stage, *outage_since);
        // An outage that began before this call's first failure counts from
        // its own start.
        let since = self.failing_since.get_or_insert(now);
        if let Some(outage) = outage_since {
            *since = (*since).min(outage);
        }
        let failing_for = now.saturating_duration_since(*since);
        let in_transaction = class == ErrorClass::Transient
            || (class == ErrorClass::Connection && stage != Stage::Checkout);
        if in_transaction {
            self.in_transaction_failures += 1;
        }
        let limit_reached = in_transaction
            && self
                .policy
                .transient_attempts
                .is_some_and(|n| self.in_transaction_failures >= n);
        let reason = || Reason::from(error_of(&error));
        if limit_reached {
            // Stopped by the attempt limit, not by the outage clock.
            return Decision::Stop(Failure::Rejected { error: reason() });
        }
        if !self.policy.should_retry(class, self.attempts, failing_for) {
            let error = reason();
            return Decision::Stop(match class {
                ErrorClass::Permanent | ErrorClass::Unrecognized => Failure::Rejected { error },
                ErrorClass::Resource => Failure::OutOfResources { error },
                ErrorClass::Connection | ErrorClass::Transient => {
                    Failure::GaveUp { error, failing_for }
                }
            });
        }
        if cancelled {
            return Decision::Stop(Failure::Cancelled { error: reason() });
        }
        let left = self
            .policy
            .wait_limit(class)
            .map_or(Duration::MAX, |limit| limit.saturating_sub(failing_for));
        Decision::Retry {
            ceiling: self.policy.ceiling(self.attempts).min(left),
            error,
        }
    }
}

fn error_of(error: &AttemptError) -> &DbError {
    match error {
        AttemptError::Failed { error, .. } => error,
        AttemptError::Panicked(_) => unreachable!("a panic is decided before"),
    }
}

/// Runs `attempt` until it succeeds or the policy says stop. Never sleeps
/// after the last attempt; returns the last real error.
pub(super) fn run<T>(
    policy: &RetryPolicy,
    clock: &mut impl Clock,
    observer: &mut impl Observer,
    mut attempt: impl FnMut(u32) -> Result<T, AttemptError>,
) -> Result<T, Failure> {
    let mut retrying = Retrying::new(policy);
    loop {
        let number = retrying.failures() + 1;
        let error = match attempt(number) {
            Ok(value) => {
                observer.succeeded(number - 1);
                return Ok(value);
            }
            Err(error) => error,
        };
        let now = clock.now();
        match retrying.decide(error, now, observer.cancelled()) {
            Decision::Retry { error, ceiling } => {
                let delay = clock.jitter(ceiling);
                observer.retrying(&error, number, delay);
                clock.sleep(delay);
            }
            Decision::Stop(failure) => {
                observer.stopped(&failure, number);
                return Err(failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Cause;

    /// Virtual time: sleeping advances it, jitter is always the ceiling.
    struct FakeClock {
        now: Instant,
        slept: Vec<Duration>,
    }

    impl Clock for FakeClock {
        fn now(&mut self) -> Instant {
            self.now
        }
        fn sleep(&mut self, d: Duration) {
            self.slept.push(d);
            self.now += d;
        }
        fn jitter(&mut self, ceiling: Duration) -> Duration {
            ceiling
        }
    }

    #[derive(Default)]
    struct Log {
        retries: Vec<(u32, Option<Cause>)>,
        succeeded: Option<u32>,
        stopped: Option<u32>,
    }

    impl Observer for Log {
        fn retrying(&mut self, error: &AttemptError, attempt: u32, _delay: Duration) {
            let cause = match error {
                AttemptError::Failed { classified, .. } => Some(classified.cause),
                AttemptError::Panicked(_) => None,
            };
            self.retries.push((attempt, cause));
        }
        fn succeeded(&mut self, retries: u32) {
            self.succeeded = Some(retries);
        }
        fn stopped(&mut self, _failure: &Failure, attempts: u32) {
            self.stopped = Some(attempts);
        }
    }

    fn fail_with(message: &str) -> AttemptError {
        AttemptError::failed(DbError::Connect(message.to_string()), Stage::Checkout)
    }

    fn query_error(message: &'static str) -> AttemptError {
        let error = crate::db::classify::test_support::db(
            diesel::result::DatabaseErrorKind::Unknown,
            message,
        );
        AttemptError::failed(error, Stage::Body)
    }

    /// A scripted fake: fails `n` times with `make`, then succeeds.
    fn scripted(
        n: u32,
        make: impl Fn() -> AttemptError,
        policy: &RetryPolicy,
    ) -> (Result<u32, Failure>, FakeClock, Log) {
        let mut clock = FakeClock {
            now: Instant::now(),
            slept: vec![],
        };
        let mut log = Log::default();
        let result = run(policy, &mut clock, &mut log, |attempt| {
            if attempt <= n {
                Err(make())
            } else {
                Ok(attempt)
            }
        });
        (result, clock, log)
    }

    #[test]
    fn every_retryable_class_is_retried_until_it_succeeds() {
        let policy = RetryPolicy::default();
        type Case = (&'static str, Box<dyn Fn() -> AttemptError>, Cause);
        let cases: Vec<Case> = vec![
            (
                "refused",
                Box::new(|| fail_with("Connection refused")),
                Cause::ConnectionLost,
            ),
            (
                "starting",
                Box::new(|| fail_with("FATAL: the database system is starting up")),
                Cause::AdminShutdown,
            ),
            (
                "too many",
                Box::new(|| fail_with("sorry, too many clients already")),
                Cause::TooManyConnections,
            ),
            (
                "serialization",
                Box::new(|| query_error("could not serialize access")),
                Cause::Serialization,
            ),
            (
                "deadlock",
                Box::new(|| query_error("deadlock detected")),
                Cause::Deadlock,
            ),
            (
                "lock",
                Box::new(|| query_error("canceling statement due to lock timeout")),
                Cause::LockTimeout,
            ),
            (
                "busy",
                Box::new(|| query_error("database is locked")),
                Cause::Busy,
            ),
        ];
        for (name, make, cause) in cases {
            for n in [1, 5, 40] {
                let (result, clock, log) = scripted(n, &make, &policy);
                assert_eq!(result.unwrap(), n + 1, "{name} x{n}");
                assert_eq!(log.retries.len() as u32, n, "{name}");
                assert!(log.retries.iter().all(|(_, c)| *c == Some(cause)), "{name}");
                assert_eq!(log.succeeded, Some(n));
                assert_eq!(
                    clock.slept.len() as u32,
                    n,
                    "one sleep per retry, none after success"
                );
            }
        }
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let (_, clock, _) = scripted(6, || query_error("deadlock detected"), &policy);
        let ms: Vec<u128> = clock.slept.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn real_jitter_stays_within_the_ceiling() {
        let mut clock = SystemClock;
        for _ in 0..1000 {
            assert!(clock.jitter(Duration::from_millis(3)) <= Duration::from_millis(3));
        }
    }

    #[test]
    fn a_permanent_error_is_not_retried() {
        let policy = RetryPolicy::default();
        let (result, clock, log) = scripted(
            1,
            || query_error("invalid byte sequence for encoding"),
            &policy,
        );
        assert!(matches!(result, Err(Failure::Rejected { .. })));
        assert!(clock.slept.is_empty(), "no sleep after the last attempt");
        assert_eq!(log.stopped, Some(1));
    }

    #[test]
    fn an_unrecognized_error_is_retried_a_bounded_number_of_times() {
        let policy = RetryPolicy::default();
        let (result, clock, log) = scripted(100, || query_error("a new kind of failure"), &policy);
        assert!(matches!(result, Err(Failure::Rejected { .. })));
        assert_eq!(log.stopped, Some(policy.unrecognized_attempts));
        assert_eq!(clock.slept.len() as u32, policy.unrecognized_attempts - 1);
        // And a few of them are survived.
        let (result, _, _) = scripted(2, || query_error("a new kind of failure"), &policy);
        assert_eq!(result.unwrap(), 3);
    }

    #[test]
    fn an_outage_longer_than_max_outage_gives_up_with_the_last_error() {
        let policy = RetryPolicy {
            max_outage: Duration::from_secs(10),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let (result, clock, log) = scripted(u32::MAX, || fail_with("Connection refused"), &policy);
        match result {
            Err(Failure::GaveUp { error, failing_for }) => {
                assert!(error.to_string().contains("Connection refused"));
                assert_eq!(failing_for, Duration::from_secs(10));
            }
            other => panic!("{other:?}"),
        }
        let slept: Duration = clock.slept.iter().sum();
        assert_eq!(
            slept,
            Duration::from_secs(10),
            "never sleeps past the deadline"
        );
        assert!(log.stopped.is_some());
    }

    #[test]
    fn an_outage_that_began_before_this_call_counts_from_its_start() {
        let policy = RetryPolicy {
            max_outage: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        let mut clock = FakeClock {
            now: Instant::now() + Duration::from_secs(60),
            slept: vec![],
        };
        let began = clock.now - Duration::from_secs(9);
        let result: Result<(), Failure> = run(&policy, &mut clock, &mut Log::default(), |_| {
            let error = DbError::Connect("database unreachable: refused".into());
            Err(AttemptError::failed(error, Stage::Checkout).since(began))
        });
        assert!(matches!(result, Err(Failure::GaveUp { .. })));
        let slept: Duration = clock.slept.iter().sum();
        assert_eq!(
            slept,
            Duration::from_secs(1),
            "only the outage's last second is waited"
        );
    }

    #[test]
    fn a_transient_attempt_limit_ends_in_rejected_but_connection_errors_go_on() {
        let policy = RetryPolicy {
            transient_attempts: Some(4),
            ..RetryPolicy::default()
        };
        let (result, clock, _) = scripted(100, || query_error("deadlock detected"), &policy);
        assert!(matches!(result, Err(Failure::Rejected { .. })));
        assert_eq!(clock.slept.len(), 3);
        let (result, _, _) = scripted(30, || fail_with("Connection refused"), &policy);
        assert_eq!(result.unwrap(), 31, "an outage is waited out, not split");
        let lost_inside = || {
            let error = DbError::Connect("server closed the connection unexpectedly".into());
            AttemptError::failed(error, Stage::Body)
        };
        let (result, _, _) = scripted(100, lost_inside, &policy);
        assert!(
            matches!(result, Err(Failure::Rejected { .. })),
            "a transaction that keeps losing its connection is split"
        );
    }

    #[test]
    fn a_panic_stops_the_loop_at_once() {
        let policy = RetryPolicy::default();
        let (result, clock, _) = scripted(1, || AttemptError::Panicked("boom".into()), &policy);
        assert!(matches!(result, Err(Failure::Panicked(m)) if m == "boom"));
        assert!(clock.slept.is_empty());
    }

    #[test]
    fn a_full_disk_stops_at_once_by_default_and_is_waited_out_when_asked() {
        let full = || query_error("database or disk is full");
        let (result, clock, _) = scripted(100, full, &RetryPolicy::default());
        match result {
            Err(failure @ Failure::OutOfResources { .. }) => {
                assert!(failure.is_stop(), "never bisected or dead-lettered");
                assert!(
                    failure
                        .to_string()
                        .starts_with("the database's disk is full"),
                    "{failure}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(clock.slept.is_empty(), "no retry at all");
        let waiting = RetryPolicy {
            resource_wait: None,
            max_outage: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let (result, clock, _) = scripted(2000, full, &waiting);
        assert_eq!(result.unwrap(), 2001, "waited out far beyond max_outage");
        assert!(clock.slept.iter().sum::<Duration>() > Duration::from_secs(60));
        let (result, _, _) = scripted(3, || query_error("out of memory"), &RetryPolicy::default());
        assert!(
            matches!(&result, Err(f @ Failure::OutOfResources { .. }) if f.to_string().starts_with("the database is out of memory")),
            "{result:?}"
        );
    }

    /// The decision alone, as a table: each row is a call's history of
    /// failures (seconds after the first, error) and what the last one gets.
    #[test]
    fn the_decision_is_a_table_of_histories_and_answers() {
        let policy = RetryPolicy {
            max_outage: Duration::from_secs(10),
            transient_attempts: Some(3),
            ..RetryPolicy::default()
        };
        let refused = || fail_with("Connection refused");
        let deadlock = || query_error("deadlock detected");
        let full = || query_error("database or disk is full");
        let bad = || query_error("invalid byte sequence for encoding");
        let new = || query_error("a new kind of failure");
        type Make = fn() -> AttemptError;
        /// Name, failures (seconds after the first, error), shutting down,
        /// what the last failure gets.
        type Row = (&'static str, Vec<(u64, Make)>, bool, &'static str);
        let rows: Vec<Row> = vec![
            ("refused once", vec![(0, refused)], false, "retry"),
            (
                "refused for 9 s",
                vec![(0, refused), (9, refused)],
                false,
                "retry",
            ),
            (
                "refused for 10 s",
                vec![(0, refused), (10, refused)],
                false,
                "gave up",
            ),
            (
                "deadlock twice",
                vec![(0, deadlock), (0, deadlock)],
                false,
                "retry",
            ),
            (
                "deadlock thrice",
                vec![(0, deadlock), (0, deadlock), (0, deadlock)],
                false,
                "rejected",
            ),
            (
                "refused, not counted as in-transaction",
                vec![(0, refused), (0, refused), (0, refused)],
                false,
                "retry",
            ),
            ("permanent", vec![(0, bad)], false, "rejected"),
            (
                "unrecognized twice",
                vec![(0, new), (0, new)],
                false,
                "retry",
            ),
            (
                "unrecognized thrice",
                vec![(0, new), (0, new), (0, new)],
                false,
                "rejected",
            ),
            ("disk full", vec![(0, full)], false, "out of resources"),
            (
                "refused while shutting down",
                vec![(0, refused)],
                true,
                "cancelled",
            ),
            (
                "permanent while shutting down",
                vec![(0, bad)],
                true,
                "rejected",
            ),
            (
                "panic",
                vec![(0, || AttemptError::Panicked("boom".into()))],
                false,
                "panicked",
            ),
        ];
        let start = Instant::now();
        for (name, history, cancelled, expected) in rows {
            let mut retrying = Retrying::new(&policy);
            let mut last = None;
            for (i, (at, make)) in history.iter().enumerate() {
                let is_last = i + 1 == history.len();
                let now = start + Duration::from_secs(*at);
                let decision = retrying.decide(make(), now, cancelled && is_last);
                if !is_last {
                    assert!(
                        matches!(decision, Decision::Retry { .. }),
                        "{name}: earlier attempts retry"
                    );
                }
                last = Some(decision);
            }
            let got = match last.unwrap() {
                Decision::Retry { ceiling, .. } => {
                    assert!(ceiling <= policy.max_delay, "{name}");
                    "retry"
                }
                Decision::Stop(Failure::GaveUp { .. }) => "gave up",
                Decision::Stop(Failure::Rejected { .. }) => "rejected",
                Decision::Stop(Failure::Cancelled { .. }) => "cancelled",
                Decision::Stop(Failure::OutOfResources { .. }) => "out of resources",
                Decision::Stop(Failure::Panicked(_)) => "panicked",
                Decision::Stop(Failure::Fenced(_)) => "fenced",
            };
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn a_copy_of_a_failure_says_what_the_original_says() {
        let (result, _, _) = scripted(
            1,
            || query_error("canceling statement due to statement timeout"),
            &RetryPolicy {
                max_outage: Duration::ZERO,
                ..RetryPolicy::default()
            },
        );
        let original = result.unwrap_err();
        let copy = original.clone();
        assert!(original.is_gave_up());
        assert_eq!(copy.to_string(), original.to_string());
        assert!(copy.to_string().contains("statement timeout"), "{copy}");
        let (Failure::GaveUp { error: a, .. }, Failure::GaveUp { error: b, .. }) =
            (&original, &copy)
        else {
            panic!("{original:?}")
        };
        assert_eq!(a.classified(), b.classified());
        assert_eq!(b.classified().cause, Cause::StatementTimeout);
    }
}
