//! The feed's public face: [`Feed`] connects and sets up the stream and the
//! bucket, starts the blocking threads and the async side (one tokio
//! runtime on its own thread), and ends them; the connection's events and
//! outages are logged here. Ownership, fetching and settling are rooms of
//! their own (`ownership`, `fetch`, `settle`).
//!
//! A message is acknowledged only after the transaction that recorded its
//! outcome committed. A message in flight is marked in progress every third
//! of `ack_wait`, so the server does not redeliver it while the database is
//! down; fetching pauses while the database is down or a partition has
//! `max_in_flight` messages out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::connect;
use super::fetch::{feed_workers, Fetched};
use super::ownership::{parse_consumer, run_claims, Claim, Coordinator};
use super::settle::{
    progress_loop, run_records, settle_loop, settle_outcomes, InFlight, Record, Settle,
};
use super::setup::{self, partition_subject, Mismatch};
use super::{FeedStatus, NatsOptions};
use crate::db::Database;
use crate::pipeline::{Done, Workers};

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

/// State shared by the async tasks and the blocking threads.
pub(super) struct Shared {
    pub(super) options: NatsOptions,
    pub(super) status: Arc<FeedStatus>,
    pub(super) in_flight: Mutex<HashMap<u64, InFlight>>,
    pub(super) next_ticket: AtomicU64,
    pub(super) lines: Sender<Fetched>,
    pub(super) claims: Sender<Claim>,
    pub(super) records: Sender<Record>,
    pub(super) settle: mpsc::UnboundedSender<Settle>,
    pub(super) db_down: AtomicBool,
    /// No new fetches: the instance is shutting down.
    pub(super) stopping: AtomicBool,
    /// The stream's creation time, in every write token.
    pub(super) stream_epoch: AtomicU64,
}

/// A running feed: see the module's documentation.
pub struct Feed {
    pub(super) shared: Arc<Shared>,
    pub(super) lines: Receiver<Fetched>,
    pub(super) claims: Receiver<Claim>,
    pub(super) records: Receiver<Record>,
    pub(super) start: Mutex<Option<oneshot::Sender<()>>>,
    pub(super) quit: watch::Sender<bool>,
    pub(super) thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Closed when the blocking threads must end.
    pub(super) done: Mutex<Option<Sender<()>>>,
    pub(super) done_rx: Receiver<()>,
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
pub(super) async fn main(
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
pub(super) async fn set_up(
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
pub(super) async fn check_consumers(
    stream: &stream::Stream,
    options: &NatsOptions,
) -> anyhow::Result<()> {
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

/// How long a lost connection may take to come back (to another node of
/// the cluster, say) before it counts as an outage and is logged.
pub(super) const NATS_OUTAGE_AFTER: Duration = Duration::from_secs(2);

/// Connection events: a disconnection starts the clock; only one that
/// lasts `NATS_OUTAGE_AFTER` is logged (by `watch_outage`), once when it
/// starts and once when it ends. A server that stops accepting this
/// instance's credentials (its authorization reloaded) is an ERROR, logged
/// once, and once more when it lets the instance in again: nothing is
/// fetched in between, and the client keeps trying.
pub(super) fn on_event(status: &FeedStatus, login: &str, event: async_nats::Event) {
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
                    log::info!(event = "nats_back", seconds = secs; "nats: reachable again after {secs:.1} s");
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
pub(super) fn is_refusal(event: &async_nats::Event) -> bool {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => true,
        async_nats::Event::ClientError(async_nats::ClientError::Other(text)) => {
            text == &async_nats::ConnectErrorKind::AuthorizationViolation.to_string()
        }
        _ => false,
    }
}

/// Logs an outage of NATS once it has lasted `NATS_OUTAGE_AFTER`.
pub(super) async fn watch_outage(status: Arc<FeedStatus>, servers: String) {
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
