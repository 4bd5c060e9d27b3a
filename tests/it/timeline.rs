//! Fault time lines: what a faulty run did, sampled as it ran, written as
//! `<dir>/<fault>.csv` and `<dir>/<fault>.fault` for
//! `scripts/lib/plot-timeline` to draw. Every harness that injects a fault
//! (the chaos cases, the partitions, the full disk, the scale-out run)
//! records one when `CHAOS_TIMELINES=DIR` is set (`scripts/chaos --plot
//! DIR`).
//!
//! The CSV's columns: seconds from the start of the faulty run, lines
//! committed a second (over the last half second), a
//! count so far (retries; backends killed) and a state (0 or 1: the
//! database's outage; a node or an instance down). Its header names the
//! last two, and the chart's legends are those names. The `.fault` file's
//! first line is the fault's span and what it was (`began ended note`);
//! each further line (`mark SECONDS LABEL`) is an event drawn as a
//! vertical line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where time lines go, if anywhere: `CHAOS_TIMELINES`.
pub(crate) fn dir() -> Option<PathBuf> {
    std::env::var_os("CHAOS_TIMELINES").map(PathBuf::from)
}

struct Sample {
    seconds: f64,
    done: u64,
    count: u64,
    state: bool,
}

/// A faulty run's samples and events, from `started` on.
pub(crate) struct Timeline {
    started: Instant,
    count: &'static str,
    state: &'static str,
    samples: Vec<Sample>,
    marks: Vec<(f64, String)>,
}

impl Timeline {
    /// A time line whose lower plot shows `count` (a number so far) and
    /// `state` (0 or 1): names in snake_case, as the CSV's header has them.
    pub(crate) fn new(started: Instant, count: &'static str, state: &'static str) -> Timeline {
        Timeline {
            started,
            count,
            state,
            samples: Vec::new(),
            marks: Vec::new(),
        }
    }

    /// One sample, taken now: lines done so far, the count so far, the
    /// state.
    pub(crate) fn sample(&mut self, done: u64, count: u64, state: bool) {
        self.samples.push(Sample {
            seconds: self.started.elapsed().as_secs_f64(),
            done,
            count,
            state,
        });
    }

    /// An event at `at`, drawn as a vertical line with `label`.
    pub(crate) fn mark(&mut self, at: Instant, label: &str) {
        self.marks.push((self.seconds(at), label.to_string()));
    }

    fn seconds(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Writes `<dir>/<fault>.csv` and `<dir>/<fault>.fault`; the fault's
    /// span is `began` to `ended` (either may be unknown), `note` says what
    /// it was.
    pub(crate) fn write(
        &self,
        dir: &Path,
        fault: &str,
        began: Option<Instant>,
        ended: Option<Instant>,
        note: &str,
    ) {
        std::fs::create_dir_all(dir).unwrap();
        let mut csv = format!(
            "seconds,lines_committed_a_second,{},{}\n",
            self.count, self.state
        );
        for (i, b) in self.samples.iter().enumerate().skip(1) {
            // The rate over the last half second or so (batches commit in
            // bursts): from the newest sample at least that much older, or
            // the oldest there is.
            let a = self.samples[..i]
                .iter()
                .rev()
                .find(|a| b.seconds - a.seconds >= 0.5)
                .unwrap_or(&self.samples[0]);
            let rate = (b.done.saturating_sub(a.done)) as f64 / (b.seconds - a.seconds).max(1e-6);
            csv += &format!(
                "{:.2},{:.0},{},{}\n",
                b.seconds,
                rate,
                b.count,
                u8::from(b.state)
            );
        }
        std::fs::write(dir.join(format!("{fault}.csv")), csv).unwrap();
        let at =
            |t: Option<Instant>| t.map_or(String::new(), |t| format!("{:.2}", self.seconds(t)));
        let mut text = format!("{} {} {note}\n", at(began), at(ended));
        for (seconds, label) in &self.marks {
            text += &format!("mark {seconds:.2} {label}\n");
        }
        std::fs::write(dir.join(format!("{fault}.fault")), text).unwrap();
    }
}

/// Watches a `serve` from outside: its `/metrics` at `addr` every 100 ms
/// (lines with an outcome, retries so far, `database_up`) until `stop` is
/// set, then once more.
pub(crate) fn watch_metrics(addr: &str, stop: &AtomicBool, started: Instant) -> Timeline {
    let mut timeline = Timeline::new(started, "retries_so_far", "database_unavailable");
    loop {
        let last = stop.load(Ordering::SeqCst);
        // Not up yet, or gone: no sample.
        if let Ok(text) = http_get(addr, "/metrics") {
            timeline.sample(
                metric_sum(&text, "normalizer_lines_total") as u64,
                metric_sum(&text, "normalizer_retries_total") as u64,
                metric_sum(&text, "normalizer_database_up") == 0.0,
            );
        }
        if last {
            return timeline;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `GET` of `path` on a local HTTP server: the whole response.
pub(crate) fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Lines with an outcome so far, by the `/metrics` of a `serve` at `addr`
/// (0 while it does not answer).
pub(crate) fn lines_done(addr: &str) -> f64 {
    http_get(addr, "/metrics").map_or(0.0, |text| metric_sum(&text, "normalizer_lines_total"))
}

/// Reads one Prometheus text exposition's sum of a family's samples (every
/// label set), for harnesses that watch a `serve` from outside.
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
