//! Reliability under real faults. Each case runs the same generated input
//! twice on a PostgreSQL cluster that the test owns: once clean, once while a
//! fault is injected, and checks that the two end states are identical table
//! by table: nothing lost, nothing doubled, no valid message dead-lettered.
//!
//! `CHAOS_MESSAGES` sets the size (default 10,000; `scripts/chaos` runs
//! 50,000). Each case prints one line of figures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use normalizer::db::repo::snapshot::Snapshot;
use normalizer::db::{Database, PoolSettings};
use normalizer::gen::{self, GenOptions};
use normalizer::metrics::Cause;
use normalizer::pipeline::{self, IngestOptions, Progress, Summary};

use crate::pg::PgCluster;
use crate::support::TestDb;
use crate::timeline::Timeline;

pub(crate) fn size() -> usize {
    std::env::var("CHAOS_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// [`size`], at least three passes and a third: SQLite's one writer queues
/// a pass (`SQLITE_PASS_SIZE`), and a smaller run of a test that injects
/// its fault at 30% can end between that point and the fault.
pub(crate) fn sqlite_size() -> usize {
    size().max(normalizer::pipeline::SQLITE_PASS_SIZE * 10 / 3)
}

pub(crate) fn input(messages: usize) -> (String, String) {
    let options = GenOptions {
        devices: 60,
        messages,
        seed: 42,
        ..GenOptions::default()
    };
    let mut out = Vec::new();
    gen::messages(&options, &mut out).unwrap();
    (
        gen::provisioning(&options).to_string(),
        String::from_utf8(out).unwrap(),
    )
}

/// What the injector and the run share.
#[derive(Default)]
pub(crate) struct Run {
    pub(crate) done: AtomicBool,
    pub(crate) completed: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) back_at: Mutex<Option<Instant>>,
    pub(crate) first_after_back: Mutex<Option<Instant>>,
    pub(crate) injected_while_running: AtomicBool,
    pub(crate) note: Mutex<String>,
    pub(crate) max_stall: Mutex<Duration>,
    /// When the fault began (the first `wait_for` that returned while the
    /// run went on) and ended (`server_back`, or the injector's return).
    pub(crate) fault_began: Mutex<Option<Instant>>,
    pub(crate) fault_ended: Mutex<Option<Instant>>,
}

impl Run {
    /// Waits until `share` of the input is done (or the run ended).
    pub fn wait_for(&self, share: f64) {
        let target = (self.total.load(Ordering::SeqCst) as f64 * share) as u64;
        while self.completed.load(Ordering::SeqCst) < target && !self.done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !self.done.load(Ordering::SeqCst) {
            self.injected_while_running.store(true, Ordering::SeqCst);
            self.fault_began
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        }
    }
    fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
    pub(crate) fn server_back(&self) {
        *self.back_at.lock().unwrap() = Some(Instant::now());
        self.fault_ended
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
    }
    pub(crate) fn note(&self, text: String) {
        *self.note.lock().unwrap() = text;
    }
}

/// One line of figures.
pub(crate) struct Figures {
    pub(crate) fault: &'static str,
    pub(crate) how: String,
    pub(crate) messages: usize,
    pub(crate) lost: usize,
    pub(crate) doubled: usize,
    pub(crate) wrongly_dead_lettered: usize,
    pub(crate) summary: Summary,
    pub(crate) recovery: Option<Duration>,
    pub(crate) max_stall: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let db = &self.summary.database;
        let retries: Vec<String> = db
            .retries
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        write!(
            f,
            "fault={} messages={} lost={} doubled={} wrongly_dead_lettered={} retries={} [{}] recovered={}/{} discarded={} recovery={} max_stall={:.2}s elapsed={:.1}s how=\"{}\"",
            self.fault,
            self.messages,
            self.lost,
            self.doubled,
            self.wrongly_dead_lettered,
            db.total_retries(),
            retries.join(" "),
            db.recoveries,
            db.needed_retry,
            db.connections_discarded,
            self.recovery.map_or("-".to_string(), |d| format!("{:.3}s", d.as_secs_f64())),
            self.max_stall.as_secs_f64(),
            self.summary.elapsed_seconds,
            self.how,
        )
    }
}

