//! The connection pool: r2d2 with a manager that can discard on our word.
//!
//! r2d2 decides at check-in whether a connection goes back, by asking
//! `has_broken`; it offers no way to throw away a connection one holds. So
//! [`PooledConn`] carries a `discard` flag that the retry layer sets whenever
//! it has any doubt about the session (a connection-level error, a failed
//! rollback, a panic), and the manager answers `has_broken` from it. Idle
//! connections are validated at checkout only when they sat idle for a while,
//! as HikariCP and pgxpool do, not with a round trip before every job.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, ConnectionError, QueryResult};

use super::checkpointer::{self, Checkpointer};
use super::deadline::{self, Registry, Watch};
use super::lite::{self, SqliteHandle};
use super::url::DatabaseUrl;
use crate::metrics::DbMetrics;

/// What a transaction will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Reads and writes.
    Write,
    /// Only reads.
    Read,
}

/// A connection to either backend. Database code matches on it once and runs
/// the same diesel code for both (see the `dispatch!` macro).
pub enum AnyConnection {
    /// PostgreSQL.
    Pg(PgConnection),
    /// SQLite, and its handle for the statements diesel does not run
    /// ([`super::lite`]).
    Sqlite(SqliteConnection, SqliteHandle),
}

impl AnyConnection {
    /// BEGIN. A write transaction on SQLite is `BEGIN IMMEDIATE`, so that it
    /// takes the write lock up front instead of failing to upgrade a read
    /// lock; a read takes no write lock at all.
    pub(super) fn begin(&mut self, access: Access) -> QueryResult<()> {
        match (self, access) {
            (AnyConnection::Pg(c), Access::Write) => AnsiTransactionManager::begin_transaction(c),
            (AnyConnection::Pg(c), Access::Read) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN READ ONLY")
            }
            (AnyConnection::Sqlite(c, _), Access::Write) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")
            }
            (AnyConnection::Sqlite(c, _), Access::Read) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN")
            }
        }
    }

    /// COMMIT.
    pub(crate) fn commit(&mut self) -> QueryResult<()> {
        match self {
            AnyConnection::Pg(c) => AnsiTransactionManager::commit_transaction(c),
            AnyConnection::Sqlite(c, _) => AnsiTransactionManager::commit_transaction(c),
        }
    }

    /// ROLLBACK.
    pub(crate) fn rollback(&mut self) -> QueryResult<()> {
        match self {
            AnyConnection::Pg(c) => AnsiTransactionManager::rollback_transaction(c),
            AnyConnection::Sqlite(c, _) => AnsiTransactionManager::rollback_transaction(c),
        }
    }

    /// Runs SQL text without results.
    pub fn batch_execute(&mut self, sql: &str) -> QueryResult<()> {
        match self {
            AnyConnection::Pg(c) => c.batch_execute(sql),
            AnyConnection::Sqlite(c, _) => c.batch_execute(sql),
        }
    }

    fn is_broken(&mut self) -> bool {
        match self {
            AnyConnection::Pg(c) => c.is_broken(),
            AnyConnection::Sqlite(c, _) => c.is_broken(),
        }
    }
}

/// Settings of each connection and of the pool. Defaults in `impl Default`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Most connections open at once.
    pub max_size: u32,
    /// How long a checkout waits for a connection.
    pub checkout_timeout: Duration,
    /// A connection idle for longer is pinged before it is handed out.
    pub validate_after_idle: Duration,
    /// Connections older than this are closed and replaced.
    pub max_lifetime: Duration,
    /// PostgreSQL `statement_timeout`.
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout`.
    pub lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout`: how long a client
    /// that stopped mid-transaction (paused, cut off) keeps its row locks.
    pub idle_in_transaction_timeout: Duration,
    /// SQLite `busy_timeout`.
    pub busy_timeout: Duration,
}

