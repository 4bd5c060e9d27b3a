//! `normalizer send --nats`: publishes each non-blank line to the feed and
//! waits for JetStream's acknowledgement of each, a bounded number in
//! flight. Each publish carries `Nats-Msg-Id` (the message's id, or for a
//! line without a readable id a stable hash of the input's name and the line
//! number), so a publish retried across a node failure is stored once.

use std::collections::VecDeque;
use std::io::BufRead;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;

use super::{subject_token, INPUT_PREFIX, TRUNCATED_HEADER};
use crate::core::message::{is_blank, parse_line};
use crate::core::Parsed;
use crate::input::LineReader;

/// How `send --nats` publishes.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The cluster's client URLs, comma-separated.
    pub servers: String,
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

struct Pending {
    number: u64,
    subject: String,
    message: PublishMessage,
    ack: PublishAckFuture,
    first_try: Instant,
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

async fn publish_all(options: &PublishOptions, input: impl BufRead) -> anyhow::Result<Published> {
    let addrs = options
        .servers
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--nats {:?}", options.servers))?;
    let client = async_nats::ConnectOptions::new()
        .name("normalizer send")
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", options.servers))?;
    let js = jetstream::new(client.clone());
    let mut done = Published::default();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut lines = LineReader::new(input);
    while let Some(line) = lines.next_line().context("cannot read the input")? {
        if is_blank(&line.bytes, line.oversize) {
            continue;
        }
        done.lines += 1;
        let (subject, message) = prepare(&options.input_name, &line);
        let ack = send(&js, &subject, &message, options, &mut done, Instant::now()).await?;
        pending.push_back(Pending {
            number: line.number,
            subject,
            message,
            ack,
            first_try: Instant::now(),
        });
        while pending.len() >= options.in_flight.max(1) {
            let first = pending.pop_front().expect("not empty");
            settle(&js, first, options, &mut done).await?;
        }
    }
    while let Some(first) = pending.pop_front() {
        settle(&js, first, options, &mut done).await?;
    }
    client.flush().await.ok();
    Ok(done)
}

/// The subject and message of a line: routed by its device, named by its
/// id.
fn prepare(input_name: &str, line: &crate::input::Line) -> (String, PublishMessage) {
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
    (subject, message)
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

/// Publishes once, retrying while the publish itself cannot be sent.
async fn send(
    js: &jetstream::Context,
    subject: &str,
    message: &PublishMessage,
    options: &PublishOptions,
    done: &mut Published,
    first_try: Instant,
) -> anyhow::Result<PublishAckFuture> {
    loop {
        match js.send_publish(subject.to_string(), message.clone()).await {
            Ok(ack) => return Ok(ack),
            Err(e) => {
                if first_try.elapsed() > options.timeout {
                    anyhow::bail!("cannot publish to {subject}: {e}");
                }
                done.retried += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Waits for a publish's acknowledgement; publishes again (same id) on an
/// error until `timeout`.
async fn settle(
    js: &jetstream::Context,
    mut pending: Pending,
    options: &PublishOptions,
    done: &mut Published,
) -> anyhow::Result<()> {
    loop {
        match pending.ack.await {
            Ok(ack) if ack.duplicate => {
                done.duplicate += 1;
                return Ok(());
            }
            Ok(_) => {
                done.stored += 1;
                return Ok(());
            }
            Err(e) => {
                if pending.first_try.elapsed() > options.timeout {
                    let hint = if e.to_string().contains("no stream") {
                        " (no stream takes sensors.*: start `serve --nats` once, which creates it, and include scripts/nats/normalizer.conf's mapping in the server's configuration)"
                    } else {
                        ""
                    };
                    anyhow::bail!(
                        "line {} was not stored after {:?}: {e}{hint}; every line before it that was acknowledged is stored, and publishing the input again is safe",
                        pending.number,
                        options.timeout
                    );
                }
                done.retried += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
                pending.ack = send(
                    js,
                    &pending.subject,
                    &pending.message,
                    options,
                    done,
                    pending.first_try,
                )
                .await?;
            }
        }
    }
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
        let (subject, _) = prepare("in.jsonl", &line);
        assert_eq!(subject, "sensors.Raum%202%2EOG%2FS%C3%BCd");
        let bad = crate::input::Line {
            number: 7,
            bytes: b"not json".to_vec(),
            oversize: false,
        };
        assert_eq!(prepare("in.jsonl", &bad).0, "sensors.%");
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