impl Figures {
    /// The figures of a faulty run against the clean one: what was lost,
    /// doubled or wrongly dead-lettered, and how soon after the server (or
    /// the link) was back the first line committed.
    pub(crate) fn of(
        fault: &'static str,
        how: String,
        messages: usize,
        summary: Summary,
        run: &Run,
        clean: &Snapshot,
        faulty: &Snapshot,
    ) -> Figures {
        let (lost, doubled, wrongly_dead_lettered) = compare(clean, faulty);
        let recovery = match (
            *run.back_at.lock().unwrap(),
            *run.first_after_back.lock().unwrap(),
        ) {
            (Some(back), Some(first)) => Some(first.saturating_duration_since(back)),
            _ => None,
        };
        Figures {
            fault,
            how,
            messages,
            lost,
            doubled,
            wrongly_dead_lettered,
            summary,
            recovery,
            max_stall: *run.max_stall.lock().unwrap(),
        }
    }

    /// Prints the line of figures and checks what every fault case holds:
    /// the fault hit the run and was felt, nothing was lost, doubled or
    /// wrongly dead-lettered, and the end state is the clean run's.
    pub(crate) fn check(&self, run: &Run, clean: &Snapshot, faulty: &Snapshot) {
        let fault = self.fault;
        println!("{self}");
        assert!(
            run.injected_while_running.load(Ordering::SeqCst),
            "{fault}: the fault hit the run"
        );
        assert_eq!(
            (self.lost, self.doubled, self.wrongly_dead_lettered),
            (0, 0, 0),
            "{self}"
        );
        assert_eq!(faulty, clean, "{fault}: end state equals the clean run");
        assert!(
            self.summary.database.total_retries() > 0,
            "{fault}: the fault was felt: {self}"
        );
    }
}

pub(crate) fn compare(clean: &Snapshot, faulty: &Snapshot) -> (usize, usize, usize) {
    use std::collections::HashSet;
    let clean_ids: HashSet<&String> = clean.processed.iter().collect();
    let faulty_ids: HashSet<&String> = faulty.processed.iter().collect();
    let key = |d: &normalizer::db::repo::snapshot::DeadLetterRow| (d.0.clone(), d.4.clone());
    let clean_dl: HashSet<_> = clean.dead_letters.iter().map(key).collect();
    let faulty_dl: HashSet<_> = faulty.dead_letters.iter().map(key).collect();
    let lost = clean_ids.difference(&faulty_ids).count()
        + clean_dl.difference(&faulty_dl).count()
        + clean.readings.len().saturating_sub(faulty.readings.len());
    let doubled = faulty.readings.len().saturating_sub(clean.readings.len())
        + faulty.alerts.len().saturating_sub(clean.alerts.len())
        + faulty
            .dead_letters
            .len()
            .saturating_sub(clean.dead_letters.len())
        + faulty.dead_letters.iter().filter(|d| d.5 > 1).count();
    let wrong = faulty_dl.difference(&clean_dl).count();
    (lost, doubled, wrong)
}

/// The largest batch for a fault case: a tenth of its input (the default
/// 5000 for `scripts/chaos`'s 50,000 messages, 1000 for the tests' 10,000),
/// so that a fault injected a quarter of the way in meets transactions
/// still to come, whatever the input's size.
fn batch_for(text: &str) -> usize {
    (text.lines().count() / 10).max(1)
}

/// The options of a fault case: batches of [`batch_for`]; on SQLite, whose
/// one writer commits a group in passes, passes of a quarter of it, so
/// that a fault meets a transaction with passes applied and parked.
fn chaos_options(db: &Database, text: &str, workers: usize) -> IngestOptions {
    let batch_size = crate::support::options().batch_size.min(batch_for(text));
    let pass_size = match db.url() {
        normalizer::db::DatabaseUrl::Sqlite(_) => (batch_size / 4).max(1),
        normalizer::db::DatabaseUrl::Postgres(_) => usize::MAX,
    };
    IngestOptions {
        workers,
        batch_size,
        pass_size,
        ..crate::support::options()
    }
}

