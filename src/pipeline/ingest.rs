//! `ingest`: one input stream through the worker pool, with a tally.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use super::{Done, IngestOptions, Summary, Workers};
use crate::db::{Database, Failure};
use crate::input::LineReader;

/// How long the caller waits between progress refreshes.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Progress that the caller may show while the run goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes consumed.
    pub bytes_read: AtomicU64,
}

/// A run that stopped before every line was accounted for.
#[derive(Debug)]
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

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (completed, lines) = (self.summary.completed, self.summary.lines);
        match &self.failure {
            Failure::OutOfResources { error } => {
                let (what, remedy) = crate::db::shortage_of(error);
                write!(
                    f,
                    "{what}; every line before line {} is done; {remedy} and run the same input again ({completed} of {lines} lines read were completed; the database said: {error})",
                    self.resume_from
                )
            }
            failure => write!(
                f,
                "stopped at line {}: {failure}; {completed} of {lines} lines read were completed, every line before line {} is done, and re-running the same input is safe",
                self.line, self.resume_from
            ),
        }
    }
}

impl std::error::Error for Stopped {}

/// The error of an unreadable input stream.
#[derive(Debug, thiserror::Error)]
#[error("reading the input failed after line {line}: {source}")]
pub struct ReadFailed {
    line: u64,
    source: std::io::Error,
}

/// A run interrupted by a signal: reading stopped, the work in flight was
/// finished (or, after the shutdown timeout, handed back).
#[derive(Debug, thiserror::Error)]
#[error("interrupted at line {resume_from}; every line before it is done ({} of {} lines read were completed); running the same input again is safe", summary.completed, summary.lines)]
pub struct Interrupted {
    /// The lowest line number not known to be done.
    pub resume_from: u64,
    /// What was done.
    pub summary: Box<Summary>,
}

/// Why [`ingest`] did not account for every line.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The database could not take the work: see [`Stopped`].
    #[error(transparent)]
    Stopped(Stopped),
    /// The input could not be read.
    #[error(transparent)]
    ReadFailed(ReadFailed),
    /// [`IngestOptions::interrupt`] was raised.
    #[error(transparent)]
    Interrupted(Interrupted),
}

/// What one run shares between the reader, the workers and the collector.
struct Run<'a> {
    /// Workers hand jobs back unrun; the reader stops.
    stop: AtomicBool,
    /// Lines submitted and not yet done.
    in_flight: Mutex<BTreeSet<u64>>,
    /// Raised from outside (a signal): stop reading, finish what is queued.
    interrupt: Option<&'a AtomicBool>,
}

impl Run<'_> {
    fn interrupted(&self) -> bool {
        self.interrupt.is_some_and(|i| i.load(Ordering::SeqCst))
    }

    /// The lowest line not known to be done, `next` when all read are.
    fn resume_from(self, next: u64) -> u64 {
        let first_open = self
            .in_flight
            .into_inner()
            .expect("in-flight lock")
            .first()
            .copied();
        first_open.unwrap_or(next).min(next)
    }
}

/// How the collecting ended.
enum Ending {
    /// Every line read was accounted for.
    Done,
    /// A line's transaction failed in a way that stops the run.
    Stopped(u64, Failure),
    /// Interrupted from outside.
    Interrupted,
}

