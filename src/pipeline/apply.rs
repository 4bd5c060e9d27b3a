//! Applying a batch of jobs: one transaction, bisected on a permanent
//! error or a panic down to the one message, which gets one more try on its
//! own and is then dead-lettered.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};

use super::job::{Cost, Job, Work};
use super::Done;
use crate::core::message::{parse_line, raw_for_storage, MAX_RAW_BYTES};
use crate::core::{DeadLetterKind, Message, Parsed};
use crate::db::repo::fences::{self as fence_repo, Fence};
use crate::db::repo::reference::ReferenceCache;
use crate::db::repo::{batch, dead_letters};
use crate::db::{AnyConnection, Database, Failure};
use crate::outcome::{DeadLetter, Outcome};
use diesel::QueryResult;

/// A job with its dead letter built and its write token drawn: both stay
/// the same however often its transaction is retried or its batch split.
pub(super) struct Prepared {
    job_ticket: u64,
    reply: Sender<Done>,
    token: String,
    fence: Option<Fence>,
    kind: PreparedKind,
    cost: Cost,
}

enum PreparedKind {
    // Boxed, as the letter is: a parked job keeps only the enum's size.
    Apply {
        message: Box<Message>,
        raw: Vec<u8>,
    },
    /// Applied by an earlier pass of a transaction still open
    /// ([`run_in_passes`]): the parsed message is dropped to keep a long
    /// transaction's memory to its lines, and parsed again from the line
    /// if the transaction has to run again.
    Parked {
        id: String,
        raw: Vec<u8>,
    },
    Letter {
        letter: Box<DeadLetter>,
        detail: String,
    },
}

impl Prepared {
    /// What the batch repository applies for this job.
    fn item(&self) -> batch::Item<'_> {
        match &self.kind {
            PreparedKind::Apply { message, raw } => batch::Item::Message {
                message,
                raw,
                token: &self.token,
            },
            PreparedKind::Letter { letter, .. } => batch::Item::Letter {
                letter,
                token: &self.token,
            },
            PreparedKind::Parked { .. } => unreachable!("a parked job is unparked before it runs"),
        }
    }

    /// Drops the parsed message of an applied job whose line is whole (a
    /// line longer than [`MAX_RAW_BYTES`] keeps its message: its kept line
    /// is only the head).
    fn park(&mut self) {
        if let PreparedKind::Apply { message, raw } = &mut self.kind {
            if raw.len() < MAX_RAW_BYTES {
                self.kind = PreparedKind::Parked {
                    id: std::mem::take(&mut message.id),
                    raw: std::mem::take(raw),
                };
            }
        }
    }

    /// Parses a parked job's line again: the same line gives the same
    /// message.
    fn unpark(&mut self) {
        if let PreparedKind::Parked { raw, .. } = &mut self.kind {
            let raw = std::mem::take(raw);
            let message = match parse_line(&raw, false) {
                Parsed::Message(message) => message,
                _ => unreachable!("a parked line parsed as a message before"),
            };
            self.kind = PreparedKind::Apply {
                message: Box::new(message),
                raw,
            };
        }
    }
}

impl From<Job> for Prepared {
    fn from(job: Job) -> Self {
        let kind = match job.work {
            Work::Apply { message, raw } => PreparedKind::Apply {
                message: Box::new(message),
                raw,
            },
            Work::Reject { rejection, raw } => PreparedKind::Letter {
                detail: rejection.error.clone(),
                letter: Box::new(DeadLetter {
                    message_id: rejection.message_id,
                    device_key: rejection.device_key,
                    kind: rejection.kind,
                    error: rejection.error,
                    raw: raw_for_storage(&raw),
                }),
            },
        };
        let (token, fence) = match job.origin {
            Some(origin) => (origin.token, origin.fence),
            None => (new_token(), None),
        };
        Prepared {
            job_ticket: job.ticket,
            reply: job.reply,
            token,
            fence,
            kind,
            cost: job.cost,
        }
    }
}

