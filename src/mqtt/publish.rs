//! `normalizer send --mqtt`: publishes a file's lines to an MQTT broker at
//! QoS 1, each to `sensors/<device key>` (the key read from the line;
//! `sensors/unreadable` when it cannot be), and waits for the broker's
//! PUBACK of every one. A producer for trials, benchmarks and tests, in the
//! shape sensors publish: one topic per device, in order.

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rumqttc::{Client, Event, Packet, QoS, RecvTimeoutError};
use serde::Serialize;

use super::source::{client_options, refusal};
use super::MqttOptions;
use crate::core::message::{is_blank, MAX_LINE_BYTES};
use crate::input::LineReader;

/// What a `send --mqtt` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Published {
    /// Lines published.
    pub sent: u64,
    /// PUBACKs from the broker.
    pub acknowledged: u64,
    /// Lines over 1 MiB, not published (MQTT 3.1.1 has no header to say a
    /// message was cut; the line's number is printed).
    pub skipped: Vec<u64>,
}

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published {}, acknowledged by the broker {}",
            self.sent, self.acknowledged
        )?;
        if !self.skipped.is_empty() {
            write!(f, "; {} lines over 1 MiB not sent", self.skipped.len())?;
        }
        Ok(())
    }
}

/// The topic a line goes to: `sensors/<device key>`.
pub fn topic(line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Device<'a> {
        #[serde(borrow)]
        device: Option<std::borrow::Cow<'a, str>>,
    }
    let device = serde_json::from_slice::<Device>(line)
        .ok()
        .and_then(|d| d.device)
        .filter(|d| {
            !d.is_empty() && !d.contains(['+', '#', '\0']) && !d.starts_with('/') && d.len() < 1024
        });
    match device {
        Some(d) => format!("sensors/{d}"),
        None => "sensors/unreadable".to_string(),
    }
}

/// Polls the connection on a thread of its own: says when it connected
/// (or why not), counts the broker's PUBACKs, and records why it broke.
fn drive(
    mut connection: rumqttc::Connection,
    options: MqttOptions,
    acknowledged: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    connected: crossbeam_channel::Sender<Result<(), String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                let _ = connected.try_send(Ok(()));
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => return,
            Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
            Ok(Err(e)) => {
                let why = refusal(&e, &options).unwrap_or_else(|| {
                    format!(
                        "the connection to the MQTT broker at {} broke: {e}",
                        options.address()
                    )
                });
                let _ = connected.try_send(Err(why.clone()));
                *failed.lock().expect("failure lock") = Some(why);
                return;
            }
        }
    })
}

/// Publishes every non-blank line of `input` at QoS 1, at most `in_flight`
/// unacknowledged at once, and waits for the broker's PUBACKs. A broken
/// connection ends it with an error that says how many were acknowledged
/// (the rest may be published again: the service applies a message once).
pub fn publish(
    options: &MqttOptions,
    input: impl BufRead,
    in_flight: u16,
) -> anyhow::Result<Published> {
    let mut o = client_options(options).map_err(|e| anyhow!("{e}"))?;
    o.set_clean_session(true)
        .set_manual_acks(false)
        .set_inflight(in_flight.max(1));
    let (client, connection) = Client::new(o, usize::from(in_flight).max(16));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let (connected_tx, connected) = crossbeam_channel::bounded::<Result<(), String>>(1);
    let driver = drive(
        connection,
        options.clone(),
        acknowledged.clone(),
        failed.clone(),
        connected_tx,
    );
    match connected.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => bail!("{why}"),
        Err(_) => bail!(
            "the MQTT broker at {} did not answer within 30 s",
            options.address()
        ),
    }
    let mut published = Published::default();
    let mut lines = LineReader::new(input);
    while let Some(line) = lines.next_line().context("cannot read the input")? {
        if is_blank(&line.bytes, line.oversize) {
            continue;
        }
        if line.oversize || line.bytes.len() > MAX_LINE_BYTES {
            eprintln!("normalizer: line {} is over 1 MiB: not sent", line.number);
            published.skipped.push(line.number);
            continue;
        }
        if client
            .publish(topic(&line.bytes), QoS::AtLeastOnce, false, line.bytes)
            .is_err()
        {
            break;
        }
        published.sent += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.load(Ordering::SeqCst) < published.sent
        && failed.lock().expect("failure lock").is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = client.disconnect();
    let _ = driver.join();
    published.acknowledged = acknowledged.load(Ordering::SeqCst);
    if let Some(why) = failed.lock().expect("failure lock").take() {
        bail!(
            "{why}; {} of {} lines acknowledged by the broker (publishing them again is safe)",
            published.acknowledged,
            published.sent
        );
    }
    if published.acknowledged < published.sent {
        bail!(
            "the broker acknowledged {} of {} lines within 60 s of the last (publishing them again is safe)",
            published.acknowledged,
            published.sent
        );
    }
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::topic;

    #[test]
    fn a_line_goes_to_its_devices_topic_or_to_unreadable() {
        assert_eq!(topic(br#"{"device":"hall/a","id":"1"}"#), "sensors/hall/a");
        assert_eq!(topic(br#"{"device":"d\u002f1"}"#), "sensors/d/1");
        for line in [
            &b"not json"[..],
            br#"{"id":"1"}"#,
            br#"{"device":""}"#,
            br#"{"device":"a/+"}"#,
            br##"{"device":"#"}"##,
            br#"{"device":7}"#,
        ] {
            assert_eq!(
                topic(line),
                "sensors/unreadable",
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
