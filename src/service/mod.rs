//! `normalizer serve`: a system service fed through a Unix domain socket.
//!
//! Producers write JSON lines; for every non-blank line the service writes
//! back one acknowledgement once the line's outcome is committed
//! ([`protocol`]). `seq` is the line's 1-based number on that connection
//! (blank lines are numbered but, having no outcome, not acknowledged). A
//! line that is not acknowledged was not applied, or its ack was lost:
//! sending it again is safe either way.
//!
//! [`serve`] binds the socket and turns signals into a shutdown message;
//! [`run`] is the loop on any listener: an accept loop with a handler per
//! producer (a reader thread that submits lines to the worker pool and
//! blocks while its queues are full, so the socket is simply not read, and
//! a writer thread for the acks), a stats thread, and a drain bounded by
//! the shutdown timeout.

pub mod client;
mod connection;
mod http;

/// How soon `/healthz` says an outage: a failed check comes at most
/// `EVERY` after the last good one, an unanswered one counts as failed
/// after `SILENT`.
pub use http::{EVERY as HEALTH_CHECK_EVERY, SILENT as HEALTH_CHECK_SILENT};
pub mod logfile;
pub mod protocol;
pub mod stats;

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::db::Database;
use crate::feed::{Feed, NatsOptions};
use crate::mqtt::{MqttOptions, Source};
use crate::pipeline::{Done, IngestOptions, Summary, Workers};
pub use http::MetricsListener;
use logfile::LogFile;
use protocol::Refusal;
use stats::{write_atomically, Report};

/// How the service runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// The socket's path; none: no socket (the NATS feed or the MQTT
    /// broker alone).
    pub socket: Option<PathBuf>,
    /// The socket file's mode (0660 by default: the service's group).
    pub mode: u32,
    /// Most producers connected at once.
    pub max_connections: usize,
    /// How long a shutdown may take before queued work is handed back.
    pub shutdown_timeout: Duration,
    /// How often to log the stats line and write the metrics file.
    pub stats_interval: Duration,
    /// The Prometheus text file.
    pub metrics_file: Option<PathBuf>,
    /// Where to serve `/metrics` and `/healthz` over HTTP.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The worker pool.
    pub workers: IngestOptions,
    /// The NATS JetStream feed, when the service consumes one.
    pub nats: Option<NatsOptions>,
    /// The MQTT broker, when the service reads one.
    pub mqtt: Option<MqttOptions>,
}

/// The sources beside the socket that a running service reads.
#[derive(Clone, Copy, Default)]
pub struct Sources<'a> {
    /// The NATS JetStream feed.
    pub nats: Option<&'a Feed>,
    /// The MQTT broker.
    pub mqtt: Option<&'a Source>,
}

impl Sources<'_> {
    /// Stops taking new messages from the sources.
    fn stop_reading(&self) {
        if let Some(feed) = self.nats {
            feed.stop_fetching();
        }
        if let Some(mqtt) = self.mqtt {
            mqtt.stop_reading();
        }
    }

    /// Messages taken from the sources whose outcome is not back.
    fn in_flight(&self) -> u64 {
        self.nats.map_or(0, |f| f.in_flight() as u64) + self.mqtt.map_or(0, Source::in_flight)
    }

    fn end(&self) {
        if let Some(feed) = self.nats {
            feed.end();
        }
        if let Some(mqtt) = self.mqtt {
            mqtt.end();
        }
    }
}

/// How the service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on a signal; everything acknowledged is committed.
    Clean,
    /// The database stayed unreachable beyond `max_outage`.
    GaveUp,
}

struct Shared {
    shutting_down: AtomicBool,
    gave_up: AtomicBool,
    streams: Mutex<HashMap<u64, UnixStream>>,
    next_id: AtomicU64,
    summary: Mutex<Summary>,
    socket: Option<PathBuf>,
    /// Wakes a service without a socket when shutdown begins.
    wake: Sender<()>,
    /// Producers connected now.
    active: AtomicUsize,
    /// Lines read and never acknowledged, of producers cut off.
    unacknowledged: AtomicU64,
    /// Producers cut off with lines unacknowledged.
    cut_off: AtomicU64,
}

