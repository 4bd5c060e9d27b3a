//! Everything that touches the database. No module outside `db` imports diesel.
//!
//! - [`classify`]: what an error means (reconnect, retry, give up).
//! - [`retry`]: the bounded, jittered retry loop; the only code that sleeps.
//! - [`pool`]: r2d2 with discard-on-our-word and idle validation.
//! - [`repo`]: the SQL of each use case, for both backends.
//! - [`Database::transaction`]: every transaction goes through it.

pub mod classify;
pub mod migrate;
pub mod pool;
pub mod repo;
pub mod retry;
#[allow(missing_docs)]
pub mod schema;
pub mod types;
pub mod url;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::QueryResult;

pub use self::classify::{classify, Classified, DbError, ErrorClass};
pub use self::pool::{AnyConnection, PoolSettings};
use self::pool::{Manager, PooledConn, QuietErrors};
use self::retry::{AttemptError, Observer, Stage, SystemClock};
pub use self::retry::{Failure, RetryPolicy};
pub use self::url::DatabaseUrl;
use crate::metrics::{DbCounters, DbMetrics};

/// Runs the same diesel code on whichever backend a connection is.
macro_rules! dispatch {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::db::AnyConnection::Pg($c) => $body,
            $crate::db::AnyConnection::Sqlite($c) => $body,
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
    health: Mutex<Health>,
}

/// Whether the database is reachable, for logging an outage once.
#[derive(Debug, Default)]
struct Health {
    down_since: Option<(Instant, DateTime<Utc>)>,
    waited: u64,
}

