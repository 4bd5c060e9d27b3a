//! What became of a line: the vocabulary shared by the database layer, the
//! pipeline and the summaries.

use crate::core::DeadLetterKind;

/// The end of one non-blank input line (CONTRACT section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now.
    Processed(Applied),
    /// Its id was already processed; nothing changed.
    Duplicate,
    /// Filed in `dead_letters` with this kind.
    DeadLetter(DeadLetterKind),
}

impl Outcome {
    /// `processed`, `duplicate` or `dead_letter`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Processed(_) => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLetter(_) => "dead_letter",
        }
    }
}

/// What applying one message changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Readings stored.
    pub readings: u32,
    /// Readings not stored because the sensor had one at that instant.
    pub duplicate_readings: u32,
    /// Payload fields not mapped to a sensor.
    pub unmapped: u32,
    /// Alerts opened.
    pub alerts_opened: u32,
    /// Alerts closed.
    pub alerts_closed: u32,
}

/// A row for `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message's id, where it is a valid id.
    pub message_id: Option<String>,
    /// The device's key, where it is a valid key.
    pub device_key: Option<String>,
    /// Why.
    pub kind: DeadLetterKind,
    /// What went wrong, for a person.
    pub error: String,
    /// The line as stored: see [`crate::core::message::raw_for_storage`].
    pub raw: String,
}

impl DeadLetter {
    /// The dead letter of a parsed message, read from the line `raw`.
    pub fn of(
        message: &crate::core::Message,
        raw: &[u8],
        kind: DeadLetterKind,
        error: String,
    ) -> Self {
        DeadLetter {
            message_id: Some(message.id.clone()),
            device_key: Some(message.device.clone()),
            kind,
            error,
            raw: crate::core::message::raw_for_storage(raw),
        }
    }
}
