//! `normalizer send`: streams a file to the service and waits for every
//! acknowledgement.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::protocol::Reply;
use crate::core::message::is_blank;
use crate::input::LineReader;

/// What a `send` saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sent {
    /// Non-blank lines sent.
    pub sent: u64,
    /// Lines acknowledged.
    pub acknowledged: u64,
    /// Acknowledgements by outcome (`dead_letter:KIND` for dead letters).
    pub outcomes: BTreeMap<String, u64>,
    /// Line numbers sent but not acknowledged (at most the first 100).
    pub unacknowledged: Vec<u64>,
    /// An error line from the service, if it sent one.
    pub error: Option<String>,
}

impl Sent {
    /// Whether every line sent was acknowledged.
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.acknowledged == self.sent
    }
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        write!(
            f,
            "sent {}, acknowledged {}: {}",
            self.sent,
            self.acknowledged,
            outcomes.join(", ")
        )
    }
}

/// Streams `input` to the service at `socket` and collects the acks.
pub fn send(socket: &Path, input: impl BufRead + Send) -> anyhow::Result<Sent> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the service at {}", socket.display()))?;
    let read_half = stream.try_clone().context("cannot clone the socket")?;
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> anyhow::Result<BTreeSet<u64>> {
            let mut expected = BTreeSet::new();
            let mut out = BufWriter::new(&stream);
            let mut lines = LineReader::new(input);
            while let Some(line) = lines.next_line().context("cannot read the input")? {
                if !is_blank(&line.bytes, line.oversize) {
                    expected.insert(line.number);
                }
                // The service may close early (e.g. too many connections):
                // stop sending, the acks tell the rest.
                if out
                    .write_all(&line.bytes)
                    .and_then(|()| out.write_all(b"\n"))
                    .is_err()
                {
                    break;
                }
            }
            let _ = out.flush();
            drop(out);
            let _ = stream.shutdown(Shutdown::Write);
            Ok(expected)
        });
        let mut sent = Sent::default();
        let mut acked = BTreeSet::new();
        for line in BufReader::new(read_half).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Ack(ack)) => {
                    acked.insert(ack.seq);
                    *sent.outcomes.entry(ack.label()).or_default() += 1;
                }
                Ok(Reply::Refused(refusal)) => sent.error = Some(refusal.error),
                Err(_) => {}
            }
        }
        let expected = writer.join().expect("the writer does not panic")?;
        sent.sent = expected.len() as u64;
        sent.acknowledged = expected.intersection(&acked).count() as u64;
        sent.unacknowledged = expected.difference(&acked).take(100).copied().collect();
        Ok(sent)
    })
}
