//! SQLite checkpoints off the writer's thread.
//!
//! In WAL mode a commit appends pages to the log, and a checkpoint copies
//! them back into the database file. SQLite runs it by default in the
//! committing thread, once the log holds 1,000 pages: for the one writer's
//! group commits (thousands of pages each) that was 8% of its time, which
//! the second core, idle but for the reader, can take
//! (docs/PERFORMANCE.md, "A write path made for SQLite").
//!
//! Each pooled SQLite connection gets a commit hook ([`Hook`],
//! `sqlite3_wal_hook`, which replaces SQLite's own automatic checkpoint):
//! once the log holds [`NUDGE_PAGES`], it nudges the [`Checkpointer`],
//! whose thread runs a PASSIVE checkpoint on a connection of its own (it
//! never waits for a lock, and never makes anyone wait). A PASSIVE
//! checkpoint cannot restart the log while the writer keeps appending to
//! it, so the log grows while the writer streams; at [`BACKSTOP_PAGES`] the
//! committing connection checkpoints itself, as SQLite would have: cheaply,
//! since the thread has copied most of the pages by then, and the log
//! starts over at the writer's next transaction. The log therefore stays
//! under the backstop plus one group commit, whether the thread keeps up,
//! falls behind, or fails (a full disk, say: it logs and waits for the
//! next nudge).

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use diesel::connection::SimpleConnection;
use libsqlite3_sys as ffi;

/// Log pages after a commit from which the checkpointer is nudged:
/// SQLite's own automatic checkpoint point.
pub(crate) const NUDGE_PAGES: c_int = 1000;

/// Log pages after a commit from which the committing connection
/// checkpoints itself (64 MiB of 4 KiB pages).
pub(crate) const BACKSTOP_PAGES: c_int = 16_384;

/// What the checkpoints did, for the tests and the debug log.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Checkpoints the thread ran.
    pub(crate) off_thread: AtomicU64,
    /// Checkpoints a committing connection ran at the backstop.
    pub(crate) backstop: AtomicU64,
}

/// When a commit nudges the thread, and when it checkpoints itself, in log
/// pages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages {
    pub(crate) nudge: c_int,
    pub(crate) backstop: c_int,
}

/// The points of every pool: [`NUDGE_PAGES`], [`BACKSTOP_PAGES`].
pub(crate) const PAGES: Pages = Pages {
    nudge: NUDGE_PAGES,
    backstop: BACKSTOP_PAGES,
};

/// The thread that checkpoints one SQLite database, and how to nudge it.
pub(crate) struct Checkpointer {
    pages: Pages,
    nudge: Sender<()>,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread; `open` opens its connection, at the first nudge
    /// (a database only read is never opened again).
    pub(crate) fn start<C, F>(pages: Pages, open: F) -> Checkpointer
    where
        C: SimpleConnection,
        F: FnMut() -> Result<C, String> + Send + 'static,
    {
        let (nudge, nudges) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn({
                let (stop, counts) = (stop.clone(), counts.clone());
                move || run(open, nudges, &stop, &counts)
            })
            .map_err(|e| log::warn!("no checkpointer thread ({e}): SQLite's connections checkpoint at {BACKSTOP_PAGES} pages"))
            .ok();
        Checkpointer {
            pages,
            nudge,
            stop,
            counts,
            thread,
        }
    }

    /// A commit hook for a new connection of this database.
    pub(crate) fn hook(&self) -> Hook {
        Hook {
            pages: self.pages,
            nudge: self.nudge.clone(),
            counts: self.counts.clone(),
        }
    }

