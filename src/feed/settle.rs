//! Settling: the workers' outcomes come back to the ack thread; each
//! partition's [`Window`] turns them into the highest settled prefix, which
//! is acknowledged (one cumulative `+ACK`), marked in progress while it
//! waits, and recorded in the database as the partition's resume point.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_nats::Subject;
use bytes::Bytes;
use crossbeam_channel::Receiver;
use tokio::sync::mpsc;

use super::fetch::Run;
use super::handle::Shared;
use crate::db::repo::fences;
use crate::db::{Database, Failure};
use crate::pipeline::Done;

/// The outcome of a ticket, for the async side.
pub(super) struct Settle {
    pub(super) ticket: u64,
    pub(super) ack: bool,
}

/// How far a partition run has settled, for the records thread.
pub(super) struct Record {
    pub(super) run: Arc<Run>,
    pub(super) through: u64,
}

/// A message fetched and not settled.
pub(super) struct InFlight {
    pub(super) reply: Option<Subject>,
    pub(super) run: Arc<Run>,
    pub(super) since: Instant,
    /// The message's stream sequence.
    pub(super) sequence: u64,
}

/// What one cumulative `+ACK` does for the lines the window released: the
/// reply subject to acknowledge up to (the last released line's that has
/// one), how many lines that acknowledges, and the stream sequence the
/// settled prefix now ends at. `None` when nothing was released.
pub(super) fn cumulative_ack(released: Vec<(u64, Option<Subject>)>) -> Option<(Subject, u64, u64)> {
    let through = released.last()?.0;
    let count = released.len() as u64;
    let reply = released.into_iter().rev().find_map(|(_, reply)| reply)?;
    Some((reply, count, through))
}

pub(super) fn settle_locally(shared: &Shared, ticket: u64) -> Option<InFlight> {
    let entry = shared
        .in_flight
        .lock()
        .expect("in-flight lock")
        .remove(&ticket)?;
    entry.run.in_flight.fetch_sub(1, Ordering::SeqCst);
    Some(entry)
}

/// Acknowledges committed messages: whatever has settled by the time it
/// looks, with one cumulative ack per partition run (the last message of
/// its settled prefix), not one per message: each ack costs the consumer's
/// leader (and its replicas) a write.
pub(super) async fn settle_loop(
    shared: Arc<Shared>,
    client: async_nats::Client,
    mut settle: mpsc::UnboundedReceiver<Settle>,
) {
    /// At most this many settlements per round, so that acks keep going
    /// out under a steady stream.
    const ROUND: usize = 4096;
    while let Some(first) = settle.recv().await {
        // Keyed by the run (a partition taken again is a new run, with a
        // consumer of its own), which the value keeps alive meanwhile.
        let mut acks: HashMap<usize, (Arc<Run>, Subject, u64)> = HashMap::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(s) = next.take() {
            taken += 1;
            if let Some(entry) = settle_locally(&shared, s.ticket) {
                let released = entry
                    .run
                    .window
                    .lock()
                    .expect("window lock")
                    .settled(entry.sequence, s.ack);
                if let Some((reply, count, through)) = cumulative_ack(released) {
                    entry
                        .run
                        .settled_through
                        .fetch_max(through, Ordering::SeqCst);
                    let slot = acks
                        .entry(Arc::as_ptr(&entry.run) as usize)
                        .or_insert_with(|| (entry.run.clone(), reply.clone(), 0));
                    slot.1 = reply;
                    slot.2 += count;
                }
            }
            if taken < ROUND {
                next = settle.try_recv().ok();
            }
        }
        for (_, reply, count) in acks.into_values() {
            match client.publish(reply, Bytes::from_static(b"+ACK")).await {
                Ok(()) => {
                    shared
                        .status
                        .acknowledged
                        .fetch_add(count, Ordering::Relaxed);
                }
                // Delivered again later; its own write token makes that a
                // no-op, acknowledged then.
                Err(e) => log::debug!("nats: an ack was not sent: {e}"),
            }
        }
    }
}

