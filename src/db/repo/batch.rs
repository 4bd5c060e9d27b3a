//! The apply engine (CONTRACT section 3, steps 2 to 8): messages in one
//! transaction, with set-based statements, ending in exactly the state that
//! applying them one at a time, in order, would. One message is a batch of
//! one ([`apply_one`]): the one-message-per-transaction mode and the end of
//! a batch's bisection run the same code, so each rule lives here once.
//!
//! The transaction reads what the batch needs in a few statements (processed
//! ids, devices, mappings, sensors, active alarms, open alerts), decides
//! every message in memory in arrival order with the pure core
//! (`core::normalize`, `core::alarm`), and writes with multi-row inserts
//! and, on PostgreSQL, array updates. The passes, in order:
//!
//! 1. [`lock_devices`], then [`processed_tokens`]: the batch's devices
//!    locked, then which ids are already processed (step 2);
//! 2. [`decide`]: each line's fate in arrival order: duplicate, dead letter
//!    (steps 1, 3 and 4, filed at once, in order) or to be processed;
//! 3. [`store_readings`]: the readings, the first of a sensor and instant
//!    winning (step 5);
//! 4. [`evaluate`]: alarms and last-seen, in arrival order (steps 6 and
//!    7), in memory;
//! 5. [`mark_processed`] and the removal of replayed ids' dead letters
//!    (step 8);
//! 6. [`Group::finish`], once a transaction: the sensors', alerts' and
//!    devices' rows that step 4 changed. A transaction applied in several
//!    passes ([`Group`]) reads each device's state once and writes it once.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::core::alarm::{evaluates_alarms, transition, Transition};
use crate::core::normalize::{normalize, DeviceSpec, Quality};
use crate::core::{DeadLetterKind, Message};
use crate::db::schema::{alerts, dead_letters as dl, devices, processed_messages, sensors};
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection, Fixed, Value};
use crate::outcome::{Applied, DeadLetter, Outcome};

use super::dead_letters;
use super::reference::{Reference, ReferenceCache};

/// One line of a batch.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// A message to apply.
    Message {
        /// The message.
        message: &'a Message,
        /// The line as read, for a dead letter.
        raw: &'a [u8],
        /// This write's token (see [`dead_letters::record`]).
        token: &'a str,
    },
    /// A line already known to be a dead letter (malformed or invalid).
    Letter {
        /// The dead letter.
        letter: &'a DeadLetter,
        /// This write's token.
        token: &'a str,
    },
}

/// Rows per statement: within PostgreSQL's 65,535 and SQLite's 32,766 binds.
const CHUNK: usize = 1000;

/// Applies one message inside the caller's transaction: a batch of one.
/// `raw` is the line as read, for a dead letter; `token` names this write
/// (see [`dead_letters::record`]). Safe to run again after a commit whose
/// outcome was unknown: the processed-id check comes first.
pub fn apply_one(
    conn: &mut AnyConnection,
    message: &Message,
    raw: &[u8],
    token: &str,
    cache: &ReferenceCache,
) -> QueryResult<Outcome> {
    let item = Item::Message {
        message,
        raw,
        token,
    };
    let mut outcomes = apply(conn, &[item], cache)?;
    Ok(outcomes.pop().expect("one outcome per item"))
}