impl Shared {
    fn new(socket: Option<PathBuf>, wake: Sender<()>) -> Shared {
        Shared {
            shutting_down: AtomicBool::new(false),
            gave_up: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            summary: Mutex::new(Summary::new()),
            socket,
            wake,
            active: AtomicUsize::new(0),
            unacknowledged: AtomicU64::new(0),
            cut_off: AtomicU64::new(0),
        }
    }

    /// Logs the last line (what was done, what was left unacknowledged)
    /// and says how the service ended.
    fn stopped(&self) -> Exit {
        let summary = self.summary.lock().expect("summary lock");
        let unacknowledged = match self.unacknowledged.load(Ordering::SeqCst) {
            0 => String::new(),
            n => format!(
                "; {n} lines of {} producers left unacknowledged (sending them again is safe)",
                self.cut_off.load(Ordering::SeqCst)
            ),
        };
        log::info!(
            "stopped: processed {}, duplicate {}, dead letter {}{unacknowledged}",
            summary.processed,
            summary.duplicates,
            summary.dead_letters
        );
        if self.gave_up.load(Ordering::SeqCst) {
            Exit::GaveUp
        } else {
            Exit::Clean
        }
    }

    /// Stops accepting and stops reading: the readers see the end of their
    /// streams, the work in flight finishes and is acknowledged.
    fn begin_shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        notify("STOPPING=1");
        // Wake the accept loop.
        if let Some(socket) = &self.socket {
            let _ = UnixStream::connect(socket);
        }
        let _ = self.wake.try_send(());
        for stream in self.streams.lock().expect("streams lock").values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    /// Takes a committed line's outcome into the summary; a failure that
    /// gave up on the database shuts the service down.
    fn record(&self, done: &Done) {
        match &done.result {
            Ok(outcome) => self.summary.lock().expect("summary lock").record(outcome),
            Err(failure) => {
                if failure.is_gave_up() && !self.gave_up.swap(true, Ordering::SeqCst) {
                    log::error!("the database stayed unreachable: shutting down");
                    self.begin_shutdown();
                }
            }
        }
    }
}

/// Binds the socket, replacing a stale socket file from a crash but never
/// stealing a live one, and sets its mode.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            );
        }
        match UnixStream::connect(path) {
            Ok(_) => bail!("another process is listening on {}", path.display()),
            Err(_) => {
                log::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove the stale socket {}", path.display())
                })?;
            }
        }
    }
    // The socket is created with the mode already, not chmod-ed after a
    // window in which others could connect.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Runs the service on `options.socket` until SIGTERM or SIGINT (or the
/// database stays unreachable too long). SIGHUP reopens `log`.
pub fn serve(
    db: &Database,
    options: &ServeOptions,
    log: Option<Arc<LogFile>>,
) -> anyhow::Result<Exit> {
    let listener = match &options.socket {
        Some(path) => Some(bind(path, options.mode)?),
        None => None,
    };
    let signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let (shutdown, on_shutdown) = bounded::<()>(1);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn_scoped(scope, || handle_signals(signals, log, shutdown))
            .expect("spawn the signal thread");
        let connected = connected(options.nats.as_ref(), |o| Feed::connect(o, &on_shutdown))
            .and_then(|feed| {
                let mqtt = connected(options.mqtt.as_ref(), |o| Source::connect(o, &on_shutdown))?;
                Ok((feed, mqtt))
            });
        let (feed, mqtt) = match connected {
            Ok(sources) => sources,
            // A shutdown before the sources were up is a clean end.
            Err(stop) => {
                signal_handle.close();
                return stop.map_or(Ok(Exit::Clean), Err);
            }
        };
        let metrics = match options
            .metrics_listen
            .map(MetricsListener::bind)
            .transpose()
        {
            Ok(metrics) => {
                if let Some(addr) = options.metrics_listen {
                    log::info!("metrics on http://{addr}/metrics, health on http://{addr}/healthz");
                }
                metrics
            }
            Err(e) => {
                signal_handle.close();
                return Err(e);
            }
        };
        // The socket listens, the feed is set up and the database answered
        // (its migrations ran).
        notify("READY=1");
        let sources = Sources {
            nats: feed.as_ref(),
            mqtt: mqtt.as_ref(),
        };
        let exit = run(db, options, listener, sources, metrics, on_shutdown);
        signal_handle.close();
        Ok(exit)
    })
}

