//! Counts for operators and tests.

use diesel::dsl::{count_star, max};
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{alerts, dead_letters, devices, processed_messages, readings};
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};

/// What the database holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// Rows in `processed_messages`.
    pub processed_messages: i64,
    /// Rows in `readings`.
    pub readings: i64,
    /// Alerts without `closed_at`.
    pub open_alerts: i64,
    /// Alerts in all.
    pub alerts: i64,
    /// Devices provisioned.
    pub devices: i64,
    /// Dead-letter rows by kind.
    pub dead_letters: Vec<(String, i64)>,
    /// The latest `last_seen_at` of any device, RFC 3339.
    pub last_message_at: Option<String>,
}

impl Status {
    /// The counts as `normalizer status` prints them, one per line.
    pub fn to_text(&self) -> String {
        let kinds: Vec<String> = self
            .dead_letters
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        [
            format!("messages processed: {}", self.processed_messages),
            format!("readings: {}", self.readings),
            format!("alerts: {} ({} open)", self.alerts, self.open_alerts),
            format!("devices: {}", self.devices),
            format!(
                "dead letters: {}",
                if kinds.is_empty() {
                    "none".into()
                } else {
                    kinds.join(", ")
                }
            ),
            format!(
                "last message at: {}",
                self.last_message_at.as_deref().unwrap_or("never")
            ),
        ]
        .join("\n")
    }
}

/// Reads the counts.
pub fn read(conn: &mut AnyConnection) -> QueryResult<Status> {
    dispatch!(conn, c => {
        let last: Option<Instant> = devices::table.select(max(devices::last_seen_at)).first(c)?;
        Ok(Status {
            processed_messages: processed_messages::table.select(count_star()).first(c)?,
            readings: readings::table.select(count_star()).first(c)?,
            open_alerts: alerts::table.filter(alerts::closed_at.is_null()).select(count_star()).first(c)?,
            alerts: alerts::table.select(count_star()).first(c)?,
            devices: devices::table.select(count_star()).first(c)?,
            dead_letters: dead_letters::table
                .group_by(dead_letters::kind)
                .select((dead_letters::kind, count_star()))
                .order(dead_letters::kind)
                .load(c)?,
            last_message_at: last.map(|i| i.0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        })
    })
}
