//! An independent check of the apply engine's semantics: the contract's
//! section 3 written out a second time, as an in-memory model driven by the
//! pure core (`parse_line`, `normalize`, `evaluates_alarms`, `transition`)
//! one message at a time, in file order. The engine (`db/repo/batch.rs`,
//! through the real pipeline, on a real database) must end in the state the
//! model predicts, at every batch size, on both backends.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use normalizer::core::alarm::{evaluates_alarms, transition, Condition, Transition};
use normalizer::core::message::{parse_line, raw_for_storage, Parsed};
use normalizer::core::normalize::{normalize, DeviceSpec, FieldMapping, Quality, SensorSpec};
use normalizer::core::provisioning::Provisioning;
use normalizer::core::DeadLetterKind;
use normalizer::db::repo::snapshot::{AlertRow, DeadLetterRow, ReadingRow, Snapshot};
use normalizer::gen::{self, GenOptions};
use normalizer::pipeline::{IngestOptions, SQLITE_BATCH_SIZE, SQLITE_PASS_SIZE};

use crate::support::{self, both, msg, TestDb};

/// A sensor in the model: its device and metric, its active alarms.
struct ModelSensor {
    device: String,
    metric: String,
    alarms: Vec<(String, Condition, f64)>,
}

/// (sensor, alarm name, opened at, open value, closed at and value)
type ModelAlert = (
    usize,
    String,
    DateTime<Utc>,
    f64,
    Option<(DateTime<Utc>, f64)>,
);

/// The tables other services read, as the contract says one message at a
/// time leaves them.
#[derive(Default)]
struct Model {
    specs: HashMap<String, DeviceSpec>,
    sensors: Vec<ModelSensor>,
    processed: HashSet<String>,
    /// (sensor, ts) -> (value, quality, message id)
    readings: BTreeMap<(usize, DateTime<Utc>), (f64, Quality, String)>,
    latest_good: HashMap<usize, DateTime<Utc>>,
    /// (sensor, alarm name) -> index into `alerts` of its open alert.
    open: HashMap<(usize, String), usize>,
    alerts: Vec<ModelAlert>,
    /// Rows with an id by id; rows without one in order.
    letters: BTreeMap<String, DeadLetterRow>,
    anonymous: Vec<DeadLetterRow>,
    last_seen: BTreeMap<String, Option<DateTime<Utc>>>,
}

impl Model {
    fn new(provisioning: &Provisioning) -> Model {
        let mut model = Model::default();
        for device in &provisioning.devices {
            let profile = &provisioning.profiles[&device.profile];
            let mut spec = DeviceSpec::default();
            for (name, field) in &profile.fields {
                let mapping = FieldMapping {
                    metric: field.metric.clone(),
                    scale: field.scale,
                    offset: field.offset,
                };
                spec.fields.insert(name.clone(), mapping);
            }
            for sensor in &device.sensors {
                let id = model.sensors.len();
                let alarms = sensor
                    .alarms
                    .iter()
                    .filter(|a| a.active)
                    .map(|a| {
                        (
                            a.name.clone(),
                            Condition::parse(&a.condition).unwrap(),
                            a.threshold,
                        )
                    })
                    .collect();
                model.sensors.push(ModelSensor {
                    device: device.key.clone(),
                    metric: sensor.metric.clone(),
                    alarms,
                });
                let spec_of_sensor = SensorSpec {
                    id: id as i64,
                    scale: sensor.scale,
                    offset: sensor.offset,
                    min: sensor.min,
                    max: sensor.max,
                };
                spec.sensors.insert(sensor.metric.clone(), spec_of_sensor);
            }
            model.specs.insert(device.key.clone(), spec);
            model.last_seen.insert(device.key.clone(), None);
        }
        model
    }

