//! Who applies which partition: the coordinator balances partitions over
//! the instances (a fair share each), renews this instance's leases, takes
//! over a partition (its fence claimed in the database, a consumer that
//! starts after the recorded resume point) and releases what it gives up;
//! the claims thread runs the fence claims on the database. The leases
//! themselves are keys of the ownership bucket (`lease`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use crossbeam_channel::Receiver;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::fetch::{fetch_loop, Run};
use super::handle::Shared;
use super::lease::{self, Lease, Renewal};
use super::settle::Record;
use super::setup::partition_subject;
use super::PartitionStatus;
use crate::db::repo::fences::{self, Fence};
use crate::db::{Database, Failure};
use crate::pipeline::AckWindow;

/// A fence claim for the bridge thread: the reply is the partition's
/// resume point, or `None` when a later owner's token is there.
pub(super) struct Claim {
    pub(super) fence: Fence,
    pub(super) reply: oneshot::Sender<Result<Option<u64>, Failure>>,
}

pub(super) fn consumer_name(partition: u32, token: u64) -> String {
    format!("p{partition}-{token}")
}

pub(super) fn parse_consumer(name: &str) -> Option<(u32, u64)> {
    let (p, t) = name.strip_prefix('p')?.split_once('-')?;
    Some((p.parse().ok()?, t.parse().ok()?))
}

/// `partition 3` or `partitions 0,1,5`.
pub(super) fn partitions_named(partitions: &[u32]) -> String {
    let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
    match list.len() {
        1 => format!("partition {}", list[0]),
        _ => format!("partitions {}", list.join(",")),
    }
}

/// A partition this instance holds a lease on.
pub(super) struct Held {
    pub(super) lease: Lease,
    /// The fencing token: the revision that granted the lease.
    pub(super) token: u64,
    /// Consuming, once the fence is claimed and the consumer made.
    pub(super) run: Option<Arc<Run>>,
    /// Being claimed (fence, consumer) by a task.
    pub(super) claiming: bool,
    /// Asked to give it up once its messages in flight are settled.
    pub(super) releasing: bool,
}

pub(super) struct Coordinator {
    pub(super) shared: Arc<Shared>,
    pub(super) store: jetstream::kv::Store,
    pub(super) stream: stream::Stream,
    pub(super) member: Option<Lease>,
    pub(super) held: BTreeMap<u32, Held>,
    pub(super) last_pending: Instant,
}

/// What a claim task reports back.
pub(super) enum Claimed {
    Running(u32, Arc<Run>),
    Failed(u32, String),
}