pub(crate) fn ingest_observed(db: &Database, text: &str, run: &Run, workers: usize) -> Summary {
    let mut last = Instant::now();
    let mut max_stall = Duration::ZERO;
    let summary = pipeline::ingest(
        db,
        std::io::Cursor::new(text.as_bytes().to_vec()),
        &chaos_options(db, text, workers),
        &Progress::default(),
        |s| {
            run.completed.store(s.completed, Ordering::SeqCst);
            let now = Instant::now();
            max_stall = max_stall.max(now - last);
            last = now;
            if run.back_at.lock().unwrap().is_some() {
                let mut first = run.first_after_back.lock().unwrap();
                if first.is_none() {
                    *first = Some(now);
                }
            }
        },
    );
    run.done.store(true, Ordering::SeqCst);
    *run.max_stall.lock().unwrap() = max_stall;
    summary.expect("the run finishes by itself")
}

/// Samples the run every 100 ms until it is done: lines done, retries so
/// far, whether the database is in an outage.
fn sample(db: &Database, run: &Run, started: Instant) -> Timeline {
    let mut timeline = Timeline::new(started, "retries_so_far", "database_outage");
    loop {
        let finished = run.is_done();
        timeline.sample(
            run.completed.load(Ordering::SeqCst),
            db.counters().total_retries(),
            db.down_since().is_some(),
        );
        if finished {
            return timeline;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`ingest_observed`], sampled as it runs: its summary and time line.
pub(crate) fn ingest_sampled(
    db: &Database,
    text: &str,
    run: &Run,
    workers: usize,
) -> (Summary, Timeline) {
    let started = Instant::now();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(db, run, started));
        let summary = ingest_observed(db, text, run, workers);
        (summary, sampler.join().expect("the sampler does not panic"))
    })
}

/// Writes the run's time line to `dir` (see [`crate::timeline`]): the
/// fault's span and note are the run's.
pub(crate) fn write_timeline(dir: &std::path::Path, fault: &str, run: &Run, timeline: &Timeline) {
    timeline.write(
        dir,
        fault,
        *run.fault_began.lock().unwrap(),
        *run.fault_ended.lock().unwrap(),
        &run.note.lock().unwrap(),
    );
}

/// The end state, read with default settings: a fault's own settings (a
/// 300 ms statement_timeout) are for the run, not for reading its result.
fn snapshot_of(url: &str) -> Snapshot {
    TestDb::open(url, PoolSettings::default()).snapshot()
}

/// Runs one case: `prepare` may change the faulty database before the run,
/// `inject` runs beside the faulty run until it returns. With `role`, the
/// normalizer connects as that role (not a superuser). With
/// `CHAOS_TIMELINES=DIR` (`scripts/chaos --plot DIR`), the faulty run's time
/// line goes to DIR.
fn case(
    fault: &'static str,
    cluster: &PgCluster,
    settings: PoolSettings,
    role: Option<&str>,
    workers: usize,
    prepare: impl FnOnce(&str),
    inject: impl FnOnce(&PgCluster, &str, &Run) + Send,
) {
    let timelines = crate::timeline::dir();
    case_recorded(
        fault, cluster, settings, role, workers, prepare, inject, timelines,
    );
}

