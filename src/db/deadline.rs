//! A client-side deadline on every PostgreSQL call, that does not depend on
//! TCP noticing anything.
//!
//! libpq blocks in `poll()` until the server answers. When the path to the
//! server is cut behind a relay (pgbouncer, HAProxy, a cloud load balancer),
//! the relay keeps answering TCP for a peer that is gone, and the call waits
//! for ever; keepalives and `tcp_user_timeout` only help on a direct
//! connection. So each connection reports when a call starts and ends (a
//! diesel [`Instrumentation`]), and one watchdog thread per pool cuts the
//! socket of a call that has had no answer for longer than the server's own
//! `statement_timeout` plus a margin: `shutdown(2)` on a duplicate of libpq's
//! socket wakes the blocked call at once with a closed connection, the retry
//! layer sees [`super::DbError::NoAnswer`], discards the connection and
//! retries on a new one. The stuck thread is never left behind, and the
//! descriptor we cut is our own duplicate, so it can never be a number that
//! libpq closed and someone else reused.
//!
//! diesel does not expose libpq's socket. The socket of a new connection is
//! the one socket that appeared while it was established and carries this
//! connection's own `tcp_user_timeout` (10 s plus a per-connection number of
//! milliseconds: see [`super::url::DatabaseUrl::libpq_url`]).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use diesel::connection::{Instrumentation, InstrumentationEvent};

/// How far beyond `statement_timeout` a call may go unanswered: the
/// server cancels a statement at its timeout and its error needs to travel.
pub(super) const MARGIN: Duration = Duration::from_secs(5);

/// One connection's call clock and its socket.
#[derive(Debug)]
pub(super) struct Watch {
    /// When the current call started (nanoseconds after [`epoch`], plus
    /// one), 0 when no call is in progress.
    started: AtomicU64,
    socket: Option<OwnedFd>,
    /// Set once, when the watchdog cut the connection: how long the call
    /// had waited.
    cut: OnceLock<Duration>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Watch {
    /// A watch over `socket` (a duplicate of the connection's own).
    pub(super) fn new(socket: Option<OwnedFd>) -> Arc<Watch> {
        Arc::new(Watch {
            started: AtomicU64::new(0),
            socket,
            cut: OnceLock::new(),
        })
    }

    /// Whether the socket of this connection could be found (without it,
    /// the deadline cannot be enforced on it).
    pub(super) fn has_socket(&self) -> bool {
        self.socket.is_some()
    }

    /// Whether the watchdog cut this connection (it must never be used
    /// again), and after how long a wait.
    pub(super) fn cut_after(&self) -> Option<Duration> {
        self.cut.get().copied()
    }

    /// The instrumentation to install on the connection.
    pub(super) fn clock(self: &Arc<Self>) -> CallClock {
        CallClock(self.clone())
    }

    fn start(&self) {
        let nanos = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.started.store(nanos + 1, Ordering::SeqCst);
    }

    fn finish(&self) {
        self.started.store(0, Ordering::SeqCst);
    }

    /// How long the call in progress has waited, if one is.
    fn waiting(&self, now: Instant) -> Option<Duration> {
        match self.started.load(Ordering::SeqCst) {
            0 => None,
            n => Some(now.saturating_duration_since(epoch() + Duration::from_nanos(n - 1))),
        }
    }

    /// Cuts the connection: the blocked call returns at once with a closed
    /// connection. Returns whether this call did it.
    fn cut(&self, waited: Duration) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        if self.cut.set(waited).is_err() {
            return false;
        }
        // SAFETY: shutdown on a descriptor we own; it acts on the socket
        // that libpq shares with our duplicate.
        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        true
    }
}

/// Tells a [`Watch`] when each call of its connection starts and ends.
pub(super) struct CallClock(Arc<Watch>);

impl Instrumentation for CallClock {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { .. } => self.0.start(),
            InstrumentationEvent::FinishQuery { .. } => self.0.finish(),
            _ => {}
        }
    }
}

/// The connections a watchdog watches.
pub(super) type Registry = Arc<Mutex<Vec<Weak<Watch>>>>;