/// Applies `items` in order inside the caller's transaction; returns one
/// outcome per item. Mappings, sensors and alarms come from `cache`.
pub fn apply(
    conn: &mut AnyConnection,
    items: &[Item<'_>],
    cache: &ReferenceCache,
) -> QueryResult<Vec<Outcome>> {
    let mut group = Group::default();
    let outcomes = group.apply(conn, items, cache)?;
    group.finish(conn)?;
    Ok(outcomes)
}

/// What the passes of one transaction share (SQLite's group commit applies
/// its messages a pass at a time, see `pipeline::apply::run_in_passes`):
/// the devices looked up (and locked, on PostgreSQL), their sensors' last
/// good instants and open alerts, and their last-seen instants. Each is
/// read once a transaction, for the devices a pass brings first, and the
/// sensors, alerts and devices are written once, by [`Group::finish`],
/// instead of once a pass: with a thousand devices a pass of 24,000
/// messages updated some 3,700 sensor and device rows. The transaction
/// holds SQLite's write lock from its first pass, so what the first pass
/// read is still what the table holds at the last.
#[derive(Default)]
pub struct Group {
    known: HashMap<String, i64>,
    looked_up: HashSet<String>,
    state: Option<State>,
    loaded: HashSet<i64>,
    last_seen: HashMap<i64, DateTime<Utc>>,
}

impl Group {
    /// Applies one pass, `items` in order, after the passes before it in
    /// the same transaction; returns one outcome per item.
    pub fn apply(
        &mut self,
        conn: &mut AnyConnection,
        items: &[Item<'_>],
        cache: &ReferenceCache,
    ) -> QueryResult<Vec<Outcome>> {
        let messages: Vec<&Message> = items
            .iter()
            .filter_map(|item| match item {
                Item::Message { message, .. } => Some(*message),
                Item::Letter { .. } => None,
            })
            .collect();
        let mut keys: Vec<&str> = messages.iter().map(|m| m.device.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        // Devices are locked before the processed ids are read: a
        // transaction of the same devices still running (one whose
        // connection was cut and abandoned, say) has ended by then, and its
        // commit is seen.
        let new_keys: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !self.looked_up.contains(*k))
            .collect();
        self.known.extend(lock_devices(conn, &new_keys)?);
        self.looked_up
            .extend(new_keys.iter().map(|k| (*k).to_owned()));
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        let processed = processed_tokens(conn, &ids)?;
        let device_ids: Vec<i64> = keys
            .iter()
            .filter_map(|k| self.known.get(*k).copied())
            .collect();
        let reference = cache.current(conn, &device_ids)?;
        let fresh: Vec<i64> = device_ids
            .iter()
            .copied()
            .filter(|d| !self.loaded.contains(d))
            .collect();
        let state = self
            .state
            .get_or_insert_with(|| State::new(reference.clone()));
        state.reference = reference;
        state.load(conn, &fresh)?;
        self.loaded.extend(fresh);

        let mut decided = decide(conn, items, &self.known, &processed, state)?;
        let stored = store_readings(conn, &decided.candidates)?;
        evaluate(state, &stored, &mut decided, &mut self.last_seen);
        let done: Vec<(&str, &str)> = decided
            .candidates
            .iter()
            .map(|c| (c.message.id.as_str(), c.token))
            .collect();
        mark_processed(conn, &done)?;
        remove_dead_letters(conn, decided.pending_delete)?;
        Ok(decided
            .outcomes
            .into_iter()
            .map(|o| o.expect("every item decided"))
            .collect())
    }

    /// Writes what the passes changed of sensors, alerts and devices (the
    /// contract's steps 6 and 7); the transaction may then commit.
    pub fn finish(self, conn: &mut AnyConnection) -> QueryResult<()> {
        if let Some(state) = &self.state {
            state.write(conn)?;
        }
        touch_devices(conn, &self.last_seen)
    }
}

/// A message of the batch that will be processed, with its readings.
struct Candidate<'a> {
    index: usize,
    message: &'a Message,
    token: &'a str,
    device_id: i64,
    readings: Vec<crate::core::normalize::Reading>,
    unmapped: u32,
}

/// What pass 1 decided.
struct Decided<'a> {
    /// Each item's outcome, once known.
    outcomes: Vec<Option<Outcome>>,
    /// The messages to process, in arrival order.
    candidates: Vec<Candidate<'a>>,
    /// Ids whose dead-letter rows processing removes.
    pending_delete: HashSet<&'a str>,
}

