//! One message, applied (CONTRACT section 3, steps 2 to 8).

use std::collections::HashMap;

use chrono::Utc;
use diesel::prelude::*;

use crate::core::alarm::{evaluates_alarms, transition, Condition, Transition};
use crate::core::normalize::{normalize, DeviceSpec, Quality, Reading};
use crate::core::{DeadLetterKind, Message};
use crate::db::schema::{
    alarms, alerts, devices, processed_messages, profile_fields, readings, sensors,
};
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};
use crate::outcome::{Applied, DeadLetter, Outcome};

use super::dead_letters;
use super::reference::{add_sensor, map_field};

/// Applies one message inside the caller's transaction. `raw` is the line as
/// read, for a dead letter; `token` names this write (see
/// [`dead_letters::record`]). Safe to run again after a commit whose outcome
/// was unknown: the processed-id check comes first.
pub fn apply(
    conn: &mut AnyConnection,
    msg: &Message,
    raw: &[u8],
    token: &str,
) -> QueryResult<Outcome> {
    // The device is locked first, so that a transaction of the same device
    // still running (one whose connection was cut and abandoned, say) has
    // ended before the processed id is read, and its commit is seen.
    let device = lock_device(conn, &msg.device)?;
    // Step 2: an id already processed changes nothing. Our own token there
    // means our earlier commit landed and only its acknowledgement was lost.
    if let Some(stored) = processed_token(conn, &msg.id)? {
        return Ok(if stored == token {
            Outcome::Processed(Applied::default())
        } else {
            Outcome::Duplicate
        });
    }
    let dead_letter = |conn: &mut AnyConnection, kind: DeadLetterKind, error: String| {
        let letter = DeadLetter::of(msg, raw, kind, error);
        dead_letters::record(conn, &letter, token).map(|()| Outcome::DeadLetter(kind))
    };
    // Step 3.
    let Some((device_id, profile_id)) = device else {
        let error = format!("no device with key {:?} is provisioned", msg.device);
        return dead_letter(conn, DeadLetterKind::UnknownDevice, error);
    };
    // Step 4.
    let (spec, latest_good) = device_spec(conn, device_id, profile_id)?;
    let normalized = match normalize(&msg.payload, &spec) {
        Ok(n) => n,
        Err(error) => return dead_letter(conn, DeadLetterKind::Invalid, error),
    };
    let ts = Instant(msg.ts);
    let mut applied = Applied {
        unmapped: normalized.unmapped,
        ..Applied::default()
    };
    for reading in &normalized.readings {
        // Step 5.
        if insert_reading(conn, reading, ts, &msg.id)? == 0 {
            applied.duplicate_readings += 1;
            continue;
        }
        applied.readings += 1;
        // Step 6.
        let latest = latest_good.get(&reading.sensor_id).copied().flatten();
        if reading.quality == Quality::Good && evaluates_alarms(msg.ts, latest.map(|i| i.0)) {
            set_latest_good(conn, reading.sensor_id, ts)?;
            evaluate_alarms(conn, reading, ts, &mut applied)?;
        }
    }
    // Steps 7 and 8.
    touch_device(conn, device_id, ts)?;
    mark_processed(conn, &msg.id, token)?;
    dead_letters::remove(conn, &msg.id)?;
    Ok(Outcome::Processed(applied))
}

