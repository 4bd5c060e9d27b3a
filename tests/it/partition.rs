//! Network partitions: the link between the normalizer and PostgreSQL is
//! cut for a while (packets vanish, nothing is reset), once with a TCP relay
//! on either side of the link (as pgbouncer or a load balancer sit in
//! between: the normalizer's own connection never breaks), once direct (the
//! normalizer inside the namespace, PostgreSQL on the host's end of the
//! link). The run must commit again within the call deadline of the heal
//! and finish by itself with the clean run's end state; how long the rest
//! took is printed beside the clean run's time, not asserted.
//!
//! `CHAOS_PARTITION_SECONDS` sets how long the link stays cut (30 by
//! default; `scripts/chaos` also runs 300).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use normalizer::db::{PoolSettings, RetryPolicy};

use crate::chaos::{
    compare, ingest_observed, ingest_sampled, input, size, write_timeline, Figures, Run,
};
use crate::netns::{Link, Relay};
use crate::pg::PgCluster;
use crate::service::{bin, Server};
use crate::support::TestDb;

fn partition_length() -> Duration {
    Duration::from_secs(
        std::env::var("CHAOS_PARTITION_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Placement {
    Relay,
    Direct,
}

fn check(placement: Placement) {
    let down = partition_length();
    let link = Link::new();
    let cluster = PgCluster::start_listening_on(&link.host_ip, link.subnet());
    let messages = size();
    let (devices, text) = input(messages);
    let workers = 4;
    let settings = PoolSettings::default();

    // The clean run's time is its ingest alone, as the faulty run's is
    // (from its ingest's start to its end): not the database's creation,
    // the provisioning or the snapshot.
    let (clean_summary, clean_snap, clean_elapsed) = {
        let clean = TestDb::open(&cluster.create_database(), settings.clone());
        clean.provision(&devices);
        let started = Instant::now();
        let summary = ingest_observed(&clean.db, &text, &Run::default(), workers);
        let elapsed = started.elapsed();
        (summary, clean.snapshot(), elapsed)
    };

    let database = cluster.create_database();
    let database = database.rsplit('/').next().unwrap();
    let server: SocketAddr = format!("{}:{}", link.host_ip, cluster.port)
        .parse()
        .unwrap();
    let (_relays, url, name) = match placement {
        Placement::Relay => {
            let inner = Relay::start(&link.ns_ip, server, Some(&link));
            let outer = Relay::start("127.0.0.1", inner.addr, None);
            let url = format!("postgres://postgres@{}/{database}", outer.addr);
            (vec![outer, inner], url, "relay")
        }
        Placement::Direct => (
            vec![],
            format!("postgres://postgres@{server}/{database}"),
            "direct",
        ),
    };
    // Waited out however long the partition: the test is about coming back.
    let policy = RetryPolicy {
        max_outage: down + Duration::from_secs(600),
        ..RetryPolicy::default()
    };

    let run = Run::default();
    run.total.store(clean_summary.lines, Ordering::SeqCst);
    let (summary, faulty_snap, finished, healed, done_at_cut, timeline) = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            run.wait_for(0.2);
            let done_at_cut = run.completed.load(Ordering::SeqCst);
            link.cut();
            std::thread::sleep(down);
            link.heal();
            run.server_back();
            (Instant::now(), done_at_cut)
        });
        let normalizer = s.spawn(|| {
            if placement == Placement::Direct {
                link.enter();
            }
            let faulty = TestDb::open_with_policy(&url, settings.clone(), policy);
            faulty.provision(&devices);
            let (summary, timeline) = ingest_sampled(&faulty.db, &text, &run, workers);
            let finished = Instant::now();
            (summary, faulty.snapshot(), finished, timeline)
        });
        let (healed, done_at_cut) = injector.join().expect("the injector does not panic");
        let (summary, snap, finished, timeline) =
            normalizer.join().expect("the run does not panic");
        (summary, snap, finished, healed, done_at_cut, timeline)
    });

    let after_heal = finished.saturating_duration_since(healed);
    let remaining = 1.0 - done_at_cut as f64 / clean_summary.lines.max(1) as f64;
    let budget = Duration::from_secs(10) + clean_elapsed.mul_f64(remaining);
    let fault = match placement {
        Placement::Relay => "partition-relay",
        Placement::Direct => "partition-direct",
    };
    // A figure, not a verdict: how long the rest took next to what the
    // clean run took for the same share (speed is for scripts/chaos to
    // print, never for a test to assert).
    let how = format!(
        "link cut for {} s at 20% ({name}); finished {:.1} s after the heal (for comparison: 10 s + the clean run's ingest time for the {:.0}% left = {:.1} s)",
        down.as_secs(),
        after_heal.as_secs_f64(),
        remaining * 100.0,
        budget.as_secs_f64(),
    );
    run.note(format!(
        "link cut for {} s at 20% of the input ({name})",
        down.as_secs()
    ));
    if let Some(dir) = crate::timeline::dir() {
        write_timeline(&dir, fault, &run, &timeline);
    }
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
    // Liveness, not speed: without a deadline the run waited for TCP's
    // retransmission backoff (minutes) or for ever. The promise is the
    // configured call deadline (statement_timeout + its margin): a call cut
    // off by the partition ends within it. The stated margin, 10 s, covers
    // what follows it: a new connection (libpq's connect_timeout, 5 s, if
    // its first try still meets the cut), the backoff ceiling (0.25 s) and
    // a loaded 2-CPU machine's scheduling.
    let bound = settings.call_deadline().unwrap() + Duration::from_secs(10);
    let recovery = figures
        .recovery
        .expect("lines were committed after the heal");
    assert!(
        recovery <= bound,
        "the first commit came {recovery:?} after the heal (bound {bound:?}): {figures}"
    );
}

