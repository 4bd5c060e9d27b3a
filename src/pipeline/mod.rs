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

use crate::core::message::{parse_line, raw_for_storage, MAX_RAW_BYTES};
use crate::core::{DeadLetterKind, Message, Parsed, Rejection};
use crate::db::repo::reference::ReferenceCache;
use crate::db::repo::{batch, dead_letters, messages};
use crate::db::{Database, Failure};
use crate::input::Line;
use crate::outcome::{DeadLetter, Outcome};
pub use ingest::{ingest, IngestError, Progress, Stopped, PROGRESS_INTERVAL};
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
    /// Bytes queued for all workers together; the reader waits beyond it.
    pub queue_bytes: usize,
    /// Most messages applied in one transaction; 1 is one message per
    /// transaction.
    pub batch_size: usize,
    /// How long a worker waits for more jobs to fill a batch.
    pub batch_wait: std::time::Duration,
    /// See [`ApplyHook`].
    pub hook: Option<ApplyHook>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_per_worker: 2048,
            queue_bytes: 64 * 1024 * 1024,
            batch_size: 1000,
            batch_wait: std::time::Duration::from_millis(2),
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
    cost: Cost,
}

/// A job's share of the queue budget, given back when the job is dropped.
struct Cost {
    bytes: usize,
    budget: Arc<Budget>,
}

impl Drop for Cost {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Work {
    /// Roughly the bytes a queued job holds: its line twice (raw, parsed).
    fn cost(&self) -> usize {
        match self {
            Work::Apply { raw, .. } | Work::Reject { raw, .. } => 256 + 2 * raw.len(),
        }
    }
}

/// A bound on the bytes queued for the workers, so that memory stays flat
/// whatever the lines hold: the reader waits while the budget is spent.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits until `cost` fits (a job larger than the whole budget goes
    /// through alone).
    fn acquire(&self, cost: usize) {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + cost > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += cost;
    }

    fn release(&self, cost: usize) {
        let mut used = self.used.lock().expect("budget lock");
        *used = used.saturating_sub(cost);
        self.freed.notify_all();
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        *self.used.lock().expect("budget lock")
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

/// A pool of worker threads inside a thread scope.
pub struct Workers {
    senders: Vec<Sender<Job>>,
    next_reject: std::sync::atomic::AtomicUsize,
    budget: Arc<Budget>,
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
        // One cache of reference data for all the pool's workers.
        let cache = Arc::new(ReferenceCache::default());
        let senders = (0..options.workers.max(1))
            .map(|i| {
                let (tx, rx) = bounded::<Job>(options.queue_per_worker);
                let options = options.clone();
                let cache = cache.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn_scoped(scope, move || work(db, rx, stop, &options, &cache))
                    .expect("spawn a worker");
                tx
            })
            .collect();
        Workers {
            senders,
            next_reject: Default::default(),
            budget: Arc::new(Budget::new(options.queue_bytes)),
        }
    }

    /// Parses a line and sends it to its worker, blocking while that
    /// worker's queue is full or the queues' byte budget is spent. Returns `None` for a blank line (no job), or
    /// `Some(false)` when the workers are gone.
    pub fn submit(&self, ticket: u64, line: Line, reply: &Sender<Done>) -> Option<bool> {
        let parsed = parse_line(&line.bytes, line.oversize);
        // Only a dead letter needs the line, and only its first 64 KiB.
        let mut raw = line.bytes;
        raw.truncate(MAX_RAW_BYTES);
        let (worker, work) = match parsed {
            Parsed::Blank => return None,
            Parsed::Message(message) => (
                route(&message.device, self.senders.len()),
                Work::Apply { message, raw },
            ),
            Parsed::Rejected(rejection) => {
                // With a readable device key it keeps its place among that
                // device's messages.
                let i = match &rejection.device_key {
                    Some(key) => route(key, self.senders.len()),
                    None => self.next_reject.fetch_add(1, Ordering::Relaxed) % self.senders.len(),
                };
                (i, Work::Reject { rejection, raw })
            }
        };
        let cost = work.cost();
        self.budget.acquire(cost);
        let cost = Cost {
            bytes: cost,
            budget: self.budget.clone(),
        };
        let job = Job {
            ticket,
            work,
            reply: reply.clone(),
            cost,
        };
        Some(self.senders[worker].send(job).is_ok())
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

fn work(
    db: &Database,
    jobs: Receiver<Job>,
    stop: &AtomicBool,
    options: &IngestOptions,
    cache: &ReferenceCache,
) {
    let hook = options.hook.as_deref();
    // The batch size adapts: halved after a batch had to be split, doubled
    // back (up to --batch-size) after one that committed whole, so a
    // persistent fault rate does not make every full-size batch fail first.
    let mut limit = options.batch_size;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let deadline = std::time::Instant::now() + options.batch_wait;
        while batch.len() < limit {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => match jobs.recv_deadline(deadline) {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                },
            }
        }
        if stop.load(Ordering::SeqCst) {
            // Handed back: not done, and safe to run again later.
            continue;
        }
        let prepared: Vec<Prepared> = batch.into_iter().map(Prepared::from).collect();
        if options.batch_size == 1 {
            for job in prepared {
                let result = run_alone(db, &job, hook);
                job.reply(result);
            }
        } else {
            let size = prepared.len();
            limit = if run_batch(db, cache, prepared, hook) {
                (size / 2).max(1)
            } else {
                (limit * 2).min(options.batch_size)
            };
        }
    }
}

/// A job with its dead letter built and its write token drawn: both stay
/// the same however often its transaction is retried or its batch split.
struct Prepared {
    job_ticket: u64,
    reply: Sender<Done>,
    token: String,
    kind: PreparedKind,
    _cost: Cost,
}

enum PreparedKind {
    Apply { message: Message, raw: Vec<u8> },
    Letter { letter: DeadLetter, detail: String },
}

impl From<Job> for Prepared {
    fn from(job: Job) -> Self {
        let kind = match job.work {
            Work::Apply { message, raw } => PreparedKind::Apply { message, raw },
            Work::Reject { rejection, raw } => PreparedKind::Letter {
                detail: rejection.error.clone(),
                letter: DeadLetter {
                    message_id: rejection.message_id,
                    device_key: rejection.device_key,
                    kind: rejection.kind,
                    error: rejection.error,
                    raw: raw_for_storage(&raw),
                },
            },
        };
        Prepared {
            job_ticket: job.ticket,
            reply: job.reply,
            token: new_token(),
            kind,
            _cost: job.cost,
        }
    }
}

impl Prepared {
    fn id(&self) -> Option<String> {
        match &self.kind {
            PreparedKind::Apply { message, .. } => Some(message.id.clone()),
            PreparedKind::Letter { letter, .. } => letter.message_id.clone(),
        }
    }