/// Connects a source when it is configured (`Ok(None)` when it is not).
/// `Err(None)`: a shutdown came first; `Err(Some(..))`: a set-up error.
fn connected<O: Clone, S, E: Into<anyhow::Error>>(
    options: Option<&O>,
    connect: impl FnOnce(O) -> Result<Option<S>, E>,
) -> Result<Option<S>, Option<anyhow::Error>> {
    match options.cloned().map(connect) {
        None => Ok(None),
        Some(Ok(Some(source))) => Ok(Some(source)),
        Some(Ok(None)) => Err(None),
        Some(Err(e)) => Err(Some(e.into())),
    }
}

/// Tells systemd (a `Type=notify` unit) how the service is: a datagram to
/// `$NOTIFY_SOCKET`, when there is one (sd_notify(3)).
fn notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        log::warn!("cannot tell systemd {state}: {e}");
    }
}

fn handle_signals(mut signals: Signals, log: Option<Arc<LogFile>>, shutdown: Sender<()>) {
    for signal in signals.forever() {
        match (signal, &log) {
            (SIGHUP, Some(file)) => match file.reopen() {
                Ok(()) => log::info!("SIGHUP: log file reopened"),
                Err(e) => eprintln!("normalizer: cannot reopen the log file: {e}"),
            },
            (SIGHUP, None) => log::info!("SIGHUP: logging to stderr, nothing to reopen"),
            _ => {
                log::info!("signal {signal}: shutting down");
                let _ = shutdown.try_send(());
            }
        }
    }
}

/// The service on a listener the caller bound to `options.socket` and on
/// connected sources (a NATS feed, an MQTT broker; any of them), until a
/// message (or the sender's drop) on `shutdown`, or until the database
/// stays unreachable too long: the socket feeds the worker pool, one
/// handler per producer; the feed feeds it the partitions this instance
/// owns; the MQTT source what the broker sends. `metrics`, when given,
/// serves `/metrics` and `/healthz` until the end.
pub fn run(
    db: &Database,
    options: &ServeOptions,
    listener: Option<UnixListener>,
    sources: Sources,
    metrics: Option<MetricsListener>,
    shutdown: Receiver<()>,
) -> Exit {
    let (wake, woken) = bounded::<()>(1);
    let shared = Shared::new(listener.as_ref().and(options.socket.clone()), wake);
    let stop = AtomicBool::new(false);
    let record = |done: &Done| shared.record(done);
    let on_done: &(dyn Fn(&Done) + Sync) = &record;
    log_serving(db, options, listener.is_some());
    let health = http::Health::new();
    std::thread::scope(|outer| {
        let workers = Workers::spawn(outer, db, &options.workers, &stop);
        let (stats_stop, stats_stopped) = bounded::<()>(1);
        let (finished, on_finished) = bounded::<()>(0);
        std::thread::scope(|scope| {
            let (workers, shared) = (&workers, &shared);
            let watch = Watchers {
                db,
                options,
                shared,
                workers,
                sources,
                health: &health,
                stopped: stats_stopped,
            };
            watch.spawn(scope, shutdown, on_finished, metrics);
            if let Some(feed) = sources.nats {
                feed.run(scope, db, workers, on_done);
            }
            if let Some(mqtt) = sources.mqtt {
                mqtt.run(scope, workers, on_done);
            }
            let connections_done = match &listener {
                Some(listener) => accept(scope, listener, workers, shared, options),
                None => {
                    let _ = woken.recv();
                    bounded(1).1
                }
            };
            drop(listener);
            if let Some(path) = &shared.socket {
                let _ = std::fs::remove_file(path);
            }
            drain(
                db,
                options,
                shared,
                workers,
                sources,
                &stop,
                &connections_done,
            );
            drop(stats_stop);
            drop(finished);
        });
    });
    shared.stopped()
}