impl Prepared {
    fn id(&self) -> Option<String> {
        match &self.kind {
            PreparedKind::Apply { message, .. } => Some(message.id.clone()),
            PreparedKind::Parked { id, .. } => Some(id.clone()),
            PreparedKind::Letter { letter, .. } => letter.message_id.clone(),
        }
    }

    /// Sends the outcome. A closed reply channel means its reader went
    /// away; the outcome is durable all the same.
    pub(super) fn reply(&self, result: Result<Outcome, Failure>) {
        let detail = match &self.kind {
            PreparedKind::Letter { detail, .. } => Some(detail.clone()),
            PreparedKind::Apply { .. } | PreparedKind::Parked { .. } => None,
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
pub(super) fn run_alone(
    db: &Database,
    cache: &ReferenceCache,
    job: &Prepared,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    let fence = job.fence.as_ref();
    match &job.kind {
        PreparedKind::Letter { letter, .. } => file_dead_letter(db, letter, &job.token, fence),
        PreparedKind::Apply { message, raw } => apply_message(db, cache, job, message, raw, hook),
        PreparedKind::Parked { .. } => unreachable!("a parked job is unparked before it runs"),
    }
}

/// Runs `body`, then checks `fences` in the same transaction: if another
/// instance has claimed one of them, the transaction rolls back and `lost`
/// names the fences lost.
fn fenced<T>(
    conn: &mut AnyConnection,
    fences: &[&Fence],
    lost: &mut Vec<Fence>,
    body: impl FnOnce(&mut AnyConnection) -> QueryResult<T>,
) -> QueryResult<T> {
    lost.clear();
    let value = body(conn)?;
    if fences.is_empty() {
        return Ok(value);
    }
    let gone = fence_repo::check(conn, fences)?;
    if gone.is_empty() {
        return Ok(value);
    }
    lost.extend(gone.into_iter().cloned());
    Err(diesel::result::Error::RollbackTransaction)
}

/// The failure of a transaction that ended at its fence.
fn fenced_failure(lost: &[Fence]) -> Option<Failure> {
    lost.first()
        .map(|fence| Failure::Fenced(fence.key.to_string()))
}

/// Transient failures of one batch before it is split.
const BATCH_TRANSIENT_ATTEMPTS: u32 = 4;

/// Applies jobs in one transaction. A permanent error or a panic does not
/// dead-letter the batch: it is split in halves, each retried, until the
/// failing message is alone; only it is dead-lettered. A batch that keeps
/// hitting transient errors (deadlocks, timeouts) is split the same way,
/// down to single messages, which retry until `max_outage`.
/// Returns whether the batch had to be split.
pub(super) fn run_batch(
    db: &Database,
    cache: &ReferenceCache,
    mut jobs: Vec<Prepared>,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> bool {
    jobs.iter_mut().for_each(Prepared::unpark);
    if jobs.len() == 1 {
        let job = &jobs[0];
        job.reply(run_alone(db, cache, job, hook));
        return false;
    }
    let items: Vec<batch::Item<'_>> = jobs.iter().map(Prepared::item).collect();
    let fences = fences_of(&jobs);
    let mut lost = Vec::new();
    let result = db.transaction_splittable(BATCH_TRANSIENT_ATTEMPTS, |conn| {
        fenced(conn, &fences, &mut lost, |conn| {
            run_hook(hook, &items);
            batch::apply(conn, &items, cache)
        })
    });
    drop(items);
    settle(db, cache, jobs, &lost, result, hook, |mut jobs, failure| {
        log::warn!(
            event = "batch_split", batch = jobs.len();
            "a batch of {} failed ({failure}); splitting it to find the message",
            jobs.len()
        );
        let second = jobs.split_off(jobs.len() / 2);
        run_batch(db, cache, jobs, hook);
        run_batch(db, cache, second, hook);
    })
}

/// Ends the transaction of `jobs`: the jobs of a raised fence end there and
/// the others run again; a commit replies each job's outcome; a stop is
/// every job's reply; any other failure hands the jobs to `split`.
/// Returns whether they were split.
fn settle(
    db: &Database,
    cache: &ReferenceCache,
    jobs: Vec<Prepared>,
    lost: &[Fence],
    result: Result<Vec<Outcome>, Failure>,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
    split: impl FnOnce(Vec<Prepared>, Failure),
) -> bool {
    if !lost.is_empty() {
        end_fenced(db, cache, jobs, lost, hook);
        return false;
    }
    match result {
        Ok(outcomes) => {
            for (job, outcome) in jobs.iter().zip(outcomes) {
                job.reply(Ok(outcome));
            }
            let mut jobs = jobs;
            Cost::release_together(jobs.iter_mut().map(|job| &mut job.cost));
            drop_elsewhere(jobs);
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
            split(jobs, failure);
            true
        }
    }
}

/// Jobs at least this many are dropped on a thread of their own.
const DROP_ELSEWHERE: usize = 4096;

/// Drops a large group's jobs on a short-lived thread of their own: freeing
/// tens of thousands of lines, ids and reply senders was 2.4% of the one
/// SQLite writer's time, which the other core can spend. Smaller groups (and
/// a thread that cannot start) are dropped here.
fn drop_elsewhere(jobs: Vec<Prepared>) {
    if jobs.len() < DROP_ELSEWHERE {
        return;
    }
    // Err: the closure, and the jobs with it, are dropped here.
    let _ = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(jobs));
}

/// The hook, for each message of `items`, inside their transaction.
fn run_hook(hook: Option<&(dyn Fn(&Message) + Send + Sync)>, items: &[batch::Item<'_>]) {
    let Some(hook) = hook else { return };
    for item in items {
        if let batch::Item::Message { message, .. } = item {
            hook(message);
        }
    }
}

/// The fences of `jobs`, each once, in the order they are checked.
fn fences_of(jobs: &[Prepared]) -> Vec<&Fence> {
    let mut fences: Vec<&Fence> = jobs.iter().filter_map(|j| j.fence.as_ref()).collect();
    fences.sort_unstable_by(|a, b| (&a.key, a.token).cmp(&(&b.key, b.token)));
    fences.dedup();
    fences
}

/// Applies `first` and then, in the same transaction, what is queued on
/// `more` when each pass ends, `pass` jobs at a time, until `limit` jobs,
/// an empty queue or a raised stop flag: SQLite's one writer, whose
/// commits cost about the same whatever they hold (docs/PERFORMANCE.md, "A
/// write path made for SQLite"). Each pass is a batch of the one engine, in arrival order, so
/// the transaction ends in the state of the passes committed one by one.
/// An applied job is parked (its parsed message dropped), so memory holds
/// one pass's messages and the others' lines. A transaction that fails is
/// run again as batches of one pass each (parsed again from their lines),
/// which split themselves down to the failing message as ever. Returns
/// whether it had to be split.
pub(super) fn run_in_passes(
    db: &Database,
    cache: &ReferenceCache,
    first: Vec<Prepared>,
    (more, stop): (&Receiver<Job>, &AtomicBool),
    pass: usize,
    limit: usize,
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> bool {
    let pass = pass.max(1);
    let mut jobs = first;
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(jobs.len());
    let mut lost: Vec<Fence> = Vec::new();
    let result = db.transaction_splittable(BATCH_TRANSIENT_ATTEMPTS, |conn| {
        outcomes.clear();
        lost.clear();
        let mut applied = 0;
        let mut group = batch::Group::default();
        loop {
            if applied == jobs.len() && !stop.load(Ordering::SeqCst) {
                let room = limit.saturating_sub(jobs.len()).min(pass);
                jobs.extend(more.try_iter().take(room).map(Prepared::from));
            }
            if applied == jobs.len() {
                break;
            }
            let end = (applied + pass).min(jobs.len());
            let chunk = &mut jobs[applied..end];
            chunk.iter_mut().for_each(Prepared::unpark);
            let items: Vec<batch::Item<'_>> = chunk.iter().map(Prepared::item).collect();
            run_hook(hook, &items);
            outcomes.extend(group.apply(conn, &items, cache)?);
            drop(items);
            chunk.iter_mut().for_each(Prepared::park);
            applied = end;
        }
        group.finish(conn)?;
        fenced(conn, &fences_of(&jobs), &mut lost, |_| Ok(()))
    });
    let result = result.map(|()| outcomes);
    settle(db, cache, jobs, &lost, result, hook, |jobs, failure| {
        log::warn!(
            event = "batch_split", batch = jobs.len();
            "a transaction of {} in passes of {pass} failed ({failure}); applying its passes one by one",
            jobs.len()
        );
        let mut rest = jobs.into_iter().peekable();
        while rest.peek().is_some() {
            let batch: Vec<Prepared> = rest.by_ref().take(pass).collect();
            run_batch(db, cache, batch, hook);
        }
    })
}

/// A batch that met a raised fence: the jobs of the lost partitions end
/// here, uncommitted; the others are applied without them.
fn end_fenced(
    db: &Database,
    cache: &ReferenceCache,
    jobs: Vec<Prepared>,
    lost: &[Fence],
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) {
    let (gone, kept): (Vec<Prepared>, Vec<Prepared>) = jobs
        .into_iter()
        .partition(|j| j.fence.as_ref().is_some_and(|f| lost.contains(f)));
    for job in &gone {
        let key = job
            .fence
            .as_ref()
            .map_or_else(String::new, |f| f.key.to_string());
        job.reply(Err(Failure::Fenced(key)));
    }
    if !kept.is_empty() {
        run_batch(db, cache, kept, hook);
    }
}

/// Applies a message. A permanent database error or a panic gets one more
/// try of the message on its own, then the message is dead-lettered as
/// `db_rejected` or `internal`. Connection and transient errors never reach
/// here: the retry loop waits them out or gives up.
fn apply_message(
    db: &Database,
    cache: &ReferenceCache,
    job: &Prepared,
    message: &Message,
    raw: &[u8],
    hook: Option<&(dyn Fn(&Message) + Send + Sync)>,
) -> Result<Outcome, Failure> {
    let (token, fence, ticket) = (job.token.as_str(), job.fence.as_ref(), job.job_ticket);
    let fences: Vec<&Fence> = fence.into_iter().collect();
    let mut last_failure = None;
    for attempt in 1..=2 {
        let mut lost = Vec::new();
        let result = db.transaction(|conn| {
            fenced(conn, &fences, &mut lost, |conn| {
                if let Some(hook) = hook {
                    hook(message);
                }
                batch::apply_one(conn, message, raw, token, cache)
            })
        });
        if let Some(failure) = fenced_failure(&lost) {
            return Err(failure);
        }
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(failure) if failure.is_stop() => return Err(failure),
            Err(failure) => {
                log::warn!(
                    event = "alone_failed", line = ticket, id:? = message.id, attempt = attempt;
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
    let letter = DeadLetter::of(message, raw, kind, error);
    // A new write, so a new token: the message's own token may already
    // name a landed dead letter of it (an earlier line with the same id).
    file_dead_letter(db, &letter, &new_token(), fence)
}

fn file_dead_letter(
    db: &Database,
    letter: &DeadLetter,
    token: &str,
    fence: Option<&Fence>,
) -> Result<Outcome, Failure> {
    let fences: Vec<&Fence> = fence.into_iter().collect();
    let mut lost = Vec::new();
    let result = db.transaction(|conn| {
        fenced(conn, &fences, &mut lost, |conn| {
            dead_letters::record(conn, letter, token)
        })
    });
    if let Some(failure) = fenced_failure(&lost) {
        return Err(failure);
    }
    result?;
    Ok(Outcome::DeadLetter(letter.kind))
}

/// A random name for one write, stable across its retries.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
