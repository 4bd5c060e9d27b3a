//! The whole end state of a database, in a form that compares across runs
//! and backends: what the chaos runs and the tests check against a clean run.

use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{
    alarms, alerts, dead_letters, devices, processed_messages, readings, sensors,
};
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};

/// A reading: (device, metric, ts, value, quality, message id).
pub type ReadingRow = (String, String, String, f64, String, String);
/// An alert: (device, metric, alarm, opened at, open value, closed at, close value).
pub type AlertRow = (
    String,
    String,
    String,
    String,
    f64,
    Option<String>,
    Option<f64>,
);
/// A dead letter: (message id, device key, kind, error, raw, attempts).
pub type DeadLetterRow = (Option<String>, Option<String>, String, String, String, i32);

/// Every row other services read, with ids replaced by keys, sorted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Readings by device, metric and ts.
    pub readings: Vec<ReadingRow>,
    /// Alerts by device, metric, alarm and opening.
    pub alerts: Vec<AlertRow>,
    /// Dead letters by message id and raw line.
    pub dead_letters: Vec<DeadLetterRow>,
    /// Processed message ids.
    pub processed: Vec<String>,
    /// (device, last seen at)
    pub devices: Vec<(String, Option<String>)>,
}

fn text(i: Instant) -> String {
    i.0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

type StoredAlert = (
    String,
    String,
    String,
    Instant,
    f64,
    Option<Instant>,
    Option<f64>,
);

/// Reads the snapshot.
pub fn read(conn: &mut AnyConnection) -> QueryResult<Snapshot> {
    let readings: Vec<(String, String, Instant, f64, String, String)> = dispatch!(conn, c => readings::table
        .inner_join(sensors::table.inner_join(devices::table))
        .select((devices::key, sensors::metric, readings::ts, readings::value, readings::quality, readings::message_id))
        .order((devices::key, sensors::metric, readings::ts))
        .load(c))?;
    let alerts: Vec<StoredAlert> = dispatch!(conn, c => alerts::table
        .inner_join(alarms::table.inner_join(sensors::table.inner_join(devices::table)))
        .select((devices::key, sensors::metric, alarms::name, alerts::opened_at, alerts::open_value, alerts::closed_at, alerts::close_value))
        .order((devices::key, sensors::metric, alarms::name, alerts::opened_at))
        .load(c))?;
    let mut dead_letters: Vec<DeadLetterRow> = dispatch!(conn, c => dead_letters::table
        .select((dead_letters::message_id, dead_letters::device_key, dead_letters::kind, dead_letters::error, dead_letters::raw, dead_letters::attempts))
        .load(c))?;
    dead_letters.sort_by(|a, b| (&a.0, &a.4, &a.2).cmp(&(&b.0, &b.4, &b.2)));
    let processed: Vec<String> = dispatch!(conn, c => processed_messages::table
        .select(processed_messages::message_id)
        .order(processed_messages::message_id)
        .load(c))?;
    let devices: Vec<(String, Option<Instant>)> = dispatch!(conn, c => devices::table
        .select((devices::key, devices::last_seen_at))
        .order(devices::key)
        .load(c))?;
    Ok(Snapshot {
        readings: readings
            .into_iter()
            .map(|(d, m, ts, v, q, id)| (d, m, text(ts), v, q, id))
            .collect(),
        alerts: alerts
            .into_iter()
            .map(|(d, m, a, o, ov, cl, cv)| (d, m, a, text(o), ov, cl.map(text), cv))
            .collect(),
        dead_letters,
        processed,
        devices: devices.into_iter().map(|(k, t)| (k, t.map(text))).collect(),
    })
}