    /// One line, as CONTRACT section 3 says.
    fn line(&mut self, line: &str) {
        let raw = raw_for_storage(line.as_bytes());
        let m = match parse_line(line.as_bytes(), false) {
            Parsed::Blank => return,
            Parsed::Rejected(r) => {
                return self.letter(r.message_id, r.device_key, r.kind, r.error, raw);
            }
            Parsed::Message(m) => m,
        };
        // Step 2.
        if self.processed.contains(&m.id) {
            return;
        }
        // Step 3.
        let Some(spec) = self.specs.get(&m.device) else {
            let kind = DeadLetterKind::UnknownDevice;
            return self.letter(Some(m.id), Some(m.device), kind, String::new(), raw);
        };
        // Step 4.
        let normalized = match normalize(&m.payload, spec) {
            Ok(n) => n,
            Err(error) => {
                let kind = DeadLetterKind::Invalid;
                return self.letter(Some(m.id), Some(m.device), kind, error, raw);
            }
        };
        for reading in normalized.readings {
            let sensor = reading.sensor_id as usize;
            // Step 5.
            if self.readings.contains_key(&(sensor, m.ts)) {
                continue;
            }
            let stored = (reading.value, reading.quality, m.id.clone());
            self.readings.insert((sensor, m.ts), stored);
            // Step 6.
            let latest = self.latest_good.get(&sensor).copied();
            if reading.quality == Quality::Good && evaluates_alarms(m.ts, latest) {
                self.latest_good.insert(sensor, m.ts);
                self.evaluate(sensor, m.ts, reading.value);
            }
        }
        // Steps 7 and 8, and a replayed id's dead letter.
        let seen = self.last_seen.get_mut(&m.device).expect("a known device");
        *seen = Some(seen.map_or(m.ts, |s| s.max(m.ts)));
        self.letters.remove(&m.id);
        self.processed.insert(m.id);
    }

    fn evaluate(&mut self, sensor: usize, ts: DateTime<Utc>, value: f64) {
        for (name, condition, threshold) in &self.sensors[sensor].alarms {
            let key = (sensor, name.clone());
            let open = self.open.get(&key).copied();
            match transition(*condition, *threshold, value, open.is_some()) {
                Transition::Open => {
                    self.open.insert(key, self.alerts.len());
                    self.alerts.push((sensor, name.clone(), ts, value, None));
                }
                Transition::Close => {
                    let i = self.open.remove(&key).expect("an open alert");
                    self.alerts[i].4 = Some((ts, value));
                }
                Transition::Stay => {}
            }
        }
    }

    fn letter(
        &mut self,
        id: Option<String>,
        device: Option<String>,
        kind: DeadLetterKind,
        error: String,
        raw: String,
    ) {
        let row = (id.clone(), device, kind.as_str().to_string(), error, raw, 1);
        match id {
            None => self.anonymous.push(row),
            Some(id) => {
                let attempts = self.letters.get(&id).map_or(0, |r| r.5);
                self.letters
                    .insert(id, (row.0, row.1, row.2, row.3, row.4, attempts + 1));
            }
        }
    }

    /// The model in the snapshot's form.
    fn snapshot(&self) -> Snapshot {
        let text = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut readings: Vec<ReadingRow> = self
            .readings
            .iter()
            .map(|((s, ts), (value, quality, id))| {
                let sensor = &self.sensors[*s];
                let (d, m) = (sensor.device.clone(), sensor.metric.clone());
                (
                    d,
                    m,
                    text(*ts),
                    *value,
                    quality.as_str().to_string(),
                    id.clone(),
                )
            })
            .collect();
        readings.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        let mut alerts: Vec<AlertRow> = self
            .alerts
            .iter()
            .map(|(s, name, opened, value, closed)| {
                let sensor = &self.sensors[*s];
                (
                    sensor.device.clone(),
                    sensor.metric.clone(),
                    name.clone(),
                    text(*opened),
                    *value,
                    closed.map(|(t, _)| text(t)),
                    closed.map(|(_, v)| v),
                )
            })
            .collect();
        alerts.sort_by(|a, b| (&a.0, &a.1, &a.2, &a.3).cmp(&(&b.0, &b.1, &b.2, &b.3)));
        let mut dead_letters: Vec<DeadLetterRow> = self.letters.values().cloned().collect();
        dead_letters.extend(self.anonymous.iter().cloned());
        dead_letters.sort_by(|a, b| (&a.0, &a.4, &a.2).cmp(&(&b.0, &b.4, &b.2)));
        let mut processed: Vec<String> = self.processed.iter().cloned().collect();
        processed.sort();
        Snapshot {
            readings,
            alerts,
            dead_letters,
            processed,
            devices: self
                .last_seen
                .iter()
                .map(|(k, t)| (k.clone(), t.map(text)))
                .collect(),
        }
    }
}

/// The engine's unknown-device error is its own wording; the model has
/// none to compare, so that one column is blanked on both sides.
fn comparable(mut s: Snapshot) -> Snapshot {
    for row in &mut s.dead_letters {
        if row.2 == DeadLetterKind::UnknownDevice.as_str() {
            row.3 = String::new();
        }
    }
    s
}