    /// What the checkpoints did so far.
    #[cfg(test)]
    fn counts(&self) -> &Counts {
        &self.counts
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread (or finds it gone); hooks may still hold senders.
        let _ = self.nudge.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<C, F>(mut open: F, nudges: Receiver<()>, stop: &AtomicBool, counts: &Counts)
where
    C: SimpleConnection,
    F: FnMut() -> Result<C, String>,
{
    let mut conn = None;
    while nudges.recv().is_ok() && !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match open() {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    log::info!("the checkpointer cannot open the database ({e}); the writer checkpoints at {BACKSTOP_PAGES} pages");
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("opened above");
        match c.batch_execute("PRAGMA wal_checkpoint(PASSIVE)") {
            Ok(()) => {
                counts.off_thread.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Its connection may be what failed: a new one next time.
                log::info!("a checkpoint failed ({e}); the next commit past {NUDGE_PAGES} pages tries again");
                conn = None;
            }
        }
    }
}

/// A connection's commit hook: owned beside the connection, and dropped
/// after it (`AnyConnection::Sqlite`'s order), so SQLite never calls it
/// with a context that is gone.
pub(crate) struct Hook {
    pages: Pages,
    nudge: Sender<()>,
    counts: Arc<Counts>,
}

impl Hook {
    /// Installs the hook on `db`, replacing SQLite's automatic checkpoint.
    /// The hook's address must not change while `db` is open: it is boxed
    /// by its owner.
    ///
    /// # Safety
    /// `db` is an open connection that is closed before `self` is dropped
    /// or moved.
    pub(crate) unsafe fn install(&self, db: *mut ffi::sqlite3) {
        let context = self as *const Hook as *mut c_void;
        // SAFETY: per the caller's promise, `context` outlives `db`.
        unsafe { ffi::sqlite3_wal_hook(db, Some(committed), context) };
    }
}

/// SQLite's call after each commit in WAL mode, with the pages in the log.
unsafe extern "C" fn committed(
    context: *mut c_void,
    db: *mut ffi::sqlite3,
    name: *const c_char,
    pages: c_int,
) -> c_int {
    // SAFETY: the context installed with this function (see `install`).
    let hook = unsafe { &*(context as *const Hook) };
    if pages >= hook.pages.backstop {
        // SAFETY: the connection and schema name SQLite passed in; a
        // PASSIVE checkpoint from the hook is what SQLite's own does. Its
        // failure is the next commit's to retry, as with SQLite's own.
        unsafe {
            ffi::sqlite3_wal_checkpoint_v2(
                db,
                name,
                ffi::SQLITE_CHECKPOINT_PASSIVE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        hook.counts.backstop.fetch_add(1, Ordering::Relaxed);
    } else if pages >= hook.pages.nudge {
        // Full: a checkpoint is already due. Gone: the pool is closing.
        let _ = hook.nudge.try_send(());
    }
    ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use diesel::connection::SimpleConnection;
    use diesel::sql_types::Integer;
    use diesel::sqlite::SqliteConnection;
    use diesel::RunQueryDsl;

    use super::*;
    use crate::db::lite::{self, SqliteHandle};

    const SMALL: Pages = Pages {
        nudge: 10,
        backstop: 100,
    };

    fn open(path: &str) -> (SqliteConnection, SqliteHandle) {
        let (mut conn, db) = lite::establish(path).unwrap();
        conn.batch_execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .unwrap();
        (conn, db)
    }

    /// Commits `pages` pages of new rows (4 KiB pages, a row of 4,000 bytes
    /// a page).
    fn commit(conn: &mut SqliteConnection, pages: u32) {
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS t (b BLOB); BEGIN IMMEDIATE; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {pages}) \
             INSERT INTO t SELECT randomblob(4000) FROM n; COMMIT;"
        ))
        .unwrap();
    }

    #[derive(diesel::QueryableByName)]
    struct Log {
        #[diesel(sql_type = Integer)]
        log: i32,
    }

    /// The pages in the log now (a PASSIVE checkpoint reports them).
    fn log_pages(conn: &mut SqliteConnection) -> i32 {
        diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
            .get_result::<Log>(conn)
            .unwrap()
            .log
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(60), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_thread_checkpoints_a_commit_past_the_nudge_and_the_log_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        let checkpointer = Checkpointer::start(SMALL, {
            let path = path.clone();
            move || Ok::<_, String>(open(&path).0)
        });
        let (mut conn, mut db) = open(&path);
        db.set_hook(checkpointer.hook());
        commit(&mut conn, 50);
        wait_for("the thread checkpoints", || {
            checkpointer.counts().off_thread.load(Ordering::SeqCst) == 1
        });
        assert_eq!(checkpointer.counts().backstop.load(Ordering::SeqCst), 0);
        // Every page was copied back, so the next commit starts the log
        // over instead of appending to it.
        commit(&mut conn, 2);
        let log = log_pages(&mut conn);
        assert!(log < 10, "{log} pages in the log");
        drop(conn);
    }

    #[test]
    fn a_commit_past_the_backstop_checkpoints_itself_when_the_thread_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        let checkpointer = Checkpointer::start(SMALL, || {
            Err::<SqliteConnection, _>("no connection for the checkpointer".to_owned())
        });
        let (mut conn, mut db) = open(&path);
        db.set_hook(checkpointer.hook());
        commit(&mut conn, 50);
        commit(&mut conn, 30);
        assert_eq!(checkpointer.counts().backstop.load(Ordering::SeqCst), 0);
        commit(&mut conn, 30);
        assert_eq!(checkpointer.counts().backstop.load(Ordering::SeqCst), 1);
        commit(&mut conn, 2);
        let log = log_pages(&mut conn);
        assert!(log < 10, "{log} pages in the log");
        assert_eq!(checkpointer.counts().off_thread.load(Ordering::SeqCst), 0);
        drop(conn);
    }
}