/// [`case`], its time line written to `timelines` when given.
#[allow(clippy::too_many_arguments)]
fn case_recorded(
    fault: &'static str,
    cluster: &PgCluster,
    settings: PoolSettings,
    role: Option<&str>,
    workers: usize,
    prepare: impl FnOnce(&str),
    inject: impl FnOnce(&PgCluster, &str, &Run) + Send,
    timelines: Option<std::path::PathBuf>,
) {
    let messages = size();
    let (devices, text) = input(messages);
    let open = |url: &str| TestDb::open(url, settings.clone());
    let create = || match role {
        Some(role) => cluster.create_database_for(role),
        None => cluster.create_database(),
    };
    let (clean_url, faulty_url) = (create(), create());
    let clean_summary = {
        let clean = open(&clean_url);
        clean.provision(&devices);
        ingest_observed(&clean.db, &text, &Run::default(), workers)
    };
    // Its pool is closed by now: a role with few slots has them back.
    let clean_snap = snapshot_of(&clean_url);
    let faulty = open(&faulty_url);
    faulty.provision(&devices);
    prepare(&faulty.url);
    let run = Run::default();
    run.total.store(clean_summary.lines, Ordering::SeqCst);
    let (summary, timeline) = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            inject(cluster, &faulty.url, &run);
            run.fault_ended
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        });
        let observed = ingest_sampled(&faulty.db, &text, &run, workers);
        injector.join().expect("the injector does not panic");
        observed
    });
    if let Some(dir) = timelines {
        write_timeline(&dir, fault, &run, &timeline);
    }
    drop(faulty);
    let faulty_snap = snapshot_of(&faulty_url);
    let how = run.note.lock().unwrap().clone();
    let figures = Figures::of(
        fault,
        how,
        messages,
        summary,
        &run,
        &clean_snap,
        &faulty_snap,
    );
    figures.check(&run, &clean_snap, &faulty_snap);
}

/// Kills every normalizer backend every 300 ms from `share` of the input
/// to the end of the run.
fn kill_backends_until_done(cluster: &PgCluster, url: &str, run: &Run, share: f64) {
    run.wait_for(share);
    let mut kills = 0;
    while !run.is_done() {
        kills += cluster.terminate_normalizer_backends(url);
        std::thread::sleep(Duration::from_millis(300));
    }
    run.note(format!(
        "pg_terminate_backend of every normalizer backend every 300 ms ({kills} killed)"
    ));
}

#[test]
fn killed_backends_lose_and_double_nothing() {
    let cluster = PgCluster::start_new();
    case(
        "kill-backends",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        |_| {},
        |cluster, url, run| kill_backends_until_done(cluster, url, run, 0.05),
    );
}

#[test]
fn a_fast_restart_mid_run_loses_and_doubles_nothing() {
    let cluster = PgCluster::start_new();
    case(
        "fast-restart",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        |_| {},
        |cluster, _, run| {
            run.wait_for(0.3);
            cluster.restart("fast");
            run.server_back();
            run.note("pg_ctl restart -m fast at 30% of the input".into());
        },
    );
}

#[test]
fn an_outage_and_a_slow_start_lose_and_double_nothing() {
    let cluster = PgCluster::start_new();
    case(
        "outage",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        |_| {},
        |cluster, _, run| {
            run.wait_for(0.3);
            cluster.stop("immediate");
            let down = Duration::from_secs(if size() > 10_000 { 8 } else { 3 });
            std::thread::sleep(down);
            // Crash recovery after an immediate stop: "the database system is
            // starting up" until it is done.
            cluster.start_no_wait();
            let _ = cluster.admin();
            run.server_back();
            run.note(format!("pg_ctl stop -m immediate at 30%, down {} s, then start without waiting (crash recovery)", down.as_secs()));
        },
    );
}

/// The primary crashes (an immediate stop) at 30% of the input and its
/// synchronous standby is promoted a second later, as a failover manager
/// (Patroni, pg_auto_failover) would do it. The normalizer's URL names both
/// servers with `target_session_attrs=read-write`, as a client of such a
/// pair is configured: its new connections find the new primary by
/// themselves.
#[test]
fn a_failover_to_the_standby_loses_and_doubles_nothing() {
    let mut primary = PgCluster::start_new();
    let standby = primary.add_standby();
    case(
        "failover",
        &primary,
        PoolSettings::default(),
        None,
        4,
        |_| {},
        |primary, _, run| {
            run.wait_for(0.3);
            primary.stop("immediate");
            std::thread::sleep(Duration::from_secs(1));
            standby.promote();
            run.server_back();
            run.note("the primary stopped -m immediate at 30%, its synchronous standby promoted 1 s later".into());
        },
    );
}

