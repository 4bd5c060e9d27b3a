//! The engine's statements on PostgreSQL find their rows through indexes
//! from the first batch on, on a new database too. A plan made while a
//! table is small (a sequential scan is then the cheapest) must not be kept
//! as the table grows: diesel prepares its statements, PostgreSQL keeps a
//! generic plan after five executions, and such a plan of the processed-ids
//! lookup made a third of the ingests into new databases thirteen times
//! slower (docs/PERFORMANCE.md, "PostgreSQL: `enable_seqscan = off` and `jit = off`"). Nor may
//! a statement be compiled by JIT: `enable_seqscan = off` prices a
//! sequential scan above `jit_above_cost`.

use diesel::prelude::*;
use normalizer::db::PoolSettings;
use normalizer::gen::{self, GenOptions};
use normalizer::pipeline::IngestOptions;

use crate::pg::PgCluster;
use crate::support;

#[derive(QueryableByName, Debug)]
struct Scans {
    #[diesel(sql_type = diesel::sql_types::Text)]
    relname: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq_scan: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    idx_scan: i64,
}

#[test]
fn on_a_new_postgres_database_the_engine_finds_rows_by_index_and_compiles_nothing() {
    // A cluster of its own, with pg_stat_statements, whose counters only
    // this test's sessions move.
    let cluster = PgCluster::start_with(&["shared_preload_libraries = 'pg_stat_statements'"]);
    let url = cluster.create_database();
    let options = GenOptions {
        devices: 40,
        messages: 20_000,
        seed: 5,
        bad_share: 0.02,
        duplicate_share: 0.02,
        late_share: 0.05,
    };
    let settings = || PoolSettings {
        max_size: 5,
        ..PoolSettings::default()
    };
    let t = support::TestDb::open(&url, settings());
    t.provision(&gen::provisioning(&options).to_string());
    // The counters before the ingest (migrations and provisioning scan
    // their empty tables): read once the pool's sessions have ended and
    // flushed their statistics.
    drop(t);
    let before = scans(&url);
    let mut admin = PgConnection::establish(&url).unwrap();
    diesel::sql_query("CREATE EXTENSION pg_stat_statements")
        .execute(&mut admin)
        .unwrap();
    diesel::sql_query("SELECT pg_stat_statements_reset()")
        .execute(&mut admin)
        .unwrap();
    drop(admin);
    let mut input = Vec::new();
    gen::messages(&options, &mut input).unwrap();
    let input = String::from_utf8(input).unwrap();
    let t = support::TestDb::open(&url, settings());
    // Small batches: many executions of each statement while the tables
    // grow from empty, as in the first minutes of a new deployment.
    let summary = t
        .ingest_with(
            &input,
            &IngestOptions {
                batch_size: 100,
                ..support::options()
            },
        )
        .unwrap();
    assert!(summary.processed > 15_000, "{summary:?}");
    assert!(summary.dead_letters > 0, "{summary:?}");
    assert!(summary.alerts_opened > 0, "{summary:?}");
    drop(t);
    let after = scans(&url);

    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.relname, a.relname);
        assert_eq!(
            a.seq_scan, b.seq_scan,
            "{} was scanned sequentially during the ingest: before {before:?}, after {after:?}",
            a.relname
        );
    }
    let lookups = |v: &[Scans]| {
        v.iter()
            .find(|s| s.relname == "processed_messages")
            .unwrap()
            .idx_scan
    };
    assert!(
        lookups(&after) - lookups(&before) >= 200,
        "the processed-ids lookups ran, by index: before {before:?}, after {after:?}"
    );

    // No statement was compiled by JIT: a sequential scan priced as
    // disabled is above `jit_above_cost`, and compiling the one-row read of
    // `reference_version` cost 20-100 ms a batch.
    let jit: Jit = diesel::sql_query(
        "SELECT coalesce(sum(jit_functions), 0)::bigint AS functions, \
                coalesce(sum(calls), 0)::bigint AS calls \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .get_result(&mut PgConnection::establish(&url).unwrap())
    .unwrap();
    assert!(
        jit.calls > 1000,
        "the engine's statements were counted: {jit:?}"
    );
    assert_eq!(jit.functions, 0, "statements were compiled by JIT: {jit:?}");
}

#[derive(QueryableByName, Debug)]
struct Jit {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    functions: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    calls: i64,
}

/// The engine's growing tables' scan counters, once every other session of
/// the database has ended (a session flushes its statistics when it ends).
fn scans(url: &str) -> Vec<Scans> {
    let mut conn = PgConnection::establish(url).unwrap();
    let database = url.rsplit('/').next().unwrap();
    wait_for_sessions_to_end(&mut conn, database);
    let scans: Vec<Scans> = diesel::sql_query(
        "SELECT relname::text AS relname, seq_scan, coalesce(idx_scan, 0) AS idx_scan \
         FROM pg_stat_user_tables \
         WHERE relname IN ('alerts', 'dead_letters', 'processed_messages', 'readings') \
         ORDER BY relname",
    )
    .load(&mut conn)
    .unwrap();
    assert_eq!(scans.len(), 4, "{scans:?}");
    scans
}

/// Waits until no other session is connected to `database`.
fn wait_for_sessions_to_end(conn: &mut PgConnection, database: &str) {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n: N = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind::<diesel::sql_types::Text, _>(database)
        .get_result(conn)
        .unwrap();
        if n.n == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "sessions did not end");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
