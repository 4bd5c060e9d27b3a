//! `normalizer serve`: a system service fed through a Unix domain socket.
//!
//! Producers write JSON lines; for every non-blank line the service writes
//! back one JSON line once the line's outcome is committed:
//! `{"seq":N,"id":"...","outcome":"processed|duplicate|dead_letter","kind":...}`.
//! `seq` is the line's 1-based number on that connection (blank lines are
//! numbered but, having no outcome, not acknowledged). A line that is not
//! acknowledged was not applied, or its ack was lost: sending it again is
//! safe either way.
//!
//! Each connection has a reader thread, which submits lines to the worker
//! pool and blocks while the pool's queues are full (backpressure: the
//! socket is simply not read), and a writer thread for the acks.

pub mod client;
pub mod logfile;
pub mod stats;

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use serde_json::json;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::db::Database;
use crate::input::LineReader;
use crate::outcome::Outcome;
use crate::pipeline::{Done, IngestOptions, Summary, Workers};
use logfile::LogFile;
use stats::{write_atomically, Report};

/// How the service runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// The socket's path.
    pub socket: PathBuf,
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
    /// The worker pool.
    pub workers: IngestOptions,
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
    socket: PathBuf,
}

impl Shared {
    /// Stops accepting and stops reading: the readers see the end of their
    /// streams, the work in flight finishes and is acknowledged.
    fn begin_shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
        for stream in self.streams.lock().expect("streams lock").values() {
            let _ = stream.shutdown(Shutdown::Read);
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

/// Runs the service until SIGTERM or SIGINT (or the database stays
/// unreachable too long). SIGHUP reopens `log`.
pub fn serve(
    db: &Database,
    options: &ServeOptions,
    log: Option<Arc<LogFile>>,
) -> anyhow::Result<Exit> {
    let listener = bind(&options.socket, options.mode)?;
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let shared = Shared {
        shutting_down: AtomicBool::new(false),
        gave_up: AtomicBool::new(false),
        streams: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        summary: Mutex::new(Summary::new()),
        socket: options.socket.clone(),
    };
    let stop = AtomicBool::new(false);
    let active = AtomicUsize::new(0);
    let (stats_stop, stats_stopped) = bounded::<()>(1);
    log::info!(
        "serving on {} (mode {:04o}) with {} workers, database {}",
        options.socket.display(),
        options.mode,
        options.workers.workers,
        db.url()
    );

    let (conn_done, conns_done) = crossbeam_channel::unbounded::<()>();
    std::thread::scope(|outer| {
        let workers = Workers::spawn(outer, db, &options.workers, &stop);
        std::thread::scope(|scope| {
            let workers = &workers;
            let (shared, active, stop) = (&shared, &active, &stop);
            std::thread::Builder::new()
                .name("signals".into())
                .spawn_scoped(scope, move || {
                    for signal in signals.forever() {
                        match signal {
                            SIGHUP => match &log {
                                Some(file) => match file.reopen() {
                                    Ok(()) => log::info!("SIGHUP: log file reopened"),
                                    Err(e) => {
                                        eprintln!("normalizer: cannot reopen the log file: {e}")
                                    }
                                },
                                None => log::info!("SIGHUP: logging to stderr, nothing to reopen"),
                            },
                            _ => {
                                log::info!("signal {signal}: shutting down");
                                shared.begin_shutdown();
                            }
                        }
                    }
                })
                .expect("spawn the signal thread");
            std::thread::Builder::new()
                .name("stats".into())
                .spawn_scoped(scope, move || {
                    report_stats(db, options, shared, workers, active, stats_stopped)
                })
                .expect("spawn the stats thread");

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
                if active.load(Ordering::SeqCst) >= options.max_connections {
                    log::warn!(
                        "refused a producer: {} connected, the limit",
                        options.max_connections
                    );
                    let line = json!({"error": format!("too many connections: the limit is {}; try again later", options.max_connections)});
                    let _ = writeln!(stream, "{line}");
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let conn_done = conn_done.clone();
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    shared
                        .streams
                        .lock()
                        .expect("streams lock")
                        .insert(id, clone);
                }
                std::thread::Builder::new()
                    .name(format!("producer-{id}"))
                    .spawn_scoped(scope, move || {
                        serve_connection(id, stream, workers, shared, options);
                        shared.streams.lock().expect("streams lock").remove(&id);
                        active.fetch_sub(1, Ordering::SeqCst);
                        let _ = conn_done.send(());
                    })
                    .expect("spawn a connection thread");
            }
            drop(listener);
            let _ = std::fs::remove_file(&options.socket);
            // Give the work in flight `shutdown_timeout` to finish; then hand
            // back what is still queued and stop retrying.
            let deadline = Instant::now() + options.shutdown_timeout;
            while active.load(Ordering::SeqCst) > 0 && conns_done.recv_deadline(deadline).is_ok() {}
            if active.load(Ordering::SeqCst) > 0 {
                log::warn!(
                    "shutdown timeout: handing back queued work unacknowledged ({} jobs)",
                    workers.queued()
                );
                stop.store(true, Ordering::SeqCst);
                db.cancel_retries();
            }
            drop(stats_stop);
            signal_handle.close();
        });
    });
    let summary = shared.summary.lock().expect("summary lock");
    log::info!(
        "stopped: processed {}, duplicate {}, dead letter {}",
        summary.processed,
        summary.duplicates,
        summary.dead_letters
    );
    Ok(if shared.gave_up.load(Ordering::SeqCst) {
        Exit::GaveUp
    } else {
        Exit::Clean
    })
}

fn serve_connection(
    id: u64,
    stream: UnixStream,
    workers: &Workers,
    shared: &Shared,
    options: &ServeOptions,
) {
    log::debug!("producer {id} connected");
    let Ok(write_half) = stream.try_clone() else {
        log::warn!("producer {id}: cannot clone the stream");
        return;
    };
    let (reply, acks) = bounded::<Done>(options.workers.queue_per_worker.max(16));
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(format!("acks-{id}"))
            .spawn_scoped(scope, || write_acks(id, write_half, acks, shared))
            .expect("spawn an ack writer");
        let mut reader = LineReader::new(BufReader::with_capacity(64 * 1024, &stream));
        loop {
            match reader.next_line() {
                Ok(Some(line)) => {
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        break;
                    }
                    if workers.submit(line.number, line, &reply) == Some(false) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::info!("producer {id}: read failed: {e}");
                    break;
                }
            }
        }
        drop(reply);
    });
    let _ = stream.shutdown(Shutdown::Both);
    log::debug!("producer {id} done");
}