#[test]
fn transient_errors_raised_by_the_database_lose_and_double_nothing() {
    let cluster = PgCluster::start_new();
    let prepare = run_sql(
        "CREATE FUNCTION chaos() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE r float := random();
             BEGIN
               IF r < 0.01 THEN RAISE EXCEPTION 'could not serialize access due to injected conflict' USING ERRCODE = '40001';
               ELSIF r < 0.02 THEN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';
               ELSIF r < 0.03 THEN RAISE EXCEPTION 'could not obtain lock on row in relation \"readings\"' USING ERRCODE = '55P03';
               ELSIF r < 0.035 THEN PERFORM pg_terminate_backend(pg_backend_pid());
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER chaos BEFORE INSERT ON readings FOR EACH ROW EXECUTE FUNCTION chaos();",
    );
    case(
        "transient-errors",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        prepare,
        |_, _, run| {
            run.wait_for(0.0);
            run.note("trigger on readings: 1% 40001, 1% 40P01, 1% 55P03, 0.5% the backend terminates itself".into());
        },
    );
}

#[test]
fn a_session_left_pending_rollback_loses_and_doubles_nothing() {
    // The old service's failure at scale: the backend dies inside the
    // transaction, so the statement fails and the ROLLBACK fails too.
    let cluster = PgCluster::start_new();
    let prepare = run_sql(
        "CREATE FUNCTION chaos() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF random() < 0.02 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER chaos AFTER INSERT ON processed_messages FOR EACH ROW EXECUTE FUNCTION chaos();",
    );
    case(
        "pending-rollback",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        prepare,
        |_, _, run| {
            run.wait_for(0.0);
            run.note("trigger on processed_messages: each insert kills its own backend with probability 2%, mid-transaction, so ROLLBACK fails".into());
        },
    );
}

#[test]
fn panicking_messages_cost_only_themselves() {
    let messages = size();
    let (devices, text) = input(messages);
    let t = crate::support::postgres();
    t.provision(&devices);
    let panicky = |id: &str| {
        id.ends_with('7')
            && id.starts_with('g')
            && id.len() > 5
            && id.as_bytes()[id.len() - 2] == b'1'
    };
    let options = IngestOptions {
        workers: 4,
        hook: Some(std::sync::Arc::new(move |m| {
            if panicky(&m.id) {
                panic!("injected panic on {}", m.id);
            }
        })),
        ..crate::support::options()
    };
    let summary = pipeline::ingest(
        &t.db,
        std::io::Cursor::new(text.clone().into_bytes()),
        &options,
        &Progress::default(),
        |_| {},
    )
    .unwrap();
    let snap = t.snapshot();
    // Lines, not ids: the input replays some messages, and a replayed copy
    // of a panicking message panics too (the hook runs before the
    // duplicate check), adding an attempt to the same dead letter.
    let panicky_lines: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(String::from))
        .filter(|id| panicky(id))
        .collect();
    let expected: std::collections::BTreeSet<String> = panicky_lines.iter().cloned().collect();
    let internal: std::collections::BTreeSet<String> = snap
        .dead_letters
        .iter()
        .filter(|d| d.2 == "internal")
        .filter_map(|d| d.0.clone())
        .collect();
    let processed: std::collections::BTreeSet<&String> = snap.processed.iter().collect();
    println!(
        "fault=panic messages={messages} lost=0 doubled=0 wrongly_dead_lettered=0 internal={} discarded={} elapsed={:.1}s how=\"a hook panics inside the transaction of {} messages\"",
        internal.len(),
        summary.database.connections_discarded,
        summary.elapsed_seconds,
        expected.len()
    );
    assert!(!expected.is_empty());
    assert_eq!(
        internal, expected,
        "exactly the panicking messages are dead-lettered as internal"
    );
    assert!(expected.iter().all(|id| !processed.contains(id)));
    assert_eq!(summary.completed, summary.lines, "every line accounted for");
    assert_eq!(
        summary.dead_letters_by_kind["internal"] as usize,
        panicky_lines.len()
    );
    let (open, _) = t.db.pool_state();
    assert!(open >= 1, "the pool still has connections");
}

