//! `normalizer send --nats`: publishes each non-blank line to the feed and
//! waits for JetStream's acknowledgement of each, a bounded number in
//! flight, one per device at a time (so a repeated publish never lands
//! behind a later line of its device). Each publish carries `Nats-Msg-Id` (the message's id, or for a
//! line without a readable id a stable hash of the input's name and the line
//! number), so a publish retried across a node failure is stored once.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};

use super::{subject_token, INPUT_PREFIX, TRUNCATED_HEADER};
use crate::core::message::{is_blank, parse_line};
use crate::core::Parsed;
use crate::input::LineReader;

/// How `send --nats` publishes.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The cluster's client URLs, comma-separated, without credentials.
    pub servers: String,
    /// How to log in and check the servers.
    pub auth: super::NatsAuth,
    /// Publishes awaiting their acknowledgement at most.
    pub in_flight: usize,
    /// How long one line may keep failing (a cluster without a stream
    /// leader, no node reachable) before `send` gives up.
    pub timeout: Duration,
    /// The input's name, for the ids of lines without one.
    pub input_name: String,
}

/// What a `send --nats` did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Published {
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines the stream stored.
    pub stored: u64,
    /// Lines the stream already had (same `Nats-Msg-Id` within its
    /// duplicate window): a publish repeated.
    pub duplicate: u64,
    /// Publishes repeated after an error.
    pub retried: u64,
}

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published {}, stored {}, already stored {} (retried {})",
            self.lines, self.stored, self.duplicate, self.retried
        )
    }
}

/// A line to publish.
struct Line {
    number: u64,
    subject: String,
    message: PublishMessage,
}

/// How one line's publishing ended.
struct Stored {
    subject: String,
    duplicate: bool,
    retries: u64,
}

/// Publishes `input`; returns when every line is stored, or fails naming
/// the first line that could not be.
pub fn publish(options: &PublishOptions, input: impl BufRead) -> anyhow::Result<Published> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    runtime.block_on(publish_all(options, input))
}

/// One device's lines go out one at a time, each after the previous one is
/// stored: a publish that fails and is repeated (a stream leader lost mid-
/// election) can then never land behind a later line of the same device,
/// and the stream keeps each device's order. Different devices go in
/// parallel, at most `in_flight` lines out or waiting at once.
async fn publish_all(options: &PublishOptions, input: impl BufRead) -> anyhow::Result<Published> {
    let addrs = super::server_addrs(&options.servers).map_err(|e| anyhow::anyhow!("--nats {e}"))?;
    let client = super::connect::options(&options.auth, "normalizer send".to_string())?
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(
            |e| match super::connect::refusal(&e, &options.auth, &options.servers) {
                Some(why) => anyhow::anyhow!(why),
                None => anyhow::anyhow!("cannot connect to NATS at {}: {e}", options.servers),
            },
        )?;
    let js = jetstream::new(client.clone());
    let mut done = Published::default();
    let mut out = FuturesUnordered::new();
    // Lines waiting behind their device's line in flight.
    let mut waiting: HashMap<String, VecDeque<Line>> = HashMap::new();
    let mut held = 0usize;
    let mut lines = LineReader::new(input);
    while let Some(line) = lines.next_line().context("cannot read the input")? {
        if is_blank(&line.bytes, line.oversize) {
            continue;
        }
        done.lines += 1;
        let line = prepare(&options.input_name, &line);
        held += 1;
        match waiting.get_mut(&line.subject) {
            Some(queue) => queue.push_back(line),
            None => {
                waiting.insert(line.subject.clone(), VecDeque::new());
                out.push(store(js.clone(), line, options.timeout));
            }
        }
        while held >= options.in_flight.max(1) {
            let stored = out.next().await.expect("lines are out")?;
            held -= 1;
            next_of(&js, &mut out, &mut waiting, stored, &mut done, options);
        }
    }
    while let Some(stored) = out.next().await {
        next_of(&js, &mut out, &mut waiting, stored?, &mut done, options);
    }
    client.flush().await.ok();
    Ok(done)
}

