//! Schema migrations, embedded in the binary, one set per backend.
//!
//! A schema that is up to date is found with plain reads, so a role that
//! may only read and write rows (no DDL, not even the migration
//! bookkeeping's `CREATE TABLE IF NOT EXISTS`) can run every command.

use diesel::migration::{Migration, MigrationSource};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{AnyConnection, Database, Failure};

const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Runs the pending migrations in one transaction, through the retry loop;
/// on PostgreSQL under an advisory lock, so that processes starting together
/// migrate once. Returns the versions applied; with none pending it writes
/// nothing at all.
pub fn run(db: &Database) -> Result<Vec<String>, Failure> {
    // Read first: a database that is up to date may well be read-only.
    if pending(db)?.is_empty() {
        return Ok(vec![]);
    }
    db.transaction(|conn| {
        if pending_in(conn)?.is_empty() {
            return Ok(vec![]);
        }
        let applied = match conn {
            AnyConnection::Pg(c) => {
                diesel::sql_query("SELECT pg_advisory_xact_lock(7350429001)").execute(c)?;
                c.run_pending_migrations(POSTGRES).map(versions)
            }
            AnyConnection::Sqlite(c, _) => c.run_pending_migrations(SQLITE).map(versions),
        };
        applied.map_err(unbox)
    })
}

/// The versions of the migrations not applied yet, with reads only.
pub fn pending(db: &Database) -> Result<Vec<String>, Failure> {
    db.read(pending_in)
}

fn pending_in(conn: &mut AnyConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let (exists, embedded) = match conn {
        AnyConnection::Pg(c) => (
            diesel::sql_query(
                "SELECT count(*) AS n FROM pg_catalog.pg_tables \
                 WHERE tablename = '__diesel_schema_migrations' AND schemaname = current_schema()",
            )
            .get_result::<Count>(c)?,
            names(MigrationSource::<diesel::pg::Pg>::migrations(&POSTGRES)),
        ),
        AnyConnection::Sqlite(c, _) => (
            diesel::sql_query(
                "SELECT count(*) AS n FROM sqlite_master \
                 WHERE type = 'table' AND name = '__diesel_schema_migrations'",
            )
            .get_result::<Count>(c)?,
            names(MigrationSource::<diesel::sqlite::Sqlite>::migrations(
                &SQLITE,
            )),
        ),
    };
    let embedded = embedded.map_err(unbox)?;
    if exists.n == 0 {
        return Ok(embedded);
    }
    let applied: Vec<Version> = super::dispatch!(conn, c => diesel::sql_query(
        "SELECT version FROM __diesel_schema_migrations"
    )
    .load(c))?;
    Ok(embedded
        .into_iter()
        .filter(|v| !applied.iter().any(|a| &a.version == v))
        .collect())
}

fn names<DB: diesel::backend::Backend>(
    migrations: diesel::migration::Result<Vec<Box<dyn Migration<DB>>>>,
) -> diesel::migration::Result<Vec<String>> {
    migrations.map(|all| all.iter().map(|m| m.name().version().to_string()).collect())
}

fn versions(applied: Vec<diesel::migration::MigrationVersion<'_>>) -> Vec<String> {
    applied.iter().map(|v| v.to_string()).collect()
}

/// diesel_migrations boxes diesel's errors. The classifier reads an
/// error's text anyway (diesel has no SQLSTATE), so the boxed error goes on
/// as a database error with its own words: a connection lost during a
/// migration is still retried like any other, and nothing is downcast.
fn unbox(e: Box<dyn std::error::Error + Send + Sync>) -> diesel::result::Error {
    diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::Unknown,
        Box::new(super::classify::Said(e.to_string())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{classify, ErrorClass};

    #[test]
    fn a_boxed_error_keeps_its_meaning() {
        let lost: Box<dyn std::error::Error + Send + Sync> =
            "server closed the connection unexpectedly".into();
        let error = crate::db::DbError::Query(unbox(lost));
        assert_eq!(classify(&error).class, ErrorClass::Connection);
        let denied: Box<dyn std::error::Error + Send + Sync> =
            "permission denied for schema public".into();
        let error = crate::db::DbError::Query(unbox(denied));
        assert_eq!(classify(&error).class, ErrorClass::Permanent);
        assert!(error
            .to_string()
            .contains("permission denied for schema public"));
    }
}