/// Prepares the faulty database by running `sql` in it.
fn run_sql(sql: &'static str) -> impl FnOnce(&str) {
    move |url| {
        PgConnection::establish(url)
            .unwrap()
            .batch_execute(sql)
            .unwrap()
    }
}

fn hold_device_locks(url: &str, run: &Run, hold: Duration) {
    run.wait_for(0.25);
    let mut c = PgConnection::establish(url).unwrap();
    c.batch_execute("BEGIN; SELECT id FROM devices FOR UPDATE;")
        .unwrap();
    std::thread::sleep(hold);
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn row_locks_with_a_lock_timeout_lose_and_double_nothing() {
    let cluster = PgCluster::start_new();
    let settings = PoolSettings {
        lock_timeout: Duration::from_millis(200),
        ..PoolSettings::default()
    };
    case(
        "lock-timeout",
        &cluster,
        settings,
        None,
        4,
        |_| {},
        |_, url, run| {
            hold_device_locks(url, run, Duration::from_secs(2));
            run.note(
                "another session holds FOR UPDATE on every device for 2 s; lock_timeout = 200 ms"
                    .into(),
            );
        },
    );
}

#[test]
fn row_locks_with_a_statement_timeout_lose_and_double_nothing() {
    let cluster = PgCluster::start_new();
    let settings = PoolSettings {
        lock_timeout: Duration::ZERO,
        statement_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    case(
        "statement-timeout",
        &cluster,
        settings,
        None,
        4,
        |_| {},
        |_, url, run| {
            hold_device_locks(url, run, Duration::from_secs(2));
            run.note("another session holds FOR UPDATE on every device for 2 s; statement_timeout = 300 ms".into());
        },
    );
}

#[test]
fn fewer_server_connections_than_the_pool_loses_and_doubles_nothing() {
    // Normal roles get 5 slots (3 are reserved for superusers, which the
    // test's own admin connections use); six workers want six.
    let cluster =
        PgCluster::start_with(&["max_connections = 8", "superuser_reserved_connections = 3"]);
    let settings = PoolSettings {
        max_size: 8,
        ..PoolSettings::default()
    };
    case(
        "too-many-connections",
        &cluster,
        settings,
        Some("app"),
        6,
        |_| {},
        |cluster, url, run| {
            // Then no slot at all for 2 s: the role's connection limit drops to
            // zero and its backends are killed, so it must reconnect into 53300.
            run.wait_for(0.2);
            let mut admin = cluster.admin();
            admin
                .batch_execute("ALTER ROLE app CONNECTION LIMIT 0")
                .unwrap();
            cluster.terminate_normalizer_backends(url);
            std::thread::sleep(Duration::from_secs(2));
            admin
                .batch_execute("ALTER ROLE app CONNECTION LIMIT -1")
                .unwrap();
            run.server_back();
            run.note("max_connections = 8 (5 for normal roles) for 6 workers; then CONNECTION LIMIT 0 and backends killed for 2 s".into());
        },
    );
}

#[test]
fn sqlite_busy_from_another_writer_loses_and_doubles_nothing() {
    let messages = sqlite_size();
    let (devices, text) = input(messages);
    let settings = PoolSettings {
        busy_timeout: Duration::from_millis(100),
        ..PoolSettings::default()
    };
    let open = |dir: &tempfile::TempDir| {
        let url = format!("sqlite://{}", dir.path().join("n.db").display());
        TestDb::open(&url, settings.clone())
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clean = open(&d1);
    clean.provision(&devices);
    let clean_summary = ingest_observed(&clean.db, &text, &Run::default(), 2);
    let faulty = open(&d2);
    faulty.provision(&devices);
    let run = Run::default();
    run.total.store(clean_summary.lines, Ordering::SeqCst);
    let path = d2.path().join("n.db");
    // A second process that will hold the write lock, started and connected
    // before the run, so that it takes the lock the moment it is told to
    // (a run of 10,000 lines leaves less time after 30% than python3 takes
    // to start).
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        // It polls for the lock without a busy handler: SQLite's sleeps
        // (1, 2, 5 … 100 ms) can miss every gap between the one writer's
        // back-to-back group commits, and the run ends before it gets in.
        .arg("import sqlite3,sys,time\nc=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)\nprint('ready', flush=True)\nsys.stdin.readline()\nwhile True:\n    try:\n        c.execute('BEGIN IMMEDIATE')\n        break\n    except sqlite3.OperationalError:\n        time.sleep(0.0002)\ntime.sleep(1.5)\nc.execute('COMMIT')")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    let mut go = holder.stdin.take().unwrap();
    let summary = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            run.wait_for(0.3);
            std::io::Write::write_all(&mut go, b"go\n").unwrap();
            std::io::Write::flush(&mut go).unwrap();
            holder.wait().unwrap();
            run.fault_ended
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        });
        let (summary, timeline) = ingest_sampled(&faulty.db, &text, &run, 2);
        injector.join().unwrap();
        run.note("a second process holds BEGIN IMMEDIATE for 1.5 s; busy_timeout = 100 ms".into());
        if let Some(dir) = crate::timeline::dir() {
            write_timeline(&dir, "sqlite-busy", &run, &timeline);
        }
        summary
    });
    let (clean_snap, faulty_snap) = (clean.snapshot(), faulty.snapshot());
    let (lost, doubled, wrong) = compare(&clean_snap, &faulty_snap);
    let busy = summary.database.retries_of(Cause::Busy);
    println!(
        "fault=sqlite-busy messages={messages} lost={lost} doubled={doubled} wrongly_dead_lettered={wrong} retries={} [busy={busy}] elapsed={:.1}s how=\"{}\"",
        summary.database.total_retries(),
        summary.elapsed_seconds,
        run.note.lock().unwrap()
    );
    assert!(run.injected_while_running.load(Ordering::SeqCst));
    assert_eq!((lost, doubled, wrong), (0, 0, 0));
    assert_eq!(faulty_snap, clean_snap);
    assert!(busy > 0, "the lock was felt");
}