/// Runs every line of `input` and returns the tally; `on_done` sees the tally
/// after each line. Returns [`Stopped`] when the database stayed unreachable
/// beyond the retry policy's `max_outage` (or a dead letter could not be
/// written), after the work in flight has been handed back, and
/// [`Interrupted`] when `options.interrupt` was raised.
pub fn ingest(
    db: &Database,
    input: impl BufRead + Send,
    options: &IngestOptions,
    progress: &Progress,
    mut on_done: impl FnMut(&Summary),
) -> Result<Summary, IngestError> {
    let started = Instant::now();
    let run = Run {
        stop: AtomicBool::new(false),
        in_flight: Mutex::new(BTreeSet::new()),
        interrupt: options.interrupt.as_deref(),
    };
    let mut summary = Summary::new();
    let (done_tx, done_rx) = bounded::<Done>(options.workers.max(1) * options.queue_per_worker);
    let (read_result, ending) = std::thread::scope(|scope| {
        let workers = Workers::spawn(scope, db, options, &run.stop);
        let reader = std::thread::Builder::new()
            .name("reader".into())
            .spawn_scoped(scope, || read(input, workers, done_tx, &run, progress))
            .expect("spawn the reader");
        let ending = collect(db, options, &done_rx, &run, &mut summary, &mut on_done);
        let read = reader.join().expect("the reader does not panic");
        (read, ending)
    });
    let next = match read_result {
        Ok(read) => {
            summary.lines = read.non_blank;
            read.next
        }
        Err(e) => {
            summary.lines = e.line;
            summary.finish(db.counters(), started.elapsed());
            return Err(IngestError::ReadFailed(e));
        }
    };
    summary.finish(db.counters(), started.elapsed());
    match ending {
        Ending::Done => Ok(summary),
        Ending::Stopped(line, failure) => Err(IngestError::Stopped(Stopped {
            line,
            failure,
            resume_from: run.resume_from(line),
            summary: Box::new(summary),
        })),
        Ending::Interrupted => Err(IngestError::Interrupted(Interrupted {
            resume_from: run.resume_from(next),
            summary: Box::new(summary),
        })),
    }
}

/// Takes each line's outcome until the workers are gone. After an
/// interrupt, the work in flight gets `options.shutdown_timeout` to finish;
/// then it is handed back and retries stop.
fn collect(
    db: &Database,
    options: &IngestOptions,
    done_rx: &crossbeam_channel::Receiver<Done>,
    run: &Run<'_>,
    summary: &mut Summary,
    on_done: &mut impl FnMut(&Summary),
) -> Ending {
    let mut ending = Ending::Done;
    let mut deadline = None;
    loop {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(done) => {
                run.in_flight
                    .lock()
                    .expect("in-flight lock")
                    .remove(&done.ticket);
                match done.result {
                    Ok(outcome) => {
                        summary.record(&outcome);
                        on_done(summary);
                    }
                    Err(failure) => {
                        run.stop.store(true, Ordering::SeqCst);
                        if matches!(ending, Ending::Done) {
                            ending = Ending::Stopped(done.ticket, failure);
                        }
                    }
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return ending,
        }
        if run.interrupted() && matches!(ending, Ending::Done | Ending::Interrupted) {
            ending = Ending::Interrupted;
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + options.shutdown_timeout);
            if Instant::now() >= deadline && !run.stop.swap(true, Ordering::SeqCst) {
                log::warn!("shutdown timeout: handing back the work in flight");
                db.cancel_retries();
            }
        }
    }
}

/// What the reader read.
struct Read {
    /// Non-blank lines submitted.
    non_blank: u64,
    /// The number of the first line not read.
    next: u64,
}

/// Reads and submits every line (until stopped or interrupted). Owns the
/// pool and the reply sender: dropping them at the end lets the workers and
/// then the collector finish.
fn read(
    input: impl BufRead,
    workers: Workers,
    reply: Sender<Done>,
    run: &Run<'_>,
    progress: &Progress,
) -> Result<Read, ReadFailed> {
    let mut reader = LineReader::new(input);
    let mut read = Read {
        non_blank: 0,
        next: 1,
    };
    while !run.stop.load(Ordering::SeqCst) && !run.interrupted() {
        let line = match reader.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(source) => {
                run.stop.store(true, Ordering::SeqCst);
                return Err(ReadFailed {
                    line: read.non_blank,
                    source,
                });
            }
        };
        progress
            .bytes_read
            .store(reader.consumed(), Ordering::Relaxed);
        let number = line.number;
        read.next = number + 1;
        // Marked in flight before it can complete.
        run.in_flight.lock().expect("in-flight lock").insert(number);
        match workers.submit(number, line, &reply) {
            None => {
                run.in_flight
                    .lock()
                    .expect("in-flight lock")
                    .remove(&number);
            }
            Some(true) => read.non_blank += 1,
            Some(false) => break,
        }
    }
    Ok(read)
}