/// Counts a stored line and sends its device's next one.
fn next_of(
    js: &jetstream::Context,
    out: &mut FuturesUnordered<BoxFuture<'static, anyhow::Result<Stored>>>,
    waiting: &mut HashMap<String, VecDeque<Line>>,
    stored: Stored,
    done: &mut Published,
    options: &PublishOptions,
) {
    if stored.duplicate {
        done.duplicate += 1;
    } else {
        done.stored += 1;
    }
    done.retried += stored.retries;
    let queue = waiting
        .get_mut(&stored.subject)
        .expect("a device in flight");
    match queue.pop_front() {
        Some(line) => out.push(store(js.clone(), line, options.timeout)),
        None => {
            waiting.remove(&stored.subject);
        }
    }
}

/// The subject and message of a line: routed by its device, named by its
/// id.
fn prepare(input_name: &str, line: &crate::input::Line) -> Line {
    let (device, id) = match parse_line(&line.bytes, line.oversize) {
        Parsed::Message(m) => (Some(m.device), Some(m.id)),
        Parsed::Rejected(r) => (r.device_key, r.message_id),
        Parsed::Blank => (None, None),
    };
    let id = id.unwrap_or_else(|| format!("line:{:016x}", line_hash(input_name, line.number)));
    let subject = format!("{INPUT_PREFIX}.{}", subject_token(device.as_deref()));
    let mut message = PublishMessage::build()
        .payload(Bytes::copy_from_slice(&line.bytes))
        .message_id(id);
    if line.oversize {
        message = message.header(TRUNCATED_HEADER, "1");
    }
    Line {
        number: line.number,
        subject,
        message,
    }
}

/// FNV-1a over the input's name and the line number: the same on every run
/// and every build, unlike the standard library's hasher.
fn line_hash(name: &str, number: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain([0]).chain(number.to_le_bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Publishes a line until JetStream acknowledges it, the same message (and
/// `Nats-Msg-Id`) each time, for at most `timeout`.
fn store(
    js: jetstream::Context,
    line: Line,
    timeout: Duration,
) -> BoxFuture<'static, anyhow::Result<Stored>> {
    Box::pin(async move {
        let first_try = Instant::now();
        let mut retries = 0;
        loop {
            let acked = match js
                .send_publish(line.subject.clone(), line.message.clone())
                .await
            {
                Ok(ack) => ack.await.map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            };
            let e = match acked {
                Ok(ack) => {
                    return Ok(Stored {
                        subject: line.subject,
                        duplicate: ack.duplicate,
                        retries,
                    })
                }
                Err(e) => e,
            };
            if first_try.elapsed() > timeout {
                let hint = if e.to_string().contains("no stream") {
                    " (no stream takes sensors.*: start `serve --nats` once, which creates it, and include scripts/nats/normalizer.conf's mapping in the server's configuration)"
                } else {
                    ""
                };
                anyhow::bail!(
                    "line {} was not stored after {timeout:?}: {e}{hint}; every line acknowledged is stored, and publishing the input again is safe",
                    line.number,
                );
            }
            if retries == 0 {
                log::info!(
                    "line {}: not stored yet ({e}); publishing it again",
                    line.number
                );
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_route_by_their_device_and_are_named_by_their_id() {
        let line = crate::input::Line {
            number: 7,
            bytes: br#"{"id":"m-1","device":"Raum 2.OG/S\u00fcd","ts":"2026-01-01T00:00:00Z","payload":{"t":1}}"#.to_vec(),
            oversize: false,
        };
        let subject = prepare("in.jsonl", &line).subject;
        assert_eq!(subject, "sensors.Raum%202%2EOG%2FS%C3%BCd");
        let bad = crate::input::Line {
            number: 7,
            bytes: b"not json".to_vec(),
            oversize: false,
        };
        assert_eq!(prepare("in.jsonl", &bad).subject, "sensors.%");
    }

    #[test]
    fn the_line_hash_is_stable_and_tells_lines_and_inputs_apart() {
        assert_eq!(line_hash("a", 1), line_hash("a", 1));
        assert_ne!(line_hash("a", 1), line_hash("a", 2));
        assert_ne!(line_hash("a", 1), line_hash("b", 1));
        // Pinned: a change would store lines of an input twice across
        // versions.
        assert_eq!(line_hash("", 0), 16_574_515_714_863_409_599);
    }
}
