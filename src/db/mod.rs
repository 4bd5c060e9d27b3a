//! Everything that touches the database. No module outside `db` imports diesel.
//!
//! - [`classify()`]: what an error means (reconnect, retry, give up).
//! - `retry`: the bounded, jittered retry loop; the only code that sleeps.
//! - `pool`: r2d2 with discard-on-our-word and idle validation.
//! - [`repo`]: the SQL of each use case, for both backends.
//! - [`Database::transaction`]: every transaction goes through it.

mod breaker;
mod checkpointer;
mod classify;
mod deadline;
mod lite;
pub mod migrate;
mod pool;
pub mod repo;
mod retry;
#[allow(missing_docs)]
mod schema;
mod types;
mod url;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::QueryResult;

use self::breaker::{Breaker, Outage};
pub use self::classify::{classify, remedy, Classified, DbError, ErrorClass, Reason};
use self::deadline::Watchdog;
pub use self::lite::SqliteHandle;
pub(crate) use self::lite::{Fixed, Value};
use self::pool::Access;
pub use self::pool::{AnyConnection, PoolSettings, SQLITE_PRAGMAS};
use self::pool::{Manager, PooledConn, QuietErrors, Session};
pub(crate) use self::retry::shortage_of;
use self::retry::{AttemptError, Observer, Stage, SystemClock};
pub use self::retry::{Failure, RetryPolicy};
pub use self::url::DatabaseUrl;
pub(crate) use self::url::DEFAULT_URL;
use crate::metrics::{DbCounters, DbMetrics};

/// Runs the same diesel code on whichever backend a connection is.
macro_rules! dispatch {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::db::AnyConnection::Pg($c) => $body,
            $crate::db::AnyConnection::Sqlite($c, _) => $body,
        }
    };
}
pub(crate) use dispatch;

/// A database: its pool, its retry policy and its counters.
pub struct Database {
    url: DatabaseUrl,
    pool: r2d2::Pool<Manager>,
    policy: RetryPolicy,
    metrics: Arc<DbMetrics>,
    breaker: Breaker,
    cancelled: AtomicBool,
    /// Cuts PostgreSQL calls that go unanswered (see [`deadline`]).
    _watchdog: Option<Watchdog>,
    /// Server sessions of discarded connections, to end at the next
    /// checkout (see [`Session::end_all`]).
    abandoned: std::sync::Mutex<Vec<Session>>,
    /// Whether `abandoned` may hold sessions: checked without its lock on
    /// every transaction.
    any_abandoned: AtomicBool,
    /// The health check's own connection (see [`Database::probe`]).
    probe: Probe,
}

/// A connection outside the pool, for health checks: a busy pool never
/// keeps a check waiting, and a check never takes a worker's connection.
struct Probe {
    manager: Manager,
    conn: std::sync::Mutex<Option<PooledConn>>,
}

impl Database {
    /// Opens a pool on `url`. No connection is made yet: the first
    /// transaction connects, through the retry loop, so a database that is
    /// still starting is waited for.
    pub fn open(url: DatabaseUrl, settings: PoolSettings, policy: RetryPolicy) -> Database {
        let metrics = Arc::new(DbMetrics::default());
        let name = url.redacted();
        let watchdog = match (&url, settings.call_deadline()) {
            (DatabaseUrl::Postgres(_), Some(limit)) => Some(Watchdog::start(limit)),
            _ => None,
        };
        let registry = watchdog.as_ref().map(Watchdog::registry);
        let probe = Probe {
            manager: Manager::new(
                url.clone(),
                settings.clone(),
                Arc::new(DbMetrics::default()),
                registry.clone(),
            ),
            conn: Default::default(),
        };
        let pool = r2d2::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(Some(0))
            .connection_timeout(settings.checkout_timeout)
            .max_lifetime(Some(settings.max_lifetime))
            .idle_timeout(Some(Duration::from_secs(600)))
            .test_on_check_out(true)
            .error_handler(Box::new(QuietErrors))
            .build_unchecked(
                Manager::new(url.clone(), settings, metrics.clone(), registry).checkpointing(),
            );
        Database {
            url,
            pool,
            policy,
            metrics,
            breaker: Breaker::new(name),
            cancelled: AtomicBool::new(false),
            _watchdog: watchdog,
            abandoned: Default::default(),
            any_abandoned: AtomicBool::new(false),
            probe,
        }
    }