    /// Sends the outcome. A closed reply channel means its reader went
    /// away; the outcome is durable all the same.
    fn reply(&self, result: Result<Outcome, Failure>) {
        let detail = match &self.kind {
            PreparedKind::Letter { detail, .. } => Some(detail.clone()),
            PreparedKind::Apply { .. } => None,
        };
        let _ = self.reply.send(Done {
            ticket: self.job_ticket,
            id: self.id(),
            detail,
            result,
        });
    }
}

/// One job in its own transaction(s): the one-message-per-transaction mode,
/// and the end of a batch's bisection.
fn run_alone(
    db: &Database,
    job: &Prepared,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    match &job.kind {
        PreparedKind::Letter { letter, .. } => file_dead_letter(db, letter, &job.token),
        PreparedKind::Apply { message, raw } => {
            apply_message(db, message, raw, &job.token, job.job_ticket, hook)
        }
    }
}

/// Transient failures of one batch before it is split.
const BATCH_TRANSIENT_ATTEMPTS: u32 = 4;

/// Applies jobs in one transaction. A permanent error or a panic does not
/// dead-letter the batch: it is split in halves, each retried, until the
/// failing message is alone; only it is dead-lettered. A batch that keeps
/// hitting transient errors (deadlocks, timeouts) is split the same way,
/// down to single messages, which retry until `max_outage`.
/// Returns whether the batch had to be split.
fn run_batch(
    db: &Database,
    cache: &ReferenceCache,
    jobs: Vec<Prepared>,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> bool {
    if jobs.len() == 1 {
        let job = &jobs[0];
        job.reply(run_alone(db, job, hook));
        return false;
    }
    let items: Vec<batch::Item<'_>> = jobs
        .iter()
        .map(|j| match &j.kind {
            PreparedKind::Apply { message, raw } => batch::Item::Message {
                message,
                raw,
                token: &j.token,
            },
            PreparedKind::Letter { letter, .. } => batch::Item::Letter {
                letter,
                token: &j.token,
            },
        })
        .collect();
    let result = db.transaction_splittable(BATCH_TRANSIENT_ATTEMPTS, |conn| {
        if let Some(hook) = hook {
            for item in &items {
                if let batch::Item::Message { message, .. } = item {
                    hook(message);
                }
            }
        }
        batch::apply(conn, &items, cache)
    });
    drop(items);
    match result {
        Ok(outcomes) => {
            for (job, outcome) in jobs.iter().zip(outcomes) {
                job.reply(Ok(outcome));
            }
            false
        }
        Err(failure) if failure.is_stop() => {
            // Not done: every job of the batch stops the same way.
            for job in &jobs {
                job.reply(Err(failure.clone()));
            }
            false
        }
        Err(failure) => {
            log::warn!(
                "a batch of {} failed ({failure}); splitting it to find the message",
                jobs.len()
            );
            let mut jobs = jobs;
            let second = jobs.split_off(jobs.len() / 2);
            run_batch(db, cache, jobs, hook);
            run_batch(db, cache, second, hook);
            true
        }
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
    token: &str,
    ticket: u64,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    let mut last_failure = None;
    for attempt in 1..=2 {
        let result = db.transaction(|conn| {
            if let Some(hook) = hook {
                hook(message);
            }
            messages::apply(conn, message, raw, token)
        });
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(failure) if failure.is_stop() => return Err(failure),
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
    // A new write, so a new token: the message's own token may already
    // name a landed dead letter of it (an earlier line with the same id).
    file_dead_letter(db, &letter, &new_token())
}

fn file_dead_letter(db: &Database, letter: &DeadLetter, token: &str) -> Result<Outcome, Failure> {
    db.transaction(|conn| dead_letters::record(conn, letter, token))?;
    Ok(Outcome::DeadLetter(letter.kind))
}

/// A random name for one write, stable across its retries.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_budget_blocks_until_jobs_are_done_and_lets_a_huge_job_through_alone() {
        let budget = Arc::new(Budget::new(100));
        budget.acquire(500); // larger than the whole budget: goes through alone
        assert_eq!(budget.used(), 500);
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        std::thread::scope(|s| {
            s.spawn(|| {
                budget.acquire(30);
                tx.send(()).unwrap();
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(100))
                    .is_err(),
                "blocked while spent"
            );
            budget.release(500);
            rx.recv_timeout(std::time::Duration::from_secs(5))
                .expect("released");
        });
        assert_eq!(budget.used(), 30);
    }
}
