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
//! never waits for a lock, and never makes anyone wait).
//!
//! The log starts over (is written again from its beginning) only at a
//! transaction that begins when every page of it has been copied back, which
//! a thread copying beside a writer that keeps committing seldom sees. So the
//! committing connection checkpoints itself, as SQLite would have, in two
//! cases: from [`RESTART_PAGES`] when the thread has left at most
//! [`NUDGE_PAGES`] to copy (cheap: what came since the thread's last pass;
//! small commits, as `serve` and one message per transaction make, keep the
//! log near this size), and from [`BACKSTOP_PAGES`] whatever is left (the
//! one writer's large group commits, or a thread that falls behind or
//! fails: a full disk, say, which it logs and tries again at the next
//! nudge). The log stays under the backstop plus one commit.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use diesel::sql_types::Integer;
use diesel::sqlite::SqliteConnection;
use diesel::RunQueryDsl;
use libsqlite3_sys as ffi;

/// Log pages after a commit from which the checkpointer is nudged:
/// SQLite's own automatic checkpoint point.
pub(crate) const NUDGE_PAGES: c_int = 1000;

/// Log pages after a commit from which the committing connection copies
/// back what the thread has not, if that is little (16 MiB of 4 KiB pages).
pub(crate) const RESTART_PAGES: c_int = 4096;

/// Log pages after a commit from which the committing connection
/// checkpoints itself, whatever is left (64 MiB of 4 KiB pages).
pub(crate) const BACKSTOP_PAGES: c_int = 16_384;

/// The log as the checkpoints see it, and what they did.
#[derive(Debug, Default)]
struct Counts {
    /// Pages in the log after the last commit.
    log: AtomicI32,
    /// Pages of the log copied back, as the last checkpoint reported.
    copied: AtomicI32,
    /// Nudges sent to the thread.
    nudged: AtomicU64,
    /// Checkpoints the thread ran.
    off_thread: AtomicU64,
    /// Checkpoints committing connections ran.
    inline: AtomicU64,
}

/// When a commit nudges the thread, and when it checkpoints itself, in log
/// pages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages {
    pub(crate) nudge: c_int,
    pub(crate) restart: c_int,
    pub(crate) backstop: c_int,
}

/// The points of every pool: [`NUDGE_PAGES`], [`RESTART_PAGES`],
/// [`BACKSTOP_PAGES`].
pub(crate) const PAGES: Pages = Pages {
    nudge: NUDGE_PAGES,
    restart: RESTART_PAGES,
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
    pub(crate) fn start<F>(pages: Pages, open: F) -> Checkpointer
    where
        F: FnMut() -> Result<SqliteConnection, String> + Send + 'static,
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

fn run<F>(mut open: F, nudges: Receiver<()>, stop: &AtomicBool, counts: &Counts)
where
    F: FnMut() -> Result<SqliteConnection, String>,
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
        match diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result::<Checkpointed>(c) {
            Ok(done) => {
                counts.copied.store(done.copied, Ordering::SeqCst);
                counts.off_thread.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                // Its connection may be what failed: a new one next time.
                log::info!("a checkpoint failed ({e}); the next commit past {NUDGE_PAGES} pages tries again");
                conn = None;
            }
        }
    }
}

/// What `PRAGMA wal_checkpoint` reports, of its three columns.
#[derive(diesel::QueryableByName)]
struct Checkpointed {
    /// Pages of the log copied back.
    #[diesel(sql_type = Integer, column_name = checkpointed)]
    copied: i32,
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
    let counts = &hook.counts;
    if counts.log.swap(pages, Ordering::SeqCst) > pages {
        // The log started over: nothing of it is copied yet.
        counts.copied.store(0, Ordering::SeqCst);
    }
    let copied = counts.copied.load(Ordering::SeqCst);
    match hook.pages.after_commit(pages, copied) {
        After::Nothing => {}
        After::Nudge => {
            // Not sent: a checkpoint is already due, or the pool is closing.
            if hook.nudge.try_send(()).is_ok() {
                counts.nudged.fetch_add(1, Ordering::SeqCst);
            }
        }
        After::Checkpoint => {
            let mut copied = 0;
            // SAFETY: the connection and schema name SQLite passed in; a
            // PASSIVE checkpoint from the hook is what SQLite's own does.
            // Its failure is the next commit's to retry, as with SQLite's.
            let rc = unsafe {
                ffi::sqlite3_wal_checkpoint_v2(
                    db,
                    name,
                    ffi::SQLITE_CHECKPOINT_PASSIVE,
                    std::ptr::null_mut(),
                    &mut copied,
                )
            };
            if rc == ffi::SQLITE_OK {
                counts.copied.store(copied, Ordering::SeqCst);
            }
            counts.inline.fetch_add(1, Ordering::SeqCst);
        }
    }
    ffi::SQLITE_OK
}

