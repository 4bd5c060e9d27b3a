//! The retry decision as a table of real error values, and the loop
//! driven by scripted connections.

use super::*;
use crate::metrics::Cause;

/// Virtual time: sleeping advances it, jitter is always the ceiling.
struct FakeClock {
    now: Instant,
    slept: Vec<Duration>,
}

impl Clock for FakeClock {
    fn now(&mut self) -> Instant {
        self.now
    }
    fn sleep(&mut self, d: Duration) {
        self.slept.push(d);
        self.now += d;
    }
    fn jitter(&mut self, ceiling: Duration) -> Duration {
        ceiling
    }
}

#[derive(Default)]
struct Log {
    retries: Vec<(u32, Option<Cause>)>,
    succeeded: Option<u32>,
    stopped: Option<u32>,
}

impl Observer for Log {
    fn retrying(&mut self, error: &AttemptError, attempt: u32, _delay: Duration) {
        let cause = match error {
            AttemptError::Failed { classified, .. } => Some(classified.cause),
            AttemptError::Panicked(_) => None,
        };
        self.retries.push((attempt, cause));
    }
    fn succeeded(&mut self, retries: u32) {
        self.succeeded = Some(retries);
    }
    fn stopped(&mut self, _failure: &Failure, attempts: u32) {
        self.stopped = Some(attempts);
    }
}

fn fail_with(message: &str) -> AttemptError {
    AttemptError::failed(DbError::Connect(message.to_string()), Stage::Checkout)
}

fn query_error(message: &'static str) -> AttemptError {
    let error =
        crate::db::classify::test_support::db(diesel::result::DatabaseErrorKind::Unknown, message);
    AttemptError::failed(error, Stage::Body)
}

/// A scripted fake: fails `n` times with `make`, then succeeds.
fn scripted(
    n: u32,
    make: impl Fn() -> AttemptError,
    policy: &RetryPolicy,
) -> (Result<u32, Failure>, FakeClock, Log) {
    let mut clock = FakeClock {
        now: Instant::now(),
        slept: vec![],
    };
    let mut log = Log::default();
    let result = run(policy, &mut clock, &mut log, |attempt| {
        if attempt <= n {
            Err(make())
        } else {
            Ok(attempt)
        }
    });
    (result, clock, log)
}

