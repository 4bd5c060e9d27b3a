//! Consuming the feed: the async side (one tokio runtime on its own thread:
//! ownership, fetching, acknowledgements) and the blocking side (a feeder
//! that submits fetched lines to the workers, an ack thread that takes their
//! outcomes, and a bridge that runs fence claims on the database).
//!
//! A message is acknowledged only after the transaction that recorded its
//! outcome committed. A message in flight is marked in progress every third
//! of `ack_wait`, so the server does not redeliver it while the database is
//! down; fetching pauses while the database is down or a partition has
//! `max_in_flight` messages out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::Subject;
use bytes::Bytes;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::connect;
use super::owner::{self, Lease, Renewal};
use super::setup::{self, partition_subject, Mismatch};
use super::{FeedStatus, NatsOptions, PartitionStatus, TRUNCATED_HEADER};
use crate::core::message::{MAX_LINE_BYTES, MAX_RAW_BYTES};
use crate::db::repo::fences::{self, Fence};
use crate::db::{Database, Failure};
use crate::input::Line;
use crate::pipeline::{Done, Origin, Workers};

/// Why the feed could not start.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The stream, the bucket or a consumer exists with settings that do
    /// not fit this instance: fatal, nothing was consumed.
    #[error("{0}")]
    Mismatch(String),
    /// The NATS URLs are not valid.
    #[error("--nats: {0}")]
    Url(String),
    /// The server refused this instance's credentials or certificate, or
    /// the TLS settings cannot work: fatal at start.
    #[error("{0}")]
    Refused(String),
}

/// A fetched message on its way to the feeder.
struct Fetched {
    ticket: u64,
    payload: Bytes,
    truncated: bool,
    origin: Origin,
}

/// The outcome of a ticket, for the async side.
struct Settle {
    ticket: u64,
    ack: bool,
}

/// A fence claim for the bridge thread: the reply is the partition's
/// resume point, or `None` when a later owner's token is there.
struct Claim {
    fence: Fence,
    reply: oneshot::Sender<Result<Option<u64>, Failure>>,
}

/// How far a partition run has settled, for the records thread.
struct Record {
    run: Arc<Run>,
    through: u64,
}

/// A message fetched and not settled.
struct InFlight {
    reply: Option<Subject>,
    run: Arc<Run>,
    since: Instant,
    /// The message's stream sequence.
    sequence: u64,
}

/// A partition's messages delivered and not yet acknowledged, by stream
/// sequence. The consumer acknowledges cumulatively (`AckPolicy::All`): one
/// `+ACK` on the highest message of a settled prefix acknowledges every
/// message before it, so the acknowledgement point never passes a message
/// whose outcome is not committed.
#[derive(Default)]
struct Window {
    slots: BTreeMap<u64, Slot>,
}

struct Slot {
    /// Deliveries of it not yet settled (a redelivery may overlap).
    open: u32,
    /// Its last settled delivery committed.
    committed: bool,
    reply: Option<Subject>,
}

impl Window {
    fn delivered(&mut self, sequence: u64, reply: Option<Subject>) {
        let slot = self.slots.entry(sequence).or_insert(Slot {
            open: 0,
            committed: false,
            reply: None,
        });
        slot.open += 1;
        slot.reply = reply;
    }

    /// Settles one delivery; when the settled prefix grew, returns the reply
    /// subject to acknowledge up to, how many messages that acknowledges,
    /// and the stream sequence the prefix now ends at.
    fn settled(&mut self, sequence: u64, committed: bool) -> Option<(Subject, u64, u64)> {
        if let Some(slot) = self.slots.get_mut(&sequence) {
            slot.open = slot.open.saturating_sub(1);
            slot.committed = committed;
        }
        let mut last = None;
        let mut count = 0;
        let mut through = 0;
        while let Some(entry) = self.slots.first_entry() {
            let slot = entry.get();
            if slot.open > 0 || !slot.committed {
                break;
            }
            through = *entry.key();
            last = entry.remove().reply.or(last);
            count += 1;
        }
        last.map(|reply| (reply, count, through))
    }
}

