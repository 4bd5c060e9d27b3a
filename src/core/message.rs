//! Raw message lines (CONTRACT section 1) into [`Message`]s or [`Rejection`]s.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// The longest line that is read as a message: longer ones are `malformed`.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// How much of a dead-lettered line is kept in `dead_letters.raw`.
pub const MAX_RAW_BYTES: usize = 64 * 1024;
/// The longest `id` or `device` key, in characters.
pub const MAX_KEY_CHARS: usize = 200;

/// Why a message was dead-lettered; the strings are the contract's kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterKind {
    /// Not JSON, not an object, not UTF-8, or too long.
    Malformed,
    /// A required field is missing or ill-typed, or a value cannot be used.
    Invalid,
    /// No device with the message's key is provisioned.
    UnknownDevice,
    /// The database rejected this message alone, also when retried on its own.
    DbRejected,
    /// The normalizer itself failed on this message (a panic).
    Internal,
}

impl DeadLetterKind {
    /// Every kind, in the order summaries list them.
    pub const ALL: [DeadLetterKind; 5] = [
        DeadLetterKind::Malformed,
        DeadLetterKind::Invalid,
        DeadLetterKind::UnknownDevice,
        DeadLetterKind::DbRejected,
        DeadLetterKind::Internal,
    ];

    /// The kind as stored in `dead_letters.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Malformed => "malformed",
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::UnknownDevice => "unknown_device",
            DeadLetterKind::DbRejected => "db_rejected",
            DeadLetterKind::Internal => "internal",
        }
    }

    /// Parses a stored kind back.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A well-formed message, ready to be applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The idempotency key.
    pub id: String,
    /// The device's key.
    pub device: String,
    /// The measurement instant, in UTC, truncated to microseconds.
    pub ts: DateTime<Utc>,
    /// Raw field name to value, in name order (a JSON object's map order).
    /// A vector, not the map it was read as: a queued message holds a few
    /// entries, and a map's node is ~600 bytes whatever it holds, which
    /// bounds how many messages SQLite's group commit can gather in the
    /// memory budget (docs/PERFORMANCE.md, "A write path made for SQLite").
    pub payload: Vec<(String, Value)>,
}

/// A line that cannot become a message, and what is known of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// `malformed` or `invalid`.
    pub kind: DeadLetterKind,
    /// What is wrong, for a person.
    pub error: String,
    /// The `id`, where it is a valid id.
    pub message_id: Option<String>,
    /// The `device`, where it is a valid key.
    pub device_key: Option<String>,
}

/// What one input line is.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Only white space: skipped silently.
    Blank,
    /// A message to apply.
    Message(Message),
    /// A line to dead-letter as it is.
    Rejected(Rejection),
}

/// Whether `s` is a valid `id` or device key: 1..=200 characters, none of them
/// a control character (U+0000..U+001F, U+007F).
pub fn is_valid_key(s: &str) -> bool {
    let mut n = 0;
    for c in s.chars() {
        if c <= '\u{1f}' || c == '\u{7f}' {
            return false;
        }
        n += 1;
        if n > MAX_KEY_CHARS {
            return false;
        }
    }
    n > 0
}

/// Whether a line is only white space: skipped silently, never an outcome.
pub fn is_blank(line: &[u8], oversize: bool) -> bool {
    !oversize && line.iter().all(u8::is_ascii_whitespace)
}

/// Parses one line, without its `\n`. `oversize` says the line was longer than
/// [`MAX_LINE_BYTES`] (the reader keeps only its head).
pub fn parse_line(line: &[u8], oversize: bool) -> Parsed {
    if is_blank(line, oversize) {
        return Parsed::Blank;
    }
    let malformed = |error: String| {
        Parsed::Rejected(Rejection {
            kind: DeadLetterKind::Malformed,
            error,
            message_id: None,
            device_key: None,
        })
    };
    if oversize {
        return malformed(format!("line is longer than {MAX_LINE_BYTES} bytes"));
    }
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => return malformed(format!("line is not valid UTF-8: {e}")),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return malformed(format!("not valid JSON: {e}")),
    };
    match value {
        Value::Object(object) => parse_object(object),
        other => malformed(format!("not a JSON object but {}", json_type(&other))),
    }
}

