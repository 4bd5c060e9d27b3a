//! One producer on the socket: a reader that submits its lines to the
//! workers, and a writer that sends back each line's acknowledgement once
//! its outcome is committed.
//!
//! The protocol acknowledges each line by its number, in any order, so a
//! producer needs no window of its own. The service keeps one
//! ([`AckWindow`], the same the NATS feed acknowledges with) to know the
//! connection's committed prefix: a producer cut off is told, in the log,
//! the line through which everything is committed, the point a resend of
//! the file may start from.

use std::io::{BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver};

use super::protocol::Ack;
use super::{ServeOptions, Shared};
use crate::core::message::is_blank;
use crate::input::LineReader;
use crate::pipeline::{AckWindow, Done, Workers};

/// A connection's committed prefix: every line through `through` has its
/// outcome in the database.
#[derive(Default)]
struct Progress {
    window: AckWindow<()>,
    /// The last line of the committed prefix (0: none yet).
    through: u64,
    /// A line ended without an outcome (a shutdown handed it back): the
    /// prefix ends before it for good, and the window stops growing.
    stalled: bool,
}

impl Progress {
    fn delivered(&mut self, line: u64) {
        if !self.stalled {
            self.window.delivered(line, ());
        }
    }

    fn settled(&mut self, line: u64, committed: bool) {
        if self.stalled {
            return;
        }
        if let Some(&(last, ())) = self.window.settled(line, committed).last() {
            self.through = last;
        }
        if !committed {
            self.stalled = true;
            self.window = AckWindow::default();
        }
    }
}

/// Serves producer `id` until it closes, the workers are gone or the
/// service shuts down.
pub(super) fn serve(
    id: u64,
    stream: UnixStream,
    workers: &Workers,
    shared: &Shared,
    options: &ServeOptions,
) {
    let who = peer(&stream);
    log::debug!("producer {id} ({who}) connected");
    let Ok(write_half) = stream.try_clone() else {
        log::warn!("producer {id} ({who}): cannot clone the stream");
        return;
    };
    let (reply, acks) = bounded::<Done>(options.workers.queue_per_worker.max(16));
    let progress = Mutex::new(Progress::default());
    let mut submitted = 0u64;
    let committed = std::thread::scope(|scope| {
        let writer = std::thread::Builder::new()
            .name(format!("acks-{id}"))
            .spawn_scoped(scope, || {
                write_acks(id, write_half, acks, shared, &progress)
            })
            .expect("spawn an ack writer");
        let mut reader = LineReader::new(BufReader::with_capacity(64 * 1024, &stream));
        loop {
            match reader.next_line() {
                Ok(Some(line)) => {
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        break;
                    }
                    let number = line.number;
                    if is_blank(&line.bytes, line.oversize) {
                        continue;
                    }
                    // In the window before the workers have it: its
                    // outcome may come back before `submit` returns.
                    progress.lock().expect("progress lock").delivered(number);
                    match workers.submit(number, line, &reply) {
                        Some(true) => submitted += 1,
                        Some(false) => {
                            progress
                                .lock()
                                .expect("progress lock")
                                .settled(number, false);
                            break;
                        }
                        None => {}
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::info!("producer {id} ({who}): read failed: {e}");
                    break;
                }
            }
        }
        drop(reply);
        writer.join().expect("the ack writer does not panic")
    });
    let _ = stream.shutdown(Shutdown::Both);
    let unacknowledged = submitted.saturating_sub(committed);
    if unacknowledged > 0 {
        let resume = match progress.lock().expect("progress lock").through {
            0 => "none of its lines is committed: sending all again is safe".to_string(),
            through => format!(
                "every line through {through} is committed: sending again from line {} (or all of it) is safe",
                through + 1
            ),
        };
        log::warn!(
            event = "producer_cut_off", producer = id, unacknowledged = unacknowledged;
            "producer {id} ({who}) cut off with {unacknowledged} lines unacknowledged; {resume}"
        );
        shared
            .unacknowledged
            .fetch_add(unacknowledged, Ordering::SeqCst);
        shared.cut_off.fetch_add(1, Ordering::SeqCst);
    }
    log::debug!("producer {id} done");
}

/// Who is at the other end of a producer's socket, from its credentials.
pub(super) fn peer(stream: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("uid {}, pid {}", cred.uid, cred.pid)
    } else {
        "peer unknown".to_string()
    }
}

/// Writes each committed line's ack; returns how many were committed.
fn write_acks(
    id: u64,
    stream: UnixStream,
    acks: Receiver<Done>,
    shared: &Shared,
    progress: &Mutex<Progress>,
) -> u64 {
    let mut out = BufWriter::new(stream);
    let mut broken = false;
    let mut committed = 0;
    for done in acks.iter() {
        shared.record(&done);
        progress
            .lock()
            .expect("progress lock")
            .settled(done.ticket, done.result.is_ok());
        let line = match &done.result {
            Ok(outcome) => {
                committed += 1;
                let ack = Ack::new(done.ticket, done.id, outcome, done.detail.as_deref());
                serde_json::to_string(&ack).expect("serializable")
            }
            Err(failure) => {
                log::warn!(
                    "producer {id}, line {}: not acknowledged: {failure}",
                    done.ticket
                );
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
    committed
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn the_committed_prefix_grows_over_out_of_order_outcomes_and_stops_at_a_line_without_one() {
        let mut p = Progress::default();
        for line in [1, 2, 4, 5, 6] {
            p.delivered(line);
        }
        p.settled(2, true);
        assert_eq!(p.through, 0, "line 1 is not settled yet");
        p.settled(1, true);
        assert_eq!(p.through, 2);
        p.settled(5, true);
        assert_eq!(p.through, 2, "line 4 (3 was blank) is not settled yet");
        p.settled(4, false);
        assert_eq!(p.through, 2, "line 4 has no outcome");
        p.settled(6, true);
        p.delivered(7);
        p.settled(7, true);
        assert_eq!(p.through, 2, "nothing passes a line without an outcome");
        assert!(p.window.is_empty(), "a stalled prefix keeps nothing");
    }
}