/// One owned partition being consumed.
struct Run {
    partition: u32,
    fence: Fence,
    /// Set to stop fetching (released, lost, shutting down).
    stop: AtomicBool,
    /// Set by the ack thread when a transaction of it ended at its fence.
    fenced: AtomicBool,
    /// A delivery went missing (the consumer's delivery sequence jumped):
    /// the messages after it must not be applied before it, so the
    /// partition is given up and taken again from its acknowledged point.
    gap: AtomicBool,
    /// The consumer sequence of the last delivery seen.
    last_delivery: AtomicU64,
    /// The stream sequence through which every message of this run has its
    /// outcome committed (0: none yet).
    settled_through: AtomicU64,
    /// What of it is recorded in the database (`feed_fences`).
    recorded: AtomicU64,
    in_flight: AtomicUsize,
    window: Mutex<Window>,
    /// Its fetch loop runs (a fetch may still deliver messages).
    fetching: AtomicBool,
    /// The lease holds until then: no fetch after it.
    valid_until: Mutex<Instant>,
}

impl Run {
    fn may_fetch(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
            && !self.fenced.load(Ordering::SeqCst)
            && !self.gap.load(Ordering::SeqCst)
            && Instant::now() < *self.valid_until.lock().expect("run lock")
    }
}

/// State shared by the async tasks and the blocking threads.
struct Shared {
    options: NatsOptions,
    status: Arc<FeedStatus>,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    next_ticket: AtomicU64,
    lines: Sender<Fetched>,
    claims: Sender<Claim>,
    records: Sender<Record>,
    settle: mpsc::UnboundedSender<Settle>,
    db_down: AtomicBool,
    /// No new fetches: the instance is shutting down.
    stopping: AtomicBool,
    /// The stream's creation time, in every write token.
    stream_epoch: AtomicU64,
}

/// A running feed: see the module's documentation.
pub struct Feed {
    shared: Arc<Shared>,
    lines: Receiver<Fetched>,
    claims: Receiver<Claim>,
    records: Receiver<Record>,
    start: Mutex<Option<oneshot::Sender<()>>>,
    quit: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Closed when the blocking threads must end.
    done: Mutex<Option<Sender<()>>>,
    done_rx: Receiver<()>,
}

impl Feed {
    /// Connects and sets up the stream and the bucket, waiting for NATS as
    /// long as it takes (logged once). `Ok(None)`: `shutdown` came first.
    pub fn connect(
        options: NatsOptions,
        shutdown: &Receiver<()>,
    ) -> Result<Option<Feed>, FeedError> {
        let addrs = super::server_addrs(&options.servers).map_err(FeedError::Url)?;
        let (lines_tx, lines) = unbounded();
        let (claims_tx, claims) = unbounded();
        let (records_tx, records) = unbounded();
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            options,
            status: Arc::new(FeedStatus::default()),
            in_flight: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            lines: lines_tx,
            claims: claims_tx,
            records: records_tx,
            settle: settle_tx,
            db_down: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stream_epoch: AtomicU64::new(0),
        });
        let (ready_tx, ready) = bounded::<Result<(), FeedError>>(1);
        let (start_tx, start_rx) = oneshot::channel();
        let (quit, quit_rx) = watch::channel(false);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nats".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    runtime.block_on(main(shared, addrs, ready_tx, start_rx, settle_rx, quit_rx));
                })
                .expect("spawn the nats thread")
        };
        let (done_tx, done_rx) = bounded(0);
        let feed = Feed {
            shared,
            lines,
            claims,
            records,
            start: Mutex::new(Some(start_tx)),
            quit,
            thread: Mutex::new(Some(thread)),
            done: Mutex::new(Some(done_tx)),
            done_rx,
        };
        crossbeam_channel::select! {
            recv(ready) -> r => match r {
                Ok(Ok(())) => Ok(Some(feed)),
                Ok(Err(e)) => {
                    feed.end();
                    Err(e)
                }
                Err(_) => {
                    feed.end();
                    Err(FeedError::Mismatch("the NATS thread ended during set-up".into()))
                }
            },
            recv(shutdown) -> _ => {
                feed.end();
                Ok(None)
            }
        }
    }

    /// What the feed is doing, for stats and metrics.
    pub fn status(&self) -> Arc<FeedStatus> {
        self.shared.status.clone()
    }

    /// Starts consuming: the feeder, ack, bridge and records threads in `scope`, and
    /// the ownership loop. `on_done` sees every outcome first.
    pub fn run<'scope, 'env>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        db: &'scope Database,
        workers: &'scope Workers,
        on_done: &'scope (dyn Fn(&Done) + Sync),
    ) {
        let (reply, acks) = bounded::<Done>(4096);
        let shared = &self.shared;
        std::thread::Builder::new()
            .name("nats-feeder".into())
            .spawn_scoped(scope, move || {
                feed_workers(&self.lines, &self.done_rx, workers, reply)
            })
            .expect("spawn the feeder");
        std::thread::Builder::new()
            .name("nats-acks".into())
            .spawn_scoped(scope, move || settle_outcomes(shared, acks, on_done))
            .expect("spawn the ack thread");
        std::thread::Builder::new()
            .name("nats-claims".into())
            .spawn_scoped(scope, move || {
                run_claims(shared, db, &self.claims, &self.done_rx)
            })
            .expect("spawn the claim thread");
        std::thread::Builder::new()
            .name("nats-records".into())
            .spawn_scoped(scope, move || {
                run_records(shared, db, &self.records, &self.done_rx)
            })
            .expect("spawn the records thread");
        if let Some(start) = self.start.lock().expect("feed lock").take() {
            let _ = start.send(());
        }
    }

    /// Messages fetched and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.lock().expect("in-flight lock").len()
    }

    /// Stops fetching: the messages in flight are still committed and
    /// acknowledged.
    pub fn stop_fetching(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    /// Ends the feed: gives up this instance's leases (so that the others
    /// take its partitions over at once, not when the leases run out) and
    /// stops the NATS thread. Messages still in flight are delivered again
    /// to the partitions' next owners.
    pub fn end(&self) {
        let fenced = self.shared.status.fenced.load(Ordering::Relaxed);
        if fenced > 0 {
            log::info!("nats: {fenced} messages ended at a fence (not committed here; their partitions' new owners applied them)");
        }
        let unsettled = self.in_flight();
        if unsettled > 0 {
            log::warn!(
                "nats: {unsettled} messages in flight not acknowledged at shutdown; they are delivered again to the partitions' next owners"
            );
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.quit.send(true);
        self.join();
        self.done.lock().expect("feed lock").take();
    }

    /// Waits (15 s at most) for the NATS thread; a thread stuck in a call
    /// to NATS is left to end with the process.
    fn join(&self) {
        let Some(thread) = self.thread.lock().expect("feed lock").take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("nats: the NATS thread did not end in 15 s; leaving it");
        }
    }
}

