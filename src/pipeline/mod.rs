//! The ingest pipeline: one reader, a router, a pool of blocking workers.
//!
//! ```text
//! reader ──parse──> route by device key ──> worker i (bounded channel) ──> results
//! ```
//!
//! The reader parses each line and sends it to the worker that owns its
//! device (a hash of the key), so one device's messages apply in arrival
//! order while other devices go in parallel. Each worker runs each job as one
//! transaction through [`Database::transaction`], checking a connection out
//! per job. Channels are bounded: a slow database slows the reader, it never
//! buffers the input. All threads are scoped and joined.

pub mod summary;

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::core::message::{parse_line, raw_for_storage};
use crate::core::{DeadLetterKind, Message, Parsed, Rejection};
use crate::db::repo::{dead_letters, messages};
use crate::db::{Database, Failure};
use crate::input::LineReader;
use crate::outcome::{DeadLetter, Outcome};
pub use summary::Summary;

/// A hook run inside each message's transaction, before it is applied: for
/// injecting faults in tests. `None` in production.
pub type ApplyHook = Arc<dyn Fn(&Message) + Send + Sync>;

/// How to run the pipeline. Defaults in `impl Default`.
#[derive(Clone)]
pub struct IngestOptions {
    /// Worker threads.
    pub workers: usize,
    /// Jobs queued per worker.
    pub queue_per_worker: usize,
    /// See [`ApplyHook`].
    pub hook: Option<ApplyHook>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_per_worker: 64,
            hook: None,
        }
    }
}

/// Progress that the caller may show while the run goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes consumed.
    pub bytes_read: AtomicU64,
}

/// A run that stopped before every line was accounted for.
#[derive(Debug, thiserror::Error)]
#[error("stopped at line {line}: {failure}; {} of {} lines read were completed, every line before line {resume_from} is done, and re-running the same input is safe", summary.completed, summary.lines)]
pub struct Stopped {
    /// The line whose transaction failed.
    pub line: u64,
    /// Why.
    pub failure: Failure,
    /// The lowest line number not known to be done.
    pub resume_from: u64,
    /// What was done.
    pub summary: Box<Summary>,
}

/// The error of an unreadable input stream.
#[derive(Debug, thiserror::Error)]
#[error("reading the input failed after line {line}: {source}")]
pub struct ReadFailed {
    line: u64,
    source: std::io::Error,
}

enum Job {
    Apply {
        line: u64,
        message: Message,
        raw: Vec<u8>,
    },
    Reject {
        line: u64,
        rejection: Rejection,
        raw: Vec<u8>,
    },
}

impl Job {
    fn line(&self) -> u64 {
        match self {
            Job::Apply { line, .. } | Job::Reject { line, .. } => *line,
        }
    }
}

struct Done {
    line: u64,
    result: Result<Outcome, Failure>,
}

