//! SQLite's C API where diesel has no door: the handle of a connection that
//! diesel opened, and statements of one fixed text run once a row.
//!
//! The one SQLite writer runs a statement for every reading, every message
//! id and every sensor whose last good reading moved (docs/PERFORMANCE.md,
//! "A write path made for SQLite"). Through diesel each run looked the
//! statement up in its cache, walked the query to collect its values into
//! buffers of its own, bound them, stepped, and reset: besides the step, a
//! seventh of the writer's time; and its statements of varying text (an
//! `UPDATE` by id, with no static query id) were prepared again for every
//! row. A [`Fixed`] statement is prepared once by the pass that runs it,
//! binds a row's values where they lie, steps and resets.
//!
//! diesel 2.3 does not lend a SQLite connection's handle. SQLite calls each
//! automatic extension (`sqlite3_auto_extension`) with the handle of every
//! connection it opens, on the thread that opens it, before the open
//! returns: [`establish`] opens through diesel and takes the handle that the
//! extension ([`opened`]) left for its thread.

use std::cell::Cell;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int};
use std::ptr::NonNull;

use diesel::result::{DatabaseErrorKind, Error};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, ConnectionError, QueryResult};
use libsqlite3_sys as ffi;

use super::checkpointer::Hook;

/// The handle of one SQLite connection, beside the diesel connection that
/// owns it (`AnyConnection::Sqlite`), and the connection's commit hook.
/// Valid as long as that connection is; dropped after it.
pub struct SqliteHandle {
    db: NonNull<ffi::sqlite3>,
    hook: Option<Box<Hook>>,
}

impl SqliteHandle {
    /// Gives the connection `hook` as its commit hook (see
    /// [`super::checkpointer`]).
    pub(super) fn set_hook(&mut self, hook: Hook) {
        let hook = Box::new(hook);
        // SAFETY: the connection is open, and this handle, which owns the
        // boxed hook, is dropped after it (the variant's field order, or the
        // pair `establish` returns).
        unsafe { hook.install(self.db.as_ptr()) };
        self.hook = Some(hook);
    }
}

impl std::fmt::Debug for SqliteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteHandle")
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

// SAFETY: the handle travels with the diesel connection that owns it (which
// is Send), and is used only through that connection's exclusive borrow
// ([`Fixed::prepare`]); SQLite's multi-thread mode allows a connection on
// any one thread at a time. The hook is Send.
unsafe impl Send for SqliteHandle {}

thread_local! {
    /// The handle of the connection SQLite last opened on this thread.
    static OPENED: Cell<Option<NonNull<ffi::sqlite3>>> = const { Cell::new(None) };
}

/// The automatic extension: notes the new connection's handle.
unsafe extern "C" fn opened(
    db: *mut ffi::sqlite3,
    _error: *mut *mut c_char,
    _api: *const ffi::sqlite3_api_routines,
) -> c_int {
    OPENED.with(|slot| slot.set(NonNull::new(db)));
    ffi::SQLITE_OK
}

/// Registers [`opened`] with SQLite, once; returns SQLite's result code.
fn watch_opens() -> c_int {
    static RESULT: std::sync::OnceLock<c_int> = std::sync::OnceLock::new();
    // SAFETY: `opened` has the signature SQLite calls an extension with, and
    // touches only a thread-local.
    *RESULT.get_or_init(|| unsafe { ffi::sqlite3_auto_extension(Some(opened)) })
}

/// Opens `target` through diesel; returns the connection and its handle.
pub(super) fn establish(target: &str) -> Result<(SqliteConnection, SqliteHandle), ConnectionError> {
    let watching = watch_opens();
    OPENED.with(|slot| slot.set(None));
    let conn = SqliteConnection::establish(target)?;
    let handle = OPENED.with(Cell::take).ok_or_else(|| {
        ConnectionError::BadConnection(format!(
            "SQLite did not tell the new connection's handle (sqlite3_auto_extension: {watching})"
        ))
    })?;
    Ok((
        conn,
        SqliteHandle {
            db: handle,
            hook: None,
        },
    ))
}

/// A value bound to a [`Fixed`] statement's parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    /// INTEGER.
    Int(i64),
    /// REAL.
    Real(f64),
    /// TEXT.
    Text(&'a str),
}

/// A prepared statement of one fixed text, run once a row; finalized when
/// dropped. It borrows its connection, so the connection outlives it.
pub(crate) struct Fixed<'c> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: NonNull<ffi::sqlite3>,
    _conn: PhantomData<&'c mut SqliteConnection>,
}