/// The async side: connect, set up, then (once `start` comes) own and
/// consume partitions until `quit`.
async fn main(
    shared: Arc<Shared>,
    addrs: Vec<async_nats::ServerAddr>,
    ready: Sender<Result<(), FeedError>>,
    start: oneshot::Receiver<()>,
    settle_rx: mpsc::UnboundedReceiver<Settle>,
    mut quit: watch::Receiver<bool>,
) {
    let options = &shared.options;
    let servers = options.servers.clone();
    let make = || {
        let status = shared.status.clone();
        let login = options.auth.login.described();
        Ok(
            connect::options(&options.auth, format!("normalizer {}", options.instance))?
                // Every request of the ownership loop answers or fails within it.
                .request_timeout(Some(Duration::from_secs(3)))
                .event_callback(move |event| {
                    let status = status.clone();
                    let login = login.clone();
                    async move { on_event(&status, &login, event) }
                }),
        )
    };
    let connect = connect::until_connected(&options.auth, &servers, &addrs, make);
    tokio::spawn(watch_outage(shared.status.clone(), servers.clone()));
    let client = tokio::select! {
        c = connect => match c {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(FeedError::Refused(e.0)));
                return;
            }
        },
        _ = quit.changed() => return,
    };
    let js = jetstream::new(client.clone());
    let set_up = tokio::select! {
        s = set_up(&shared, &js) => s,
        _ = quit.changed() => return,
    };
    let (stream, store) = match set_up {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    shared.status.ready.store(true, Ordering::SeqCst);
    let _ = ready.send(Ok(()));
    tokio::select! {
        _ = start => {}
        _ = quit.changed() => return,
    }
    tokio::spawn(settle_loop(shared.clone(), client.clone(), settle_rx));
    tokio::spawn(progress_loop(shared.clone(), client.clone()));
    let mut coordinator = Coordinator {
        shared: shared.clone(),
        store,
        stream,
        member: None,
        held: BTreeMap::new(),
        last_pending: Instant::now() - Duration::from_secs(60),
    };
    coordinator.run(&mut quit).await;
    let _ = client.flush().await;
}