fn write_acks(id: u64, stream: UnixStream, acks: Receiver<Done>, shared: &Shared) {
    let mut out = BufWriter::new(stream);
    let mut broken = false;
    for done in acks.iter() {
        let line = match done.result {
            Ok(outcome) => {
                shared
                    .summary
                    .lock()
                    .expect("summary lock")
                    .record(&outcome);
                let kind = match &outcome {
                    Outcome::DeadLetter(k) => Some(k.as_str()),
                    _ => None,
                };
                let mut ack = json!({"seq": done.ticket, "id": done.id, "outcome": outcome.as_str(), "kind": kind});
                if let (Some(detail), Outcome::DeadLetter(_)) = (&done.detail, &outcome) {
                    ack["error"] = json!(detail);
                }
                ack
            }
            Err(failure) => {
                log::warn!(
                    "producer {id}, line {}: not acknowledged: {failure}",
                    done.ticket
                );
                if failure.is_gave_up() && !shared.gave_up.swap(true, Ordering::SeqCst) {
                    log::error!("the database stayed unreachable: shutting down");
                    shared.begin_shutdown();
                }
                continue;
            }
        };
        if broken {
            continue;
        }
        // Flush when no more acks are ready, so a busy connection batches
        // its writes and an idle one is answered at once.
        let written =
            writeln!(out, "{line}")
                .and_then(|()| if acks.is_empty() { out.flush() } else { Ok(()) });
        if let Err(e) = written {
            log::info!("producer {id} went away ({e}); its outcomes are committed all the same");
            broken = true;
        }
    }
    let _ = out.flush();
}

fn report_stats(
    db: &Database,
    options: &ServeOptions,
    shared: &Shared,
    workers: &Workers,
    active: &AtomicUsize,
    stopped: Receiver<()>,
) {
    let mut last = (Instant::now(), 0u64);
    loop {
        let finished = match stopped.recv_timeout(options.stats_interval) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) => continue,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let mut summary = shared.summary.lock().expect("summary lock").clone();
        summary.finish(db.counters(), Duration::ZERO);
        let now = Instant::now();
        let rate = (summary.completed - last.1) as f64
            / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, summary.completed);
        let (open, idle) = db.pool_state();
        let report = Report {
            summary: &summary,
            rate,
            in_use: open.saturating_sub(idle),
            idle,
            queued: workers.queued(),
            producers: active.load(Ordering::SeqCst),
            down_since: db.down_since(),
        };
        log::info!("{}", report.line());
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
