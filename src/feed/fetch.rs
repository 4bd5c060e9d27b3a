//! Fetching and delivery: each owned partition's fetch loop pulls from its
//! consumer while the lease holds and the window has room, hands each
//! message to the feeder thread as a line with its origin (write token and
//! fence), and the feeder submits it to the workers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use async_nats::Subject;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use futures_util::StreamExt;

use super::handle::Shared;
use super::settle::{settle_locally, InFlight};
use super::TRUNCATED_HEADER;
use crate::core::message::{MAX_LINE_BYTES, MAX_RAW_BYTES};
use crate::db::repo::fences::Fence;
use crate::input::Line;
use crate::pipeline::AckWindow;
use crate::pipeline::{Done, Origin, Workers};

/// A fetched message on its way to the feeder.
pub(super) struct Fetched {
    pub(super) ticket: u64,
    pub(super) payload: Bytes,
    pub(super) truncated: bool,
    pub(super) origin: Origin,
}

/// One owned partition being consumed.
pub(super) struct Run {
    pub(super) partition: u32,
    pub(super) fence: Fence,
    /// Set to stop fetching (released, lost, shutting down).
    pub(super) stop: AtomicBool,
    /// Set by the ack thread when a transaction of it ended at its fence.
    pub(super) fenced: AtomicBool,
    /// A delivery went missing (the consumer's delivery sequence jumped):
    /// the messages after it must not be applied before it, so the
    /// partition is given up and taken again from its acknowledged point.
    pub(super) gap: AtomicBool,
    /// The consumer sequence of the last delivery seen.
    pub(super) last_delivery: AtomicU64,
    /// The stream sequence through which every message of this run has its
    /// outcome committed (0: none yet).
    pub(super) settled_through: AtomicU64,
    /// What of it is recorded in the database (`feed_fences`).
    pub(super) recorded: AtomicU64,
    pub(super) in_flight: AtomicUsize,
    pub(super) window: Mutex<AckWindow<Option<Subject>>>,
    /// Its fetch loop runs (a fetch may still deliver messages).
    pub(super) fetching: AtomicBool,
    /// The lease holds until then: no fetch after it.
    pub(super) valid_until: Mutex<Instant>,
}

impl Run {
    /// Stopped, fenced, or past a gap: this run fetches no more.
    pub(super) fn ended(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || self.fenced.load(Ordering::SeqCst)
            || self.gap.load(Ordering::SeqCst)
    }

    pub(super) fn may_fetch(&self) -> bool {
        !self.ended() && Instant::now() < *self.valid_until.lock().expect("run lock")
    }
}

/// Fetches partition messages while this instance may: the lease holds,
/// the database is up, fewer than `max_in_flight` are out.
pub(super) async fn fetch_loop(
    shared: Arc<Shared>,
    consumer: consumer::PullConsumer,
    run: Arc<Run>,
) {
    fetch(&shared, consumer, &run).await;
    run.fetching.store(false, Ordering::SeqCst);
}

/// How long a fetch may go without a message or its closing status before
/// it is given up (a server that lost the request, a leader that moved).
pub(super) const FETCH_SILENCE: Duration = Duration::from_secs(5);

/// The most one fetch asks for.
pub(super) const FETCH_BATCH: usize = 500;

/// How long fetches may fail (or go unanswered) in a row before the
/// partition is taken again with a new consumer: a consumer of one replica
/// is out of reach while its node is down.
pub(super) const CONSUMER_UNREACHABLE: Duration = Duration::from_secs(5);

