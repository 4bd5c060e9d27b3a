//! The worker pool: a bounded queue per worker, a byte budget over all of
//! them, and each worker's loop that takes a batch and applies it.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Scope;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::apply::{run_alone, run_batch, run_in_passes, Prepared};
use super::job::{Budget, Cost, Job, Origin, Work};
use super::{Done, IngestOptions};
use crate::core::message::{parse_line, MAX_RAW_BYTES};
use crate::core::{DeadLetterKind, Parsed, Rejection};
use crate::db::repo::reference::ReferenceCache;
use crate::db::{Database, DatabaseUrl};
use crate::input::Line;

/// A pool of worker threads inside a thread scope.
pub struct Workers {
    senders: Vec<Sender<Job>>,
    next_reject: std::sync::atomic::AtomicUsize,
    budget: Arc<Budget>,
}

impl Workers {
    /// Starts `options.workers` threads in `scope` (one on SQLite: see
    /// [`IngestOptions::one_writer`]). They stop when every
    /// clone of the returned pool is dropped (their channels close). While
    /// `stop` is set they hand jobs back unrun.
    pub fn spawn<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        db: &'env Database,
        options: &IngestOptions,
        stop: &'env AtomicBool,
    ) -> Workers {
        let options = match db.url() {
            DatabaseUrl::Sqlite(_) => {
                if options.workers > 1 {
                    log::debug!(
                        "SQLite has one writer: one worker applies every message, in group commits of up to {} (--workers is for PostgreSQL)",
                        options.batch_size
                    );
                }
                options.clone().one_writer()
            }
            DatabaseUrl::Postgres(_) => options.clone(),
        };
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
        let cost = Cost::taken(&self.budget, &work);
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
        let pass = options.pass_size.min(limit);
        while batch.len() < pass {
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
            let split = if pass < limit {
                run_in_passes(db, cache, prepared, (&jobs, stop), pass, limit, hook)
            } else {
                run_batch(db, cache, prepared, hook)
            };
            limit = if split {
                (size / 2).max(1)
            } else {
                (limit * 2).min(options.batch_size)
            };
        }
    }
}
