//! The worker pool: a bounded queue per worker, a byte budget over all of
//! them, and each worker's loop that takes a batch and applies it.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Scope;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::apply::{run_alone, run_batch, Prepared};
use super::{Done, IngestOptions};
use crate::core::message::{parse_line, MAX_RAW_BYTES};
use crate::core::{DeadLetterKind, Message, Parsed, Rejection};
use crate::db::repo::fences::Fence;
use crate::db::repo::reference::ReferenceCache;
use crate::db::Database;
use crate::input::Line;

pub(super) enum Work {
    Apply { message: Message, raw: Vec<u8> },
    Reject { rejection: Rejection, raw: Vec<u8> },
}

/// One line on its way to a worker.
pub struct Job {
    pub(super) ticket: u64,
    pub(super) work: Work,
    pub(super) reply: Sender<Done>,
    pub(super) cost: Cost,
    pub(super) origin: Option<Origin>,
}

/// Where a line of a partitioned feed came from: what makes its writes
/// exactly-once across redeliveries, and who may commit them.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The write token of this line: the same on every delivery of it (its
    /// stream and sequence), so a redelivered line whose first delivery
    /// committed finds its own token and changes nothing.
    pub token: String,
    /// The partition's fence, checked in every transaction of the line.
    pub fence: Fence,
}

/// A job's share of the queue budget, given back when the job is dropped.
pub(super) struct Cost {
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
        self.submit_from(ticket, line, None, reply)
    }

    /// Like [`Workers::submit`], for a line of a partitioned feed.
    pub fn submit_from(
        &self,
        ticket: u64,
        line: Line,
        origin: Option<Origin>,
        reply: &Sender<Done>,
    ) -> Option<bool> {
        let parsed = match parse_line(&line.bytes, line.oversize) {
            // A feed's message has no blank lines to skip: an empty one is
            // a bad message, filed and acknowledged like any other.
            Parsed::Blank if origin.is_some() => Parsed::Rejected(Rejection {
                kind: DeadLetterKind::Malformed,
                error: "an empty message: a message must hold one JSON object".to_string(),
                message_id: None,
                device_key: None,
            }),
            parsed => parsed,
        };
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
            origin,
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
                let result = run_alone(db, cache, &job, hook);
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