/// Creates or checks the stream, the bucket and the consumers, retrying
/// while NATS or JetStream does not answer; a mismatch is fatal.
async fn set_up(
    shared: &Shared,
    js: &jetstream::Context,
) -> Result<(stream::Stream, jetstream::kv::Store), FeedError> {
    let options = &shared.options;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let attempt = async {
            let mut stream = setup::stream(js, options).await?;
            let epoch = stream.info().await?.created.unix_timestamp_nanos();
            check_consumers(&stream, options).await?;
            let store = setup::bucket(js, options).await?;
            anyhow::Ok((stream, store, epoch))
        };
        match attempt.await {
            Ok((stream, store, epoch)) => {
                shared.stream_epoch.store(epoch as u64, Ordering::SeqCst);
                if let Some(since) = waiting_since {
                    log::info!(
                        "nats: the stream {} is ready after {:.1} s",
                        options.stream,
                        since.elapsed().as_secs_f64()
                    );
                }
                return Ok((stream, store));
            }
            Err(e) => {
                if let Some(mismatch) = e.downcast_ref::<Mismatch>() {
                    return Err(FeedError::Mismatch(mismatch.0.clone()));
                }
                if waiting_since.is_none() {
                    log::warn!(
                        "nats: waiting for the stream {} at {} ({e:#}); as long as it takes",
                        options.stream,
                        options.servers
                    );
                    waiting_since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Every consumer on the stream must be one of ours for this partition
/// count: `p<n>-<token>`, n below it, filtered on partition n.
async fn check_consumers(stream: &stream::Stream, options: &NatsOptions) -> anyhow::Result<()> {
    let mut consumers = stream.consumers();
    while let Some(info) = consumers.next().await {
        let info = info?;
        let partition = parse_consumer(&info.name).map(|(n, _)| n);
        let fits = partition.is_some_and(|n| {
            n < options.partitions
                && info.config.filter_subject == partition_subject(&options.stream, n)
                && info.config.ack_policy == consumer::AckPolicy::All
        });
        if !fits {
            return Err(Mismatch(format!(
                "the stream {} has a consumer {} (filter {:?}) that is not one of this instance's {} partitions; remove it, or start with the --nats-partitions it was made for",
                options.stream, info.name, info.config.filter_subject, options.partitions
            ))
            .into());
        }
    }
    Ok(())
}

fn consumer_name(partition: u32, token: u64) -> String {
    format!("p{partition}-{token}")
}

fn parse_consumer(name: &str) -> Option<(u32, u64)> {
    let (p, t) = name.strip_prefix('p')?.split_once('-')?;
    Some((p.parse().ok()?, t.parse().ok()?))
}

/// How long a lost connection may take to come back (to another node of
/// the cluster, say) before it counts as an outage and is logged.
const NATS_OUTAGE_AFTER: Duration = Duration::from_secs(2);

/// Connection events: a disconnection starts the clock; only one that
/// lasts `NATS_OUTAGE_AFTER` is logged (by `watch_outage`), once when it
/// starts and once when it ends. A server that stops accepting this
/// instance's credentials (its authorization reloaded) is an ERROR, logged
/// once, and once more when it lets the instance in again: nothing is
/// fetched in between, and the client keeps trying.
fn on_event(status: &FeedStatus, login: &str, event: async_nats::Event) {
    if is_refusal(&event) {
        if !status.refused.swap(true, Ordering::SeqCst) {
            log::error!(
                "nats: the server refuses {login} (Authorization Violation); no work is taken from NATS until the server lets this instance in again; retrying"
            );
        }
        return;
    }
    let mut down = status.down_since.lock().expect("status lock");
    match event {
        async_nats::Event::Disconnected if down.is_none() => *down = Some(chrono::Utc::now()),
        async_nats::Event::Connected => {
            if status.refused.swap(false, Ordering::SeqCst) {
                log::info!("nats: the server accepts {login} again");
            }
            if let Some(since) = down.take() {
                let secs = (chrono::Utc::now() - since).num_milliseconds() as f64 / 1000.0;
                if status.down_logged.swap(false, Ordering::SeqCst) {
                    log::info!("nats: reachable again after {secs:.1} s");
                } else {
                    log::info!("nats: reconnected after {secs:.1} s");
                }
            }
        }
        async_nats::Event::Disconnected => {}
        // Each failed reconnection attempt says so: the outage line is enough.
        async_nats::Event::ClientError(e) => log::debug!("nats: {e}"),
        other => log::info!("nats: {other}"),
    }
}

/// The server's `-ERR 'Authorization Violation'` on a live connection, or a
/// reconnection attempt that it refused.
fn is_refusal(event: &async_nats::Event) -> bool {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => true,
        async_nats::Event::ClientError(async_nats::ClientError::Other(text)) => {
            text == &async_nats::ConnectErrorKind::AuthorizationViolation.to_string()
        }
        _ => false,
    }
}

/// Logs an outage of NATS once it has lasted `NATS_OUTAGE_AFTER`.
async fn watch_outage(status: Arc<FeedStatus>, servers: String) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let since = *status.down_since.lock().expect("status lock");
        let Some(since) = since else { continue };
        let long = (chrono::Utc::now() - since).to_std().unwrap_or_default() >= NATS_OUTAGE_AFTER;
        // A refusal is logged as what it is, not as an outage.
        let long = long && !status.refused.load(Ordering::SeqCst);
        if long && !status.down_logged.swap(true, Ordering::SeqCst) {
            log::warn!(
                "nats: unreachable since {} at {servers}; reconnecting as long as it takes",
                since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
    }
}

/// `partition 3` or `partitions 0,1,5`.
fn partitions_named(partitions: &[u32]) -> String {
    let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
    match list.len() {
        1 => format!("partition {}", list[0]),
        _ => format!("partitions {}", list.join(",")),
    }
}

/// A partition this instance holds a lease on.
struct Held {
    lease: Lease,
    /// The fencing token: the revision that granted the lease.
    token: u64,
    /// Consuming, once the fence is claimed and the consumer made.
    run: Option<Arc<Run>>,
    /// Being claimed (fence, consumer) by a task.
    claiming: bool,
    /// Asked to give it up once its messages in flight are settled.
    releasing: bool,
}

struct Coordinator {
    shared: Arc<Shared>,
    store: jetstream::kv::Store,
    stream: stream::Stream,
    member: Option<Lease>,
    held: BTreeMap<u32, Held>,
    last_pending: Instant,
}

/// What a claim task reports back.
enum Claimed {
    Running(u32, Arc<Run>),
    Failed(u32, String),
}

impl Coordinator {
    async fn run(&mut self, quit: &mut watch::Receiver<bool>) {
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

    async fn tick(&mut self, claimed: &mpsc::UnboundedSender<Claimed>) {
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

    fn instance(&self) -> &str {
        &self.shared.options.instance
    }

    /// Renews the member key and every partition lease.
    async fn renew(&mut self) {
        let me = self.shared.options.instance.clone();
        let member_key = owner::member_key(&me);
        self.member = match self.member {
            Some(lease) => match owner::renew(&self.store, &member_key, &me, lease).await {
                Renewal::Renewed(l) => Some(l),
                Renewal::Lost => None,
                Renewal::Unknown(_) => Some(lease),
            },
            None => None,
        };
        if self.member.is_none() {
            match owner::acquire(&self.store, &member_key, &me).await {
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
            match owner::renew(&self.store, &owner::partition_key(n), &me, held.lease).await {
                Renewal::Renewed(l) => {
                    held.lease = l;
                    if let Some(run) = &held.run {
                        *run.valid_until.lock().expect("run lock") = l.written + ttl - ttl / 10;
                    }
                }
                Renewal::Lost => expired.push(n),
                Renewal::Unknown(e) if !owner::holds(&held.lease, ttl) => {
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
    fn record(&self) {
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
    fn drop_fenced(&mut self) {
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
            log::warn!("nats: lost partition {n}: another instance claimed it in the database (fenced); fetching stopped");
            if let Some(held) = self.held.remove(&n) {
                if let Some(run) = held.run {
                    run.stop.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Claims free partitions up to this instance's share, and gives up
    /// those above it.
    async fn balance(&mut self, claimed: &mpsc::UnboundedSender<Claimed>) {
        let view = match owner::view(&self.store).await {
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
        let share = owner::fair_share(partitions, &view.members, &me) as usize;
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
                owner::release(&self.store, &owner::partition_key(n), held.lease).await;
                log::info!("nats: gave partition {n} up");
            }
        }
        // Below the share: take free partitions, starting at a place of
        // this instance's own so that instances rarely race for the same.
        let mut wanted = share.saturating_sub(keeping.len().min(share));
        let offset = crate::pipeline::route(&me, partitions as usize) as u32;
        for i in 0..partitions {
            if wanted == 0 {
                break;
            }
            let n = (offset + i) % partitions;
            if view.held.contains(&n) || self.held.contains_key(&n) {
                continue;
            }
            match owner::acquire(&self.store, &owner::partition_key(n), &me).await {
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

    fn on_claimed(&mut self, claimed: Claimed) {
        match claimed {
            Claimed::Running(n, run) => match self.held.get_mut(&n) {
                Some(held) if held.token == run.fence.token as u64 => {
                    held.claiming = false;
                    *run.valid_until.lock().expect("run lock") =
                        held.lease.written + self.shared.options.lease * 9 / 10;
                    if held.releasing || self.shared.stopping.load(Ordering::SeqCst) {
                        run.stop.store(true, Ordering::SeqCst);
                    }
                    log::info!("nats: owning partition {n} (token {})", held.token);
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

    async fn publish_status(&mut self) {
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
                        run.window.lock().expect("window lock").slots.len(),
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
    async fn release_all(&mut self) {
        for (n, held) in std::mem::take(&mut self.held) {
            if let Some(run) = &held.run {
                run.stop.store(true, Ordering::SeqCst);
            }
            owner::release(&self.store, &owner::partition_key(n), held.lease).await;
        }
        if let Some(lease) = self.member.take() {
            owner::release(&self.store, &owner::member_key(self.instance()), lease).await;
        }
        match owner::release_named(&self.store, self.instance()).await {
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
async fn take_over(
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
    let (reply, claimed) = oneshot::channel();
    shared
        .claims
        .send(Claim {
            fence: fence.clone(),
            reply,
        })
        .map_err(|_| anyhow::anyhow!("shutting down"))?;
    let resume = match claimed.await? {
        Ok(Some(resume)) => resume,
        Ok(None) => anyhow::bail!("a later owner's token is already in the database"),
        Err(failure) => anyhow::bail!("cannot claim its fence: {failure}"),
    };
    // This consumer starts after the partition's resume point in the
    // database, or after the newest previous consumer's ack floor if that
    // is further and can be read (its node may be gone with it). Both only
    // cover messages whose outcomes are committed; messages after them
    // that were committed come again, and find their own write token.
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
    let mut settled = resume;
    if let Some((_, name)) = previous.last() {
        // Given a second: its node may be down.
        match tokio::time::timeout(Duration::from_secs(1), stream.consumer_info(name)).await {
            Ok(Ok(info)) => settled = settled.max(info.ack_floor.stream_sequence),
            Ok(Err(e)) => log::debug!(
                "nats: partition {n}: the previous consumer {name} cannot be read ({e}); starting after {resume}, the database's resume point"
            ),
            Err(_) => log::debug!(
                "nats: partition {n}: the previous consumer {name} does not answer; starting after {resume}, the database's resume point"
            ),
        }
    }
    let name = consumer_name(n, token);
    let consumer: consumer::PullConsumer = stream
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
        window: Mutex::new(Window::default()),
        fetching: AtomicBool::new(true),
        valid_until: Mutex::new(valid_until),
    });
    tokio::spawn(fetch_loop(shared.clone(), consumer, run.clone()));
    Ok(run)
}

/// Fetches partition messages while this instance may: the lease holds,
/// the database is up, fewer than `max_in_flight` are out.
async fn fetch_loop(shared: Arc<Shared>, consumer: consumer::PullConsumer, run: Arc<Run>) {
    fetch(&shared, consumer, &run).await;
    run.fetching.store(false, Ordering::SeqCst);
}

/// How long a fetch may go without a message or its closing status before
/// it is given up (a server that lost the request, a leader that moved).
const FETCH_SILENCE: Duration = Duration::from_secs(5);

/// The most one fetch asks for.
const FETCH_BATCH: usize = 500;

/// How long fetches may fail (or go unanswered) in a row before the
/// partition is taken again with a new consumer: a consumer of one replica
/// is out of reach while its node is down.
const CONSUMER_UNREACHABLE: Duration = Duration::from_secs(5);

async fn fetch(shared: &Arc<Shared>, mut consumer: consumer::PullConsumer, run: &Arc<Run>) {
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
        if run.stop.load(Ordering::SeqCst)
            || run.fenced.load(Ordering::SeqCst)
            || run.gap.load(Ordering::SeqCst)
        {
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
        let mut batch = match batch {
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
        let mut got = 0;
        loop {
            let message = match tokio::time::timeout(FETCH_SILENCE, batch.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    failing = None;
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
            // Stopped: the rest of this fetch is not taken; the
            // partition's next consumer starts before it.
            if run.stop.load(Ordering::SeqCst)
                || run.fenced.load(Ordering::SeqCst)
                || run.gap.load(Ordering::SeqCst)
            {
                break;
            }
            match message {
                Ok(message) => {
                    got += 1;
                    failing = None;
                    deliver(shared, run, message)
                }
                Err(e) => {
                    log::debug!("nats: partition {}: {e}", run.partition);
                    if consumer_gone(&mut consumer).await {
                        gone(run);
                        return;
                    }
                    failing.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if got == 0 {
            // Nothing there: ask again shortly, not in a tight loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The run's consumer is gone: another instance took the partition over
/// and removed it, or its node restarted without it. Taken again: from the
/// resume point if this instance still owns the partition, not at all if
/// it does not (its lease is lost, its claim is refused).
fn gone(run: &Run) {
    log::warn!(
        "nats: partition {}: its consumer is gone (another instance took the partition over, or its node restarted); fetching stopped",
        run.partition
    );
    run.gap.store(true, Ordering::SeqCst);
}

async fn consumer_gone(consumer: &mut consumer::PullConsumer) -> bool {
    match consumer.info().await {
        Ok(_) => false,
        Err(e) => e.to_string().contains("consumer not found"),
    }
}

/// Hands a fetched message to the feeder.
fn deliver(shared: &Shared, run: &Arc<Run>, message: jetstream::Message) {
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
            fence: run.fence.clone(),
        },
    };
    if shared.lines.send(fetched).is_err() {
        settle_locally(shared, ticket);
    }
}

fn settle_locally(shared: &Shared, ticket: u64) -> Option<InFlight> {
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
async fn settle_loop(
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
                let ack = entry
                    .run
                    .window
                    .lock()
                    .expect("window lock")
                    .settled(entry.sequence, s.ack);
                if let Some((reply, count, through)) = ack {
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
async fn progress_loop(shared: Arc<Shared>, client: async_nats::Client) {
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

/// The feeder thread: fetched messages into the worker pool.
fn feed_workers(
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

/// The ack thread: each outcome settles its message.
fn settle_outcomes(shared: &Shared, acks: Receiver<Done>, on_done: &(dyn Fn(&Done) + Sync)) {
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

/// The bridge thread: fence claims on the database, and whether the
/// database is down (fetching pauses then).
fn run_claims(shared: &Shared, db: &Database, claims: &Receiver<Claim>, done: &Receiver<()>) {
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

/// The records thread: each partition's settled point into its fence row
/// (the latest of each run's, whatever queued meanwhile). Not while the
/// database is down: the next ownership tick hands it again.
fn run_records(shared: &Shared, db: &Database, records: &Receiver<Record>, done: &Receiver<()>) {
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

    fn subject(n: u64) -> Option<Subject> {
        Some(Subject::from(format!("ack.{n}")))
    }

    #[test]
    fn the_acknowledgement_point_never_passes_an_uncommitted_message() {
        let mut w = Window::default();
        for n in 1..=5 {
            w.delivered(n, subject(n));
        }
        // 2 and 3 commit first: nothing before them is done yet.
        assert!(w.settled(2, true).is_none());
        assert!(w.settled(3, true).is_none());
        // 1 commits: 1 to 3 are acknowledged with one ack on 3, settled
        // through 3.
        let (reply, count, through) = w.settled(1, true).unwrap();
        assert_eq!((reply.as_str(), count, through), ("ack.3", 3, 3));
        // 4 fails (fenced, cancelled): never acknowledged, 5 waits behind it.
        assert!(w.settled(4, false).is_none());
        assert!(w.settled(5, true).is_none());
        // Redelivered and committed: 4 and 5 go.
        w.delivered(4, subject(40));
        let (reply, count, through) = w.settled(4, true).unwrap();
        assert_eq!((reply.as_str(), count, through), ("ack.5", 2, 5));
        assert!(w.slots.is_empty());
    }

    #[test]
    fn an_overlapping_redelivery_holds_its_message_until_both_are_settled() {
        let mut w = Window::default();
        w.delivered(7, subject(7));
        w.delivered(7, subject(70));
        assert!(w.settled(7, true).is_none());
        assert_eq!(w.settled(7, true).unwrap().0.as_str(), "ack.70");
    }
}