/// Pass 1: what each line is, in arrival order, before any reading is
/// written. Dead letters are written here, in order: a letter for an id
/// that this batch processes earlier first removes the row that the
/// processing would have removed, as one at a time would.
fn decide<'a>(
    conn: &mut AnyConnection,
    items: &'a [Item<'a>],
    known: &HashMap<String, i64>,
    processed: &HashMap<String, String>,
    state: &State,
) -> QueryResult<Decided<'a>> {
    let mut decided = Decided {
        outcomes: vec![None; items.len()],
        candidates: Vec::new(),
        pending_delete: HashSet::new(),
    };
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let (m, raw, token) = match item {
            Item::Letter { letter, token } => {
                file_letter(conn, letter, token, &mut decided.pending_delete)?;
                decided.outcomes[i] = Some(Outcome::DeadLetter(letter.kind));
                continue;
            }
            Item::Message {
                message,
                raw,
                token,
            } => (*message, *raw, *token),
        };
        if let Some(stored) = processed.get(m.id.as_str()) {
            decided.outcomes[i] = Some(if stored == token {
                Outcome::Processed(Applied::default())
            } else {
                Outcome::Duplicate
            });
            continue;
        }
        if seen.contains(m.id.as_str()) {
            decided.outcomes[i] = Some(Outcome::Duplicate);
            continue;
        }
        let rejected = match known.get(m.device.as_str()) {
            None => Err((
                DeadLetterKind::UnknownDevice,
                format!("no device with key {:?} is provisioned", m.device),
            )),
            Some(&device_id) => normalize(&m.payload, state.spec(device_id))
                .map(|n| (device_id, n))
                .map_err(|error| (DeadLetterKind::Invalid, error)),
        };
        match rejected {
            Ok((device_id, n)) => {
                seen.insert(m.id.as_str());
                decided.pending_delete.insert(m.id.as_str());
                decided.candidates.push(Candidate {
                    index: i,
                    message: m,
                    token,
                    device_id,
                    readings: n.readings,
                    unmapped: n.unmapped,
                });
            }
            Err((kind, error)) => {
                let letter = DeadLetter::of(m, raw, kind, error);
                file_letter(conn, &letter, token, &mut decided.pending_delete)?;
                decided.outcomes[i] = Some(Outcome::DeadLetter(kind));
            }
        }
    }
    Ok(decided)
}