impl<'c> Fixed<'c> {
    /// Prepares `sql` on the connection `conn` whose handle is `db`.
    pub(crate) fn prepare(
        _conn: &'c mut SqliteConnection,
        db: &SqliteHandle,
        sql: &str,
    ) -> QueryResult<Fixed<'c>> {
        let db = db.db;
        let mut stmt = std::ptr::null_mut();
        let len = c_int::try_from(sql.len()).map_err(|_| too_long())?;
        // SAFETY: a live handle (borrowed with its connection), a text of
        // `len` bytes, and an out-pointer for the statement.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        match NonNull::new(stmt) {
            Some(stmt) if rc == ffi::SQLITE_OK => Ok(Fixed {
                stmt,
                db,
                _conn: PhantomData,
            }),
            _ => Err(last_error(db)),
        }
    }

    /// Runs the statement with `values` bound to its parameters in order
    /// (`?1` is the first); returns the rows it changed. No binding outlives
    /// the call.
    pub(crate) fn run(&mut self, values: &[Value<'_>]) -> QueryResult<usize> {
        let changed = self.step_with(values, |stmt, db| match stmt {
            None => Ok(changes(db)),
            Some(_) => Err(Error::QueryBuilderError(
                "a fixed statement returned a row".into(),
            )),
        })?;
        Ok(usize::try_from(changed).unwrap_or(0))
    }

    /// Runs a query with `values` bound as [`Fixed::run`] does; returns its
    /// first row's first column as text (`None`: no row, or NULL).
    pub(crate) fn first_text(&mut self, values: &[Value<'_>]) -> QueryResult<Option<String>> {
        self.step_with(values, |row, _| Ok(row.and_then(first_column)))
    }

    /// Runs a query with `values` bound as [`Fixed::run`] does; returns
    /// every row's first column as text (NULLs left out).
    pub(crate) fn texts(&mut self, values: &[Value<'_>]) -> QueryResult<Vec<String>> {
        let mut out = Vec::new();
        self.step_with(values, |mut row, db| {
            while let Some(stmt) = row {
                out.extend(first_column(stmt));
                // SAFETY: the statement is on a row; stepping on is what a
                // query's rows need.
                unsafe {
                    row = match ffi::sqlite3_step(stmt) {
                        ffi::SQLITE_ROW => Some(stmt),
                        ffi::SQLITE_DONE => None,
                        _ => return Err(last_error(db)),
                    };
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Binds `values`, steps once, and gives `done` the statement if it is on
    /// a row (`None` once it is done); then resets the statement and clears
    /// its bindings, whatever happened.
    fn step_with<T>(
        &mut self,
        values: &[Value<'_>],
        done: impl FnOnce(Option<*mut ffi::sqlite3_stmt>, NonNull<ffi::sqlite3>) -> QueryResult<T>,
    ) -> QueryResult<T> {
        let stmt = self.stmt.as_ptr();
        let mut result = Ok(());
        for (at, value) in (1..).zip(values) {
            // SAFETY: a prepared statement; text of its given length, read
            // by SQLite only until the bindings are cleared below (STATIC:
            // not copied).
            let rc = unsafe {
                match *value {
                    Value::Int(n) => ffi::sqlite3_bind_int64(stmt, at, n),
                    Value::Real(x) => ffi::sqlite3_bind_double(stmt, at, x),
                    Value::Text(t) => match c_int::try_from(t.len()) {
                        Ok(len) => ffi::sqlite3_bind_text(
                            stmt,
                            at,
                            t.as_ptr().cast(),
                            len,
                            ffi::SQLITE_STATIC(),
                        ),
                        Err(_) => ffi::SQLITE_TOOBIG,
                    },
                }
            };
            if rc != ffi::SQLITE_OK {
                result = Err(if rc == ffi::SQLITE_TOOBIG {
                    too_long()
                } else {
                    last_error(self.db)
                });
                break;
            }
        }
        let result = result.and_then(|()| {
            // SAFETY: a prepared statement with every parameter bound.
            match unsafe { ffi::sqlite3_step(stmt) } {
                ffi::SQLITE_DONE => done(None, self.db),
                ffi::SQLITE_ROW => done(Some(stmt), self.db),
                // The error is read before the reset, which may replace it.
                _ => Err(last_error(self.db)),
            }
        });
        // SAFETY: a prepared statement; resetting and clearing never fail
        // in a way that matters here (a reset repeats the step's error).
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        result
    }
}

/// The first column of the row `stmt` is on, as text (`None` for NULL),
/// copied before the statement moves on.
fn first_column(stmt: *mut ffi::sqlite3_stmt) -> Option<String> {
    // SAFETY: a statement on a row (every caller's precondition); the text
    // is read before any other call on it.
    unsafe {
        let text = ffi::sqlite3_column_text(stmt, 0);
        (!text.is_null()).then(|| {
            let len = ffi::sqlite3_column_bytes(stmt, 0);
            let bytes = std::slice::from_raw_parts(text, usize::try_from(len).unwrap_or(0));
            String::from_utf8_lossy(bytes).into_owned()
        })
    }
}

/// The rows the connection's last statement changed.
fn changes(db: NonNull<ffi::sqlite3>) -> i64 {
    // SAFETY: a live handle (a statement of it just ran).
    unsafe { ffi::sqlite3_changes64(db.as_ptr()) }
}

impl Drop for Fixed<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is prepared and finalized once, here, while
        // its connection lives (the borrow).
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// The connection's last error, as diesel reports SQLite's errors (its
/// kinds by extended code, SQLite's message), so that `classify` reads it
/// the same whichever path ran the statement.
fn last_error(db: NonNull<ffi::sqlite3>) -> Error {
    // SAFETY: a live handle; the message is copied before any other call.
    let (code, message) = unsafe {
        (
            ffi::sqlite3_extended_errcode(db.as_ptr()),
            CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr()))
                .to_string_lossy()
                .into_owned(),
        )
    };
    let kind = match code {
        ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
            DatabaseErrorKind::UniqueViolation
        }
        ffi::SQLITE_CONSTRAINT_FOREIGNKEY => DatabaseErrorKind::ForeignKeyViolation,
        ffi::SQLITE_CONSTRAINT_NOTNULL => DatabaseErrorKind::NotNullViolation,
        ffi::SQLITE_CONSTRAINT_CHECK => DatabaseErrorKind::CheckViolation,
        _ => DatabaseErrorKind::Unknown,
    };
    Error::DatabaseError(kind, Box::new(message))
}

fn too_long() -> Error {
    Error::QueryBuilderError("a value longer than SQLite can bind".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{BigInt, Text};

    #[derive(diesel::QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        name: String,
    }

    fn open() -> (SqliteConnection, SqliteHandle) {
        let (mut conn, db) = establish(":memory:").unwrap();
        conn.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
            .unwrap();
        (conn, db)
    }

    #[test]
    fn a_fixed_statement_writes_through_the_connection_diesel_reads() {
        let (mut conn, db) = open();
        {
            let mut insert = Fixed::prepare(
                &mut conn,
                &db,
                "INSERT INTO t (id, name) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .unwrap();
            let name = String::from("first");
            assert_eq!(insert.run(&[Value::Int(1), Value::Text(&name)]).unwrap(), 1);
            assert_eq!(
                insert.run(&[Value::Int(2), Value::Text("second")]).unwrap(),
                1
            );
            assert_eq!(
                insert.run(&[Value::Int(1), Value::Text("again")]).unwrap(),
                0
            );
        }
        let rows: Vec<Row> = diesel::RunQueryDsl::load(
            diesel::sql_query("SELECT id, name FROM t ORDER BY id"),
            &mut conn,
        )
        .unwrap();
        let expected = [(1, "first"), (2, "second")].map(|(id, name)| Row {
            id,
            name: name.into(),
        });
        assert_eq!(rows, expected);
    }

    #[test]
    fn a_fixed_query_reads_its_first_column_as_text() {
        let (mut conn, db) = open();
        conn.batch_execute("INSERT INTO t (id, name) VALUES (7, 'seven')")
            .unwrap();
        let mut name = Fixed::prepare(&mut conn, &db, "SELECT name FROM t WHERE id = ?1").unwrap();
        assert_eq!(
            name.first_text(&[Value::Int(7)]).unwrap().as_deref(),
            Some("seven")
        );
        assert_eq!(name.first_text(&[Value::Int(8)]).unwrap(), None);
        assert_eq!(
            name.first_text(&[Value::Int(7)]).unwrap().as_deref(),
            Some("seven")
        );
    }

    #[test]
    fn a_fixed_query_reads_every_row_and_runs_again() {
        let (mut conn, db) = open();
        conn.batch_execute("INSERT INTO t (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
            .unwrap();
        let mut names = Fixed::prepare(
            &mut conn,
            &db,
            "SELECT name FROM t WHERE id >= ?1 ORDER BY id LIMIT ?2",
        )
        .unwrap();
        assert_eq!(
            names.texts(&[Value::Int(2), Value::Int(10)]).unwrap(),
            ["b", "c"]
        );
        assert_eq!(names.texts(&[Value::Int(1), Value::Int(1)]).unwrap(), ["a"]);
        assert!(names
            .texts(&[Value::Int(4), Value::Int(10)])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_error_reads_as_diesel_reports_it_and_the_statement_runs_again() {
        let (mut conn, db) = open();
        let mut insert =
            Fixed::prepare(&mut conn, &db, "INSERT INTO t (id, name) VALUES (?, ?)").unwrap();
        insert.run(&[Value::Int(1), Value::Text("a")]).unwrap();
        match insert.run(&[Value::Int(2), Value::Text("a")]) {
            Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
                assert!(info.message().contains("UNIQUE"), "{}", info.message())
            }
            other => panic!("expected a unique violation, got {other:?}"),
        }
        assert_eq!(insert.run(&[Value::Int(2), Value::Text("b")]).unwrap(), 1);
    }

    #[test]
    fn a_statement_that_does_not_prepare_is_an_error_with_sqlites_message() {
        let (mut conn, db) = open();
        let result = Fixed::prepare(&mut conn, &db, "INSERT INTO no_such_table VALUES (?)").err();
        match result {
            Some(Error::DatabaseError(DatabaseErrorKind::Unknown, info)) => {
                assert!(
                    info.message().contains("no such table"),
                    "{}",
                    info.message()
                )
            }
            Some(other) => panic!("expected SQLite's message, got {other:?}"),
            None => panic!("prepared a statement on a missing table"),
        }
    }
}
