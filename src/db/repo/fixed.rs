//! SQLite statements of one fixed text, run once a row.
//!
//! diesel caches a prepared statement by its query's type only when every
//! part of the query has a static id; otherwise it writes the SQL out again
//! for each execution to look the statement up by its text. An `INSERT … ON
//! CONFLICT` has no static id, and `sql_query` is never cached: either way a
//! statement run once a row spends more time in diesel than in SQLite
//! (docs/PERFORMANCE.md, "A write path made for SQLite"). A [`Fixed`]
//! statement is its text and its binds: it is prepared once per connection,
//! found again by its type, and each run only binds and steps.

use std::marker::PhantomData;

use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::{QueryResult, RunQueryDsl};

/// One statement: its text and how a row's values bind to it.
pub(super) trait Statement {
    /// The statement's key in the cache: a type of its own.
    type Key: 'static;
    /// Writes the text and binds the values (diesel writes each bind's
    /// `?`): the same text on every run.
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()>;
}

/// A [`Statement`] with one row's values, ready to run.
pub(super) struct Fixed<S>(pub S);

impl<S: Statement> Fixed<S> {
    /// Runs the statement; returns the rows it changed.
    pub(super) fn run(self, conn: &mut SqliteConnection) -> QueryResult<usize> {
        self.execute(conn)
    }
}

impl<S: Statement> QueryId for Fixed<S> {
    type QueryId = PhantomData<S::Key>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: Statement> QueryFragment<Sqlite> for Fixed<S> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        self.0.walk(&mut out)
    }
}

impl<S> RunQueryDsl<SqliteConnection> for Fixed<S> {}