/// Runs every line of `input` and returns the tally. Returns [`Stopped`]
/// when the database stayed unreachable beyond the retry policy's
/// `max_outage` (or a dead letter could not be written), after the work in
/// flight has been handed back.
pub fn ingest(
    db: &Database,
    input: impl BufRead + Send,
    options: &IngestOptions,
    progress: &Progress,
    mut on_done: impl FnMut(&Summary),
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let workers = options.workers.max(1);
    let stop = AtomicBool::new(false);
    let in_flight = Mutex::new(BTreeSet::new());
    let mut summary = Summary::new();
    let mut stopped: Option<(u64, Failure)> = None;
    let (done_tx, done_rx) = bounded::<Done>(workers * options.queue_per_worker);

    let read_result = std::thread::scope(|scope| {
        let mut senders = Vec::with_capacity(workers);
        for i in 0..workers {
            let (tx, rx) = bounded::<Job>(options.queue_per_worker);
            senders.push(tx);
            let done_tx = done_tx.clone();
            let (stop, hook) = (&stop, options.hook.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn_scoped(scope, move || work(db, rx, done_tx, stop, hook))
                .expect("spawn a worker");
        }
        drop(done_tx);
        let reader = std::thread::Builder::new()
            .name("reader".into())
            .spawn_scoped(scope, || read(input, senders, &stop, &in_flight, progress))
            .expect("spawn the reader");

        for done in done_rx.iter() {
            in_flight.lock().expect("in-flight lock").remove(&done.line);
            match done.result {
                Ok(outcome) => {
                    summary.record(&outcome);
                    on_done(&summary);
                }
                Err(failure) => {
                    stop.store(true, Ordering::SeqCst);
                    if stopped.is_none() {
                        stopped = Some((done.line, failure));
                    }
                }
            }
        }
        reader.join().expect("the reader does not panic")
    });
    let lines_read = match read_result {
        Ok(n) => n,
        Err(e) => {
            summary.lines = e.line;
            summary.finish(db.counters(), started.elapsed());
            return Err(e.into());
        }
    };
    summary.lines = lines_read.non_blank;
    summary.finish(db.counters(), started.elapsed());
    if let Some((line, failure)) = stopped {
        let resume_from = in_flight
            .into_inner()
            .expect("in-flight lock")
            .first()
            .copied()
            .unwrap_or(line)
            .min(line);
        return Err(Stopped {
            line,
            failure,
            resume_from,
            summary: Box::new(summary),
        }
        .into());
    }
    Ok(summary)
}

struct LinesRead {
    non_blank: u64,
}

fn read(
    input: impl BufRead,
    senders: Vec<Sender<Job>>,
    stop: &AtomicBool,
    in_flight: &Mutex<BTreeSet<u64>>,
    progress: &Progress,
) -> Result<LinesRead, ReadFailed> {
    let mut reader = LineReader::new(input);
    let mut non_blank = 0u64;
    let mut next_reject = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let line = match reader.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(source) => {
                stop.store(true, Ordering::SeqCst);
                return Err(ReadFailed {
                    line: non_blank,
                    source,
                });
            }
        };
        progress
            .bytes_read
            .store(reader.consumed(), Ordering::Relaxed);
        let (worker, job) = match parse_line(&line.bytes, line.oversize) {
            Parsed::Blank => continue,
            Parsed::Message(message) => (
                route(&message.device, senders.len()),
                Job::Apply {
                    line: line.number,
                    message,
                    raw: line.bytes,
                },
            ),
            Parsed::Rejected(rejection) => {
                next_reject = (next_reject + 1) % senders.len();
                (
                    next_reject,
                    Job::Reject {
                        line: line.number,
                        rejection,
                        raw: line.bytes,
                    },
                )
            }
        };
        non_blank += 1;
        in_flight.lock().expect("in-flight lock").insert(job.line());
        if senders[worker].send(job).is_err() {
            break;
        }
    }
    Ok(LinesRead { non_blank })
}

/// The worker that owns a device: the same key always goes to the same one.
pub fn route(device: &str, workers: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

fn work(
    db: &Database,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    stop: &AtomicBool,
    hook: Option<ApplyHook>,
) {
    for job in jobs.iter() {
        if stop.load(Ordering::SeqCst) {
            // Handed back: not done, and safe to run again in a later run.
            continue;
        }
        let line = job.line();
        let result = run_job(db, job, hook.as_deref());
        if done.send(Done { line, result }).is_err() {
            return;
        }
    }
}

fn run_job(
    db: &Database,
    job: Job,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    match job {
        Job::Reject { rejection, raw, .. } => {
            let letter = DeadLetter {
                message_id: rejection.message_id,
                device_key: rejection.device_key,
                kind: rejection.kind,
                error: rejection.error,
                raw: raw_for_storage(&raw),
            };
            file_dead_letter(db, &letter)
        }
        Job::Apply { message, raw, line } => apply_message(db, &message, &raw, line, hook),
    }
}

/// Applies a message. A permanent database error or a panic gets one more
/// try of the message on its own, then the message is dead-lettered as
/// `db_rejected` or `internal`. Connection and transient errors never reach
/// here: the retry loop waits them out or gives up the run.
fn apply_message(
    db: &Database,
    message: &Message,
    raw: &[u8],
    line: u64,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    let token = new_token();
    let mut first_failure = None;
    for attempt in 1..=2 {
        let result = db.transaction(|conn| {
            if let Some(hook) = hook {
                hook(message);
            }
            messages::apply(conn, message, raw, &token)
        });
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(failure @ Failure::GaveUp { .. }) => return Err(failure),
            Err(failure) => {
                log::warn!(
                    "line {line}, message {:?}: attempt {attempt} on its own failed: {failure}",
                    message.id
                );
                first_failure = Some(failure);
            }
        }
    }
    let (kind, error) = match first_failure.expect("two failed attempts") {
        Failure::Panicked(m) => (
            DeadLetterKind::Internal,
            format!("the normalizer panicked: {m}"),
        ),
        other => (DeadLetterKind::DbRejected, other.to_string()),
    };
    let letter = DeadLetter {
        message_id: Some(message.id.clone()),
        device_key: Some(message.device.clone()),
        kind,
        error,
        raw: raw_for_storage(raw),
    };
    file_dead_letter(db, &letter)
}

fn file_dead_letter(db: &Database, letter: &DeadLetter) -> Result<Outcome, Failure> {
    let token = new_token();
    db.transaction(|conn| dead_letters::record(conn, letter, &token))?;
    Ok(Outcome::DeadLetter(letter.kind))
}

/// A random name for one write, stable across its retries.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// How long the pipeline waits between progress refreshes.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