/// One thread that cuts calls unanswered for longer than `limit`. Stopped
/// and joined when dropped.
pub(super) struct Watchdog {
    registry: Registry,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub(super) fn start(limit: Duration) -> Watchdog {
        let registry: Registry = Arc::default();
        let (stop, stopped) = bounded::<()>(0);
        let tick = (limit / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let watched = registry.clone();
        let thread = std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || loop {
                match stopped.recv_timeout(tick) {
                    Err(RecvTimeoutError::Timeout) => check(&watched, limit),
                    _ => return,
                }
            })
            .expect("spawn the deadline watchdog");
        Watchdog {
            registry,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The connections to watch; new connections add themselves.
    pub(super) fn registry(&self) -> Registry {
        self.registry.clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn check(registry: &Mutex<Vec<Weak<Watch>>>, limit: Duration) {
    let now = Instant::now();
    let mut watches = registry.lock().expect("deadline registry lock");
    watches.retain(|watch| {
        let Some(watch) = watch.upgrade() else {
            return false;
        };
        if let Some(waited) = watch.waiting(now) {
            if waited > limit && watch.cut(waited) {
                log::info!(
                    "no answer from the database for {:.1} s (limit {:.1} s): cutting the connection and retrying on a new one",
                    waited.as_secs_f64(),
                    limit.as_secs_f64()
                );
            }
        }
        true
    });
}

/// The process's open sockets: descriptor and inode (a descriptor number
/// may be closed and reused; the inode tells them apart).
pub(super) fn sockets() -> HashSet<(RawFd, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

fn tcp_user_timeout(fd: RawFd) -> Option<u32> {
    let mut value: libc::c_uint = 0;
    let mut len = std::mem::size_of::<libc::c_uint>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&mut value as *mut libc::c_uint).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// The socket of a connection just established: among the sockets that
/// are not in `before`, the one whose `tcp_user_timeout` is `marker`, or
/// else the only new one. Returns a duplicate the caller owns.
pub(super) fn find_socket(before: &HashSet<(RawFd, u64)>, marker: Option<u32>) -> Option<OwnedFd> {
    let new: Vec<RawFd> = sockets().difference(before).map(|(fd, _)| *fd).collect();
    let marked: Vec<RawFd> = match marker {
        Some(m) => new
            .iter()
            .copied()
            .filter(|fd| tcp_user_timeout(*fd) == Some(m))
            .collect(),
        None => vec![],
    };
    let fd = match (marked.as_slice(), new.as_slice()) {
        ([fd], _) => *fd,
        ([], [fd]) => *fd,
        _ => return None,
    };
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1) that we own.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// A peer that accepts and never answers, as a relay whose upstream is
    /// gone: the call must be cut by the deadline, not by TCP.
    #[test]
    fn a_call_without_an_answer_is_cut_at_the_deadline_and_no_earlier() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let before = sockets();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // Two new sockets (both ends): without a marker it is ambiguous.
        assert!(find_socket(&before, None).is_none());
        let before = sockets();
        let mut client2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let marker = 12_345;
        set_tcp_user_timeout(&client2, marker);
        let found = find_socket(&before, Some(marker));
        let (_server2, _) = listener.accept().unwrap();
        let watch = Watch::new(found);
        assert!(watch.has_socket());
        let dog = Watchdog::start(Duration::from_millis(300));
        dog.registry().lock().unwrap().push(Arc::downgrade(&watch));
        watch.start();
        let started = Instant::now();
        let mut buf = [0u8; 1];
        let n = client2
            .read(&mut buf)
            .expect("a cut socket reads as closed");
        assert_eq!(n, 0);
        let waited = started.elapsed();
        assert!(watch.cut_after().unwrap() > Duration::from_millis(300));
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        // The other connection, not watched, is untouched.
        client.set_nonblocking(true).unwrap();
        assert_eq!(
            client.read(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
    }

    fn set_tcp_user_timeout(stream: &TcpStream, ms: libc::c_uint) {
        // SAFETY: setsockopt reads `size_of::<c_uint>()` bytes from `ms`.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&ms as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_finished_call_is_never_cut() {
        let watch = Watch::new(None);
        watch.start();
        assert!(watch.waiting(Instant::now()).is_some());
        watch.finish();
        assert!(watch
            .waiting(Instant::now() + Duration::from_secs(3600))
            .is_none());
        assert!(!watch.cut(Duration::ZERO), "no socket, nothing to cut");
    }
}
