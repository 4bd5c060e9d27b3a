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
mod tests;