fn processed_token(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<String>> {
    use processed_messages::dsl as p;
    dispatch!(conn, c => p::processed_messages
        .filter(p::message_id.eq(id))
        .select(p::write_token)
        .first(c)
        .optional())
}

/// Finds the device and, on PostgreSQL, locks its row for the transaction, so
/// that one device's messages apply one after another also across processes.
/// (A SQLite write transaction holds the whole database already.)
fn lock_device(conn: &mut AnyConnection, key: &str) -> QueryResult<Option<(i64, i64)>> {
    use devices::dsl as d;
    let query = d::devices
        .filter(d::key.eq(key))
        .select((d::id, d::profile_id));
    match conn {
        AnyConnection::Pg(c) => query.for_update().first(c).optional(),
        AnyConnection::Sqlite(c) => query.first(c).optional(),
    }
}

type SensorRow = (
    i64,
    String,
    f64,
    f64,
    Option<f64>,
    Option<f64>,
    Option<Instant>,
);

/// The device's profile mappings and sensors, and each sensor's latest good
/// reading time.
fn device_spec(
    conn: &mut AnyConnection,
    device_id: i64,
    profile_id: i64,
) -> QueryResult<(DeviceSpec, HashMap<i64, Option<Instant>>)> {
    use profile_fields::dsl as f;
    use sensors::dsl as s;
    let fields: Vec<(String, String, f64, f64)> = dispatch!(conn, c => f::profile_fields
        .filter(f::profile_id.eq(profile_id))
        .select((f::field, f::metric, f::scale, f::offset_value))
        .load(c))?;
    let sensors: Vec<SensorRow> = dispatch!(conn, c => s::sensors
        .filter(s::device_id.eq(device_id))
        .select((s::id, s::metric, s::scale, s::offset_value, s::min_value, s::max_value, s::last_good_at))
        .load(c))?;
    let mut spec = DeviceSpec::default();
    for (field, metric, scale, offset) in fields {
        map_field(&mut spec.fields, field, (metric, scale, offset));
    }
    let mut latest = HashMap::new();
    for (id, metric, scale, offset, min, max, last_good) in sensors {
        add_sensor(&mut spec, metric, (id, scale, offset, min, max));
        latest.insert(id, last_good);
    }
    Ok((spec, latest))
}

/// Inserts a reading unless its sensor has one at that instant; returns the
/// rows inserted (0 or 1).
fn insert_reading(
    conn: &mut AnyConnection,
    r: &Reading,
    ts: Instant,
    message_id: &str,
) -> QueryResult<usize> {
    use readings::dsl as rd;
    let row = (
        rd::sensor_id.eq(r.sensor_id),
        rd::ts.eq(ts),
        rd::value.eq(r.value),
        rd::quality.eq(r.quality.as_str()),
        rd::message_id.eq(message_id),
    );
    dispatch!(conn, c => diesel::insert_into(rd::readings)
        .values(row)
        .on_conflict((rd::sensor_id, rd::ts))
        .do_nothing()
        .execute(c))
}

fn set_latest_good(conn: &mut AnyConnection, sensor_id: i64, ts: Instant) -> QueryResult<usize> {
    use sensors::dsl as s;
    dispatch!(conn, c => diesel::update(s::sensors.find(sensor_id))
        .set(s::last_good_at.eq(ts))
        .execute(c))
}

fn evaluate_alarms(
    conn: &mut AnyConnection,
    reading: &Reading,
    ts: Instant,
    applied: &mut Applied,
) -> QueryResult<()> {
    use alarms::dsl as a;
    use alerts::dsl as al;
    let active: Vec<(i64, String, f64)> = dispatch!(conn, c => a::alarms
        .filter(a::sensor_id.eq(reading.sensor_id))
        .filter(a::active.eq(true))
        .select((a::id, a::condition, a::threshold))
        .order(a::id)
        .load(c))?;
    if active.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = active.iter().map(|(id, _, _)| *id).collect();
    let open: HashMap<i64, i64> = dispatch!(conn, c => al::alerts
        .filter(al::alarm_id.eq_any(&ids))
        .filter(al::closed_at.is_null())
        .select((al::alarm_id, al::id))
        .load::<(i64, i64)>(c))?
    .into_iter()
    .collect();
    for (alarm_id, condition, threshold) in active {
        let Some(condition) = Condition::parse(&condition) else {
            log::warn!("alarm {alarm_id} has an unknown condition {condition:?}; skipped");
            continue;
        };
        let open_alert = open.get(&alarm_id).copied();
        match transition(condition, threshold, reading.value, open_alert.is_some()) {
            Transition::Open => {
                let row = (
                    al::alarm_id.eq(alarm_id),
                    al::opened_at.eq(ts),
                    al::open_value.eq(reading.value),
                );
                dispatch!(conn, c => diesel::insert_into(al::alerts).values(row).execute(c))?;
                applied.alerts_opened += 1;
            }
            Transition::Close => {
                let alert = open_alert.expect("close needs an open alert");
                dispatch!(conn, c => diesel::update(al::alerts.find(alert))
                    .set((al::closed_at.eq(Some(ts)), al::close_value.eq(Some(reading.value))))
                    .execute(c))?;
                applied.alerts_closed += 1;
            }
            Transition::Stay => {}
        }
    }
    Ok(())
}

/// `last_seen_at` becomes the latest `ts` of any processed message.
fn touch_device(conn: &mut AnyConnection, device_id: i64, ts: Instant) -> QueryResult<usize> {
    use devices::dsl as d;
    dispatch!(conn, c => diesel::update(
        d::devices
            .filter(d::id.eq(device_id))
            .filter(d::last_seen_at.is_null().or(d::last_seen_at.lt(ts))),
    )
    .set(d::last_seen_at.eq(ts))
    .execute(c))
}

fn mark_processed(conn: &mut AnyConnection, id: &str, token: &str) -> QueryResult<usize> {
    use processed_messages::dsl as p;
    let row = (
        p::message_id.eq(id),
        p::processed_at.eq(Instant(Utc::now())),
        p::write_token.eq(token),
    );
    dispatch!(conn, c => diesel::insert_into(p::processed_messages).values(row).execute(c))
}
