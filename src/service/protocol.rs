//! What the service writes back to a producer, one JSON object a line, read
//! and written through the same types by the service and by `send`.
//!
//! - an acknowledgement once a line's outcome is committed:
//!   `{"id":"m-1","kind":null,"outcome":"processed","seq":1}`, with `kind`
//!   the dead letter's kind and `error` what was wrong with the line when it
//!   was dead-lettered before reaching the database;
//! - a refusal, before the connection is closed:
//!   `{"error":"too many connections: …"}`.

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;

/// One line's outcome, committed. Fields in the order the service has
/// always written them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Why the line was dead-lettered before reaching the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The message's id, where it was readable.
    pub id: Option<String>,
    /// The dead letter's kind, for a dead letter.
    pub kind: Option<String>,
    /// `processed`, `duplicate` or `dead_letter`.
    pub outcome: String,
    /// The line's 1-based number on its connection.
    pub seq: u64,
}

impl Ack {
    /// The acknowledgement of line `seq`'s `outcome`.
    pub fn new(seq: u64, id: Option<String>, outcome: &Outcome, detail: Option<&str>) -> Ack {
        let kind = match outcome {
            Outcome::DeadLetter(kind) => Some(kind.as_str().to_string()),
            _ => None,
        };
        Ack {
            error: kind.as_ref().and(detail).map(str::to_string),
            id,
            kind,
            outcome: outcome.as_str().to_string(),
            seq,
        }
    }

    /// The outcome as `send` counts it: `dead_letter:KIND` for dead letters.
    pub fn label(&self) -> String {
        match &self.kind {
            Some(kind) if self.outcome == "dead_letter" => format!("dead_letter:{kind}"),
            _ => self.outcome.clone(),
        }
    }
}

/// The service will not take this connection's lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why, and what to do.
    pub error: String,
}

/// A line from the service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// An acknowledgement.
    Ack(Ack),
    /// A refusal.
    Refused(Refusal),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::DeadLetterKind;
    use crate::outcome::Applied;

    #[test]
    fn acks_and_refusals_read_back_as_written() {
        let processed = Ack::new(
            1,
            Some("m-1".into()),
            &Outcome::Processed(Applied::default()),
            None,
        );
        let text = serde_json::to_string(&processed).unwrap();
        assert_eq!(
            text,
            r#"{"id":"m-1","kind":null,"outcome":"processed","seq":1}"#
        );
        let letter = Ack::new(
            2,
            None,
            &Outcome::DeadLetter(DeadLetterKind::Malformed),
            Some("not JSON"),
        );
        let text = serde_json::to_string(&letter).unwrap();
        assert_eq!(
            text,
            r#"{"error":"not JSON","id":null,"kind":"malformed","outcome":"dead_letter","seq":2}"#
        );
        assert_eq!(letter.label(), "dead_letter:malformed");
        assert_eq!(
            serde_json::from_str::<Reply>(&text).unwrap(),
            Reply::Ack(letter)
        );
        let refusal = Refusal {
            error: "too many connections".into(),
        };
        let text = serde_json::to_string(&refusal).unwrap();
        assert_eq!(
            serde_json::from_str::<Reply>(&text).unwrap(),
            Reply::Refused(refusal)
        );
    }
}