/// Marks messages in flight as in progress, so that the server does not
/// redeliver them while the database is slow or down.
pub(super) async fn progress_loop(shared: Arc<Shared>, client: async_nats::Client) {
    let every = shared.options.ack_wait / 3;
    loop {
        tokio::time::sleep(every).await;
        let replies: Vec<Subject> = shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .values()
            .filter(|e| e.since.elapsed() >= every)
            .filter_map(|e| e.reply.clone())
            .collect();
        for reply in replies {
            if client
                .publish(reply, Bytes::from_static(b"+WPI"))
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// The ack thread: each outcome settles its message.
pub(super) fn settle_outcomes(
    shared: &Shared,
    acks: Receiver<Done>,
    on_done: &(dyn Fn(&Done) + Sync),
) {
    for done in acks.iter() {
        on_done(&done);
        let ack = match &done.result {
            Ok(_) => true,
            Err(Failure::Fenced(_)) => {
                shared.status.fenced.fetch_add(1, Ordering::Relaxed);
                let in_flight = shared.in_flight.lock().expect("in-flight lock");
                if let Some(entry) = in_flight.get(&done.ticket) {
                    if !entry.run.fenced.swap(true, Ordering::SeqCst) {
                        log::warn!(
                            "nats: partition {}: a transaction ended at its fence (another instance claimed the partition in the database); nothing of it was committed here",
                            entry.run.partition
                        );
                    }
                }
                false
            }
            Err(failure) => {
                log::warn!(
                    "nats: a message not committed ({failure}); it is delivered again later"
                );
                false
            }
        };
        let _ = shared.settle.send(Settle {
            ticket: done.ticket,
            ack,
        });
    }
}

/// The records thread: each partition's settled point into its fence row
/// (the latest of each run's, whatever queued meanwhile). Not while the
/// database is down: the next ownership tick hands it again.
pub(super) fn run_records(
    shared: &Shared,
    db: &Database,
    records: &Receiver<Record>,
    done: &Receiver<()>,
) {
    let stream = shared.stream_epoch.load(Ordering::SeqCst) as i64;
    loop {
        let first = crossbeam_channel::select! {
            recv(records) -> r => match r { Ok(r) => r, Err(_) => return },
            recv(done) -> _ => return,
        };
        let mut latest: HashMap<usize, Record> = HashMap::new();
        for record in std::iter::once(first).chain(records.try_iter()) {
            let key = Arc::as_ptr(&record.run) as usize;
            match latest.get(&key) {
                Some(kept) if kept.through >= record.through => {}
                _ => {
                    latest.insert(key, record);
                }
            }
        }
        if db.down_since().is_some() {
            continue;
        }
        for Record { run, through } in latest.into_values() {
            match db.transaction(|conn| fences::record(conn, &run.fence, stream, through)) {
                Ok(_) => {
                    run.recorded.fetch_max(through, Ordering::SeqCst);
                }
                Err(e) => log::debug!(
                    "nats: partition {}: its resume point {through} not recorded: {e}",
                    run.partition
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::AckWindow;

    fn subject(n: u64) -> Option<Subject> {
        Some(Subject::from(format!("ack.{n}")))
    }

    #[test]
    fn the_acknowledgement_point_never_passes_an_uncommitted_message() {
        let mut w = AckWindow::default();
        for n in 1..=5 {
            w.delivered(n, subject(n));
        }
        let mut settle = |n, committed| cumulative_ack(w.settled(n, committed));
        // 2 and 3 commit first: nothing before them is done yet.
        assert!(settle(2, true).is_none());
        assert!(settle(3, true).is_none());
        // 1 commits: 1 to 3 are acknowledged with one ack on 3, settled
        // through 3.
        let (reply, count, through) = settle(1, true).unwrap();
        assert_eq!((reply.as_str(), count, through), ("ack.3", 3, 3));
        // 4 fails (fenced, cancelled): never acknowledged, 5 waits behind it.
        assert!(settle(4, false).is_none());
        assert!(settle(5, true).is_none());
        // Redelivered and committed: 4 and 5 go.
        w.delivered(4, subject(40));
        let (reply, count, through) = cumulative_ack(w.settled(4, true)).unwrap();
        assert_eq!((reply.as_str(), count, through), ("ack.5", 2, 5));
        assert!(w.is_empty());
    }

    #[test]
    fn an_overlapping_redelivery_acknowledges_with_its_newest_reply() {
        let mut w = AckWindow::default();
        w.delivered(7, subject(7));
        w.delivered(7, subject(70));
        assert!(cumulative_ack(w.settled(7, true)).is_none());
        assert_eq!(
            cumulative_ack(w.settled(7, true)).unwrap().0.as_str(),
            "ack.70"
        );
    }

    #[test]
    fn released_lines_without_a_reply_subject_acknowledge_with_the_last_that_has_one() {
        let released = vec![(1, subject(1)), (2, None)];
        let (reply, count, through) = cumulative_ack(released).unwrap();
        assert_eq!((reply.as_str(), count, through), ("ack.1", 2, 2));
        assert!(cumulative_ack(vec![(3, None)]).is_none());
        assert!(cumulative_ack(Vec::new()).is_none());
    }
}