/// Pass 2: readings, the first one of a sensor and instant wins. Returns,
/// for each reading of the candidates in arrival order, whether it was
/// stored. They are written in key order, `(sensor, instant)`: SQLite's
/// index is walked forward instead of all over, and PostgreSQL's
/// transactions take their index locks in one order.
fn store_readings(
    conn: &mut AnyConnection,
    candidates: &[Candidate<'_>],
) -> QueryResult<Vec<bool>> {
    let mut rows: Vec<(usize, ReadingRow<'_>)> = candidates
        .iter()
        .flat_map(|c| c.readings.iter().map(move |r| (c.message, r)))
        .enumerate()
        .map(|(i, (m, r))| {
            let row = (
                r.sensor_id,
                Instant(m.ts),
                r.value,
                r.quality.as_str(),
                m.id.as_str(),
            );
            (i, row)
        })
        .collect();
    let mut stored = vec![false; rows.len()];
    // By key, then arrival: of the rows of one key the first is kept.
    rows.sort_unstable_by_key(|(i, row)| (row.0, row.1, *i));
    rows.dedup_by_key(|(_, row)| (row.0, row.1));
    insert_readings(conn, &rows, &mut stored)?;
    Ok(stored)
}

/// Pass 3: alarms and last-seen, in arrival order, in memory (written by
/// [`Group::finish`]).
fn evaluate(
    state: &mut State,
    stored: &[bool],
    decided: &mut Decided<'_>,
    last_seen: &mut HashMap<i64, DateTime<Utc>>,
) {
    let mut stored = stored.iter();
    for c in &decided.candidates {
        let m = c.message;
        let mut applied = Applied {
            unmapped: c.unmapped,
            ..Applied::default()
        };
        for r in &c.readings {
            if !stored.next().expect("one flag a reading") {
                applied.duplicate_readings += 1;
                continue;
            }
            applied.readings += 1;
            if r.quality == Quality::Good && evaluates_alarms(m.ts, state.latest_good(r.sensor_id))
            {
                state.set_latest_good(r.sensor_id, m.ts);
                state.evaluate(r.sensor_id, m.ts, r.value, &mut applied);
            }
        }
        let seen_at = last_seen.entry(c.device_id).or_insert(m.ts);
        *seen_at = (*seen_at).max(m.ts);
        decided.outcomes[c.index] = Some(Outcome::Processed(applied));
    }
}

/// Files a dead letter at its place in the batch. If this batch processed
/// the same id before, the row that processing removes goes first.
fn file_letter(
    conn: &mut AnyConnection,
    letter: &DeadLetter,
    token: &str,
    pending_delete: &mut HashSet<&str>,
) -> QueryResult<()> {
    if let Some(id) = letter.message_id.as_deref() {
        if pending_delete.remove(id) {
            dead_letters::remove(conn, id)?;
        }
    }
    dead_letters::record(conn, letter, token)
}

fn processed_tokens(
    conn: &mut AnyConnection,
    ids: &[&str],
) -> QueryResult<HashMap<String, String>> {
    use processed_messages::dsl as p;
    let mut out = HashMap::new();
    if let AnyConnection::Sqlite(c, db) = conn {
        // One prepared lookup an id: no `IN` list of a thousand values
        // parsed, prepared and built into a temporary index each time.
        let mut token = Fixed::prepare(
            c,
            db,
            "SELECT write_token FROM processed_messages WHERE message_id = ?1",
        )?;
        for id in ids {
            if let Some(stored) = token.first_text(&[Value::Text(id)])? {
                out.insert((*id).to_owned(), stored);
            }
        }
        return Ok(out);
    }
    for chunk in ids.chunks(CHUNK) {
        let rows: Vec<(String, String)> = dispatch!(conn, c => p::processed_messages
            .filter(p::message_id.eq_any(chunk))
            .select((p::message_id, p::write_token))
            .load(c))?;
        out.extend(rows);
    }
    Ok(out)
}

/// The batch's device ids by key, locked on PostgreSQL in id order (so
/// that batches never deadlock each other). Their profiles come from the
/// reference cache.
fn lock_devices(conn: &mut AnyConnection, keys: &[&str]) -> QueryResult<HashMap<String, i64>> {
    use devices::dsl as d;
    let mut out = HashMap::new();
    for chunk in keys.chunks(CHUNK) {
        let query = d::devices
            .filter(d::key.eq_any(chunk))
            .select((d::id, d::key))
            .order(d::id);
        let rows: Vec<(i64, String)> = match conn {
            AnyConnection::Pg(c) => query.for_update().load(c)?,
            AnyConnection::Sqlite(c, _) => query.load(c)?,
        };
        out.extend(rows.into_iter().map(|(id, key)| (key, id)));
    }
    Ok(out)
}

enum OpenAlert {
    Stored(i64),
    New(usize),
}

struct NewAlert {
    alarm_id: i64,
    opened_at: DateTime<Utc>,
    open_value: f64,
    closed: Option<(DateTime<Utc>, f64)>,
}

/// What the batch reads, and what it will write, of its devices.
struct State {
    reference: Arc<Reference>,
    no_sensors: DeviceSpec,
    latest_good: HashMap<i64, Option<DateTime<Utc>>>,
    latest_changed: HashSet<i64>,
    open: HashMap<i64, OpenAlert>,
    new_alerts: Vec<NewAlert>,
    closed: Vec<(i64, DateTime<Utc>, f64)>,
}

impl State {
    fn new(reference: Arc<Reference>) -> State {
        State {
            reference,
            no_sensors: DeviceSpec::default(),
            latest_good: HashMap::new(),
            latest_changed: HashSet::new(),
            open: HashMap::new(),
            new_alerts: Vec::new(),
            closed: Vec::new(),
        }
    }

    /// Reads the last good instants and open alerts of `device_ids`'
    /// sensors (devices not read before in this transaction).
    fn load(&mut self, conn: &mut AnyConnection, device_ids: &[i64]) -> QueryResult<()> {
        let reference = self.reference.clone();
        let mut sensor_ids = Vec::new();
        for device in device_ids {
            if let Some(spec) = reference.specs.get(device) {
                sensor_ids.extend(spec.sensors.values().map(|s| s.id));
            }
        }
        for chunk in sensor_ids.chunks(CHUNK) {
            use sensors::dsl as s;
            let rows: Vec<(i64, Option<Instant>)> = dispatch!(conn, c => s::sensors
                .filter(s::id.eq_any(chunk))
                .select((s::id, s::last_good_at))
                .load(c))?;
            self.latest_good
                .extend(rows.into_iter().map(|(id, t)| (id, t.map(|i| i.0))));
        }
        let alarm_ids: Vec<i64> = sensor_ids
            .iter()
            .filter_map(|s| reference.alarms.get(s))
            .flatten()
            .map(|a| a.id)
            .collect();
        for chunk in alarm_ids.chunks(CHUNK) {
            use alerts::dsl as al;
            let rows: Vec<(i64, i64)> = dispatch!(conn, c => al::alerts
                .filter(al::alarm_id.eq_any(chunk))
                .filter(al::closed_at.is_null())
                .select((al::alarm_id, al::id))
                .load(c))?;
            self.open.extend(
                rows.into_iter()
                    .map(|(alarm, alert)| (alarm, OpenAlert::Stored(alert))),
            );
        }
        Ok(())
    }

    fn spec(&self, device_id: i64) -> &DeviceSpec {
        self.reference
            .specs
            .get(&device_id)
            .unwrap_or(&self.no_sensors)
    }

    fn latest_good(&self, sensor: i64) -> Option<DateTime<Utc>> {
        self.latest_good.get(&sensor).copied().flatten()
    }

    fn set_latest_good(&mut self, sensor: i64, ts: DateTime<Utc>) {
        self.latest_good.insert(sensor, Some(ts));
        self.latest_changed.insert(sensor);
    }

    fn evaluate(&mut self, sensor: i64, ts: DateTime<Utc>, value: f64, applied: &mut Applied) {
        let reference = self.reference.clone();
        let Some(defs) = reference.alarms.get(&sensor) else {
            return;
        };
        for alarm in defs {
            let open = self.open.get(&alarm.id);
            match transition(alarm.condition, alarm.threshold, value, open.is_some()) {
                Transition::Open => {
                    self.new_alerts.push(NewAlert {
                        alarm_id: alarm.id,
                        opened_at: ts,
                        open_value: value,
                        closed: None,
                    });
                    self.open
                        .insert(alarm.id, OpenAlert::New(self.new_alerts.len() - 1));
                    applied.alerts_opened += 1;
                }
                Transition::Close => {
                    match self
                        .open
                        .remove(&alarm.id)
                        .expect("close needs an open alert")
                    {
                        OpenAlert::Stored(id) => self.closed.push((id, ts, value)),
                        OpenAlert::New(i) => self.new_alerts[i].closed = Some((ts, value)),
                    }
                    applied.alerts_closed += 1;
                }
                Transition::Stay => {}
            }
        }
    }

    fn write(&self, conn: &mut AnyConnection) -> QueryResult<()> {
        use alerts::dsl as al;
        let mut sensors: Vec<(i64, DateTime<Utc>)> = self
            .latest_changed
            .iter()
            .map(|s| (*s, self.latest_good[s].expect("set when changed")))
            .collect();
        sensors.sort_unstable();
        match conn {
            AnyConnection::Pg(c) => {
                for chunk in sensors.chunks(CHUNK * 10) {
                    let (ids, ts): (Vec<i64>, Vec<DateTime<Utc>>) = chunk.iter().copied().unzip();
                    diesel::sql_query(
                        "UPDATE sensors AS s SET last_good_at = v.ts \
                         FROM unnest($1::bigint[], $2::timestamptz[]) AS v(id, ts) WHERE s.id = v.id",
                    )
                    .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(ids)
                    .bind::<diesel::sql_types::Array<diesel::sql_types::Timestamptz>, _>(ts)
                    .execute(c)?;
                }
            }
            AnyConnection::Sqlite(c, db) => {
                let mut update =
                    Fixed::prepare(c, db, "UPDATE sensors SET last_good_at = ?1 WHERE id = ?2")?;
                for (id, ts) in &sensors {
                    let ts = Instant(*ts).sqlite_text();
                    update.run(&[Value::Text(&ts), Value::Int(*id)])?;
                }
            }
        }
        for (id, ts, value) in &self.closed {
            dispatch!(conn, c => diesel::update(al::alerts.find(id))
                .set((al::closed_at.eq(Some(Instant(*ts))), al::close_value.eq(Some(*value))))
                .execute(c))?;
        }
        let rows: Vec<_> = self
            .new_alerts
            .iter()
            .map(|a| {
                (
                    al::alarm_id.eq(a.alarm_id),
                    al::opened_at.eq(Instant(a.opened_at)),
                    al::open_value.eq(a.open_value),
                    al::closed_at.eq(a.closed.map(|(t, _)| Instant(t))),
                    al::close_value.eq(a.closed.map(|(_, v)| v)),
                )
            })
            .collect();
        for chunk in rows.chunks(CHUNK) {
            dispatch!(conn, c => diesel::insert_into(al::alerts).values(chunk).execute(c))?;
        }
        Ok(())
    }
}

type ReadingRow<'a> = (i64, Instant, f64, &'static str, &'a str);

/// Inserts readings, each numbered by its place in `stored`, unless their
/// sensor has one at that instant; sets `stored` for those stored.
fn insert_readings(
    conn: &mut AnyConnection,
    rows: &[(usize, ReadingRow<'_>)],
    stored: &mut [bool],
) -> QueryResult<()> {
    match conn {
        AnyConnection::Pg(c) => {
            let place: HashMap<(i64, DateTime<Utc>), usize> =
                rows.iter().map(|(i, r)| ((r.0, r.1 .0), *i)).collect();
            for key in insert_readings_unnest(c, rows)? {
                stored[place[&key]] = true;
            }
        }
        AnyConnection::Sqlite(c, db) => {
            let mut insert = Fixed::prepare(c, db, INSERT_READING)?;
            for (i, (sensor, ts, value, quality, id)) in rows {
                let ts = ts.sqlite_text();
                let row = [
                    Value::Int(*sensor),
                    Value::Text(&ts),
                    Value::Real(*value),
                    Value::Text(quality),
                    Value::Text(id),
                ];
                stored[*i] = insert.run(&row)? == 1;
            }
        }
    }
    Ok(())
}

/// PostgreSQL: one statement of five arrays per 10,000 rows, parsed and
/// planned once, where the multi-row VALUES form has five parameters a row
/// (docs/PERFORMANCE.md, "PostgreSQL: a batch's readings in one `INSERT … SELECT FROM unnest(…)`").
fn insert_readings_unnest(
    c: &mut diesel::PgConnection,
    rows: &[(usize, ReadingRow<'_>)],
) -> QueryResult<Vec<(i64, DateTime<Utc>)>> {
    let mut stored = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(CHUNK * 10) {
        let mut sensors = Vec::with_capacity(chunk.len());
        let mut instants = Vec::with_capacity(chunk.len());
        let mut values = Vec::with_capacity(chunk.len());
        let mut qualities = Vec::with_capacity(chunk.len());
        let mut ids = Vec::with_capacity(chunk.len());
        for (_, (sensor, ts, value, quality, id)) in chunk {
            sensors.push(*sensor);
            instants.push(ts.0);
            values.push(*value);
            qualities.push(*quality);
            ids.push(*id);
        }
        let inserted: Vec<Inserted> = diesel::sql_query(
            "INSERT INTO readings (sensor_id, ts, value, quality, message_id) \
             SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::float8[], $4::text[], $5::text[]) \
             ON CONFLICT (sensor_id, ts) DO NOTHING RETURNING sensor_id, ts",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(sensors)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Timestamptz>, _>(instants)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Double>, _>(values)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(qualities)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(ids)
        .load(c)?;
        stored.extend(inserted.into_iter().map(|row| (row.sensor_id, row.ts)));
    }
    Ok(stored)
}

/// SQLite: one reading, unless its sensor has one at that instant. One
/// statement a row, prepared once a pass ([`Fixed`]), run in key order; its
/// row count says whether the row was stored, and a single-row write needs
/// no statement journal (docs/PERFORMANCE.md, "A write path made for
/// SQLite").
const INSERT_READING: &str = "INSERT INTO readings (sensor_id, ts, value, quality, message_id) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (sensor_id, ts) DO NOTHING";

/// A reading the PostgreSQL insert stored.
#[derive(diesel::QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    sensor_id: i64,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    ts: DateTime<Utc>,
}

fn touch_devices(
    conn: &mut AnyConnection,
    last_seen: &HashMap<i64, DateTime<Utc>>,
) -> QueryResult<()> {
    let mut rows: Vec<(i64, DateTime<Utc>)> = last_seen.iter().map(|(d, t)| (*d, *t)).collect();
    rows.sort_unstable();
    match conn {
        AnyConnection::Pg(c) => {
            for chunk in rows.chunks(CHUNK * 10) {
                let (ids, ts): (Vec<i64>, Vec<DateTime<Utc>>) = chunk.iter().copied().unzip();
                diesel::sql_query(
                    "UPDATE devices AS d SET last_seen_at = v.ts \
                     FROM unnest($1::bigint[], $2::timestamptz[]) AS v(id, ts) \
                     WHERE d.id = v.id AND (d.last_seen_at IS NULL OR d.last_seen_at < v.ts)",
                )
                .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(ids)
                .bind::<diesel::sql_types::Array<diesel::sql_types::Timestamptz>, _>(ts)
                .execute(c)?;
            }
        }
        AnyConnection::Sqlite(c, db) => {
            let mut update = Fixed::prepare(
                c,
                db,
                "UPDATE devices SET last_seen_at = ?1 \
                 WHERE id = ?2 AND (last_seen_at IS NULL OR last_seen_at < ?1)",
            )?;
            for (id, ts) in rows {
                let ts = Instant(ts).sqlite_text();
                update.run(&[Value::Text(&ts), Value::Int(id)])?;
            }
        }
    }
    Ok(())
}

/// A dead-lettered id that is now processed (a replay after provisioning)
/// loses its dead-letter row.
fn remove_dead_letters(conn: &mut AnyConnection, ids: HashSet<&str>) -> QueryResult<()> {
    match conn {
        AnyConnection::Pg(c) => {
            let ids: Vec<&str> = ids.into_iter().collect();
            for chunk in ids.chunks(CHUNK) {
                diesel::delete(dl::table.filter(dl::message_id.eq_any(chunk))).execute(c)?;
            }
        }
        AnyConnection::Sqlite(c, db) => {
            let (Some(&low), Some(&high)) = (ids.iter().min(), ids.iter().max()) else {
                return Ok(());
            };
            // Dead letters are few: one walk of the index over the ids'
            // range finds every row there is to remove, where a delete an
            // id seeks once for each (3% of the writer's time). A range
            // holding more rows than there are ids is not walked to its
            // end: then each id is deleted on its own, one prepared
            // statement a row (see [`Fixed`]).
            let most = ids.len() + 1;
            let filed = Fixed::prepare(
                c,
                db,
                "SELECT message_id FROM dead_letters \
                 WHERE message_id BETWEEN ?1 AND ?2 ORDER BY message_id LIMIT ?3",
            )?
            .texts(&[
                Value::Text(low),
                Value::Text(high),
                Value::Int(i64::try_from(most).unwrap_or(i64::MAX)),
            ])?;
            let mut delete =
                Fixed::prepare(c, db, "DELETE FROM dead_letters WHERE message_id = ?1")?;
            if filed.len() < most {
                for id in filed.iter().filter(|id| ids.contains(id.as_str())) {
                    delete.run(&[Value::Text(id)])?;
                }
            } else {
                for id in ids {
                    delete.run(&[Value::Text(id)])?;
                }
            }
        }
    }
    Ok(())
}

/// SQLite: one prepared statement a row (see [`Fixed`]).
fn mark_processed(conn: &mut AnyConnection, done: &[(&str, &str)]) -> QueryResult<()> {
    use processed_messages::dsl as p;
    let now = Instant(Utc::now());
    if let AnyConnection::Sqlite(c, db) = conn {
        let mut insert = Fixed::prepare(
            c,
            db,
            "INSERT INTO processed_messages (message_id, processed_at, write_token) \
             VALUES (?1, ?2, ?3)",
        )?;
        let now = now.sqlite_text();
        for (id, token) in done {
            insert.run(&[Value::Text(id), Value::Text(&now), Value::Text(token)])?;
        }
        return Ok(());
    }
    for chunk in done.chunks(CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(id, token)| {
                (
                    p::message_id.eq(*id),
                    p::processed_at.eq(now),
                    p::write_token.eq(*token),
                )
            })
            .collect();
        dispatch!(conn, c => diesel::insert_into(p::processed_messages).values(&rows).execute(c))?;
    }
    Ok(())
}
