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
use normalizer::db::{
    AnyConnection, Database, DatabaseUrl, PoolSettings, RetryPolicy, SQLITE_PRAGMAS,
};

const CREATE: &str = "CREATE TABLE IF NOT EXISTS bench (v INTEGER)";
const INSERT: &str = "INSERT INTO bench (v) VALUES (1)";

#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // The normalizer's own settings (its default busy_timeout is 5 s).
        conn.batch_execute(&format!("PRAGMA busy_timeout = 5000; {SQLITE_PRAGMAS}"))
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
        AnyConnection::Sqlite(c, _) => diesel::sql_query(INSERT).execute(c),
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

/// The same paths, interleaved: blocks of each side alternate over many
/// rounds (the order rotating), and the median of the per-round ratios is
/// reported. Drift on a shared machine (other processes, WAL checkpoints)
/// hits every side of a round alike, which separate criterion runs cannot
/// promise. A third side, a second wrapper, is the control: the method
/// compares the wrapper with itself, and how far that ratio is from 1 is
/// what the method cannot resolve. Each side has its own file (two
/// connections to one file make whichever writes after the other pay for
/// the other's WAL: a 30% skew between two identical sides), on tmpfs where
/// there is one, so that the disk's flushes do not add their noise.
fn interleaved(_: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, block) = if full { (600, 200) } else { (6, 10) };
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let db = open_wrapper(&dir.path().join("interleaved.db"));
    let control = open_wrapper(&dir.path().join("interleaved-control.db"));
    let plain = open_plain(&dir.path().join("interleaved-plain.db"));
    let sides: [&dyn Fn(); 3] = [&|| insert_plain(&plain), &|| insert_wrapper(&db), &|| {
        insert_wrapper(&control)
    }];
    let time = |f: &dyn Fn()| {
        let started = std::time::Instant::now();
        for _ in 0..block {
            f();
        }
        started.elapsed().as_secs_f64()
    };
    let (mut ratios, mut controls) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for round in 0..rounds {
        let mut took = [0.0; 3];
        // Every order of the three sides, in turn.
        let order = [
            [0, 1, 2],
            [1, 2, 0],
            [2, 0, 1],
            [0, 2, 1],
            [2, 1, 0],
            [1, 0, 2],
        ][round % 6];
        for side in order {
            took[side] = time(sides[side]);
        }
        ratios.push(took[1] / took[0]);
        controls.push(took[2] / took[1]);
    }
    let summary = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[v.len() / 10], v[v.len() * 9 / 10])
    };
    let (median, p10, p90) = summary(ratios);
    let (control, c10, c90) = summary(controls);
    println!(
        "interleaved: {rounds} rounds of {block} transactions each side: median ratio wrapper/plain {median:.4} (overhead {:+.2}%), p10 {p10:.4}, p90 {p90:.4}; control wrapper/wrapper {control:.4} ({:+.2}%)",
        100.0 * (median - 1.0),
        100.0 * (control - 1.0)
    );
    if full {
        let out = std::path::Path::new("target/criterion/interleaved.json");
        let _ = std::fs::create_dir_all(out.parent().unwrap());
        let _ = std::fs::write(
            out,
            format!(
                "{{\"median\": {median}, \"p10\": {p10}, \"p90\": {p90}, \"control\": {control}, \"control_p10\": {c10}, \"control_p90\": {c90}, \"rounds\": {rounds}, \"block\": {block}}}"
            ),
        );
    }
}

criterion_group!(benches, bench, interleaved);
criterion_main!(benches);
