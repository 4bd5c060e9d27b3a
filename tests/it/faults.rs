//! Faults on purpose: killed backends, failed rollbacks, a database that is
//! down, poison messages and panics. Each checks that nothing is lost,
//! nothing is applied twice and no valid message is dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use normalizer::core::message::{parse_line, Parsed};
use normalizer::db::repo::reference::ReferenceCache;
use normalizer::db::repo::{batch, dead_letters};
use normalizer::db::{AnyConnection, Database, DatabaseUrl, PoolSettings, RetryPolicy};
use normalizer::metrics::Cause;
use normalizer::outcome::{DeadLetter, Outcome};
use normalizer::pipeline::{IngestError, IngestOptions};

use crate::pg::{self, PgCluster};
use crate::support::{self, both, msg, postgres, TestDb, DEVICES};

fn messages(n: usize, prefix: &str) -> String {
    (0..n)
        .map(|i| {
            let device = if i % 2 == 0 { "dev-0042" } else { "dev-f" };
            let ts = format!(
                "2026-11-29T{:02}:{:02}:{:02}Z",
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            );
            let payload = if i % 2 == 0 {
                format!(r#"{{"t":{},"h":50}}"#, 20 + i % 10)
            } else {
                r#"{"temp_f":60}"#.into()
            };
            msg(&format!("{prefix}{i}"), device, &ts, &payload)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A trigger that makes the database reject the readings of the message
/// with id `poison`, permanently (a check violation on PostgreSQL, an
/// ABORT on SQLite).
fn install_poison(t: &TestDb) {
    let trigger = match t.name {
        "postgres" => "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.message_id = 'poison' THEN RAISE EXCEPTION 'poisoned reading' USING ERRCODE = '23514'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER poison BEFORE INSERT ON readings FOR EACH ROW EXECUTE FUNCTION poison();",
        _ => "CREATE TRIGGER poison BEFORE INSERT ON readings WHEN NEW.message_id = 'poison' \
              BEGIN SELECT RAISE(ABORT, 'poisoned reading'); END;",
    };
    t.db.transaction(|c| c.batch_execute(trigger)).unwrap();
}

fn backend_pid(conn: &mut AnyConnection) -> QueryResult<i32> {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    match conn {
        AnyConnection::Pg(c) => diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(c)
            .map(|p| p.pid),
        AnyConnection::Sqlite(..) => unreachable!("PostgreSQL only"),
    }
}

fn postgres_with(settings: PoolSettings) -> TestDb {
    TestDb::open(&pg::shared().create_database(), settings)
}

#[test]
fn a_terminated_backend_is_discarded_and_the_next_job_succeeds_on_a_new_connection() {
    // No idle validation: the dead connection is handed out, its first
    // statement fails, and the retry layer must discard it and retry.
    let t = postgres_with(PoolSettings {
        max_size: 2,
        validate_after_idle: Duration::from_secs(3600),
        ..PoolSettings::default()
    });
    t.provision(DEVICES);
    t.ingest(&messages(10, "a"));
    let killed = pg::shared().terminate_normalizer_backends(&t.url);
    assert!(killed >= 1);
    let s = t.ingest(&messages(10, "b"));
    assert_eq!((s.processed, s.dead_letters), (10, 0));
    let c = t.db.counters();
    assert!(c.connections_discarded >= 1, "{c:?}");
    assert!(
        c.retries_of(Cause::AdminShutdown) + c.retries_of(Cause::ConnectionLost) >= 1,
        "{c:?}"
    );
    assert_eq!(t.snapshot().processed.len(), 20);
}

#[test]
fn an_idle_connection_killed_by_the_server_is_validated_away_at_checkout() {
    let t = postgres_with(PoolSettings {
        max_size: 2,
        validate_after_idle: Duration::from_millis(10),
        ..PoolSettings::default()
    });
    t.provision(DEVICES);
    t.ingest(&messages(4, "a"));
    pg::shared().terminate_normalizer_backends(&t.url);
    std::thread::sleep(Duration::from_millis(50));
    let s = t.ingest(&messages(4, "b"));
    assert_eq!(s.processed, 4);
    let c = t.db.counters();
    assert!(c.connections_discarded >= 1, "{c:?}");
    assert_eq!(
        c.total_retries(),
        0,
        "validation caught it before any job failed: {c:?}"
    );
}

#[test]
fn a_failed_rollback_discards_the_connection_and_the_next_attempt_succeeds() {
    // The old service's failure: a statement fails inside a transaction and
    // the rollback fails too, leaving the session "pending rollback".
    let t = postgres();
    let admin_url = t.url.clone();
    let mut pids = vec![];
    let result = t.db.transaction(|conn| {
        let pid = backend_pid(conn)?;
        pids.push(pid);
        if pids.len() == 1 {
            let err = match conn {
                AnyConnection::Pg(c) => diesel::sql_query(
                    "DO $$ BEGIN RAISE EXCEPTION 'forced failure' USING ERRCODE = '40001'; END $$",
                )
                .execute(c)
                .unwrap_err(),
                AnyConnection::Sqlite(..) => unreachable!(),
            };
            // Kill the session before the wrapper rolls back.
            let mut admin = PgConnection::establish(&admin_url).unwrap();
            diesel::sql_query(format!("SELECT pg_terminate_backend({pid}, 5000)"))
                .execute(&mut admin)
                .unwrap();
            return Err(err);
        }
        Ok(pid)
    });
    let second = result.expect("the retry on a new connection commits");
    assert_eq!(pids.len(), 2);
    assert_ne!(
        pids[0], second,
        "the broken connection was not handed out again"
    );
    assert!(t.db.counters().connections_discarded >= 1);
    // And the pool keeps working.
    t.provision(DEVICES);
    assert_eq!(t.ingest(&messages(5, "c")).processed, 5);
}

#[test]
fn a_poison_message_is_dead_lettered_as_db_rejected_and_the_rest_commit() {
    for t in both() {
        t.provision(DEVICES);
        install_poison(&t);
        let mut lines: Vec<String> = messages(40, "g").lines().map(String::from).collect();
        lines.insert(
            20,
            msg("poison", "dev-0042", "2026-11-29T23:00:00Z", r#"{"t":21}"#),
        );
        let s = t.ingest(&lines.join("\n"));
        assert_eq!((s.processed, s.dead_letters), (40, 1), "{}", t.name);
        assert_eq!(s.dead_letters_by_kind["db_rejected"], 1, "{}", t.name);
        let dl = &t.snapshot().dead_letters[0];
        assert_eq!(dl.0.as_deref(), Some("poison"));
        assert!(dl.3.contains("poisoned reading"), "{}: {dl:?}", t.name);
    }
}

/// A hook that panics on the message "boom", as a bug in the engine would.
fn panics_at_boom() -> Option<normalizer::pipeline::ApplyHook> {
    Some(Arc::new(|m| {
        if m.id == "boom" {
            panic!("injected panic for {}", m.id);
        }
    }))
}

/// `n` messages of [`messages`] with the message "boom" at place `at`.
fn with_boom(n: usize, at: usize) -> String {
    let mut lines: Vec<String> = messages(n, "g").lines().map(String::from).collect();
    lines.insert(
        at,
        msg("boom", "dev-0042", "2026-11-29T23:00:00Z", r#"{"t":21}"#),
    );
    lines.join("\n")
}

#[test]
fn a_panicking_message_is_dead_lettered_as_internal_and_nothing_else_is_affected() {
    for t in both() {
        t.provision(DEVICES);
        let options = IngestOptions {
            workers: 2,
            hook: panics_at_boom(),
            ..crate::support::options()
        };
        let s = t.ingest_with(&with_boom(30, 7), &options).unwrap();
        assert_eq!(
            (s.processed, s.dead_letters_by_kind["internal"]),
            (30, 1),
            "{}",
            t.name
        );
        let dl = &t.snapshot().dead_letters[0];
        assert!(dl.3.contains("injected panic for boom"), "{dl:?}");
        assert!(
            t.db.counters().connections_discarded >= 2,
            "the panicking transaction's connections are discarded"
        );
        // The pool still has its connections to give.
        assert_eq!(t.ingest(&messages(5, "after")).processed, 5);
    }
}

/// A transaction of many passes that fails in a late one: nothing of it
/// commits; its jobs, parked after their pass, are parsed again from their
/// lines and applied in batches of one pass, which split down to the
/// panicking message alone.
#[test]
fn a_panic_in_a_late_pass_of_a_transaction_dead_letters_only_its_message() {
    for t in both() {
        t.provision(DEVICES);
        let options = IngestOptions {
            workers: 1,
            batch_size: 400,
            pass_size: 10,
            hook: panics_at_boom(),
            ..crate::support::options()
        };
        let s = t.ingest_with(&with_boom(300, 250), &options).unwrap();
        assert_eq!(
            (s.processed, s.dead_letters_by_kind["internal"]),
            (300, 1),
            "{}",
            t.name
        );
        let snap = t.snapshot();
        assert_eq!(snap.processed.len(), 300, "{}", t.name);
        assert!(
            snap.dead_letters[0].3.contains("injected panic for boom"),
            "{}",
            t.name
        );
        // The same lines without it, in one batch, leave the same readings.
        let again = crate::support::both()
            .into_iter()
            .find(|o| o.name == t.name)
            .unwrap();
        again.provision(DEVICES);
        again.ingest(&messages(300, "g"));
        assert_eq!(snap.readings, again.snapshot().readings, "{}", t.name);
        assert_eq!(snap.alerts, again.snapshot().alerts, "{}", t.name);
    }
}

/// A transaction of many passes whose connection is cut in a late pass:
/// the retry runs it again from its first pass (the parked jobs parsed
/// again from their lines), and each message is applied once.
#[test]
fn a_connection_cut_in_a_late_pass_is_retried_from_the_first_and_applies_each_message_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let t = postgres_with(PoolSettings {
        max_size: 2,
        ..PoolSettings::default()
    });
    t.provision(DEVICES);
    let cut = Arc::new(AtomicBool::new(false));
    let options = IngestOptions {
        workers: 1,
        batch_size: 400,
        pass_size: 10,
        hook: Some(Arc::new({
            let (cut, url) = (cut.clone(), t.url.clone());
            move |m| {
                if m.id == "g250" && !cut.swap(true, Ordering::SeqCst) {
                    // 25 passes applied and parked in the open transaction.
                    assert!(pg::shared().terminate_normalizer_backends(&url) >= 1);
                }
            }
        })),
        ..crate::support::options()
    };
    let text = messages(300, "g");
    let s = t.ingest_with(&text, &options).unwrap();
    assert!(cut.load(Ordering::SeqCst), "the connection was cut");
    assert_eq!((s.processed, s.dead_letters), (300, 0));
    let c = t.db.counters();
    assert!(
        c.retries_of(Cause::AdminShutdown) + c.retries_of(Cause::ConnectionLost) >= 1,
        "{c:?}"
    );
    let clean = postgres();
    clean.provision(DEVICES);
    clean.ingest(&text);
    assert_eq!(t.snapshot(), clean.snapshot());
}

#[test]
fn a_commit_whose_acknowledgement_was_lost_is_not_applied_twice() {
    for t in both() {
        t.provision(DEVICES);
        let line = msg("once", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":27}"#);
        let Parsed::Message(m) = parse_line(line.as_bytes(), false) else {
            panic!()
        };
        // The same write (same token) committed twice, as a retry after a
        // lost acknowledgement would: the second sees its own commit.
        let cache = ReferenceCache::default();
        let first =
            t.db.transaction(|c| batch::apply_one(c, &m, line.as_bytes(), "token-1", &cache))
                .unwrap();
        let again =
            t.db.transaction(|c| batch::apply_one(c, &m, line.as_bytes(), "token-1", &cache))
                .unwrap();
        assert!(matches!(first, Outcome::Processed(a) if a.readings == 1 && a.alerts_opened == 1));
        assert!(
            matches!(again, Outcome::Processed(_)),
            "{}: reported as processed, not duplicate",
            t.name
        );
        let other =
            t.db.transaction(|c| batch::apply_one(c, &m, line.as_bytes(), "token-2", &cache))
                .unwrap();
        assert_eq!(other, Outcome::Duplicate);
        let snap = t.snapshot();
        assert_eq!(
            (snap.readings.len(), snap.alerts.len()),
            (1, 1),
            "{}",
            t.name
        );
        // Dead letters: no attempt counted twice, no second row without an id.
        for message_id in [Some("dl".to_string()), None] {
            let letter = DeadLetter {
                message_id: message_id.clone(),
                device_key: None,
                kind: normalizer::core::DeadLetterKind::Malformed,
                error: "e".into(),
                raw: "r".into(),
            };
            for _ in 0..2 {
                t.db.transaction(|c| dead_letters::record(c, &letter, "dl-token"))
                    .unwrap();
            }
            let token = format!("dl-token-{}", message_id.is_some());
            t.db.transaction(|c| dead_letters::record(c, &letter, &token))
                .unwrap();
        }
        let dl = t.snapshot().dead_letters;
        assert_eq!(
            dl.iter()
                .filter(|d| d.0.as_deref() == Some("dl"))
                .map(|d| d.5)
                .collect::<Vec<_>>(),
            vec![2],
            "{}",
            t.name
        );
        assert_eq!(
            dl.iter().filter(|d| d.0.is_none()).count(),
            1 + 1,
            "{}",
            t.name
        );
    }
}

#[test]
fn a_database_that_is_down_at_start_is_waited_for_and_nothing_is_dead_lettered() {
    let cluster = PgCluster::start_new();
    let url = cluster.create_database();
    cluster.stop("fast");
    let db = Database::open(
        DatabaseUrl::parse(&url).unwrap(),
        PoolSettings::default(),
        support::policy(),
    );
    let t = TestDb {
        db,
        url,
        name: "postgres",
        _dir: None,
    };
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            normalizer::db::migrate::run(&t.db).unwrap();
            t.provision(DEVICES);
            t.ingest(&messages(50, "w"))
        });
        std::thread::sleep(Duration::from_secs(3));
        cluster.start();
        let summary = run.join().unwrap();
        assert_eq!((summary.processed, summary.dead_letters), (50, 0));
    });
    let c = t.db.counters();
    assert!(c.retries_of(Cause::ConnectionLost) >= 1, "{c:?}");
    assert!(c.outage_seconds > 1.0, "{c:?}");
    assert_eq!(t.snapshot().processed.len(), 50);
}

#[test]
fn an_outage_beyond_max_outage_stops_the_run_and_a_rerun_completes_it() {
    let cluster = PgCluster::start_new();
    let url = cluster.create_database();
    let open = |max_outage| {
        let policy = RetryPolicy {
            max_outage,
            ..RetryPolicy::default()
        };
        TestDb::open_with_policy(&url, PoolSettings::default(), policy)
    };
    let t = open(Duration::from_secs(2));
    t.provision(DEVICES);
    let input = messages(200, "o");
    let stopper = std::thread::scope(|s| {
        let killer = s.spawn(|| cluster.stop("immediate"));
        let options = IngestOptions {
            workers: 2,
            hook: Some(Arc::new(|_| std::thread::sleep(Duration::from_millis(5)))),
            ..crate::support::options()
        };
        let result = t.ingest_with(&input, &options);
        killer.join().unwrap();
        result
    });
    let IngestError::Stopped(stopped) = stopper.expect_err("the run gives up") else {
        panic!("a Stopped error")
    };
    assert!(stopped.summary.completed < 200, "{:?}", stopped.summary);
    assert!(stopped.resume_from >= 1 && stopped.resume_from <= 200);
    assert!(
        stopped
            .to_string()
            .contains("re-running the same input is safe"),
        "{stopped}"
    );
    cluster.start();
    let t2 = open(Duration::from_secs(60));
    let s = t2.ingest(&input);
    assert_eq!(
        s.dead_letters,
        0,
        "{:?} {:?}",
        s,
        t2.snapshot().dead_letters.first()
    );
    let snap = t2.snapshot();
    assert_eq!(snap.processed.len(), 200, "nothing lost");
    assert!(
        snap.dead_letters.is_empty(),
        "no valid message dead-lettered"
    );
}

#[test]
fn a_poison_message_in_a_batch_of_1000_costs_only_itself() {
    for t in both() {
        t.provision(DEVICES);
        install_poison(&t);
        let mut lines: Vec<String> = messages(1000, "k").lines().map(String::from).collect();
        lines.insert(
            500,
            msg("poison", "dev-0042", "2026-11-29T23:00:00Z", r#"{"t":21}"#),
        );
        // One worker and a batch that holds every line: the poison is in a
        // batch with all 1,000 others.
        let options = IngestOptions {
            workers: 1,
            batch_size: 2000,
            batch_wait: Duration::from_millis(500),
            ..crate::support::options()
        };
        let s = t.ingest_with(&lines.join("\n"), &options).unwrap();
        assert_eq!((s.processed, s.dead_letters), (1000, 1), "{}", t.name);
        assert_eq!(s.dead_letters_by_kind["db_rejected"], 1);
        let snap = t.snapshot();
        assert_eq!(snap.processed.len(), 1000);
        assert_eq!(snap.dead_letters[0].0.as_deref(), Some("poison"));
        // The split: about log2(1001) levels of halves, not 1,001 transactions.
        assert!(s.database.transactions < 100, "{:?}", s.database);
    }
}