impl PoolSettings {
    /// How long a PostgreSQL call may go without an answer before its
    /// connection is cut: `statement_timeout` plus 5 s (`deadline::MARGIN`)
    /// (none when `statement_timeout` is off: a call may then legitimately
    /// take any time).
    pub fn call_deadline(&self) -> Option<Duration> {
        (!self.statement_timeout.is_zero()).then(|| self.statement_timeout + deadline::MARGIN)
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 4,
            checkout_timeout: Duration::from_secs(1),
            validate_after_idle: Duration::from_millis(500),
            max_lifetime: Duration::from_secs(30 * 60),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// A pooled connection and what the pool must know of it.
pub(super) struct PooledConn {
    pub(crate) conn: AnyConnection,
    pub(crate) discard: bool,
    last_used: Instant,
    watch: Option<Arc<Watch>>,
    /// The server's side of a PostgreSQL connection.
    pub(crate) session: Option<Session>,
}

/// A PostgreSQL backend: its pid and start time, which together name it
/// even after the pid is reused.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub(super) struct Session {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
    #[diesel(sql_type = diesel::sql_types::Text)]
    started: String,
}

impl Session {
    fn of(conn: &mut PgConnection) -> QueryResult<Session> {
        use diesel::RunQueryDsl;
        diesel::sql_query(
            "SELECT pid, backend_start::text AS started FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .get_result(conn)
    }

    /// Ends these sessions if the server still has them: the backends of
    /// discarded connections whose end the server may not have seen (a cut
    /// link, a call abandoned at its deadline), and which may still hold
    /// their devices' row locks until `idle_in_transaction_session_timeout`.
    /// Returns how many were still there.
    pub(crate) fn end_all(conn: &mut AnyConnection, sessions: &[Session]) -> QueryResult<usize> {
        use diesel::sql_types::{Integer, Text};
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Ended {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let AnyConnection::Pg(c) = conn else {
            return Ok(0);
        };
        let mut ended = 0;
        for s in sessions {
            let row: Ended = diesel::sql_query(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                 WHERE pid = $1 AND backend_start::text = $2",
            )
            .bind::<Integer, _>(s.pid)
            .bind::<Text, _>(&s.started)
            .get_result(c)?;
            ended += row.n as usize;
        }
        Ok(ended)
    }
}

impl PooledConn {
    pub(crate) fn touch(&mut self) {
        self.last_used = Instant::now();
    }

    /// Whether the deadline watchdog cut this connection, and after how
    /// long a wait for an answer.
    pub(crate) fn cut_after(&self) -> Option<Duration> {
        self.watch.as_ref().and_then(|w| w.cut_after())
    }
}

/// What every SQLite connection is set to, after its `busy_timeout`: WAL,
/// `synchronous = NORMAL` (durable across a crash of the process; see
/// docs/RELIABILITY.md), foreign keys on, and a 16 MiB page cache (SQLite's
/// default is 2 MiB): a batch reads index pages all over `readings
/// (sensor_id, ts)`. Measured in docs/PERFORMANCE.md ("SQLite's settings").
/// Statement journals in memory (`temp_store = MEMORY`): written to a
/// temporary file they were 18% of the writer's time. Checkpoints are not
/// set here: a pooled connection's commits hand them to a thread of their
/// own ([`super::checkpointer`]).
/// Public for the benchmarks, whose plain connections must be set the same.
pub const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA foreign_keys = ON; PRAGMA cache_size = -16384; PRAGMA temp_store = MEMORY;";

/// The r2d2 manager for both backends.
pub(super) struct Manager {
    url: DatabaseUrl,
    settings: PoolSettings,
    metrics: Arc<DbMetrics>,
    /// Where new PostgreSQL connections register with the deadline
    /// watchdog, when there is one.
    deadline: Option<Registry>,
    /// SQLite: the thread that checkpoints for this pool's connections.
    checkpointer: Option<Checkpointer>,
}

impl Manager {
    pub(crate) fn new(
        url: DatabaseUrl,
        settings: PoolSettings,
        metrics: Arc<DbMetrics>,
        deadline: Option<Registry>,
    ) -> Self {
        Manager {
            url,
            settings,
            metrics,
            deadline,
            checkpointer: None,
        }
    }

    /// On SQLite, gives this manager's connections a checkpointer thread
    /// (the pool's; a health check's connection writes nothing, and SQLite's
    /// own automatic checkpoint stays on it).
    pub(crate) fn checkpointing(mut self) -> Self {
        if let DatabaseUrl::Sqlite(path) = &self.url {
            self.checkpointer = path.to_str().map(|path| {
                let (path, setup) = (path.to_owned(), sqlite_setup(&self.settings));
                Checkpointer::start(checkpointer::PAGES, move || {
                    open_sqlite(&path, &setup)
                        .map(|(conn, _)| conn)
                        .map_err(|e| e.to_string())
                })
            });
        }
        self
    }

    /// A PostgreSQL connection with client-side timeouts, its calls
    /// watched by the deadline watchdog.
    fn connect_pg(&self, url: &str) -> Result<(PgConnection, Option<Arc<Watch>>), ConnectionError> {
        // Process-wide, so that connections being made at the same time
        // by several pools never share a marker.
        static NONCE: AtomicU32 = AtomicU32::new(0);
        let (libpq_url, marker) =
            DatabaseUrl::libpq_url(url, NONCE.fetch_add(1, Ordering::Relaxed));
        let Some(registry) = &self.deadline else {
            return Ok((PgConnection::establish(&libpq_url)?, None));
        };
        let before = deadline::sockets();
        let mut conn = PgConnection::establish(&libpq_url)?;
        let watch = Watch::new(deadline::find_socket(&before, marker));
        if !watch.has_socket() {
            log::info!("cannot tell this connection's socket apart: its calls have no client-side deadline");
        }
        conn.set_instrumentation(watch.clock());
        registry
            .lock()
            .expect("deadline registry lock")
            .push(Arc::downgrade(&watch));
        Ok((conn, Some(watch)))
    }

    /// Session settings of every new connection. On PostgreSQL,
    /// `enable_seqscan = off`: every statement of the engine finds its rows
    /// by a key that has an index, and a plan must not depend on how small a
    /// table was when it was made. diesel prepares its statements, and after
    /// five executions PostgreSQL may keep one generic plan; made while
    /// `processed_messages` held a few pages, the processed-ids lookup
    /// (`message_id = ANY($1)`) was a sequential scan that compared every
    /// row with each of the batch's ids, kept while the table grew until
    /// autovacuum's ANALYZE invalidated it: a third of the ingests into a new
    /// database took 80 s instead of 6 (docs/PERFORMANCE.md). Custom plans
    /// (`plan_cache_mode`) do not help: with 5,000 ids the planner prices a
    /// sequential scan of 200,000 cached rows below 5,000 index probes, and it
    /// took 17 ms against the index's 5. A sequential scan stays possible
    /// where no index applies, priced as disabled (10^10), which is above
    /// `jit_above_cost`: hence `jit = off`, or the one-row read of
    /// `reference_version` in every batch is compiled first (20–100 ms a
    /// time, measured). The engine's statements are short; JIT does not pay
    /// for them either way.
    fn setup_sql(&self) -> String {
        let s = &self.settings;
        match self.url {
            DatabaseUrl::Postgres(_) => format!(
                "SET application_name = 'normalizer'; \
                 SET statement_timeout = {}; SET lock_timeout = {}; \
                 SET idle_in_transaction_session_timeout = {}; \
                 SET enable_seqscan = off; SET jit = off;",
                s.statement_timeout.as_millis(),
                s.lock_timeout.as_millis(),
                s.idle_in_transaction_timeout.as_millis(),
            ),
            DatabaseUrl::Sqlite(_) => sqlite_setup(s),
        }
    }
}

/// What every new SQLite connection runs first.
fn sqlite_setup(settings: &PoolSettings) -> String {
    format!(
        "PRAGMA busy_timeout = {}; {SQLITE_PRAGMAS}",
        settings.busy_timeout.as_millis()
    )
}

/// Sets SQLite's process-wide options, before its first connection:
/// - no memory statistics (`SQLITE_CONFIG_MEMSTATUS`): with them, every
///   allocation of SQLite's takes one global mutex;
/// - multi-thread mode (`SQLITE_CONFIG_MULTITHREAD`): no mutex around each
///   call on a connection. A diesel connection is used by one thread at a
///   time (it is not `Sync`; the pool lends it to one worker), which is the
///   mode's one rule.
///
/// Together they were 7% of the one writer's time (docs/PERFORMANCE.md, "A
/// write path made for SQLite"). Once SQLite is initialised (a connection
/// opened elsewhere in the process first, as a test may), they can no longer
/// be set: SQLite says so (`SQLITE_MISUSE`) and keeps its defaults, which
/// are correct, only slower.
fn configure_sqlite() {
    use libsqlite3_sys::{
        sqlite3_config, SQLITE_CONFIG_MEMSTATUS, SQLITE_CONFIG_MULTITHREAD, SQLITE_OK,
    };
    // SAFETY: sqlite3_config is called before any connection of this
    // module's (the `Once` of `open_sqlite`); if SQLite was initialised
    // before, it refuses without changing anything. The variadic argument
    // of MEMSTATUS is one int.
    let results = unsafe {
        [
            sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0 as std::os::raw::c_int),
            sqlite3_config(SQLITE_CONFIG_MULTITHREAD),
        ]
    };
    if results.iter().any(|rc| *rc != SQLITE_OK) {
        log::debug!("SQLite was initialised before its first connection here: its default mutexes and memory statistics stay (sqlite3_config: {results:?})");
    }
}

/// Opens a SQLite file. One in WAL mode that was closed cleanly (no `-shm`
/// beside it) on a read-only file system cannot be opened the usual way
/// ("unable to open database file": SQLite would create its shared-memory
/// file). Nobody can write it there, so it is opened immutable (no locks, no
/// shared memory) for the commands that only read; a write then fails as
/// read-only, which `ingest` and `serve` report as such.
/// `setup` runs on the connection (SQLite opens the file at the first
/// statement, so that is where it fails).
fn open_sqlite(
    path: &str,
    setup: &str,
) -> Result<(SqliteConnection, SqliteHandle), ConnectionError> {
    static CONFIGURE: std::sync::Once = std::sync::Once::new();
    CONFIGURE.call_once(configure_sqlite);
    let open = |target: &str| {
        let (mut conn, handle) = lite::establish(target)?;
        conn.batch_execute(setup)
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok((conn, handle))
    };
    match open(path) {
        Err(e) if cannot_be_written(Path::new(path)) => {
            match open(&format!("file:{}?immutable=1", uri_path(path))) {
                Ok(conn) => {
                    log::debug!("{path} cannot be written: opened immutable, for reading");
                    Ok(conn)
                }
                Err(_) => Err(e),
            }
        }
        result => result,
    }
}

/// An existing file that this process cannot write, or whose folder it
/// cannot write (a read-only mount says so even to root).
fn cannot_be_written(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let writable = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            // SAFETY: a NUL-terminated path; access(2) only reads it.
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
            .unwrap_or(true)
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    path.is_file() && (!writable(path) || !writable(folder))
}

/// `path` for a `file:` URI: the characters that would end or escape it
/// percent-encoded.
fn uri_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

impl r2d2::ManageConnection for Manager {
    type Connection = PooledConn;
    type Error = ConnectionError;