fn parse_object(mut object: Map<String, Value>) -> Parsed {
    let message_id = key_field(&object, "id");
    let device_key = key_field(&object, "device");
    let invalid = |error: String| {
        Parsed::Rejected(Rejection {
            kind: DeadLetterKind::Invalid,
            error,
            message_id: message_id.clone(),
            device_key: device_key.clone(),
        })
    };
    for name in ["id", "device"] {
        if let Err(e) = check_key(object.get(name), name) {
            return invalid(e);
        }
    }
    let ts = match object.get("ts") {
        None => return invalid("missing field `ts`".into()),
        Some(Value::String(s)) => match parse_ts(s) {
            Ok(ts) => ts,
            Err(e) => return invalid(e),
        },
        Some(other) => return invalid(format!("`ts` is {}, not a string", json_type(other))),
    };
    let payload = match object.remove("payload") {
        None => return invalid("missing field `payload`".into()),
        Some(Value::Object(p)) => p.into_iter().collect(),
        Some(other) => {
            return invalid(format!("`payload` is {}, not an object", json_type(&other)))
        }
    };
    Parsed::Message(Message {
        id: message_id.expect("checked above"),
        device: device_key.expect("checked above"),
        ts,
        payload,
    })
}

fn key_field(object: &Map<String, Value>, name: &str) -> Option<String> {
    match object.get(name) {
        Some(Value::String(s)) if is_valid_key(s) => Some(s.clone()),
        _ => None,
    }
}

fn check_key(value: Option<&Value>, name: &str) -> Result<(), String> {
    match value {
        None => Err(format!("missing field `{name}`")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("`{name}` is empty")),
        Some(Value::String(s)) if s.chars().count() > MAX_KEY_CHARS => Err(format!(
            "`{name}` is longer than {MAX_KEY_CHARS} characters"
        )),
        Some(Value::String(s)) if !is_valid_key(s) => {
            Err(format!("`{name}` contains a control character"))
        }
        Some(Value::String(_)) => Ok(()),
        Some(other) => Err(format!("`{name}` is {}, not a string", json_type(other))),
    }
}

/// Parses an RFC 3339 timestamp with an offset into UTC, truncated to
/// microseconds. A leap second (`:60`) becomes the first instant of the next
/// minute, as PostgreSQL reads it.
pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, String> {
    let parsed = DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("`ts` {s:?} is not an RFC 3339 timestamp with an offset: {e}"))?;
    let micros = parsed.timestamp_micros();
    DateTime::from_timestamp_micros(micros).ok_or_else(|| format!("`ts` {s:?} is out of range"))
}