#[test]
fn a_partition_behind_a_relay_loses_and_doubles_nothing_and_commits_again_within_the_deadline_of_the_heal(
) {
    check(Placement::Relay);
}

#[test]
fn a_partition_of_a_direct_connection_loses_and_doubles_nothing_and_commits_again_within_the_deadline_of_the_heal(
) {
    check(Placement::Direct);
}

/// `serve` behind the relays: a producer streams while the link is cut; it
/// gets every acknowledgement after the heal, and the end state is the
/// clean run's.
#[test]
fn serve_rides_out_a_partition_behind_a_relay() {
    let down = partition_length();
    let link = Link::new();
    let cluster = PgCluster::start_listening_on(&link.host_ip, link.subnet());
    let (devices, text) = input(size() * 2);
    let clean = TestDb::open(&cluster.create_database(), PoolSettings::default());
    clean.provision(&devices);
    clean.ingest_on(4, &text);

    let direct = cluster.create_database();
    let database = direct.rsplit('/').next().unwrap();
    TestDb::open(&direct, PoolSettings::default()).provision(&devices);
    let server: SocketAddr = format!("{}:{}", link.host_ip, cluster.port)
        .parse()
        .unwrap();
    let inner = Relay::start(&link.ns_ip, server, Some(&link));
    let outer = Relay::start("127.0.0.1", inner.addr, None);
    let url = format!("postgres://postgres@{}/{database}", outer.addr);

    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    std::fs::write(&file, &text).unwrap();
    let service = Server::start(work.path(), &url, &["--workers", "4"]);
    let mut send = bin()
        .args(["send", "--socket"])
        .arg(&service.socket)
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    link.cut();
    assert!(send.try_wait().unwrap().is_none(), "the cut hit the stream");
    std::thread::sleep(down);
    link.heal();
    let healed = Instant::now();
    let sent = send.wait_with_output().unwrap();
    let after_heal = healed.elapsed();
    assert!(
        sent.status.success(),
        "every line acknowledged: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    service.signal(libc::SIGTERM);
    let out = service.wait();
    assert!(out.status.success());
    let log = std::fs::read_to_string(work.path().join("normalizer.log")).unwrap();
    println!(
        "fault=partition-relay-serve cut={} s all_acknowledged_after_heal={:.1}s\n{}",
        down.as_secs(),
        after_heal.as_secs_f64(),
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("back after") || l.contains("ended"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        log.matches("database unreachable since").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("database back after").count(), 1, "{log}");
    let faulty = TestDb::open(&direct, PoolSettings::default());
    let (clean_snap, faulty_snap) = (clean.snapshot(), faulty.snapshot());
    assert_eq!(compare(&clean_snap, &faulty_snap), (0, 0, 0));
    assert_eq!(faulty_snap, clean_snap, "end state equals the clean run");
}