/// `serving on <socket> and <NATS stream> with N workers, database <url>`.
fn log_serving(db: &Database, options: &ServeOptions, listening: bool) {
    let mut feeds = Vec::new();
    if let (Some(path), true) = (&options.socket, listening) {
        feeds.push(format!("{} (mode {:04o})", path.display(), options.mode));
    }
    if let Some(nats) = &options.nats {
        feeds.push(format!(
            "NATS stream {} at {} as {}",
            nats.stream, nats.servers, nats.instance
        ));
    }
    if let Some(mqtt) = &options.mqtt {
        feeds.push(format!(
            "MQTT {} at {} as {}",
            mqtt.topics.join(", "),
            mqtt.address(),
            mqtt.client_id
        ));
    }
    log::info!(
        "serving on {} with {} workers, database {}",
        feeds.join(" and "),
        options.workers.workers,
        db.url()
    );
}

/// The threads that watch a running service: the one that turns the
/// shutdown signal into a shutdown, the stats line's, and (with
/// `--metrics-listen`) the database prober and the HTTP server. All end
/// when `stopped` closes (or, the first, when the service finished).
struct Watchers<'a> {
    db: &'a Database,
    options: &'a ServeOptions,
    shared: &'a Shared,
    workers: &'a Workers,
    sources: Sources<'a>,
    health: &'a http::Health,
    stopped: Receiver<()>,
}

impl<'a> Watchers<'a> {
    fn spawn<'scope>(
        self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        shutdown: Receiver<()>,
        finished: Receiver<()>,
        metrics: Option<MetricsListener>,
    ) where
        'a: 'scope,
    {
        let Watchers {
            db,
            options,
            shared,
            workers,
            sources,
            health,
            stopped,
        } = self;
        std::thread::Builder::new()
            .name("shutdown".into())
            .spawn_scoped(scope, move || {
                crossbeam_channel::select! {
                    recv(shutdown) -> _ => shared.begin_shutdown(),
                    recv(finished) -> _ => {}
                }
            })
            .expect("spawn the shutdown thread");
        if let Some(metrics) = metrics {
            let probe_stopped = stopped.clone();
            std::thread::Builder::new()
                .name("health".into())
                .spawn_scoped(scope, move || http::probe(db, health, probe_stopped))
                .expect("spawn the health thread");
            let http_stopped = stopped.clone();
            let status = sources.nats.map(Feed::status);
            let mqtt = sources.mqtt.map(Source::status);
            std::thread::Builder::new()
                .name("metrics-http".into())
                .spawn_scoped(scope, move || {
                    let render = || {
                        let summary = summary_now(db, shared);
                        let mut report = report(db, shared, workers, &summary, 0.0);
                        report.feed = status.as_deref();
                        report.mqtt = mqtt.as_deref();
                        report.down_since = health.down_since(db);
                        report.prometheus()
                    };
                    http::serve(metrics, db, health, render, http_stopped)
                })
                .expect("spawn the metrics thread");
        }
        std::thread::Builder::new()
            .name("stats".into())
            .spawn_scoped(scope, move || {
                report_stats(db, options, shared, workers, sources, stopped)
            })
            .expect("spawn the stats thread");
    }
}

