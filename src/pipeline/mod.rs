//! The worker pool, and the two ways to feed it: `ingest` (a file or stdin)
//! and the service (`crate::service`, lines from sockets).
//!
//! ```text
//! lines ──parse──> route by device key ──> worker i (bounded channel) ──> reply channel
//! ```
//!
//! A line is parsed by whoever reads it and sent to the worker that owns its
//! device (a hash of the key), so one device's messages apply in arrival
//! order while other devices go in parallel. Each worker runs each job as one
//! transaction through [`Database::transaction`], checking a connection out
//! per job, and sends the outcome to the job's reply channel. Channels are
//! bounded: a slow database blocks the sender, it never buffers the input.

mod apply;
pub mod ingest;
mod job;
pub mod summary;
mod window;
mod workers;

use std::sync::Arc;

use crate::core::Message;
use crate::db::Failure;
use crate::outcome::Outcome;
pub use ingest::{ingest, IngestError, Interrupted, Progress, Stopped, PROGRESS_INTERVAL};
pub use job::{Budget, Job, Origin};
pub use summary::Summary;
pub use window::AckWindow;
pub use workers::{route, Workers};

/// A hook run inside each message's transaction, before it is applied: for
/// injecting faults in tests. `None` in production.
pub type ApplyHook = Arc<dyn Fn(&Message) + Send + Sync>;

/// How to run the workers. Defaults in `impl Default`.
#[derive(Clone)]
pub struct IngestOptions {
    /// Worker threads.
    pub workers: usize,
    /// Jobs queued per worker.
    pub queue_per_worker: usize,
    /// Bytes queued for all workers together; the reader waits beyond it.
    pub queue_bytes: usize,
    /// Most messages applied in one transaction; 1 is one message per
    /// transaction.
    pub batch_size: usize,
    /// Jobs a batch applies at a time: a transaction larger than this goes
    /// on, pass after pass, with what is queued when each pass ends (up to
    /// `batch_size`), and holds only one pass's parsed messages. Unbounded
    /// by default; SQLite's one writer sets it ([`SQLITE_PASS_SIZE`]).
    pub pass_size: usize,
    /// How long a worker waits for more jobs to fill a batch.
    pub batch_wait: std::time::Duration,
    /// See [`ApplyHook`].
    pub hook: Option<ApplyHook>,
    /// Raised from outside (a signal handler), `ingest` stops reading and
    /// ends as [`IngestError::Interrupted`] once the work in flight is done.
    pub interrupt: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// How long the work in flight may take after an interrupt before it
    /// is handed back.
    pub shutdown_timeout: std::time::Duration,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_per_worker: 2048,
            queue_bytes: 64 * 1024 * 1024,
            batch_size: 5000,
            pass_size: usize::MAX,
            batch_wait: std::time::Duration::from_millis(2),
            hook: None,
            interrupt: None,
            shutdown_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Most messages in one transaction on SQLite when `--batch-size` is not
/// given: one writer's group commit (see [`IngestOptions::one_writer`]),
/// applied in passes of [`SQLITE_PASS_SIZE`]. Chosen by measurement, with
/// peak RSS under 100 MiB at 1,000,000 messages (docs/PERFORMANCE.md, "A
/// write path made for SQLite").
pub const SQLITE_BATCH_SIZE: usize = 48_000;

/// Messages in one pass of SQLite's one writer: what its queue holds
/// parsed, and what a pass of its group commit applies at a time (24,000:
/// a tenth faster than 16,000 at 1,000,000 messages, peak RSS 91 MiB).
pub const SQLITE_PASS_SIZE: usize = 24_000;

/// Most messages in one transaction of `serve` on SQLite when
/// `--batch-size` is not given: one pass of 16,000 (see `cli`).
pub const SQLITE_SERVE_BATCH_SIZE: usize = 16_000;

impl IngestOptions {
    /// The plan for SQLite, which has one write lock: more writers only
    /// take turns at it. One worker applies everything, in transactions of
    /// whatever is queued up to `batch_size` (a group commit), in passes of
    /// up to [`SQLITE_PASS_SIZE`], and its queue holds a whole pass, so the
    /// next one gathers while this one is applied. Each commit's cost is
    /// mostly the index pages it rewrites, so larger groups rewrite each
    /// page for more rows.
    pub fn one_writer(self) -> IngestOptions {
        let pass_size = self.pass_size.min(SQLITE_PASS_SIZE).min(self.batch_size);
        IngestOptions {
            workers: 1,
            queue_per_worker: self.queue_per_worker.max(pass_size),
            pass_size,
            ..self
        }
    }
}

/// The end of one job.
#[derive(Debug)]
pub struct Done {
    /// The caller's number for the line (its line number, or `seq`).
    pub ticket: u64,
    /// The message's id, where it was readable.
    pub id: Option<String>,
    /// Why a line was rejected before it reached the database.
    pub detail: Option<String>,
    /// The outcome, or why there is none: the run must stop.
    pub result: Result<Outcome, Failure>,
}