    fn connect(&self) -> Result<PooledConn, ConnectionError> {
        let (mut conn, watch) = match &self.url {
            DatabaseUrl::Postgres(url) => {
                let (conn, watch) = self.connect_pg(url)?;
                (AnyConnection::Pg(conn), watch)
            }
            DatabaseUrl::Sqlite(path) => {
                let path = path.to_str().ok_or_else(|| {
                    ConnectionError::InvalidConnectionUrl("the SQLite path is not UTF-8".into())
                })?;
                let (conn, mut handle) = open_sqlite(path, &self.setup_sql())?;
                if let Some(checkpointer) = &self.checkpointer {
                    handle.set_hook(checkpointer.hook());
                }
                (AnyConnection::Sqlite(conn, handle), None)
            }
        };
        if let AnyConnection::Pg(c) = &mut conn {
            c.batch_execute(&self.setup_sql())
                .map_err(ConnectionError::CouldntSetupConfiguration)?;
        }
        let session = match &mut conn {
            AnyConnection::Pg(c) => {
                Some(Session::of(c).map_err(ConnectionError::CouldntSetupConfiguration)?)
            }
            AnyConnection::Sqlite(..) => None,
        };
        self.metrics.connection_opened();
        log::debug!("opened a {} connection", self.url.backend_name());
        Ok(PooledConn {
            conn,
            discard: false,
            last_used: Instant::now(),
            watch,
            session,
        })
    }

    fn is_valid(&self, conn: &mut PooledConn) -> Result<(), ConnectionError> {
        if conn.last_used.elapsed() < self.settings.validate_after_idle {
            return Ok(());
        }
        match conn.conn.batch_execute("SELECT 1") {
            Ok(()) => {
                conn.touch();
                Ok(())
            }
            Err(e) => {
                self.metrics.connection_discarded();
                log::info!("discarding an idle connection that failed validation: {e}");
                Err(ConnectionError::BadConnection(e.to_string()))
            }
        }
    }

    fn has_broken(&self, conn: &mut PooledConn) -> bool {
        let broken = conn.discard
            || std::thread::panicking()
            || conn.cut_after().is_some()
            || conn.conn.is_broken();
        if broken {
            self.metrics.connection_discarded();
        }
        broken
    }
}

/// Connect errors during an outage are the retry layer's to report, once;
/// r2d2's default handler would log every failed attempt as an error.
#[derive(Debug)]
pub(crate) struct QuietErrors;

impl r2d2::HandleError<ConnectionError> for QuietErrors {
    fn handle_error(&self, error: ConnectionError) {
        log::debug!("connection attempt failed: {error}");
    }
}