/// Fails with the rows that only one side has (a few of each), not with
/// two listings of thousands of rows.
fn same<T: PartialEq + std::fmt::Debug>(at: &str, what: &str, got: &[T], want: &[T]) {
    if got == want {
        return;
    }
    let extra: Vec<&T> = got.iter().filter(|r| !want.contains(r)).take(5).collect();
    let missing: Vec<&T> = want.iter().filter(|r| !got.contains(r)).take(5).collect();
    panic!(
        "{at}: {what} differ from the model's ({} rows, the model {}); \
         only in the database: {extra:?}; only in the model: {missing:?}",
        got.len(),
        want.len()
    );
}

/// What the model says `input` leaves, applied one line at a time.
fn model_of(provisioning_text: &str, input: &str) -> Snapshot {
    let provisioning = Provisioning::parse(provisioning_text).unwrap();
    let mut model = Model::new(&provisioning);
    for line in input.lines() {
        model.line(line);
    }
    model.snapshot()
}

/// Fails unless `got` holds the tables other services read as `want`.
fn same_state(at: &str, got: Snapshot, want: Snapshot) {
    let (got, want) = (comparable(got), comparable(want));
    same(at, "readings", &got.readings, &want.readings);
    same(at, "alerts", &got.alerts, &want.alerts);
    same(at, "dead letters", &got.dead_letters, &want.dead_letters);
    same(at, "processed ids", &got.processed, &want.processed);
    same(at, "last seen", &got.devices, &want.devices);
}

