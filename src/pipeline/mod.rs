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

pub mod ingest;
pub mod summary;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Scope;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::core::message::{parse_line, raw_for_storage};
use crate::core::{DeadLetterKind, Message, Parsed, Rejection};
use crate::db::repo::{dead_letters, messages};
use crate::db::{Database, Failure};
use crate::input::Line;
use crate::outcome::{DeadLetter, Outcome};
pub use ingest::{ingest, Progress, Stopped, PROGRESS_INTERVAL};
pub use summary::Summary;

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

enum Work {
    Apply { message: Message, raw: Vec<u8> },
    Reject { rejection: Rejection, raw: Vec<u8> },
}

/// One line on its way to a worker.
pub struct Job {
    ticket: u64,
    work: Work,
    reply: Sender<Done>,
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

/// A pool of worker threads inside a thread scope.
pub struct Workers {
    senders: Vec<Sender<Job>>,
    next_reject: std::sync::atomic::AtomicUsize,
}

impl Workers {
    /// Starts `options.workers` threads in `scope`. They stop when every
    /// clone of the returned pool is dropped (their channels close). While
    /// `stop` is set they hand jobs back unrun.
    pub fn spawn<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        db: &'env Database,
        options: &IngestOptions,
        stop: &'env AtomicBool,
    ) -> Workers {
        let senders = (0..options.workers.max(1))
            .map(|i| {
                let (tx, rx) = bounded::<Job>(options.queue_per_worker);
                let hook = options.hook.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn_scoped(scope, move || work(db, rx, stop, hook))
                    .expect("spawn a worker");
                tx
            })
            .collect();
        Workers {
            senders,
            next_reject: Default::default(),
        }
    }

    /// Parses a line and sends it to its worker, blocking while that
    /// worker's queue is full. Returns `None` for a blank line (no job), or
    /// `Some(false)` when the workers are gone.
    pub fn submit(&self, ticket: u64, line: Line, reply: &Sender<Done>) -> Option<bool> {
        let (worker, work) = match parse_line(&line.bytes, line.oversize) {
            Parsed::Blank => return None,
            Parsed::Message(message) => (
                route(&message.device, self.senders.len()),
                Work::Apply {
                    message,
                    raw: line.bytes,
                },
            ),
            Parsed::Rejected(rejection) => {
                let i = self.next_reject.fetch_add(1, Ordering::Relaxed) % self.senders.len();
                (
                    i,
                    Work::Reject {
                        rejection,
                        raw: line.bytes,
                    },
                )
            }
        };
        Some(
            self.senders[worker]
                .send(Job {
                    ticket,
                    work,
                    reply: reply.clone(),
                })
                .is_ok(),
        )
    }

    /// Jobs waiting in the queues.
    pub fn queued(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }
}

/// The worker that owns a device: the same key always goes to the same one.
pub fn route(device: &str, workers: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

fn work(db: &Database, jobs: Receiver<Job>, stop: &AtomicBool, hook: Option<ApplyHook>) {
    for job in jobs.iter() {
        if stop.load(Ordering::SeqCst) {
            // Handed back: not done, and safe to run again later.
            continue;
        }
        let (id, detail, result) = match job.work {
            Work::Reject { rejection, raw } => {
                let id = rejection.message_id.clone();
                let detail = Some(rejection.error.clone());
                let letter = DeadLetter {
                    message_id: rejection.message_id,
                    device_key: rejection.device_key,
                    kind: rejection.kind,
                    error: rejection.error,
                    raw: raw_for_storage(&raw),
                };
                (id, detail, file_dead_letter(db, &letter))
            }
            Work::Apply { message, raw } => {
                let result = apply_message(db, &message, &raw, job.ticket, hook.as_deref());
                (Some(message.id), None, result)
            }
        };
        // A closed reply channel means its reader went away; the outcome is
        // durable all the same.
        let _ = job.reply.send(Done {
            ticket: job.ticket,
            id,
            detail,
            result,
        });
    }
}

/// Applies a message. A permanent database error or a panic gets one more
/// try of the message on its own, then the message is dead-lettered as
/// `db_rejected` or `internal`. Connection and transient errors never reach
/// here: the retry loop waits them out or gives up.
fn apply_message(
    db: &Database,
    message: &Message,
    raw: &[u8],
    ticket: u64,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    let token = new_token();
    let mut last_failure = None;
    for attempt in 1..=2 {
        let result = db.transaction(|conn| {
            if let Some(hook) = hook {
                hook(message);
            }
            messages::apply(conn, message, raw, &token)
        });
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(failure @ (Failure::GaveUp { .. } | Failure::Cancelled { .. })) => {
                return Err(failure)
            }
            Err(failure) => {
                log::warn!(
                    "line {ticket}, message {:?}: attempt {attempt} on its own failed: {failure}",
                    message.id
                );
                last_failure = Some(failure);
            }
        }
    }
    let (kind, error) = match last_failure.expect("two failed attempts") {
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
