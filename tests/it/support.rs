//! Helpers: a real database of each backend, and one-call ingest and reads.

use std::io::Cursor;
use std::time::Duration;

use normalizer::core::provisioning::Provisioning;
use normalizer::db::repo::snapshot::{self, Snapshot};
use normalizer::db::repo::{provisioning, status};
use normalizer::db::{migrate, Database, DatabaseUrl, PoolSettings, RetryPolicy};
use normalizer::pipeline::{self, IngestOptions, Progress, Summary};

use crate::pg;

/// A database for one test, of either backend.
pub struct TestDb {
    pub db: Database,
    pub url: String,
    pub name: &'static str,
    pub _dir: Option<tempfile::TempDir>,
}

/// The pipeline's options for tests: `NORMALIZER_BATCH_SIZE` picks the
/// mode (`./scripts/test` runs the suites with the default and with 1).
pub fn options() -> IngestOptions {
    let mut options = IngestOptions::default();
    if let Some(n) = std::env::var("NORMALIZER_BATCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        options.batch_size = n;
    }
    options
}

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_outage: Duration::from_secs(120),
        ..RetryPolicy::default()
    }
}

pub fn open(url: &str, pool: u32) -> Database {
    open_with(
        url,
        PoolSettings {
            max_size: pool,
            ..PoolSettings::default()
        },
    )
}

/// A database with its migrations run, with the tests' retry policy.
pub fn open_with(url: &str, settings: PoolSettings) -> Database {
    open_with_policy(url, settings, policy())
}

fn open_with_policy(url: &str, settings: PoolSettings, policy: RetryPolicy) -> Database {
    let db = Database::open(DatabaseUrl::parse(url).unwrap(), settings, policy);
    migrate::run(&db).expect("migrations run");
    db
}

/// A new SQLite file in a temporary folder.
pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    TestDb {
        db: open(&url, 5),
        url,
        name: "sqlite",
        _dir: Some(dir),
    }
}

/// A new database in the tests' own PostgreSQL cluster.
pub fn postgres() -> TestDb {
    let url = pg::shared().create_database();
    TestDb {
        db: open(&url, 5),
        url,
        name: "postgres",
        _dir: None,
    }
}

/// One of each backend.
pub fn both() -> Vec<TestDb> {
    vec![sqlite(), postgres()]
}

impl TestDb {
    /// A migrated database at `url` (no folder to keep alive).
    pub fn open(url: &str, settings: PoolSettings) -> TestDb {
        Self::open_with_policy(url, settings, policy())
    }

    /// The same, with a retry policy of the test's own.
    pub fn open_with_policy(url: &str, settings: PoolSettings, policy: RetryPolicy) -> TestDb {
        let name = if url.starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        };
        TestDb {
            db: open_with_policy(url, settings, policy),
            url: url.to_string(),
            name,
            _dir: None,
        }
    }

    /// Ingests with `workers` workers (one keeps every line in file order).
    pub fn ingest_on(&self, workers: usize, input: &str) -> Summary {
        self.ingest_with(
            input,
            &IngestOptions {
                workers,
                ..options()
            },
        )
        .unwrap_or_else(|e| panic!("{}: ingest failed: {e:#}", self.name))
    }
    pub fn provision(&self, json: &str) {
        let file = Provisioning::parse(json).expect("valid provisioning");
        provisioning::provision(&self.db, &file).expect("provisioning is valid and commits");
    }

    pub fn ingest_with(
        &self,
        input: &str,
        options: &IngestOptions,
    ) -> Result<Summary, pipeline::IngestError> {
        pipeline::ingest(
            &self.db,
            Cursor::new(input.as_bytes().to_vec()),
            options,
            &Progress::default(),
            |_| {},
        )
    }

    pub fn ingest(&self, input: &str) -> Summary {
        self.ingest_on(3, input)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.db.transaction(snapshot::read).unwrap()
    }

    pub fn status(&self) -> status::Status {
        self.db.transaction(status::read).unwrap()
    }
}

/// The contract's example provisioning file, with one more device.
pub const DEVICES: &str = r#"{
  "profiles": {
    "th-v1": {"fields": {"t": {"metric": "temperature"},
                         "h": {"metric": "humidity"},
                         "bat_mv": {"metric": "battery", "scale": 0.001}}},
    "th-f":  {"fields": {"temp_f": {"metric": "temperature",
                                    "scale": 0.5555555555555556,
                                    "offset": -17.77777777777778}}}
  },
  "devices": [
    {"key": "dev-0042", "site": "museum-a/room-1", "profile": "th-v1",
     "sensors": [
       {"metric": "temperature", "unit": "°C", "scale": 1.0, "offset": -0.3,
        "min": -40, "max": 85,
        "alarms": [{"name": "too-warm", "condition": "gt", "threshold": 26.0}]},
       {"metric": "humidity", "unit": "%", "min": 0, "max": 100,
        "alarms": [{"name": "too-dry", "condition": "lt", "threshold": 35},
                   {"name": "too-humid", "condition": "gte", "threshold": 65,
                    "active": false}]}
     ]},
    {"key": "dev-f", "site": "archive", "profile": "th-f",
     "sensors": [{"metric": "temperature", "unit": "°C"}]}
  ]
}"#;

/// A message line.
pub fn msg(id: &str, device: &str, ts: &str, payload: &str) -> String {
    format!(r#"{{"id":"{id}","device":"{device}","ts":"{ts}","payload":{payload}}}"#)
}

/// Ingests raw bytes (for input that is not valid UTF-8).
pub fn ingest_bytes(t: &TestDb, bytes: Vec<u8>) -> Summary {
    pipeline::ingest(
        &t.db,
        Cursor::new(bytes),
        &crate::support::options(),
        &Progress::default(),
        |_| {},
    )
    .unwrap()
}

/// The end state of a run stopped and then run again in whole equals the
/// clean run's, but for what the contract says a rerun does to dead
/// letters: a bad line seen twice counts two attempts (or, without a
/// readable id, adds a row).
pub fn same_as_clean_after_a_rerun(clean: &Snapshot, faulty: &Snapshot) {
    let (lost, _, wrongly_dead_lettered) = crate::chaos::compare(clean, faulty);
    assert_eq!((lost, wrongly_dead_lettered), (0, 0));
    assert_eq!(
        faulty.readings, clean.readings,
        "no reading lost or doubled"
    );
    assert_eq!(faulty.alerts, clean.alerts, "no alert lost or doubled");
    assert_eq!(faulty.processed, clean.processed);
    assert_eq!(faulty.devices, clean.devices);
    let kinds = |s: &Snapshot| {
        let mut k: Vec<_> = s
            .dead_letters
            .iter()
            .map(|d| (d.0.clone(), d.2.clone(), d.4.clone()))
            .collect();
        k.dedup();
        k
    };
    assert_eq!(kinds(faulty), kinds(clean), "the same dead letters");
}