/// What a commit does about the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    /// Nudges the thread.
    Nudge,
    /// Checkpoints on the committing connection.
    Checkpoint,
}

impl Pages {
    /// What a commit that leaves `pages` in the log, `copied` of them
    /// copied back by the last checkpoint, does.
    fn after_commit(&self, pages: c_int, copied: c_int) -> After {
        // More copied than there is: a copy of an earlier log, so none.
        let left = if copied > pages {
            pages
        } else {
            pages - copied.max(0)
        };
        if pages >= self.backstop || (pages >= self.restart && left <= self.nudge) {
            After::Checkpoint
        } else if pages >= self.nudge {
            After::Nudge
        } else {
            After::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use diesel::connection::SimpleConnection;

    use super::*;
    use crate::db::lite::{self, SqliteHandle};

    const SMALL: Pages = Pages {
        nudge: 10,
        restart: 40,
        backstop: 100,
    };

    fn open(path: &str) -> (SqliteConnection, SqliteHandle) {
        let (mut conn, db) = lite::establish(path).unwrap();
        conn.batch_execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .unwrap();
        (conn, db)
    }

    fn start(path: &str) -> Checkpointer {
        let path = path.to_owned();
        Checkpointer::start(SMALL, move || Ok(open(&path).0))
    }

    /// Commits about `pages` pages of new rows (4 KiB pages, a row of 4,000
    /// bytes a page); returns the pages in the log after it.
    fn commit(conn: &mut SqliteConnection, checkpointer: &Checkpointer, pages: u32) -> i32 {
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS t (b BLOB); BEGIN IMMEDIATE; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {pages}) \
             INSERT INTO t SELECT randomblob(4000) FROM n; COMMIT;"
        ))
        .unwrap();
        checkpointer.counts().log.load(Ordering::SeqCst)
    }

    fn count(of: &AtomicU64) -> u64 {
        of.load(Ordering::SeqCst)
    }

    /// Waits until the thread has run as many checkpoints as it was nudged
    /// for.
    fn caught_up(checkpointer: &Checkpointer) {
        let c = checkpointer.counts();
        let started = Instant::now();
        while count(&c.off_thread) < count(&c.nudged) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the thread checkpoints"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_thread_copies_a_commit_past_the_nudge_and_the_log_then_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        let checkpointer = start(&path);
        let (mut conn, mut db) = open(&path);
        db.set_hook(checkpointer.hook());
        let log = commit(&mut conn, &checkpointer, 30);
        assert!((30..40).contains(&log), "{log} pages in the log");
        assert_eq!(count(&checkpointer.counts().nudged), 1);
        caught_up(&checkpointer);
        assert_eq!(count(&checkpointer.counts().off_thread), 1);
        // Every page was copied back, so the next commit writes the log
        // from its beginning.
        let log = commit(&mut conn, &checkpointer, 2);
        assert!(log < 10, "{log} pages in the log");
        assert_eq!(count(&checkpointer.counts().inline), 0);
    }

    #[test]
    fn what_a_commit_does_by_the_pages_in_the_log_and_those_copied() {
        use After::*;
        let p = PAGES;
        for (pages, copied, after) in [
            (999, 0, Nothing),
            (1000, 0, Nudge),
            (4095, 4000, Nudge),
            // From the restart point, the committing connection copies the
            // rest if the thread left little.
            (4096, 3096, Checkpoint),
            (4096, 3095, Nudge),
            (9000, 8500, Checkpoint),
            // A copy reported for an earlier log counts as none.
            (5000, 9000, Nudge),
            // One large commit: the thread's, up to the backstop.
            (8000, 0, Nudge),
            (16_383, 8000, Nudge),
            (16_384, 0, Checkpoint),
            (40_000, 39_000, Checkpoint),
        ] {
            assert_eq!(
                p.after_commit(pages, copied),
                after,
                "{pages} pages, {copied} copied"
            );
        }
    }

    #[test]
    fn a_commit_past_the_backstop_checkpoints_itself_when_the_thread_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        let checkpointer = Checkpointer::start(SMALL, || {
            Err("no connection for the checkpointer".to_owned())
        });
        let (mut conn, mut db) = open(&path);
        db.set_hook(checkpointer.hook());
        commit(&mut conn, &checkpointer, 50);
        commit(&mut conn, &checkpointer, 30);
        assert_eq!(count(&checkpointer.counts().inline), 0);
        let log = commit(&mut conn, &checkpointer, 30);
        assert!(log >= SMALL.backstop, "{log} pages in the log");
        assert_eq!(count(&checkpointer.counts().inline), 1);
        let log = commit(&mut conn, &checkpointer, 2);
        assert!(log < 10, "{log} pages in the log");
        assert_eq!(count(&checkpointer.counts().off_thread), 0);
    }
}