/// The JSON type of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The line as stored in `dead_letters.raw`: at most its first
/// [`MAX_RAW_BYTES`] bytes, with invalid UTF-8 and NUL replaced by U+FFFD.
pub fn raw_for_storage(line: &[u8]) -> String {
    let head = &line[..line.len().min(MAX_RAW_BYTES)];
    String::from_utf8_lossy(head).replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(line: &str) -> Rejection {
        match parse_line(line.as_bytes(), false) {
            Parsed::Rejected(r) => r,
            other => panic!("{line} parsed as {other:?}"),
        }
    }

    fn message(line: &str) -> Message {
        match parse_line(line.as_bytes(), false) {
            Parsed::Message(m) => m,
            other => panic!("{line} parsed as {other:?}"),
        }
    }

    #[test]
    fn white_space_lines_are_blank() {
        for line in ["", " ", "\t \r", "   \r"] {
            assert_eq!(
                parse_line(line.as_bytes(), false),
                Parsed::Blank,
                "{line:?}"
            );
        }
    }

    #[test]
    fn a_valid_line_becomes_a_message_in_utc_truncated_to_microseconds() {
        let m = message(
            r#"{"id":"m-1","device":"dev-1","ts":"2026-11-29T15:00:00.2509999+01:00","payload":{"t":21.5},"extra":1}"#,
        );
        assert_eq!(m.id, "m-1");
        assert_eq!(m.device, "dev-1");
        assert_eq!(m.ts.to_rfc3339(), "2026-11-29T14:00:00.250999+00:00");
        assert_eq!(m.payload, vec![("t".to_string(), Value::from(21.5))]);
    }

    #[test]
    fn timestamps_before_1970_truncate_towards_the_earlier_instant() {
        let ts = parse_ts("1969-12-31T23:59:59.9999999Z").unwrap();
        assert_eq!(ts.to_rfc3339(), "1969-12-31T23:59:59.999999+00:00");
    }

    #[test]
    fn a_timestamp_without_offset_is_invalid() {
        let r = rejected(r#"{"id":"m","device":"d","ts":"2026-11-29T15:00:00","payload":{}}"#);
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        assert!(r.error.contains("RFC 3339"), "{}", r.error);
        assert_eq!(r.message_id.as_deref(), Some("m"));
        assert_eq!(r.device_key.as_deref(), Some("d"));
    }

    #[test]
    fn non_json_non_objects_and_bad_bytes_are_malformed() {
        for line in ["{", "[1,2]", "42", "\"s\"", "null", "{\"id\":\"m\",}"] {
            assert_eq!(rejected(line).kind, DeadLetterKind::Malformed, "{line}");
        }
        let bad_utf8 = b"{\"id\":\"\xff\"}";
        match parse_line(bad_utf8, false) {
            Parsed::Rejected(r) => assert_eq!(r.kind, DeadLetterKind::Malformed),
            other => panic!("{other:?}"),
        }
        match parse_line(b"{}", true) {
            Parsed::Rejected(r) => {
                assert_eq!(r.kind, DeadLetterKind::Malformed);
                assert!(r.error.contains("longer than"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deep_nesting_is_malformed_not_a_crash() {
        let line = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(rejected(&line).kind, DeadLetterKind::Malformed);
    }

    #[test]
    fn missing_or_ill_typed_fields_are_invalid() {
        let cases = [
            (
                r#"{"device":"d","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "missing field `id`",
            ),
            (
                r#"{"id":7,"device":"d","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "`id` is a number",
            ),
            (
                r#"{"id":"","device":"d","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "`id` is empty",
            ),
            (
                r#"{"id":"m","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "missing field `device`",
            ),
            (
                r#"{"id":"m","device":null,"ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "`device` is null",
            ),
            (
                r#"{"id":"m","device":"d","payload":{}}"#,
                "missing field `ts`",
            ),
            (
                r#"{"id":"m","device":"d","ts":5,"payload":{}}"#,
                "`ts` is a number",
            ),
            (
                r#"{"id":"m","device":"d","ts":"2026-01-01T00:00:00Z"}"#,
                "missing field `payload`",
            ),
            (
                r#"{"id":"m","device":"d","ts":"2026-01-01T00:00:00Z","payload":[1]}"#,
                "`payload` is an array",
            ),
            (
                r#"{"id":"m\u0001","device":"d","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "control character",
            ),
            (
                r#"{"id":"m\u007f","device":"d","ts":"2026-01-01T00:00:00Z","payload":{}}"#,
                "control character",
            ),
        ];
        for (line, expected) in cases {
            let r = rejected(line);
            assert_eq!(r.kind, DeadLetterKind::Invalid, "{line}");
            assert!(r.error.contains(expected), "{line}: {}", r.error);
        }
    }

    #[test]
    fn keys_are_limited_to_200_characters_not_bytes() {
        let ok = "é".repeat(200);
        let long = "é".repeat(201);
        assert!(is_valid_key(&ok));
        assert!(!is_valid_key(&long));
        let line =
            format!(r#"{{"id":"{long}","device":"d","ts":"2026-01-01T00:00:00Z","payload":{{}}}}"#);
        let r = rejected(&line);
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        assert_eq!(r.message_id, None, "an invalid id is not recorded");
        assert_eq!(r.device_key.as_deref(), Some("d"));
    }

    #[test]
    fn raw_is_cut_at_64_kib_and_has_no_nul_or_invalid_utf8() {
        let mut line = vec![b'a'; MAX_RAW_BYTES + 10];
        line[0] = 0;
        line[1] = 0xff;
        let raw = raw_for_storage(&line);
        assert!(raw.starts_with("\u{FFFD}\u{FFFD}a"));
        assert!(!raw.contains('\0'));
        assert_eq!(raw.len(), MAX_RAW_BYTES - 2 + 6);
    }
}
