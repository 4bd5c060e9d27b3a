//! The retry wrapper's cost on the success path: `Database::transaction`
//! (breaker, retry loop, catch_unwind, discard bookkeeping) against a plain
//! r2d2 checkout and `conn.immediate_transaction`, both on the same SQLite
//! file with the same pragmas and the same one-row insert. `scripts/bench`
//! prints the ratio of the two.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::{RunQueryDsl, SqliteConnection};
use normalizer::db::{AnyConnection, Database, DatabaseUrl, PoolSettings, RetryPolicy};

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

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let url = format!("sqlite://{}", path.display());
    let db = Database::open(
        DatabaseUrl::parse(&url).unwrap(),
        PoolSettings {
            max_size: 1,
            ..PoolSettings::default()
        },
        RetryPolicy::default(),
    );
    db.transaction(|c| c.batch_execute("CREATE TABLE IF NOT EXISTS bench (v INTEGER)"))
        .unwrap();
    let plain: Pool<ConnectionManager<SqliteConnection>> = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .connection_customizer(Box::new(Pragmas))
        .build(ConnectionManager::new(path.to_str().unwrap()))
        .unwrap();

    let mut group = c.benchmark_group("transaction");
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("plain", |b| {
        b.iter(|| {
            let mut conn = plain.get().unwrap();
            conn.immediate_transaction(|c| diesel::sql_query(INSERT).execute(c))
                .unwrap();
        })
    });
    group.bench_function("wrapper", |b| {
        b.iter(|| {
            db.transaction(|conn| match conn {
                AnyConnection::Sqlite(c) => diesel::sql_query(INSERT).execute(c),
                AnyConnection::Pg(c) => diesel::sql_query(INSERT).execute(c),
            })
            .unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
