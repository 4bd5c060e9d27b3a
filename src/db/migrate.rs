//! Schema migrations, embedded in the binary, one set per backend.

use diesel::migration::MigrationVersion;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{AnyConnection, Database, Failure};

const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Runs the pending migrations in one transaction, through the retry loop;
/// on PostgreSQL under an advisory lock, so that processes starting together
/// migrate once. Returns the versions applied.
pub fn run(db: &Database) -> Result<Vec<String>, Failure> {
    db.transaction(|conn| {
        let applied = match conn {
            AnyConnection::Pg(c) => {
                diesel::sql_query("SELECT pg_advisory_xact_lock(7350429001)").execute(c)?;
                c.run_pending_migrations(POSTGRES).map(versions)
            }
            AnyConnection::Sqlite(c) => c.run_pending_migrations(SQLITE).map(versions),
        };
        applied.map_err(|e| match e.downcast::<diesel::result::Error>() {
            Ok(e) => *e,
            Err(e) => diesel::result::Error::QueryBuilderError(e),
        })
    })
}

fn versions(applied: Vec<MigrationVersion<'_>>) -> Vec<String> {
    applied.iter().map(|v| v.to_string()).collect()
}
