//! What an error means for the caller: the one place that decides what is
//! transient.
//!
//! diesel exposes no SQLSTATE (`DatabaseErrorInformation` has the message
//! only), so the decision combines diesel's error kinds, the connection
//! status it reports, and PostgreSQL's and SQLite's documented primary
//! messages. The SQLSTATE that a message stands for is inferred and logged.

use diesel::result::{DatabaseErrorKind, Error};

use crate::metrics::Cause;

/// An error from one attempt at a transaction.
#[derive(Debug)]
pub enum DbError {
    /// A query, BEGIN, COMMIT or ROLLBACK failed.
    Query(Error),
    /// No connection could be had: connecting failed, or the pool timed out.
    Connect(String),
    /// The database has been unavailable (unreachable, or out of space) for
    /// as long as the caller waits; no call was made. The text says since
    /// when and the last error.
    Unavailable(String),
    /// A call had no answer for this long, beyond the server's own
    /// `statement_timeout`: its connection was cut and abandoned.
    NoAnswer(std::time::Duration),
}

/// libpq's messages span lines ("...failed: Connection refused\n\tIs the
/// server running..."); a log has one event per line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// r2d2 says "timed out waiting for connection: " before the last connect
/// error; that is the pool's inside, not what happened.
fn connect_error(text: &str) -> String {
    let text = one_line(text);
    match text.strip_prefix("timed out waiting for connection: ") {
        Some(cause) => cause.to_string(),
        None => text,
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Query(e) => f.write_str(&one_line(&e.to_string())),
            DbError::Connect(e) => {
                write!(f, "cannot connect to the database: {}", connect_error(e))
            }
            DbError::Unavailable(e) => f.write_str(&one_line(e)),
            DbError::NoAnswer(after) => write!(
                f,
                "no answer from the database for {:.1} s; the connection was abandoned",
                after.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for DbError {}

impl From<Error> for DbError {
    fn from(e: Error) -> Self {
        DbError::Query(e)
    }
}

/// An error as callers keep it once the attempt is over: what it said and
/// what it means. Unlike diesel's errors it is `Clone`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    message: String,
    classified: Classified,
    /// Why no connection could be had, when that was the error.
    refused: Option<String>,
}

impl Reason {
    /// What the error means.
    pub fn classified(&self) -> Classified {
        self.classified
    }

    /// Why no connection could be had, when that was the error (in the
    /// connect error's own words).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }
}

impl From<&DbError> for Reason {
    fn from(error: &DbError) -> Self {
        Reason {
            message: error.to_string(),
            classified: classify(error),
            refused: match error {
                DbError::Connect(text) => Some(connect_error(text)),
                _ => None,
            },
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the caller must do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The connection is unusable or the server unreachable: discard the
    /// connection, never hand it out again, retry on a new one after a backoff.
    Connection,
    /// The transaction failed but the session is sound: roll back, back off,
    /// retry.
    Transient,
    /// The statement is wrong for this data: retrying cannot help.
    Permanent,
    /// The database is out of disk space or memory: no message is at fault
    /// and a retry right away cannot help. Never bisected, never
    /// dead-lettered: `ingest` stops, `serve` waits until it is over.
    Resource,
    /// Not recognized: retried a bounded number of times, then permanent.
    Unrecognized,
}

/// An error's class, the counter it goes to, and the SQLSTATE it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// What to do.
    pub class: ErrorClass,
    /// Which retry counter it goes to.
    pub cause: Cause,
    /// The SQLSTATE the error stands for, where one is known.
    pub sqlstate: Option<&'static str>,
}

const fn c(class: ErrorClass, cause: Cause, sqlstate: Option<&'static str>) -> Classified {
    Classified {
        class,
        cause,
        sqlstate,
    }
}

use ErrorClass::{Connection, Permanent, Resource, Transient, Unrecognized};

/// PostgreSQL and SQLite primary messages (lower case, matched as
/// substrings), in order of precedence.
const MESSAGES: &[(&str, Classified)] = &[
    // 57P01..57P03: the server goes down, restarts or is not up yet.
    (
        "terminating connection due to administrator command",
        c(Connection, Cause::AdminShutdown, Some("57P01")),
    ),
    (
        "terminating connection due to crash",
        c(Connection, Cause::AdminShutdown, Some("57P02")),
    ),
    (
        "terminating connection due to idle",
        c(Connection, Cause::ConnectionLost, Some("57P05")),
    ),
    (
        "the database system is starting up",
        c(Connection, Cause::AdminShutdown, Some("57P03")),
    ),
    (
        "the database system is shutting down",
        c(Connection, Cause::AdminShutdown, Some("57P03")),
    ),
    (
        "the database system is in recovery mode",
        c(Connection, Cause::AdminShutdown, Some("57P03")),
    ),
    (
        "the database system is not yet accepting connections",
        c(Connection, Cause::AdminShutdown, Some("57P03")),
    ),
    (
        "the database system is not accepting connections",
        c(Connection, Cause::AdminShutdown, Some("57P03")),
    ),
    // 53300: no slot for another connection.
    (
        "sorry, too many clients already",
        c(Connection, Cause::TooManyConnections, Some("53300")),
    ),
    (
        "remaining connection slots are reserved",
        c(Connection, Cause::TooManyConnections, Some("53300")),
    ),
    (
        "too many connections for",
        c(Connection, Cause::TooManyConnections, Some("53300")),
    ),
    // Class 08 and libpq's own words for a dead socket.
    (
        "server closed the connection unexpectedly",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "no connection to the server",
        c(Connection, Cause::ConnectionLost, Some("08003")),
    ),
    (
        "connection refused",
        c(Connection, Cause::ConnectionLost, Some("08001")),
    ),
    (
        "could not connect to server",
        c(Connection, Cause::ConnectionLost, Some("08001")),
    ),
    (
        "could not receive data from server",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "could not send data to server",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "connection reset by peer",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "broken pipe",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "ssl syscall error",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "ssl connection has been closed unexpectedly",
        c(Connection, Cause::ConnectionLost, Some("08006")),
    ),
    (
        "timeout expired",
        c(Connection, Cause::ConnectionLost, Some("08001")),
    ),
    (
        "no such file or directory",
        c(Connection, Cause::ConnectionLost, Some("08001")),
    ),
    (
        "is the server running",
        c(Connection, Cause::ConnectionLost, Some("08001")),
    ),
    // The session is in a failed transaction: never reuse it.
    (
        "current transaction is aborted",
        c(Connection, Cause::Other, Some("25P02")),
    ),
    // Transient inside a transaction.
    (
        "could not serialize access",
        c(Transient, Cause::Serialization, Some("40001")),
    ),
    (
        "deadlock detected",
        c(Transient, Cause::Deadlock, Some("40P01")),
    ),
    (
        "canceling statement due to lock timeout",
        c(Transient, Cause::LockTimeout, Some("55P03")),
    ),
    (
        "could not obtain lock",
        c(Transient, Cause::LockTimeout, Some("55P03")),
    ),
    (
        "lock not available",
        c(Transient, Cause::LockTimeout, Some("55P03")),
    ),
    (
        "canceling statement due to statement timeout",
        c(Transient, Cause::StatementTimeout, Some("57014")),
    ),
    (
        "canceling statement due to user request",
        c(Transient, Cause::StatementTimeout, Some("57014")),
    ),
    (
        "canceling autovacuum task",
        c(Transient, Cause::StatementTimeout, Some("57014")),
    ),
    // Class 53: the server is out of a resource. Not the message's fault and
    // not a blip: never bisected, never dead-lettered, waited out (serve) or
    // stopped at (ingest).
    (
        "out of shared memory",
        c(Resource, Cause::OutOfMemory, Some("53200")),
    ),
    (
        "out of memory",
        c(Resource, Cause::OutOfMemory, Some("53200")),
    ),
    (
        "could not extend file",
        c(Resource, Cause::DiskFull, Some("53100")),
    ),
    (
        "no space left on device",
        c(Resource, Cause::DiskFull, Some("53100")),
    ),
    (
        "could not resize shared memory",
        c(Resource, Cause::DiskFull, Some("53100")),
    ),
    (
        "database or disk is full",
        c(Resource, Cause::DiskFull, Some("SQLITE_FULL")),
    ),
    // A database that cannot be written (a read-only file or file system)
    // is nobody's message's fault either: stop, or wait until it is fixed.
    (
        "attempt to write a readonly database",
        c(Resource, Cause::Other, Some("SQLITE_READONLY")),
    ),
    // SQLite: another writer holds the lock.
    (
        "database is locked",
        c(Transient, Cause::Busy, Some("SQLITE_BUSY")),
    ),
    (
        "database table is locked",
        c(Transient, Cause::Busy, Some("SQLITE_LOCKED")),
    ),
    (
        "database schema has changed",
        c(Transient, Cause::Other, Some("SQLITE_SCHEMA")),
    ),
    // Configuration, not an outage: fail at once with the server's words.
    (
        "password authentication failed",
        c(Permanent, Cause::Other, Some("28P01")),
    ),
    (
        "no pg_hba.conf entry",
        c(Permanent, Cause::Other, Some("28000")),
    ),
    (
        "pg_hba.conf rejects connection",
        c(Permanent, Cause::Other, Some("28000")),
    ),
    // TLS: the server's certificate, the client's, or TLS itself refused.
    // (An SSL error that breaks the connection, "SSL SYSCALL error" or an
    // unexpected EOF, stays a lost connection above.)
    (
        "certificate verify failed",
        c(Permanent, Cause::Other, None),
    ),
    ("does not match host name", c(Permanent, Cause::Other, None)),
    (
        "server does not support ssl",
        c(Permanent, Cause::Other, None),
    ),
    (
        "requires a valid client certificate",
        c(Permanent, Cause::Other, Some("28000")),
    ),
    (
        "certificate authentication failed",
        c(Permanent, Cause::Other, Some("28000")),
    ),
    ("alert unknown ca", c(Permanent, Cause::Other, None)),
    ("alert bad certificate", c(Permanent, Cause::Other, None)),
    (
        "alert certificate required",
        c(Permanent, Cause::Other, None),
    ),
    (
        "alert certificate unknown",
        c(Permanent, Cause::Other, None),
    ),
    (
        "could not read certificate file",
        c(Permanent, Cause::Other, None),
    ),
    (
        "could not load private key file",
        c(Permanent, Cause::Other, None),
    ),
    (
        "has group or world access",
        c(Permanent, Cause::Other, None),
    ),
    (
        "invalid connection option",
        c(Permanent, Cause::Other, None),
    ),
    ("invalid uri", c(Permanent, Cause::Other, None)),
    ("invalid port number", c(Permanent, Cause::Other, None)),
    ("invalid integer value", c(Permanent, Cause::Other, None)),
    ("missing \"=\" after", c(Permanent, Cause::Other, None)),
    (
        "unable to open database file",
        c(Permanent, Cause::Other, Some("SQLITE_CANTOPEN")),
    ),
    // diesel's own words for SQLITE_CANTOPEN.
    (
        "unable to open the database file",
        c(Permanent, Cause::Other, Some("SQLITE_CANTOPEN")),
    ),
    ("invalid sslmode value", c(Permanent, Cause::Other, None)),
    // libpq: the server asks for a password and the URL gives none.
    (
        "no password supplied",
        c(Permanent, Cause::Other, Some("28P01")),
    ),
    (
        "file is not a database",
        c(Permanent, Cause::Other, Some("SQLITE_NOTADB")),
    ),
    // Data, integrity and syntax errors (classes 22, 23, 42).
    ("violates", c(Permanent, Cause::Other, Some("23000"))),
    (
        "constraint failed",
        c(Permanent, Cause::Other, Some("23000")),
    ),
    (
        "invalid byte sequence",
        c(Permanent, Cause::Other, Some("22021")),
    ),
    (
        "invalid input syntax",
        c(Permanent, Cause::Other, Some("22P02")),
    ),
    ("value too long", c(Permanent, Cause::Other, Some("22001"))),
    ("out of range", c(Permanent, Cause::Other, Some("22003"))),
    (
        "numeric field overflow",
        c(Permanent, Cause::Other, Some("22003")),
    ),
    (
        "division by zero",
        c(Permanent, Cause::Other, Some("22012")),
    ),
    ("syntax error", c(Permanent, Cause::Other, Some("42601"))),
    ("does not exist", c(Permanent, Cause::Other, None)),
    ("no such table", c(Permanent, Cause::Other, None)),
    ("no such column", c(Permanent, Cause::Other, None)),
    (
        "permission denied",
        c(Permanent, Cause::Other, Some("42501")),
    ),
];

/// What an operator does about a connection refused for good, by the
/// server's (or libpq's) words: the second half of the one sentence that
/// a set-up error prints.
const REMEDIES: &[(&str, &str)] = &[
    ("certificate verify failed", "the server's certificate is not signed by the CA that sslrootcert= names (default ~/.postgresql/root.crt): give the CA that signed it"),
    ("does not match host name", "connect by a host name that the server's certificate lists, or have the certificate re-issued for this one"),
    ("server does not support ssl", "the server has ssl = off: turn it on, or ask for less in sslmode="),
    ("pg_hba.conf rejects connection", "a pg_hba.conf line on the server rejects this user, database, address or encryption: connect as another line admits (hostssl lines need sslmode=require or stronger), or change pg_hba.conf"),
    ("no pg_hba.conf entry", "no pg_hba.conf line on the server admits this user, database, address and encryption: add one, or connect as an existing line admits"),
    ("requires a valid client certificate", "the server's pg_hba.conf asks for a client certificate: give sslcert= and sslkey="),
    ("certificate authentication failed", "the client certificate's CN does not name this role: use the role it names, or a pg_ident.conf map"),
    ("alert unknown ca", "the server does not trust the client certificate (sslcert=): have it signed by a CA in the server's ssl_ca_file"),
    ("alert certificate unknown", "the server does not trust the client certificate (sslcert=): have it signed by a CA in the server's ssl_ca_file"),
    ("alert bad certificate", "the server does not accept the client certificate (sslcert=)"),
    ("password authentication failed", "check the password: in the URL, in ~/.pgpass (or passfile=), in PGPASSWORD, or in the file --database-url-file names"),
    ("no password supplied", "the server asks for a password: put it in ~/.pgpass (or passfile=), or in the URL given by --database-url-file"),
    ("has group or world access", "the key file (sslkey=) must be readable by its owner only: chmod 0600 it"),
];

/// What to do about a connection refused for good, when its words are known.
pub fn remedy(message: &str) -> Option<&'static str> {
    let lower = message.to_ascii_lowercase();
    REMEDIES
        .iter()
        .find(|(needle, _)| lower.contains(needle))
        .map(|(_, remedy)| *remedy)
}

/// Classifies an error by its text alone: connection failures and unknown
/// database errors only carry their message.
pub(super) fn classify_message(message: &str) -> Option<Classified> {
    let lower = message.to_ascii_lowercase();
    MESSAGES
        .iter()
        .find(|(needle, _)| lower.contains(needle))
        .map(|(_, classified)| *classified)
}

/// Decides what an error means for the caller.
pub fn classify(error: &DbError) -> Classified {
    match error {
        // The pool could not connect, or every connection stayed busy for the
        // whole checkout timeout; r2d2 adds the last connect error when it
        // has one. Either way the database cannot take work right now.
        DbError::Connect(text) | DbError::Unavailable(text) => match classify_message(text) {
            Some(found) if matches!(found.class, Permanent | Resource) => found,
            Some(found) => Classified {
                class: Connection,
                ..found
            },
            None => c(Connection, Cause::ConnectionLost, Some("08001")),
        },
        DbError::Query(e) => classify_query(e),
        // The server may be alive but nothing came back through the path
        // to it (a partition behind a relay): a new connection may get through.
        DbError::NoAnswer(_) => c(Connection, Cause::NoAnswer, None),
    }
}

fn classify_query(error: &Error) -> Classified {
    match error {
        Error::DatabaseError(kind, info) => {
            let by_message = classify_message(info.message());
            match kind {
                DatabaseErrorKind::SerializationFailure => {
                    c(Transient, Cause::Serialization, Some("40001"))
                }
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                    by_message.filter(|f| f.class == Connection).unwrap_or(c(
                        Connection,
                        Cause::ConnectionLost,
                        Some("08006"),
                    ))
                }
                DatabaseErrorKind::ReadOnlyTransaction => {
                    // A read-only session: most likely a standby after a
                    // failover. A new connection may reach the primary.
                    c(Connection, Cause::Other, Some("25006"))
                }
                DatabaseErrorKind::UniqueViolation => c(Permanent, Cause::Other, Some("23505")),
                DatabaseErrorKind::ForeignKeyViolation => c(Permanent, Cause::Other, Some("23503")),
                DatabaseErrorKind::NotNullViolation => c(Permanent, Cause::Other, Some("23502")),
                DatabaseErrorKind::CheckViolation => c(Permanent, Cause::Other, Some("23514")),
                DatabaseErrorKind::RestrictViolation => c(Permanent, Cause::Other, Some("23001")),
                DatabaseErrorKind::ExclusionViolation => c(Permanent, Cause::Other, Some("23P01")),
                _ => by_message.unwrap_or(c(Unrecognized, Cause::Other, None)),
            }
        }
        // The session's transaction state is lost or unknown: a failed
        // COMMIT or ROLLBACK, or a transaction left open by a panic.
        Error::BrokenTransactionManager
        | Error::AlreadyInTransaction
        | Error::NotInTransaction
        | Error::RollbackErrorOnCommit { .. } => c(Connection, Cause::ConnectionLost, None),
        // Our own statements or rows are wrong: a bug, not an outage.
        Error::NotFound
        | Error::QueryBuilderError(_)
        | Error::DeserializationError(_)
        | Error::SerializationError(_)
        | Error::InvalidCString(_)
        | Error::RollbackTransaction
        | Error::IntegerConversion(_) => c(Permanent, Cause::Other, None),
        _ => c(Unrecognized, Cause::Other, None),
    }
}

/// A database error known by its text alone: what diesel_migrations' boxed
/// errors become (and, in tests, real-looking diesel errors).
#[derive(Debug)]
pub(crate) struct Said(pub(crate) String);

impl diesel::result::DatabaseErrorInformation for Said {
    fn message(&self) -> &str {
        &self.0
    }
    fn details(&self) -> Option<&str> {
        None
    }
    fn hint(&self) -> Option<&str> {
        None
    }
    fn table_name(&self) -> Option<&str> {
        None
    }
    fn column_name(&self) -> Option<&str> {
        None
    }
    fn constraint_name(&self) -> Option<&str> {
        None
    }
    fn statement_position(&self) -> Option<i32> {
        None
    }
}

/// Real-looking diesel errors for tests of the classifier and the retry loop.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{DatabaseErrorKind, DbError, Error};

    /// A database error of `kind` with PostgreSQL's or SQLite's `message`.
    pub(crate) fn db(kind: DatabaseErrorKind, message: &'static str) -> DbError {
        DbError::Query(Error::DatabaseError(
            kind,
            Box::new(super::Said(message.into())),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_support::db;

    #[test]
    fn errors_print_on_one_line() {
        let e = DbError::Connect("failed: Connection refused\n\tIs the server running?\n".into());
        assert_eq!(
            e.to_string(),
            "cannot connect to the database: failed: Connection refused Is the server running?"
        );
        let pooled = DbError::Connect(
            "timed out waiting for connection: password authentication failed for user \"app\""
                .into(),
        );
        assert_eq!(
            pooled.to_string(),
            "cannot connect to the database: password authentication failed for user \"app\"",
            "not the pool's internals"
        );
    }

    /// Real error values, as diesel 2.3 reports them from PostgreSQL 15,
    /// SQLite and r2d2 (see shared/PITFALLS.md).
    #[test]
    fn real_errors_are_classified_as_the_caller_must_act() {
        use DatabaseErrorKind::*;
        let table: Vec<(DbError, ErrorClass, Cause, Option<&str>)> = vec![
            (db(Unknown, "canceling statement due to statement timeout"), Transient, Cause::StatementTimeout, Some("57014")),
            (db(Unknown, "canceling statement due to lock timeout"), Transient, Cause::LockTimeout, Some("55P03")),
            (db(Unknown, "could not obtain lock on row in relation \"devices\""), Transient, Cause::LockTimeout, Some("55P03")),
            (db(Unknown, "deadlock detected"), Transient, Cause::Deadlock, Some("40P01")),
            (db(SerializationFailure, "could not serialize access due to concurrent update"), Transient, Cause::Serialization, Some("40001")),
            (db(Unknown, "could not serialize access due to read/write dependencies among transactions"), Transient, Cause::Serialization, Some("40001")),
            (db(ClosedConnection, "terminating connection due to administrator command"), Connection, Cause::AdminShutdown, Some("57P01")),
            (db(UnableToSendCommand, "no connection to the server\n"), Connection, Cause::ConnectionLost, Some("08003")),
            (db(ClosedConnection, "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally"), Connection, Cause::ConnectionLost, Some("08006")),
            (db(Unknown, "current transaction is aborted, commands ignored until end of transaction block"), Connection, Cause::Other, Some("25P02")),
            (db(Unknown, "sorry, too many clients already"), Connection, Cause::TooManyConnections, Some("53300")),
            (db(Unknown, "database is locked"), Transient, Cause::Busy, Some("SQLITE_BUSY")),
            (db(Unknown, "database table is locked"), Transient, Cause::Busy, Some("SQLITE_LOCKED")),
            (db(UniqueViolation, "duplicate key value violates unique constraint \"readings_pkey\""), Permanent, Cause::Other, Some("23505")),
            (db(ForeignKeyViolation, "insert or update on table \"readings\" violates foreign key constraint"), Permanent, Cause::Other, Some("23503")),
            (db(CheckViolation, "new row violates check constraint"), Permanent, Cause::Other, Some("23514")),
            (db(Unknown, "invalid byte sequence for encoding \"UTF8\": 0x00"), Permanent, Cause::Other, Some("22021")),
            (db(Unknown, "value \"99999999999\" is out of range for type integer"), Permanent, Cause::Other, Some("22003")),
            (db(Unknown, "something the classifier has never seen"), Unrecognized, Cause::Other, None),
            (DbError::Query(Error::BrokenTransactionManager), Connection, Cause::ConnectionLost, None),
            (DbError::Query(Error::RollbackErrorOnCommit {
                rollback_error: Box::new(Error::BrokenTransactionManager),
                commit_error: Box::new(Error::BrokenTransactionManager),
            }), Connection, Cause::ConnectionLost, None),
            (DbError::Query(Error::NotFound), Permanent, Cause::Other, None),
            (DbError::Connect("connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?".into()), Connection, Cause::ConnectionLost, Some("08001")),
            (DbError::Connect("timed out waiting for connection: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  sorry, too many clients already".into()), Connection, Cause::TooManyConnections, Some("53300")),
            (DbError::Connect("timed out waiting for connection: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  the database system is starting up".into()), Connection, Cause::AdminShutdown, Some("57P03")),
            (DbError::Connect("timed out waiting for connection".into()), Connection, Cause::ConnectionLost, Some("08001")),
            (DbError::Connect("connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"app\"".into()), Permanent, Cause::Other, Some("28P01")),
            (DbError::Connect("connection to server failed: FATAL:  database \"nope\" does not exist".into()), Permanent, Cause::Other, None),
            (DbError::Connect("unable to open database file: /no/such/dir/n.db".into()), Permanent, Cause::Other, Some("SQLITE_CANTOPEN")),
            (DbError::Connect("timed out waiting for connection: Unable to open the database file".into()), Permanent, Cause::Other, Some("SQLITE_CANTOPEN")),
            (DbError::Connect("timed out waiting for connection: invalid sslmode value: \"bogus\"".into()), Permanent, Cause::Other, None),
            (DbError::Connect("timed out waiting for connection: connection to server at \"127.0.0.1\", port 5432 failed: fe_sendauth: no password supplied".into()), Permanent, Cause::Other, Some("28P01")),
            (db(Unknown, "could not extend file \"base/16384/16385\": No space left on device"), Resource, Cause::DiskFull, Some("53100")),
            (db(Unknown, "could not write to file \"pg_wal/xlogtemp.123\": No space left on device"), Resource, Cause::DiskFull, Some("53100")),
            (db(Unknown, "database or disk is full"), Resource, Cause::DiskFull, Some("SQLITE_FULL")),
            (db(Unknown, "out of memory"), Resource, Cause::OutOfMemory, Some("53200")),
            (db(Unknown, "attempt to write a readonly database"), Resource, Cause::Other, Some("SQLITE_READONLY")),
            (DbError::Unavailable("the database's disk is full since 2026-11-30T04:00:00Z: database or disk is full".into()), Resource, Cause::DiskFull, Some("SQLITE_FULL")),
            (DbError::Unavailable("database unreachable since 2026-11-30T04:00:00Z: cannot get a connection: Connection refused".into()), Connection, Cause::ConnectionLost, Some("08001")),
            (DbError::NoAnswer(std::time::Duration::from_secs(35)), Connection, Cause::NoAnswer, None),
        ];
        for (error, class, cause, sqlstate) in table {
            let got = classify(&error);
            assert_eq!(
                (got.class, got.cause, got.sqlstate),
                (class, cause, sqlstate),
                "{error}"
            );
        }
    }
}