pub(super) async fn fetch(
    shared: &Arc<Shared>,
    mut consumer: consumer::PullConsumer,
    run: &Arc<Run>,
) {
    let max = shared.options.max_in_flight;
    // A fetch waits for room for a full batch (or half the window, if that
    // is less): fetches of the few slots that each settled batch frees cost
    // nats-server a request, an inbox and a reply each, for a few messages.
    let room = FETCH_BATCH.min(max.div_ceil(2)).max(1);
    // Since when fetches have failed or gone unanswered, in a row.
    let mut failing: Option<Instant> = None;
    loop {
        if failing.is_some_and(|since| since.elapsed() >= CONSUMER_UNREACHABLE) {
            log::warn!(
                "nats: partition {}: its consumer has not answered for {CONSUMER_UNREACHABLE:?} (its node is down?); taking the partition again from its resume point",
                run.partition
            );
            run.gap.store(true, Ordering::SeqCst);
            return;
        }
        if run.ended() {
            return;
        }
        let out = run.in_flight.load(Ordering::SeqCst);
        if shared.stopping.load(Ordering::SeqCst)
            || !run.may_fetch()
            || shared.db_down.load(Ordering::SeqCst)
            || max.saturating_sub(out) < room
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // `fetch` asks for what is there now (no_wait): the server answers
        // at once, its closing status after the messages on the same inbox.
        // (A long poll that the client gives up on first drops deliveries
        // still on their way: see `Run::gap`.) No `expires`: nats-server 2.9
        // holds a no_wait request with one while it finds nothing, and with
        // most partitions idle the last busy ones then got a few messages
        // per fetch (a 20 s tail at 90 msg/s). Without one, the client does
        // not time the request out, so a fetch that is not answered is
        // given up here after FETCH_SILENCE.
        let batch = consumer
            .fetch()
            .max_messages((max - out).min(FETCH_BATCH))
            .messages()
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                if consumer_gone(&mut consumer).await {
                    gone(run);
                    return;
                }
                log::debug!("nats: partition {}: fetch failed: {e}", run.partition);
                failing.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let got = match take(shared, run, &mut consumer, batch, &mut failing).await {
            Taken::Messages(got) => got,
            Taken::ConsumerGone => {
                gone(run);
                return;
            }
        };
        if got == 0 {
            // Nothing there: ask again shortly, not in a tight loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What one fetch's messages came to.
enum Taken {
    /// This many were delivered (the fetch ended, went silent, or the run
    /// ended: the rest of it is not taken, and the partition's next
    /// consumer starts before it).
    Messages(usize),
    /// The consumer is gone.
    ConsumerGone,
}

/// Delivers one fetch's messages as they come; `failing` is cleared by a
/// message or the fetch's end, and set by silence or an error.
async fn take(
    shared: &Shared,
    run: &Arc<Run>,
    consumer: &mut consumer::PullConsumer,
    mut batch: consumer::pull::Batch,
    failing: &mut Option<Instant>,
) -> Taken {
    let mut got = 0;
    loop {
        let message = match tokio::time::timeout(FETCH_SILENCE, batch.next()).await {
            Ok(Some(message)) => message,
            Ok(None) => {
                *failing = None;
                break;
            }
            Err(_) => {
                log::debug!(
                    "nats: partition {}: no answer to a fetch for {FETCH_SILENCE:?}",
                    run.partition
                );
                failing.get_or_insert_with(Instant::now);
                break;
            }
        };
        if run.ended() {
            break;
        }
        match message {
            Ok(message) => {
                got += 1;
                *failing = None;
                deliver(shared, run, message)
            }
            Err(e) => {
                log::debug!("nats: partition {}: {e}", run.partition);
                if consumer_gone(consumer).await {
                    return Taken::ConsumerGone;
                }
                failing.get_or_insert_with(Instant::now);
                break;
            }
        }
    }
    Taken::Messages(got)
}

/// The run's consumer is gone: another instance took the partition over
/// and removed it, or its node restarted without it. Taken again: from the
/// resume point if this instance still owns the partition, not at all if
/// it does not (its lease is lost, its claim is refused).
pub(super) fn gone(run: &Run) {
    log::warn!(
        "nats: partition {}: its consumer is gone (another instance took the partition over, or its node restarted); fetching stopped",
        run.partition
    );
    run.gap.store(true, Ordering::SeqCst);
}

pub(super) async fn consumer_gone(consumer: &mut consumer::PullConsumer) -> bool {
    match consumer.info().await {
        Ok(_) => false,
        Err(e) => e.to_string().contains("consumer not found"),
    }
}

/// Hands a fetched message to the feeder.
pub(super) fn deliver(shared: &Shared, run: &Arc<Run>, message: jetstream::Message) {
    let (sequence, delivered, delivery) = match message.info() {
        Ok(info) => (info.stream_sequence, info.delivered, info.consumer_sequence),
        Err(e) => {
            log::warn!("nats: a message without JetStream metadata ({e}); ignored");
            return;
        }
    };
    // Every run has a consumer of its own, new, whose deliveries count from
    // 1: the first one seen must be 1 too (a delivery taken by another
    // client before this run's first fetch is missing as much as a later
    // one, and a cumulative ack past it would acknowledge it unapplied).
    let previous = run.last_delivery.swap(delivery, Ordering::SeqCst);
    if delivery != previous + 1 {
        // Not applied: the partition is taken again from its ack floor, and
        // this message comes again, in order, after the missing one.
        if !run.gap.swap(true, Ordering::SeqCst) {
            let after = match previous {
                0 => "first".to_string(),
                n => format!("after {n}"),
            };
            log::warn!(
                "nats: partition {}: delivery {delivery} came {after} (one went missing); taking the partition again from its acknowledged point",
                run.partition
            );
        }
        return;
    }
    if delivered > 1 {
        shared.status.redeliveries.fetch_add(1, Ordering::Relaxed);
    }
    let truncated = message
        .headers
        .as_ref()
        .is_some_and(|h| h.get(TRUNCATED_HEADER).is_some());
    let ticket = shared.next_ticket.fetch_add(1, Ordering::SeqCst);
    let token = format!(
        "nats:{}:{}:{sequence}",
        shared.options.stream,
        shared.stream_epoch.load(Ordering::SeqCst)
    );
    run.in_flight.fetch_add(1, Ordering::SeqCst);
    run.window
        .lock()
        .expect("window lock")
        .delivered(sequence, message.reply.clone());
    shared.in_flight.lock().expect("in-flight lock").insert(
        ticket,
        InFlight {
            reply: message.reply.clone(),
            run: run.clone(),
            since: Instant::now(),
            sequence,
        },
    );
    let fetched = Fetched {
        ticket,
        payload: message.payload.clone(),
        truncated,
        origin: Origin {
            token,
            fence: Some(run.fence.clone()),
        },
    };
    if shared.lines.send(fetched).is_err() {
        settle_locally(shared, ticket);
    }
}

/// The feeder thread: fetched messages into the worker pool.
pub(super) fn feed_workers(
    lines: &Receiver<Fetched>,
    done: &Receiver<()>,
    workers: &Workers,
    reply: Sender<Done>,
) {
    loop {
        let fetched = crossbeam_channel::select! {
            recv(lines) -> f => match f { Ok(f) => f, Err(_) => return },
            recv(done) -> _ => return,
        };
        let len = fetched.payload.len();
        let oversize = fetched.truncated || len > MAX_LINE_BYTES;
        let keep = if oversize {
            len.min(MAX_RAW_BYTES)
        } else {
            len
        };
        let line = Line {
            number: fetched.ticket,
            bytes: fetched.payload[..keep].to_vec(),
            oversize,
        };
        if workers.submit_from(fetched.ticket, line, Some(fetched.origin), &reply) == Some(false) {
            return;
        }
    }
}