/// Accepts producers until shutdown, each on a handler thread of `scope`.
/// Returns the channel on which each handler says it is done.
fn accept<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    listener: &UnixListener,
    workers: &'scope Workers,
    shared: &'scope Shared,
    options: &'scope ServeOptions,
) -> Receiver<()> {
    // A wake-up for the drain, not a count: one pending is enough.
    let (connection_done, connections_done) = bounded::<()>(1);
    for stream in listener.incoming() {
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                continue;
            }
        };
        if shared.active.load(Ordering::SeqCst) >= options.max_connections {
            log::warn!(
                "refused a producer ({}): {} connected, the limit",
                connection::peer(&stream),
                options.max_connections
            );
            let refusal = Refusal {
                error: format!(
                    "too many connections: the limit is {}; try again later",
                    options.max_connections
                ),
            };
            let _ = writeln!(
                stream,
                "{}",
                serde_json::to_string(&refusal).expect("serializable")
            );
            continue;
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared
                .streams
                .lock()
                .expect("streams lock")
                .insert(id, clone);
        }
        let connection_done = connection_done.clone();
        std::thread::Builder::new()
            .name(format!("producer-{id}"))
            .spawn_scoped(scope, move || {
                connection::serve(id, stream, workers, shared, options);
                shared.streams.lock().expect("streams lock").remove(&id);
                shared.active.fetch_sub(1, Ordering::SeqCst);
                let _ = connection_done.try_send(());
            })
            .expect("spawn a connection thread");
    }
    connections_done
}

/// Gives the work in flight `shutdown_timeout` to finish; then hands back
/// what is still queued and stops retrying.
fn drain(
    db: &Database,
    options: &ServeOptions,
    shared: &Shared,
    workers: &Workers,
    sources: Sources,
    stop: &AtomicBool,
    connections_done: &Receiver<()>,
) {
    let deadline = Instant::now() + options.shutdown_timeout;
    sources.stop_reading();
    while shared.active.load(Ordering::SeqCst) > 0
        && connections_done.recv_deadline(deadline).is_ok()
    {}
    let feed_busy = || sources.in_flight() > 0;
    while feed_busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if shared.active.load(Ordering::SeqCst) > 0 || feed_busy() {
        log::warn!(
            "shutdown timeout: handing back queued work unacknowledged ({} jobs)",
            workers.queued()
        );
        stop.store(true, Ordering::SeqCst);
        db.cancel_retries();
    }
    sources.end();
}

/// The counters now: the outcomes so far and the database's.
fn summary_now(db: &Database, shared: &Shared) -> Summary {
    let mut summary = shared.summary.lock().expect("summary lock").clone();
    summary.finish(db.counters(), Duration::ZERO);
    summary
}

/// What the stats line and the metrics show now.
fn report<'a>(
    db: &Database,
    shared: &Shared,
    workers: &Workers,
    summary: &'a Summary,
    rate: f64,
) -> Report<'a> {
    let (open, idle) = db.pool_state();
    Report {
        summary,
        rate,
        in_use: open.saturating_sub(idle),
        idle,
        queued: workers.queued(),
        producers: shared.active.load(Ordering::SeqCst),
        down_since: db.down_since(),
        feed: None,
        mqtt: None,
    }
}

fn report_stats(
    db: &Database,
    options: &ServeOptions,
    shared: &Shared,
    workers: &Workers,
    sources: Sources,
    stopped: Receiver<()>,
) {
    let status = sources.nats.map(Feed::status);
    let mqtt = sources.mqtt.map(Source::status);
    let mut last = (Instant::now(), 0u64);
    loop {
        let finished = match stopped.recv_timeout(options.stats_interval) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) => continue,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let summary = summary_now(db, shared);
        let now = Instant::now();
        let rate = (summary.completed - last.1) as f64
            / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, summary.completed);
        let mut report = report(db, shared, workers, &summary, rate);
        report.feed = status.as_deref();
        report.mqtt = mqtt.as_deref();
        log::info!(
            event = "stats", rate = rate, processed = summary.processed,
            duplicate = summary.duplicates, dead_letter = summary.dead_letters,
            queued = report.queued, producers = report.producers, pool_in_use = report.in_use,
            pool_idle = report.idle, database_up = report.down_since.is_none();
            "{}",
            report.line()
        );
        if let Some(path) = &options.metrics_file {
            if let Err(e) = write_atomically(path, &report.prometheus()) {
                log::warn!("cannot write the metrics file {}: {e}", path.display());
            }
        }
        if finished {
            return;
        }
    }
}