#[test]
fn every_retryable_class_is_retried_until_it_succeeds() {
    let policy = RetryPolicy::default();
    type Case = (&'static str, Box<dyn Fn() -> AttemptError>, Cause);
    let cases: Vec<Case> = vec![
        (
            "refused",
            Box::new(|| fail_with("Connection refused")),
            Cause::ConnectionLost,
        ),
        (
            "starting",
            Box::new(|| fail_with("FATAL: the database system is starting up")),
            Cause::AdminShutdown,
        ),
        (
            "too many",
            Box::new(|| fail_with("sorry, too many clients already")),
            Cause::TooManyConnections,
        ),
        (
            "serialization",
            Box::new(|| query_error("could not serialize access")),
            Cause::Serialization,
        ),
        (
            "deadlock",
            Box::new(|| query_error("deadlock detected")),
            Cause::Deadlock,
        ),
        (
            "lock",
            Box::new(|| query_error("canceling statement due to lock timeout")),
            Cause::LockTimeout,
        ),
        (
            "busy",
            Box::new(|| query_error("database is locked")),
            Cause::Busy,
        ),
    ];
    for (name, make, cause) in cases {
        for n in [1, 5, 40] {
            let (result, clock, log) = scripted(n, &make, &policy);
            assert_eq!(result.unwrap(), n + 1, "{name} x{n}");
            assert_eq!(log.retries.len() as u32, n, "{name}");
            assert!(log.retries.iter().all(|(_, c)| *c == Some(cause)), "{name}");
            assert_eq!(log.succeeded, Some(n));
            assert_eq!(
                clock.slept.len() as u32,
                n,
                "one sleep per retry, none after success"
            );
        }
    }
}

#[test]
fn backoff_doubles_from_the_base_up_to_the_cap() {
    let policy = RetryPolicy {
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let (_, clock, _) = scripted(6, || query_error("deadlock detected"), &policy);
    let ms: Vec<u128> = clock.slept.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![10, 20, 40, 80, 100, 100]);
}

#[test]
fn real_jitter_stays_within_the_ceiling() {
    let mut clock = SystemClock;
    for _ in 0..1000 {
        assert!(clock.jitter(Duration::from_millis(3)) <= Duration::from_millis(3));
    }
}

#[test]
fn a_permanent_error_is_not_retried() {
    let policy = RetryPolicy::default();
    let (result, clock, log) = scripted(
        1,
        || query_error("invalid byte sequence for encoding"),
        &policy,
    );
    assert!(matches!(result, Err(Failure::Rejected { .. })));
    assert!(clock.slept.is_empty(), "no sleep after the last attempt");
    assert_eq!(log.stopped, Some(1));
}

#[test]
fn an_unrecognized_error_is_retried_a_bounded_number_of_times() {
    let policy = RetryPolicy::default();
    let (result, clock, log) = scripted(100, || query_error("a new kind of failure"), &policy);
    assert!(matches!(result, Err(Failure::Rejected { .. })));
    assert_eq!(log.stopped, Some(policy.unrecognized_attempts));
    assert_eq!(clock.slept.len() as u32, policy.unrecognized_attempts - 1);
    // And a few of them are survived.
    let (result, _, _) = scripted(2, || query_error("a new kind of failure"), &policy);
    assert_eq!(result.unwrap(), 3);
}

#[test]
fn an_outage_longer_than_max_outage_gives_up_with_the_last_error() {
    let policy = RetryPolicy {
        max_outage: Duration::from_secs(10),
        max_delay: Duration::from_secs(1),
        ..RetryPolicy::default()
    };
    let (result, clock, log) = scripted(u32::MAX, || fail_with("Connection refused"), &policy);
    match result {
        Err(Failure::GaveUp { error, failing_for }) => {
            assert!(error.to_string().contains("Connection refused"));
            assert_eq!(failing_for, Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    let slept: Duration = clock.slept.iter().sum();
    assert_eq!(
        slept,
        Duration::from_secs(10),
        "never sleeps past the deadline"
    );
    assert!(log.stopped.is_some());
}

#[test]
fn an_outage_that_began_before_this_call_counts_from_its_start() {
    let policy = RetryPolicy {
        max_outage: Duration::from_secs(10),
        ..RetryPolicy::default()
    };
    let mut clock = FakeClock {
        now: Instant::now() + Duration::from_secs(60),
        slept: vec![],
    };
    let began = clock.now - Duration::from_secs(9);
    let result: Result<(), Failure> = run(&policy, &mut clock, &mut Log::default(), |_| {
        let error = DbError::Connect("database unreachable: refused".into());
        Err(AttemptError::failed(error, Stage::Checkout).since(began))
    });
    assert!(matches!(result, Err(Failure::GaveUp { .. })));
    let slept: Duration = clock.slept.iter().sum();
    assert_eq!(
        slept,
        Duration::from_secs(1),
        "only the outage's last second is waited"
    );
}

#[test]
fn a_transient_attempt_limit_ends_in_rejected_but_connection_errors_go_on() {
    let policy = RetryPolicy {
        transient_attempts: Some(4),
        ..RetryPolicy::default()
    };
    let (result, clock, _) = scripted(100, || query_error("deadlock detected"), &policy);
    assert!(matches!(result, Err(Failure::Rejected { .. })));
    assert_eq!(clock.slept.len(), 3);
    let (result, _, _) = scripted(30, || fail_with("Connection refused"), &policy);
    assert_eq!(result.unwrap(), 31, "an outage is waited out, not split");
    let lost_inside = || {
        let error = DbError::Connect("server closed the connection unexpectedly".into());
        AttemptError::failed(error, Stage::Body)
    };
    let (result, _, _) = scripted(100, lost_inside, &policy);
    assert!(
        matches!(result, Err(Failure::Rejected { .. })),
        "a transaction that keeps losing its connection is split"
    );
}

#[test]
fn a_panic_stops_the_loop_at_once() {
    let policy = RetryPolicy::default();
    let (result, clock, _) = scripted(1, || AttemptError::Panicked("boom".into()), &policy);
    assert!(matches!(result, Err(Failure::Panicked(m)) if m == "boom"));
    assert!(clock.slept.is_empty());
}

#[test]
fn a_full_disk_stops_at_once_by_default_and_is_waited_out_when_asked() {
    let full = || query_error("database or disk is full");
    let (result, clock, _) = scripted(100, full, &RetryPolicy::default());
    match result {
        Err(failure @ Failure::OutOfResources { .. }) => {
            assert!(failure.is_stop(), "never bisected or dead-lettered");
            assert!(
                failure
                    .to_string()
                    .starts_with("the database's disk is full"),
                "{failure}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(clock.slept.is_empty(), "no retry at all");
    let waiting = RetryPolicy {
        resource_wait: None,
        max_outage: Duration::from_secs(1),
        ..RetryPolicy::default()
    };
    let (result, clock, _) = scripted(2000, full, &waiting);
    assert_eq!(result.unwrap(), 2001, "waited out far beyond max_outage");
    assert!(clock.slept.iter().sum::<Duration>() > Duration::from_secs(60));
    let (result, _, _) = scripted(3, || query_error("out of memory"), &RetryPolicy::default());
    assert!(
        matches!(&result, Err(f @ Failure::OutOfResources { .. }) if f.to_string().starts_with("the database is out of memory")),
        "{result:?}"
    );
}

/// The decision alone, as a table: each row is a call's history of
/// failures (seconds after the first, error) and what the last one gets.
#[test]
fn the_decision_is_a_table_of_histories_and_answers() {
    let policy = RetryPolicy {
        max_outage: Duration::from_secs(10),
        transient_attempts: Some(3),
        ..RetryPolicy::default()
    };
    let refused = || fail_with("Connection refused");
    let deadlock = || query_error("deadlock detected");
    let full = || query_error("database or disk is full");
    let bad = || query_error("invalid byte sequence for encoding");
    let new = || query_error("a new kind of failure");
    type Make = fn() -> AttemptError;
    /// Name, failures (seconds after the first, error), shutting down,
    /// what the last failure gets.
    type Row = (&'static str, Vec<(u64, Make)>, bool, &'static str);
    let rows: Vec<Row> = vec![
        ("refused once", vec![(0, refused)], false, "retry"),
        (
            "refused for 9 s",
            vec![(0, refused), (9, refused)],
            false,
            "retry",
        ),
        (
            "refused for 10 s",
            vec![(0, refused), (10, refused)],
            false,
            "gave up",
        ),
        (
            "deadlock twice",
            vec![(0, deadlock), (0, deadlock)],
            false,
            "retry",
        ),
        (
            "deadlock thrice",
            vec![(0, deadlock), (0, deadlock), (0, deadlock)],
            false,
            "rejected",
        ),
        (
            "refused, not counted as in-transaction",
            vec![(0, refused), (0, refused), (0, refused)],
            false,
            "retry",
        ),
        ("permanent", vec![(0, bad)], false, "rejected"),
        (
            "unrecognized twice",
            vec![(0, new), (0, new)],
            false,
            "retry",
        ),
        (
            "unrecognized thrice",
            vec![(0, new), (0, new), (0, new)],
            false,
            "rejected",
        ),
        ("disk full", vec![(0, full)], false, "out of resources"),
        (
            "refused while shutting down",
            vec![(0, refused)],
            true,
            "cancelled",
        ),
        (
            "permanent while shutting down",
            vec![(0, bad)],
            true,
            "rejected",
        ),
        (
            "panic",
            vec![(0, || AttemptError::Panicked("boom".into()))],
            false,
            "panicked",
        ),
    ];
    let start = Instant::now();
    for (name, history, cancelled, expected) in rows {
        let mut retrying = Retrying::new(&policy);
        let mut last = None;
        for (i, (at, make)) in history.iter().enumerate() {
            let is_last = i + 1 == history.len();
            let now = start + Duration::from_secs(*at);
            let decision = retrying.decide(make(), now, cancelled && is_last);
            if !is_last {
                assert!(
                    matches!(decision, Decision::Retry { .. }),
                    "{name}: earlier attempts retry"
                );
            }
            last = Some(decision);
        }
        let got = match last.unwrap() {
            Decision::Retry { ceiling, .. } => {
                assert!(ceiling <= policy.max_delay, "{name}");
                "retry"
            }
            Decision::Stop(Failure::GaveUp { .. }) => "gave up",
            Decision::Stop(Failure::Rejected { .. }) => "rejected",
            Decision::Stop(Failure::Cancelled { .. }) => "cancelled",
            Decision::Stop(Failure::OutOfResources { .. }) => "out of resources",
            Decision::Stop(Failure::Panicked(_)) => "panicked",
            Decision::Stop(Failure::Fenced(_)) => "fenced",
        };
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn a_copy_of_a_failure_says_what_the_original_says() {
    let (result, _, _) = scripted(
        1,
        || query_error("canceling statement due to statement timeout"),
        &RetryPolicy {
            max_outage: Duration::ZERO,
            ..RetryPolicy::default()
        },
    );
    let original = result.unwrap_err();
    let copy = original.clone();
    assert!(original.is_gave_up());
    assert_eq!(copy.to_string(), original.to_string());
    assert!(copy.to_string().contains("statement timeout"), "{copy}");
    let (Failure::GaveUp { error: a, .. }, Failure::GaveUp { error: b, .. }) = (&original, &copy)
    else {
        panic!("{original:?}")
    };
    assert_eq!(a.classified(), b.classified());
    assert_eq!(b.classified().cause, Cause::StatementTimeout);
}