impl Database {
    /// Opens a pool on `url`. No connection is made yet: the first
    /// transaction connects, through the retry loop, so a database that is
    /// still starting is waited for.
    pub fn open(url: DatabaseUrl, settings: PoolSettings, policy: RetryPolicy) -> Database {
        let metrics = Arc::new(DbMetrics::default());
        let pool = r2d2::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(Some(0))
            .connection_timeout(settings.checkout_timeout)
            .max_lifetime(Some(settings.max_lifetime))
            .idle_timeout(Some(Duration::from_secs(600)))
            .test_on_check_out(true)
            .error_handler(Box::new(QuietErrors))
            .build_unchecked(Manager::new(url.clone(), settings, metrics.clone()));
        Database {
            url,
            pool,
            policy,
            metrics,
            health: Mutex::new(Health::default()),
        }
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

    /// Since when the database has been unreachable, if it is.
    pub fn down_since(&self) -> Option<DateTime<Utc>> {
        self.health
            .lock()
            .expect("health lock")
            .down_since
            .map(|(_, at)| at)
    }

    /// Runs `body` in one transaction, retried as the error's class says:
    /// connection-level errors discard the connection and retry on a new
    /// one, transient ones roll back and retry, both with jittered backoff
    /// until `max_outage`; permanent ones return at once. A commit whose
    /// outcome is unknown is retried too: every transaction of this crate
    /// checks its own idempotency key first (see docs/ARCHITECTURE.md).
    pub fn transaction<T>(
        &self,
        mut body: impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, Failure> {
        let mut observer = TxObserver {
            db: self,
            waited: false,
        };
        retry::run(&self.policy, &mut SystemClock, &mut observer, |_| {
            self.attempt(&mut body)
        })
    }

    fn attempt<T>(
        &self,
        body: &mut impl FnMut(&mut AnyConnection) -> QueryResult<T>,
    ) -> Result<T, AttemptError> {
        let mut conn = self.pool.get().map_err(|e| {
            let error = DbError::Connect(e.to_string());
            AttemptError::Failed {
                classified: classify(&error),
                error,
                stage: Stage::Checkout,
            }
        })?;
        let result = run_transaction(&mut conn, body);
        conn.touch();
        result
    }
}

/// One attempt on one connection. Marks the connection for discard whenever
/// its session may be unsound: a connection-level error, a failed rollback
/// (the "pending rollback" state that wedged the old service), a panic.
fn run_transaction<T>(
    pooled: &mut PooledConn,
    body: &mut impl FnMut(&mut AnyConnection) -> QueryResult<T>,
) -> Result<T, AttemptError> {
    let failed = |pooled: &mut PooledConn, error: diesel::result::Error, stage: Stage| {
        let error = DbError::Query(error);
        let classified = classify(&error);
        if classified.class == ErrorClass::Connection {
            pooled.discard = true;
        }
        AttemptError::Failed {
            error,
            classified,
            stage,
        }
    };
    if let Err(e) = pooled.conn.begin() {
        return Err(failed(pooled, e, Stage::Begin));
    }
    match catch_unwind(AssertUnwindSafe(|| body(&mut pooled.conn))) {
        Ok(Ok(value)) => match pooled.conn.commit() {
            Ok(()) => Ok(value),
            Err(e) => Err(failed(pooled, e, Stage::Commit)),
        },
        Ok(Err(e)) => {
            if let Err(rollback) = pooled.conn.rollback() {
                log::warn!("rollback failed, discarding the connection: {rollback}");
                pooled.discard = true;
            }
            Err(failed(pooled, e, Stage::Body))
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
/// transient error, and one line when the database goes away and one when it
/// comes back, however many workers wait in between.
struct TxObserver<'a> {
    db: &'a Database,
    waited: bool,
}

impl Observer for TxObserver<'_> {
    fn retrying(&mut self, error: &AttemptError, attempt: u32, delay: Duration) {
        let AttemptError::Failed {
            error,
            classified,
            stage,
        } = error
        else {
            return;
        };
        self.db.metrics.retried(classified.cause, attempt == 1);
        let sqlstate = classified.sqlstate.unwrap_or("-");
        if *stage == Stage::Commit && classified.class == ErrorClass::Connection {
            log::warn!(
                "commit outcome unknown (connection lost during COMMIT), retrying: attempt {attempt}, class {}, sqlstate {sqlstate}: {error}",
                classified.cause
            );
        }
        if classified.class == ErrorClass::Connection {
            let mut health = self.db.health.lock().expect("health lock");
            if !self.waited {
                self.waited = true;
                health.waited += 1;
            }
            if health.down_since.is_none() {
                health.down_since = Some((Instant::now(), Utc::now()));
                log::warn!(
                    "database unreachable since {}: class {}, sqlstate {sqlstate}, attempt {attempt}: {error}",
                    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    classified.cause
                );
            } else {
                log::debug!(
                    "still unreachable: class {}, sqlstate {sqlstate}, attempt {attempt}, next in {delay:?}: {error}",
                    classified.cause
                );
            }
        } else {
            log::warn!(
                "retrying transaction: class {}, sqlstate {sqlstate}, attempt {attempt}, in {delay:?}: {error}",
                classified.cause
            );
        }
    }

    fn succeeded(&mut self, retries: u32) {
        self.db.metrics.transaction_committed(retries);
        if retries == 0 {
            return;
        }
        let mut health = self.db.health.lock().expect("health lock");
        if let Some((since, _)) = health.down_since.take() {
            let down = since.elapsed();
            self.db.metrics.outage_ended(down.as_millis() as u64);
            log::info!(
                "database back after {:.1} s, {} transactions waited",
                down.as_secs_f64(),
                std::mem::take(&mut health.waited)
            );
        }
    }

    fn stopped(&mut self, failure: &Failure, attempts: u32) {
        match failure {
            Failure::GaveUp { .. } => log::error!("giving up after {attempts} attempts: {failure}"),
            Failure::Rejected { error } => {
                let c = classify(error);
                log::warn!(
                    "transaction rejected after {attempts} attempts: class {}, sqlstate {}: {error}",
                    c.cause,
                    c.sqlstate.unwrap_or("-")
                )
            }
            Failure::Panicked(message) => {
                log::error!("transaction panicked on attempt {attempts}: {message}")
            }
        }
    }
}