/// Generated traffic (bad lines, replays, late readings, alarms opening and
/// closing), then the cases that batches make hard: a replay inside one
/// batch, one instant from two messages, an id dead-lettered twice then
/// processed, an id processed then malformed, a late reading after an
/// alert opened, a message with nothing mapped.
fn input(options: &GenOptions) -> String {
    let mut out = Vec::new();
    gen::messages(options, &mut out).unwrap();
    let mut text = String::from_utf8(out).unwrap();
    let d = "dev-00000"; // th-v1: t, h, bat_mv; too-warm > 23.5
    let tail = [
        msg("x-1", d, "2026-12-01T00:00:00Z", r#"{"t":30,"h":50}"#),
        msg("x-1", d, "2026-12-01T00:00:00Z", r#"{"t":30,"h":50}"#),
        msg("x-2", d, "2026-12-01T00:00:00Z", r#"{"t":10,"h":20}"#),
        msg("x-3", d, "2026-12-01T00:01:00Z", r#"{"t":"hot"}"#),
        msg("x-3", d, "2026-12-01T00:01:00Z", r#"{"t":null,"h":[1]}"#),
        msg("x-3", d, "2026-12-01T00:01:00Z", r#"{"t":20}"#),
        msg("x-4", d, "2026-11-30T23:00:00Z", r#"{"t":10}"#),
        r#"{"id":"x-1","device":"dev-00000","ts":5}"#.to_string(),
        msg("x-5", d, "2026-12-01T00:02:00Z", r#"{"rssi":-70}"#),
        "   ".to_string(),
        msg("x-6", "nobody", "2026-12-01T00:02:00Z", r#"{"t":1}"#),
        msg("x-6", "nobody", "2026-12-01T00:02:00Z", r#"{"t":2}"#),
        msg("x-7", d, "2026-12-01T00:03:00.1234567Z", r#"{"t":99999}"#),
        msg("x-8", d, "2026-12-01T00:04:00Z", r#"{"t":25}"#),
    ];
    for line in tail {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

#[test]
fn the_engine_ends_where_the_contract_applied_one_message_at_a_time_ends() {
    let options = GenOptions {
        devices: 30,
        messages: 3000,
        seed: 11,
        bad_share: 0.02,
        duplicate_share: 0.02,
        late_share: 0.05,
    };
    let provisioning_text = gen::provisioning(&options).to_string();
    let input = input(&options);
    let expected = model_of(&provisioning_text, &input);
    assert!(
        expected.alerts.iter().any(|a| a.5.is_some()),
        "alerts close"
    );
    assert!(
        expected.alerts.iter().any(|a| a.5.is_none()),
        "alerts stay open"
    );
    let kinds: HashSet<&str> = expected.dead_letters.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(
        kinds.len(),
        3,
        "malformed, invalid, unknown_device: {kinds:?}"
    );
    assert!(
        expected.dead_letters.iter().any(|r| r.5 == 2),
        "a letter seen twice"
    );

    // (batch size, pass size): one message a transaction, small batches,
    // each backend's default, and transactions of many passes (each pass a
    // batch of the engine, applied then parked in the open transaction).
    let unbounded = usize::MAX;
    for (batch_size, pass_size) in [
        (1, unbounded),
        (7, unbounded),
        (IngestOptions::default().batch_size, unbounded),
        (SQLITE_BATCH_SIZE, SQLITE_PASS_SIZE),
        (500, 7),
    ] {
        for t in both() {
            t.provision(&provisioning_text);
            let options = IngestOptions {
                batch_size,
                pass_size,
                ..support::options()
            };
            t.ingest_with(&input, &options).unwrap();
            let at = format!("{}, batch size {batch_size}, pass size {pass_size}", t.name);
            same_state(&at, t.snapshot(), expected.clone());
        }
    }
}

/// The one SQLite writer killed (SIGKILL) twice while a group commit is
/// open, and the same input run again to its end: the database ends in the
/// model's state. Nothing of a group that had not committed is seen, nothing
/// of one that had is applied twice.
#[test]
fn sqlite_killed_in_the_middle_of_a_group_commit_ends_in_the_models_state() {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, RunQueryDsl, SqliteConnection};

    // No bad lines: a dead letter seen on two runs counts two attempts,
    // which the model (one run) would not.
    let options = GenOptions {
        devices: 300,
        // Groups of a pass and a half (below), five passes: three groups
        // and a part, so that the second run, whose first group holds only
        // ids the first committed, still sees a commit and then a group
        // open.
        messages: SQLITE_PASS_SIZE * 5,
        seed: 23,
        bad_share: 0.0,
        duplicate_share: 0.02,
        late_share: 0.05,
    };
    let provisioning_text = gen::provisioning(&options).to_string();
    let mut text = Vec::new();
    gen::messages(&options, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    let expected = model_of(&provisioning_text, &text);
    assert!(
        expected.dead_letters.is_empty(),
        "no dead letters to count twice"
    );

    let dir = tempfile::tempdir().unwrap();
    let (devices, input, path) = (
        dir.path().join("devices.json"),
        dir.path().join("messages.jsonl"),
        dir.path().join("n.db"),
    );
    std::fs::write(&devices, &provisioning_text).unwrap();
    std::fs::write(&input, &text).unwrap();
    let url = format!("sqlite://{}", path.display());
    let normalizer = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_normalizer"));
        c.args(["--database-url", &url, "--log-level", "warn"]);
        c
    };
    let status = normalizer()
        .arg("provision")
        .arg(&devices)
        .status()
        .unwrap();
    assert!(status.success());

    // Another connection, no busy timeout: a read counts what has
    // committed; BEGIN IMMEDIATE refused means a write transaction is open.
    let mut probe = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    let committed = |probe: &mut SqliteConnection| -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM processed_messages")
            .get_result::<Count>(probe)
            .unwrap()
            .n
    };
    // Groups of a pass and a half: each transaction applies one pass,
    // parks it and goes on with a second in the same transaction.
    let group = (SQLITE_PASS_SIZE * 3 / 2).to_string();
    let mut kills = Vec::new();
    for _ in 0..2 {
        let before = committed(&mut probe);
        let mut child = normalizer()
            .args(["ingest", "--batch-size", &group])
            .arg(&input)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let killed_at = loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before a group commit was seen open after {before} messages"
            );
            let now = committed(&mut probe);
            if now > before && probe.batch_execute("BEGIN IMMEDIATE").is_err() {
                // The writer holds the write lock: it is inside a group.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                break now;
            }
            let _ = probe.batch_execute("ROLLBACK");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let _ = probe.batch_execute("ROLLBACK");
        child.wait().unwrap();
        let after = committed(&mut probe);
        assert!(
            after >= killed_at && after < expected.processed.len() as i64,
            "killed mid-run: {after} of {} ids committed",
            expected.processed.len()
        );
        kills.push(after);
    }
    let status = normalizer()
        .args(["ingest", "--batch-size", &group])
        .arg(&input)
        .status()
        .unwrap();
    assert!(status.success(), "the run after two kills completes");
    drop(probe);
    let t = TestDb::open(&url, normalizer::db::PoolSettings::default());
    let ids = expected.processed.len();
    let at = format!("sqlite, killed with {kills:?} ids committed, then run again");
    same_state(&at, t.snapshot(), expected);
    println!("sqlite group commit killed with {kills:?} of {ids} ids committed; the re-run ended in the model's state");
}
