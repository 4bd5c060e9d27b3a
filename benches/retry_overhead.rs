//! The retry wrapper's cost on the success path: `Database::transaction`
//! (breaker, retry loop, catch_unwind, discard bookkeeping) against a plain
//! r2d2 checkout and `conn.immediate_transaction`, both on the same SQLite
//! file with the same pragmas and the same one-row insert, measured two ways:
//! as two criterion benchmarks, and interleaved (alternating blocks, median
//! of per-round ratios, each side on its own file). `scripts/bench` prints
//! both ratios.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::{RunQueryDsl, SqliteConnection};
use normalizer::db::{AnyConnection, Database, DatabaseUrl, PoolSettings, RetryPolicy};

const CREATE: &str = "CREATE TABLE IF NOT EXISTS bench (v INTEGER)";
const INSERT: &str = "INSERT INTO bench (v) VALUES (1)";

#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(
            "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// The wrapper's side: a `Database` on `path`, its table created.
fn open_wrapper(path: &std::path::Path) -> Database {
    let db = Database::open(
        DatabaseUrl::parse(&format!("sqlite://{}", path.display())).unwrap(),
        PoolSettings {
            max_size: 1,
            ..PoolSettings::default()
        },
        RetryPolicy::default(),
    );
    db.transaction(|c| c.batch_execute(CREATE)).unwrap();
    db
}

/// The plain side: diesel's own r2d2 manager on `path`, same pragmas, no
/// ping at checkout.
fn open_plain(path: &std::path::Path) -> Pool<ConnectionManager<SqliteConnection>> {
    let pool = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .connection_customizer(Box::new(Pragmas))
        .build(ConnectionManager::new(path.to_str().unwrap()))
        .unwrap();
    pool.get().unwrap().batch_execute(CREATE).unwrap();
    pool
}

fn insert_plain(pool: &Pool<ConnectionManager<SqliteConnection>>) {
    let mut conn = pool.get().unwrap();
    conn.immediate_transaction(|c| diesel::sql_query(INSERT).execute(c))
        .unwrap();
}

fn insert_wrapper(db: &Database) {
    db.transaction(|conn| match conn {
        AnyConnection::Sqlite(c) => diesel::sql_query(INSERT).execute(c),
        AnyConnection::Pg(c) => diesel::sql_query(INSERT).execute(c),
    })
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let db = open_wrapper(&path);
    let plain = open_plain(&path);

    let mut group = c.benchmark_group("transaction");
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("plain", |b| b.iter(|| insert_plain(&plain)));
    group.bench_function("wrapper", |b| b.iter(|| insert_wrapper(&db)));
    group.finish();
}

/// The same two paths, interleaved: blocks of each alternate, many rounds,
/// and the median of the per-round ratios is reported. Drift on a shared
/// machine (other processes, WAL checkpoints) hits both sides of a round
/// alike, which two separate criterion runs cannot promise.
fn interleaved(_: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, block) = if full { (200, 500) } else { (3, 10) };
    let dir = tempfile::tempdir().unwrap();
    let db = open_wrapper(&dir.path().join("interleaved.db"));
    // Its own file: two connections to one file make whichever writes after
    // the other pay for the other's WAL (measured: a 30% skew between two
    // identical sides).
    let plain = open_plain(&dir.path().join("interleaved-plain.db"));
    let run_plain = || insert_plain(&plain);
    let run_wrapper = || insert_wrapper(&db);
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let time = |f: &dyn Fn()| {
            let started = std::time::Instant::now();
            for _ in 0..block {
                f();
            }
            started.elapsed().as_secs_f64()
        };
        // Alternate which side goes first.
        let (p, w) = if round % 2 == 0 {
            let p = time(&run_plain);
            (p, time(&run_wrapper))
        } else {
            let w = time(&run_wrapper);
            (time(&run_plain), w)
        };
        ratios.push(w / p);
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let median = ratios[ratios.len() / 2];
    let (p10, p90) = (ratios[ratios.len() / 10], ratios[ratios.len() * 9 / 10]);
    println!(
        "interleaved: {rounds} rounds of {block} transactions each side: median ratio wrapper/plain {median:.4} (overhead {:+.2}%), p10 {p10:.4}, p90 {p90:.4}",
        100.0 * (median - 1.0)
    );
    if full {
        let out = std::path::Path::new("target/criterion/interleaved.json");
        let _ = std::fs::create_dir_all(out.parent().unwrap());
        let _ = std::fs::write(out, format!("{{\"median\": {median}, \"p10\": {p10}, \"p90\": {p90}, \"rounds\": {rounds}, \"block\": {block}}}"));
    }
}

criterion_group!(benches, bench, interleaved);
criterion_main!(benches);