    /// One check that the database answers (`SELECT 1`), on a connection
    /// of its own kept between checks, outside the pool, the retry loop and
    /// the breaker: for `/healthz`, which must notice an outage even when
    /// no transaction runs. The error is one line, without the password.
    pub fn probe(&self) -> Result<(), String> {
        use r2d2::ManageConnection;
        let mut slot = self.probe.conn.lock().expect("probe lock");
        let result = match slot.as_mut() {
            Some(conn) => conn
                .conn
                .batch_execute("SELECT 1")
                .map_err(|e| e.to_string()),
            None => self
                .probe
                .manager
                .connect()
                .map(|conn| {
                    *slot = Some(conn);
                })
                .map_err(|e| format!("cannot connect: {e}")),
        };
        if result.is_err() {
            *slot = None;
        }
        result.map_err(|e| {
            let first = e
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no detail");
            first.trim().to_string()
        })
    }

    /// Where this database is, without its password.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// The counters so far.
    pub fn counters(&self) -> DbCounters {
        self.metrics.snapshot()
    }

    /// Connections open now, and of them idle.
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, state.idle_connections)
    }

    /// From now on, failed transactions are not retried but end as
    /// [`Failure::Cancelled`]: for a shutdown that must not wait out an
    /// outage.
    pub fn cancel_retries(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Since when the database has been unreachable, if it is.
    pub fn down_since(&self) -> Option<DateTime<Utc>> {
        self.breaker.down_since()
    }

    /// Runs `body` in one transaction, retried as the error's class says:
    /// connection-level errors discard the connection and retry on a new
    /// one, transient ones roll back and retry, both with jittered backoff
    /// until `max_outage`; permanent ones return at once. A commit whose
    /// outcome is unknown is retried too: every transaction of this crate
    /// checks its own idempotency key first (see docs/ARCHITECTURE.md).
    pub fn transaction<T>(
        &self,
        body: impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, Failure> {
        self.run(&self.policy, Access::Write, body)
    }

    /// Like [`Database::transaction`], for a body that only reads: on
    /// SQLite a deferred `BEGIN` (no write lock, so a file that cannot be
    /// written can still be read), on PostgreSQL `BEGIN READ ONLY`.
    pub fn read<T>(
        &self,
        body: impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, Failure> {
        self.run(&self.policy, Access::Read, body)
    }

    /// Like [`Database::transaction`], but transient errors end the call as
    /// [`Failure::Rejected`] after `attempts` attempts: for a batch, which
    /// then splits itself instead of colliding again at full size.
    pub fn transaction_splittable<T>(
        &self,
        attempts: u32,
        body: impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, Failure> {
        let policy = RetryPolicy {
            transient_attempts: Some(attempts),
            ..self.policy.clone()
        };
        self.run(&policy, Access::Write, body)
    }

    fn run<T>(
        &self,
        policy: &RetryPolicy,
        access: Access,
        mut body: impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, Failure> {
        let mut observer = TxObserver { db: self };
        let mut call = self.breaker.call();
        retry::run(policy, &mut SystemClock, &mut observer, |_| {
            self.attempt(access, &mut body, &mut call)
        })
    }

    /// One attempt, through the circuit breaker: while the database is
    /// unreachable, this waits for the one probe instead of connecting.
    fn attempt<T>(
        &self,
        access: Access,
        body: &mut impl FnMut(&mut AnyConnection) -> QueryResult<T>,
        call: &mut breaker::Call<'_, SystemClock>,
    ) -> Result<T, AttemptError> {
        let admission = call.admit(&self.policy).map_err(|open| {
            AttemptError::failed(DbError::Unavailable(open.to_string()), Stage::Checkout)
                .since(open.since)
        })?;
        let result = self
            .pool
            .get()
            .map_err(|e| AttemptError::failed(DbError::Connect(e.to_string()), Stage::Checkout))
            .and_then(|mut conn| {
                self.end_abandoned_sessions(&mut conn);
                let result = run_transaction(&mut conn, access, body);
                conn.touch();
                if conn.discard || conn.cut_after().is_some() {
                    if let Some(session) = conn.session.take() {
                        self.abandoned.lock().expect("abandoned lock").push(session);
                        self.any_abandoned.store(true, Ordering::Release);
                    }
                }
                result
            });
        let outage = match &result {
            Err(AttemptError::Failed {
                classified, error, ..
            }) => Outage::of(classified).map(|outage| (outage, error)),
            _ => None,
        };
        match outage {
            Some((outage, error)) => {
                call.failed(admission, outage, &error.to_string(), &self.policy)
            }
            None => {
                if let Some(down) = self.breaker.reached(admission) {
                    self.metrics.outage_ended(down.as_millis() as u64);
                }
            }
        }
        result
    }
}

impl Database {
    /// Ends the server sessions of connections discarded earlier, before
    /// the next transaction may wait for their row locks. Best effort: a
    /// session the server already ended is simply not found.
    fn end_abandoned_sessions(&self, conn: &mut PooledConn) {
        if !self.any_abandoned.swap(false, Ordering::AcqRel) {
            return;
        }
        let sessions = std::mem::take(&mut *self.abandoned.lock().expect("abandoned lock"));
        if sessions.is_empty() {
            return;
        }
        match Session::end_all(&mut conn.conn, &sessions) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "ended {n} server sessions of discarded connections that were still open"
            ),
            Err(e) => log::info!("cannot end the sessions of discarded connections: {e}"),
        }
    }
}

/// One attempt on one connection. Marks the connection for discard whenever
/// its session may be unsound: a connection-level error, a failed rollback
/// (the "pending rollback" state that wedged the old service), a panic.
fn run_transaction<T>(
    pooled: &mut PooledConn,
    access: Access,
    body: &mut impl FnMut(&mut AnyConnection) -> QueryResult<T>,
) -> Result<T, AttemptError> {
    let failed = |pooled: &mut PooledConn, error: diesel::result::Error, stage: Stage| {
        // A call cut by the deadline fails as a closed connection; say why.
        let error = match pooled.cut_after() {
            Some(waited) => DbError::NoAnswer(waited),
            None => DbError::Query(error),
        };
        let failure = AttemptError::failed(error, stage);
        if let AttemptError::Failed { classified, .. } = &failure {
            if classified.class == ErrorClass::Connection && !pooled.discard {
                pooled.discard = true;
                log::info!(
                    "discarding the connection after a {stage:?} error: class {}, sqlstate {}",
                    classified.cause,
                    classified.sqlstate.unwrap_or("-")
                );
            }
        }
        failure
    };
    if let Err(e) = pooled.conn.begin(access) {
        return Err(failed(pooled, e, Stage::Begin));
    }
    match catch_unwind(AssertUnwindSafe(|| body(&mut pooled.conn))) {
        Ok(Ok(value)) => match pooled.conn.commit() {
            Ok(()) => Ok(value),
            Err(e) => Err(failed(pooled, e, Stage::Commit)),
        },
        Ok(Err(e)) => {
            let failure = failed(pooled, e, Stage::Body);
            if let Err(rollback) = pooled.conn.rollback() {
                // Expected on a connection already condemned; news otherwise.
                if pooled.discard {
                    log::debug!("rollback failed on a discarded connection: {rollback}");
                } else {
                    log::warn!("rollback failed, discarding the connection: {rollback}");
                    pooled.discard = true;
                }
            }
            Err(failure)
        }
        Err(panic) => {
            // After the unwind the thread is no longer panicking, so the
            // pool would take back a connection with an open transaction.
            pooled.discard = true;
            Err(AttemptError::Panicked(panic_message(panic.as_ref())))
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Logs and counts what the retry loop does: one line per retry of a
/// transient error. Outages (connection-level and resource errors) are the
/// breaker's to report: one line when they begin and one when they end.
struct TxObserver<'a> {
    db: &'a Database,
}

impl Observer for TxObserver<'_> {
    fn retrying(&mut self, error: &AttemptError, attempt: u32, delay: Duration) {
        let AttemptError::Failed {
            error,
            classified,
            stage,
            ..
        } = error
        else {
            return;
        };
        self.db.metrics.retried(classified.cause, attempt == 1);
        let sqlstate = classified.sqlstate.unwrap_or("-");
        let cause = classified.cause;
        if *stage == Stage::Commit && classified.class == ErrorClass::Connection {
            log::warn!(
                event = "commit_unknown", cause:% = cause, sqlstate = sqlstate, attempt = attempt;
                "commit outcome unknown (connection lost during COMMIT), retrying: class {cause}, sqlstate {sqlstate}, attempt {attempt}: {error}"
            );
        } else if matches!(
            classified.class,
            ErrorClass::Connection | ErrorClass::Resource
        ) {
            log::debug!("retrying: class {cause}, sqlstate {sqlstate}, attempt {attempt}, in {delay:?}: {error}");
        } else {
            log::warn!(
                event = "retry", cause:% = cause, sqlstate = sqlstate, attempt = attempt,
                delay_ms = delay.as_millis() as u64;
                "retrying transaction: class {cause}, sqlstate {sqlstate}, attempt {attempt}, in {delay:?}: {error}"
            );
        }
    }

    fn succeeded(&mut self, retries: u32) {
        self.db.metrics.transaction_committed(retries);
    }

    fn cancelled(&self) -> bool {
        self.db.cancelled.load(Ordering::SeqCst)
    }

    fn stopped(&mut self, failure: &Failure, attempts: u32) {
        match failure {
            Failure::GaveUp { .. } => log::error!(
                event = "gave_up", attempts = attempts;
                "giving up after {attempts} attempts: {failure}"
            ),
            // A connection refused for good: the caller says it, once.
            Failure::Rejected { .. } if failure.refused_connection().is_some() => {
                log::debug!("stopping after {attempts} attempts: {failure}")
            }
            // A rollback the body asked for (the feed's fence check): the
            // caller says what it means.
            Failure::Rejected { error }
                if error.to_string() == diesel::result::Error::RollbackTransaction.to_string() =>
            {
                log::debug!("rolled back on request after {attempts} attempts")
            }
            Failure::Rejected { error } => {
                let c = error.classified();
                let sqlstate = c.sqlstate.unwrap_or("-");
                log::warn!(
                    event = "rejected", cause:% = c.cause, sqlstate = sqlstate, attempts = attempts;
                    "transaction rejected after {attempts} attempts: class {}, sqlstate {sqlstate}: {error}",
                    c.cause
                )
            }
            Failure::Cancelled { error } => {
                log::warn!("transaction cancelled by shutdown after {attempts} attempts: {error}")
            }
            // The breaker said it once when it began; the caller says how
            // the run ends.
            Failure::OutOfResources { .. } => {
                log::debug!("stopping after {attempts} attempts: {failure}")
            }
            Failure::Panicked(message) => {
                log::error!("transaction panicked on attempt {attempts}: {message}")
            }
            // Made by the feed's fence check, which logs it itself.
            Failure::Fenced(_) => log::debug!("fenced after {attempts} attempts: {failure}"),
        }
    }
}