/// `scripts/lib/plot-timeline` draws a fault's time line, recorded by the
/// case itself, as an SVG chart with the fault's span marked.
#[test]
fn a_fault_time_line_is_recorded_and_drawn_as_an_svg() {
    let cluster = PgCluster::start_new();
    let dir = tempfile::tempdir().unwrap();
    case_recorded(
        "kill-backends",
        &cluster,
        PoolSettings::default(),
        None,
        4,
        |_| {},
        |cluster, url, run| kill_backends_until_done(cluster, url, run, 0.1),
        Some(dir.path().to_path_buf()),
    );
    let csv = std::fs::read_to_string(dir.path().join("kill-backends.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "seconds,lines_committed_a_second,retries_so_far,database_outage"
    );
    assert!(rows.len() > 3, "{csv}");
    let fault = std::fs::read_to_string(dir.path().join("kill-backends.fault")).unwrap();
    let began: f64 = fault.split(' ').next().unwrap().parse().unwrap();
    let ended: f64 = fault.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(0.0 < began && began <= ended, "{fault}");
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/lib/plot-timeline"
    ))
    .arg(dir.path())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(dir.path().join("kill-backends.svg")).unwrap();
    assert!(
        svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert!(svg.contains("<svg") && svg.contains("<path"), "a drawing");
    assert!(
        svg.contains("kill-backends: pg_terminate_backend of every normalizer backend"),
        "its title, from the fault's note"
    );
}
