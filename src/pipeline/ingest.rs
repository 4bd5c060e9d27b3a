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

/// Why [`ingest`] did not account for every line.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The database could not take the work: see [`Stopped`].
    #[error(transparent)]
    Stopped(Stopped),
    /// The input could not be read.
    #[error(transparent)]
    ReadFailed(ReadFailed),
}

/// Runs every line of `input` and returns the tally; `on_done` sees the tally
/// after each line. Returns [`Stopped`] when the database stayed unreachable
/// beyond the retry policy's `max_outage` (or a dead letter could not be
/// written), after the work in flight has been handed back.
pub fn ingest(
    db: &Database,
    input: impl BufRead + Send,
    options: &IngestOptions,
    progress: &Progress,
    mut on_done: impl FnMut(&Summary),
) -> Result<Summary, IngestError> {
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let in_flight = Mutex::new(BTreeSet::new());
    let mut summary = Summary::new();
    let mut stopped: Option<(u64, Failure)> = None;
    let (done_tx, done_rx) = bounded::<Done>(options.workers.max(1) * options.queue_per_worker);

    let read_result = std::thread::scope(|scope| {
        let workers = Workers::spawn(scope, db, options, &stop);
        let reader = std::thread::Builder::new()
            .name("reader".into())
            .spawn_scoped(scope, || {
                read(input, workers, done_tx, &stop, &in_flight, progress)
            })
            .expect("spawn the reader");
        for done in done_rx.iter() {
            in_flight
                .lock()
                .expect("in-flight lock")
                .remove(&done.ticket);
            match done.result {
                Ok(outcome) => {
                    summary.record(&outcome);
                    on_done(&summary);
                }
                Err(failure) => {
                    stop.store(true, Ordering::SeqCst);
                    if stopped.is_none() {
                        stopped = Some((done.ticket, failure));
                    }
                }
            }
        }
        reader.join().expect("the reader does not panic")
    });
    match read_result {
        Ok(non_blank) => summary.lines = non_blank,
        Err(e) => {
            summary.lines = e.line;
            summary.finish(db.counters(), started.elapsed());
            return Err(IngestError::ReadFailed(e));
        }
    }
    summary.finish(db.counters(), started.elapsed());
    if let Some((line, failure)) = stopped {
        let first_open = in_flight
            .into_inner()
            .expect("in-flight lock")
            .first()
            .copied();
        let resume_from = first_open.unwrap_or(line).min(line);
        return Err(IngestError::Stopped(Stopped {
            line,
            failure,
            resume_from,
            summary: Box::new(summary),
        }));
    }
    Ok(summary)
}

/// Reads and submits every line; returns the count of non-blank lines. Owns
/// the pool and the reply sender: dropping them at the end lets the workers
/// and then the collector finish.
fn read(
    input: impl BufRead,
    workers: Workers,
    reply: Sender<Done>,
    stop: &AtomicBool,
    in_flight: &Mutex<BTreeSet<u64>>,
    progress: &Progress,
) -> Result<u64, ReadFailed> {
    let mut reader = LineReader::new(input);
    let mut non_blank = 0u64;
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
        let number = line.number;
        // Marked in flight before it can complete.
        in_flight.lock().expect("in-flight lock").insert(number);
        match workers.submit(number, line, &reply) {
            None => {
                in_flight.lock().expect("in-flight lock").remove(&number);
            }
            Some(true) => non_blank += 1,
            Some(false) => break,
        }
    }
    Ok(non_blank)
}