impl Coordinator {
    pub(super) async fn run(&mut self, quit: &mut watch::Receiver<bool>) {
        let lease = self.shared.options.lease;
        let tick = (lease / 5).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (claimed_tx, mut claimed_rx) = mpsc::unbounded_channel::<Claimed>();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                Some(claimed) = claimed_rx.recv() => {
                    self.on_claimed(claimed);
                    continue;
                }
                _ = quit.changed() => break,
            }
            // A tick never outlives a shutdown, whatever NATS does.
            tokio::select! {
                _ = self.tick(&claimed_tx) => {}
                _ = quit.changed() => break,
            }
        }
        let released = tokio::time::timeout(Duration::from_secs(5), self.release_all()).await;
        if released.is_err() {
            log::warn!(
                "nats: the leases could not all be given up in 5 s; they run out by themselves"
            );
        }
    }

    pub(super) async fn tick(&mut self, claimed: &mpsc::UnboundedSender<Claimed>) {
        self.renew().await;
        self.record();
        if self.shared.stopping.load(Ordering::SeqCst) {
            // Draining: the leases are kept (renewed) until the work in
            // flight is done, nothing new is fetched or claimed.
            for held in self.held.values() {
                if let Some(run) = &held.run {
                    run.stop.store(true, Ordering::SeqCst);
                }
            }
            return;
        }
        self.drop_fenced();
        self.balance(claimed).await;
        self.publish_status().await;
    }

    pub(super) fn instance(&self) -> &str {
        &self.shared.options.instance
    }

    /// Renews the member key and every partition lease.
    pub(super) async fn renew(&mut self) {
        let me = self.shared.options.instance.clone();
        let member_key = lease::member_key(&me);
        self.member = match self.member {
            Some(lease) => match lease::renew(&self.store, &member_key, &me, lease).await {
                Renewal::Renewed(l) => Some(l),
                Renewal::Lost => None,
                Renewal::Unknown(_) => Some(lease),
            },
            None => None,
        };
        if self.member.is_none() {
            match lease::acquire(&self.store, &member_key, &me).await {
                Ok(Some(l)) => self.member = Some(l),
                Ok(None) => log::warn!(
                    "nats: the member key {member_key} is held; another instance has this name?"
                ),
                Err(e) => log::debug!("nats: cannot write the member key: {e}"),
            }
        }
        let ttl = self.shared.options.lease;
        let mut expired = Vec::new();
        let mut unrenewed = Vec::new();
        let mut last_error = String::new();
        for (&n, held) in self.held.iter_mut() {
            match lease::renew(&self.store, &lease::partition_key(n), &me, held.lease).await {
                Renewal::Renewed(l) => {
                    held.lease = l;
                    if let Some(run) = &held.run {
                        *run.valid_until.lock().expect("run lock") = l.written + ttl - ttl / 10;
                    }
                }
                Renewal::Lost => expired.push(n),
                Renewal::Unknown(e) if !lease::holds(&held.lease, ttl) => {
                    unrenewed.push(n);
                    last_error = e;
                }
                Renewal::Unknown(_) => {}
            }
        }
        // One line per cause, however many partitions.
        if !expired.is_empty() {
            log::warn!(
                "nats: lost {}: the lease expired and another instance may hold it; fetching stopped",
                partitions_named(&expired)
            );
        }
        if !unrenewed.is_empty() {
            log::warn!(
                "nats: lost {}: the lease could not be renewed for {ttl:?} ({last_error}); fetching stopped",
                partitions_named(&unrenewed)
            );
        }
        for n in expired.into_iter().chain(unrenewed) {
            if let Some(held) = self.held.remove(&n) {
                if let Some(run) = held.run {
                    run.stop.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Hands how far each partition has settled to the records thread,
    /// where it grew since it was last recorded.
    pub(super) fn record(&self) {
        for held in self.held.values() {
            let Some(run) = &held.run else { continue };
            let through = run.settled_through.load(Ordering::SeqCst);
            if through > run.recorded.load(Ordering::SeqCst) {
                let _ = self.shared.records.send(Record {
                    run: run.clone(),
                    through,
                });
            }
        }
    }

    /// Partitions whose transactions ended at their fence: another instance
    /// claimed them in the database.
    pub(super) fn drop_fenced(&mut self) {
        for held in self.held.values_mut() {
            if held
                .run
                .as_ref()
                .is_some_and(|r| r.gap.load(Ordering::SeqCst))
            {
                held.releasing = true;
            }
        }
        let fenced: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| {
                h.run
                    .as_ref()
                    .is_some_and(|r| r.fenced.load(Ordering::SeqCst))
            })
            .map(|(&n, _)| n)
            .collect();
        for n in fenced {
            log::warn!(event = "partition_lost", partition = n; "nats: lost partition {n}: another instance claimed it in the database (fenced); fetching stopped");
            if let Some(held) = self.held.remove(&n) {
                if let Some(run) = held.run {
                    run.stop.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Claims free partitions up to this instance's share, and gives up
    /// those above it.
    pub(super) async fn balance(&mut self, claimed: &mpsc::UnboundedSender<Claimed>) {
        let view = match lease::view(&self.store).await {
            Ok(v) => v,
            Err(e) => {
                log::debug!("nats: cannot read the ownership bucket: {e}");
                return;
            }
        };
        self.shared
            .status
            .instances
            .store(view.members.len().max(1) as u64, Ordering::Relaxed);
        let me = self.instance().to_string();
        let partitions = self.shared.options.partitions;
        let share = lease::fair_share(partitions, &view.members, &me) as usize;
        let keeping: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| !h.releasing)
            .map(|(&n, _)| n)
            .collect();
        // Above the share: give up the highest partitions, once their
        // messages in flight are settled.
        for &n in keeping.iter().skip(share) {
            if let Some(held) = self.held.get_mut(&n) {
                held.releasing = true;
                if let Some(run) = &held.run {
                    run.stop.store(true, Ordering::SeqCst);
                }
                log::info!("nats: giving partition {n} up ({share} is this instance's share of {partitions})");
            }
        }
        self.release_settled().await;
        // Below the share: take free partitions.
        let wanted = share.saturating_sub(keeping.len().min(share));
        self.take_free(&view.held, wanted, claimed).await;
    }

    /// Releases the partitions being given up whose runs have settled
    /// everything they fetched.
    async fn release_settled(&mut self) {
        let mut releasable = Vec::new();
        for (&n, held) in &self.held {
            let idle = held.run.as_ref().is_none_or(|r| {
                !r.fetching.load(Ordering::SeqCst) && r.in_flight.load(Ordering::SeqCst) == 0
            });
            if held.releasing && !held.claiming && idle {
                releasable.push(n);
            }
        }
        for n in releasable {
            if let Some(held) = self.held.remove(&n) {
                lease::release(&self.store, &lease::partition_key(n), held.lease).await;
                log::info!(event = "partition_given_up", partition = n; "nats: gave partition {n} up");
            }
        }
    }

    /// Takes up to `wanted` partitions that nobody holds, starting at a
    /// place of this instance's own so that instances rarely race for the
    /// same; each is taken over on a task of its own, which reports on
    /// `claimed`.
    async fn take_free(
        &mut self,
        taken: &std::collections::BTreeSet<u32>,
        mut wanted: usize,
        claimed: &mpsc::UnboundedSender<Claimed>,
    ) {
        let me = self.instance().to_string();
        let partitions = self.shared.options.partitions;
        let offset = crate::pipeline::route(&me, partitions as usize) as u32;
        for i in 0..partitions {
            if wanted == 0 {
                break;
            }
            let n = (offset + i) % partitions;
            if taken.contains(&n) || self.held.contains_key(&n) {
                continue;
            }
            match lease::acquire(&self.store, &lease::partition_key(n), &me).await {
                Ok(Some(lease)) => {
                    wanted -= 1;
                    let token = lease.revision;
                    self.held.insert(
                        n,
                        Held {
                            lease,
                            token,
                            run: None,
                            claiming: true,
                            releasing: false,
                        },
                    );
                    let shared = self.shared.clone();
                    let stream = self.stream.clone();
                    let claimed = claimed.clone();
                    let valid_until = lease.written + self.shared.options.lease * 9 / 10;
                    tokio::spawn(async move {
                        let result = take_over(&shared, &stream, n, token, valid_until).await;
                        let _ = claimed.send(match result {
                            Ok(run) => Claimed::Running(n, run),
                            Err(e) => Claimed::Failed(n, e.to_string()),
                        });
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    log::debug!("nats: cannot take partition {n}: {e}");
                    break;
                }
            }
        }
    }

    pub(super) fn on_claimed(&mut self, claimed: Claimed) {
        match claimed {
            Claimed::Running(n, run) => match self.held.get_mut(&n) {
                Some(held) if held.token == run.fence.token as u64 => {
                    held.claiming = false;
                    *run.valid_until.lock().expect("run lock") =
                        held.lease.written + self.shared.options.lease * 9 / 10;
                    if held.releasing || self.shared.stopping.load(Ordering::SeqCst) {
                        run.stop.store(true, Ordering::SeqCst);
                    }
                    log::info!(event = "partition_owned", partition = n, token = held.token; "nats: owning partition {n} (token {})", held.token);
                    held.run = Some(run);
                }
                // Lost while it was being claimed.
                _ => run.stop.store(true, Ordering::SeqCst),
            },
            Claimed::Failed(n, e) => {
                log::warn!("nats: could not take partition {n} over: {e}");
                if let Some(held) = self.held.get_mut(&n) {
                    held.claiming = false;
                    held.releasing = true;
                }
            }
        }
    }

    pub(super) async fn publish_status(&mut self) {
        let refresh = self.last_pending.elapsed() >= Duration::from_secs(5);
        let mut pending = HashMap::new();
        if refresh {
            self.last_pending = Instant::now();
            // All at once, each given a second: a consumer whose node is
            // down does not answer, and the tick must go on to renew the
            // leases.
            let stream = &self.stream;
            let infos = self.held.iter().filter_map(|(&n, held)| {
                let run = held.run.as_ref()?;
                let name = consumer_name(n, held.token);
                Some(async move {
                    let info =
                        tokio::time::timeout(Duration::from_secs(1), stream.consumer_info(&name))
                            .await;
                    (n, run, info)
                })
            });
            for (n, run, info) in futures_util::future::join_all(infos).await {
                if let Ok(Ok(info)) = info {
                    pending.insert(n, info.num_pending);
                    log::debug!(
                        "nats: partition {n}: here in flight {}, window {}, may fetch {}, fetching {}; server: pending {}, ack pending {}, waiting {}, ack floor {}, delivered {}",
                        run.in_flight.load(Ordering::SeqCst),
                        run.window.lock().expect("window lock").len(),
                        run.may_fetch(),
                        run.fetching.load(Ordering::SeqCst),
                        info.num_pending,
                        info.num_ack_pending,
                        info.num_waiting,
                        info.ack_floor.stream_sequence,
                        info.delivered.stream_sequence
                    );
                }
            }
        }
        let mut partitions = self.shared.status.partitions.lock().expect("status lock");
        let old = std::mem::take(&mut *partitions);
        for (&n, held) in &self.held {
            let Some(run) = &held.run else { continue };
            partitions.insert(
                n,
                PartitionStatus {
                    token: held.token as i64,
                    pending: pending
                        .get(&n)
                        .copied()
                        .unwrap_or_else(|| old.get(&n).map_or(0, |p| p.pending)),
                    in_flight: run.in_flight.load(Ordering::SeqCst) as u64,
                },
            );
        }
    }

    /// At shutdown: every lease given up, so that the others take over at
    /// once instead of after the lease runs out.
    pub(super) async fn release_all(&mut self) {
        for (n, held) in std::mem::take(&mut self.held) {
            if let Some(run) = &held.run {
                run.stop.store(true, Ordering::SeqCst);
            }
            lease::release(&self.store, &lease::partition_key(n), held.lease).await;
        }
        if let Some(lease) = self.member.take() {
            lease::release(&self.store, &lease::member_key(self.instance()), lease).await;
        }
        match lease::release_named(&self.store, self.instance()).await {
            Ok(0) => {}
            Ok(n) => log::info!("nats: gave up {n} more key(s) that a claim cut short by the shutdown had taken"),
            Err(e) => log::debug!("nats: cannot look for keys left with this instance's name: {e} (they expire by themselves)"),
        }
        self.shared
            .status
            .partitions
            .lock()
            .expect("status lock")
            .clear();
    }
}

/// Claims partition `n`'s fence with `token` in the database, makes the
/// partition's consumer for this token (starting where the previous
/// owner's left off) and starts fetching.
pub(super) async fn take_over(
    shared: &Arc<Shared>,
    stream: &stream::Stream,
    n: u32,
    token: u64,
    valid_until: Instant,
) -> anyhow::Result<Arc<Run>> {
    let fence = Fence {
        key: shared.options.fence_key(n),
        token: token as i64,
    };
    let resume = claim(shared, &fence).await?;
    // This consumer starts after the partition's resume point in the
    // database, or after the newest previous consumer's ack floor if that
    // is further and can be read (its node may be gone with it). Both only
    // cover messages whose outcomes are committed; messages after them
    // that were committed come again, and find their own write token.
    let previous = previous_consumers(stream, n, token).await?;
    let settled = match previous.last() {
        Some((_, name)) => resume.max(ack_floor(stream, n, name, resume).await),
        None => resume,
    };
    let consumer = create_consumer(shared, stream, n, token, settled).await?;
    for (_, old) in &previous {
        if let Err(e) = stream.delete_consumer(old).await {
            log::debug!("nats: cannot remove the old consumer {old}: {e}");
        }
    }
    let run = Arc::new(Run {
        partition: n,
        fence,
        stop: AtomicBool::new(false),
        fenced: AtomicBool::new(false),
        gap: AtomicBool::new(false),
        last_delivery: AtomicU64::new(0),
        settled_through: AtomicU64::new(settled),
        recorded: AtomicU64::new(resume),
        in_flight: AtomicUsize::new(0),
        window: Mutex::new(AckWindow::default()),
        fetching: AtomicBool::new(true),
        valid_until: Mutex::new(valid_until),
    });
    tokio::spawn(fetch_loop(shared.clone(), consumer, run.clone()));
    Ok(run)
}

/// Claims `fence` in the database (on the bridge thread); returns the
/// partition's resume point.
async fn claim(shared: &Shared, fence: &Fence) -> anyhow::Result<u64> {
    let (reply, claimed) = oneshot::channel();
    shared
        .claims
        .send(Claim {
            fence: fence.clone(),
            reply,
        })
        .map_err(|_| anyhow::anyhow!("shutting down"))?;
    match claimed.await? {
        Ok(Some(resume)) => Ok(resume),
        Ok(None) => anyhow::bail!("a later owner's token is already in the database"),
        Err(failure) => anyhow::bail!("cannot claim its fence: {failure}"),
    }
}

/// Partition `n`'s consumers of earlier tokens, oldest first.
async fn previous_consumers(
    stream: &stream::Stream,
    n: u32,
    token: u64,
) -> anyhow::Result<Vec<(u64, String)>> {
    let mut previous: Vec<(u64, String)> = Vec::new();
    let mut names = stream.consumer_names();
    while let Some(name) = names.next().await {
        let name = name?;
        if let Some((p, t)) = parse_consumer(&name) {
            if p == n && t != token {
                previous.push((t, name));
            }
        }
    }
    previous.sort();
    Ok(previous)
}

/// The ack floor of consumer `name`, given a second (its node may be
/// down); `resume` when it cannot be read.
async fn ack_floor(stream: &stream::Stream, n: u32, name: &str, resume: u64) -> u64 {
    match tokio::time::timeout(Duration::from_secs(1), stream.consumer_info(name)).await {
        Ok(Ok(info)) => info.ack_floor.stream_sequence,
        Ok(Err(e)) => {
            log::debug!(
                "nats: partition {n}: the previous consumer {name} cannot be read ({e}); starting after {resume}, the database's resume point"
            );
            resume
        }
        Err(_) => {
            log::debug!(
                "nats: partition {n}: the previous consumer {name} does not answer; starting after {resume}, the database's resume point"
            );
            resume
        }
    }
}

/// Partition `n`'s consumer for `token`, delivering after `settled`.
async fn create_consumer(
    shared: &Shared,
    stream: &stream::Stream,
    n: u32,
    token: u64,
    settled: u64,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = consumer_name(n, token);
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: partition_subject(&shared.options.stream, n),
                ack_policy: consumer::AckPolicy::All,
                ack_wait: shared.options.ack_wait,
                max_ack_pending: shared.options.max_in_flight as i64,
                deliver_policy: match settled {
                    0 => consumer::DeliverPolicy::All,
                    s => consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: s + 1,
                    },
                },
                // One replica, in memory: an ack is not a Raft proposal
                // that two more nodes apply and write (most of
                // nats-server's CPU on this path, docs/PERFORMANCE.md).
                // What it loses with its node, the resume point in the
                // database keeps; `fetch` takes the partition again when
                // the consumer is gone or does not answer.
                num_replicas: 1,
                memory_storage: true,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// The bridge thread: fence claims on the database, and whether the
/// database is down (fetching pauses then).
pub(super) fn run_claims(
    shared: &Shared,
    db: &Database,
    claims: &Receiver<Claim>,
    done: &Receiver<()>,
) {
    loop {
        shared
            .db_down
            .store(db.down_since().is_some(), Ordering::SeqCst);
        crossbeam_channel::select! {
            recv(claims) -> c => match c {
                Ok(claim) => {
                    let owner = &shared.options.instance;
                    let stream = shared.stream_epoch.load(Ordering::SeqCst) as i64;
                    let result =
                        db.transaction(|conn| fences::claim(conn, &claim.fence, owner, stream));
                    let _ = claim.reply.send(result);
                }
                Err(_) => return,
            },
            recv(done) -> _ => return,
            default(Duration::from_millis(100)) => {}
        }
    }
}
