//! `dead_letters`: exactly-once upserts by message id.

use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;

use crate::db::schema::dead_letters::dsl as dl;
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};
use crate::outcome::DeadLetter;

/// Files a dead letter. A message id has one row: filing it again bumps
/// `attempts` and keeps the latest kind, error and raw line. `token` names
/// this write: when a retried transaction finds its own token already stored,
/// the earlier commit landed and nothing is written twice.
pub fn record(conn: &mut AnyConnection, letter: &DeadLetter, token: &str) -> QueryResult<()> {
    let landed: Option<i64> = dispatch!(conn, c => dl::dead_letters
        .filter(dl::write_token.eq(token))
        .select(dl::id)
        .first(c)
        .optional())?;
    if landed.is_some() {
        return Ok(());
    }
    let now = Instant(Utc::now());
    let row = (
        dl::message_id.eq(&letter.message_id),
        dl::device_key.eq(&letter.device_key),
        dl::kind.eq(letter.kind.as_str()),
        dl::error.eq(&letter.error),
        dl::raw.eq(&letter.raw),
        dl::attempts.eq(1),
        dl::created_at.eq(now),
        dl::updated_at.eq(now),
        dl::write_token.eq(token),
    );
    dispatch!(conn, c => match letter.message_id {
        None => diesel::insert_into(dl::dead_letters).values(row).execute(c),
        Some(_) => diesel::insert_into(dl::dead_letters)
            .values(row)
            .on_conflict(dl::message_id)
            .do_update()
            .set((
                dl::attempts.eq(dl::attempts + 1),
                dl::device_key.eq(excluded(dl::device_key)),
                dl::kind.eq(excluded(dl::kind)),
                dl::error.eq(excluded(dl::error)),
                dl::raw.eq(excluded(dl::raw)),
                dl::updated_at.eq(excluded(dl::updated_at)),
                dl::write_token.eq(excluded(dl::write_token)),
            ))
            .execute(c),
    })?;
    Ok(())
}

/// Removes the dead letter of a message that has now been processed.
pub fn remove(conn: &mut AnyConnection, message_id: &str) -> QueryResult<usize> {
    dispatch!(conn, c => diesel::delete(dl::dead_letters.filter(dl::message_id.eq(message_id))).execute(c))
}

/// A stored dead letter, for operators.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stored {
    /// Row id.
    pub id: i64,
    /// The message id, where it was valid.
    pub message_id: Option<String>,
    /// The device key, where it was valid.
    pub device_key: Option<String>,
    /// The kind.
    pub kind: String,
    /// What went wrong.
    pub error: String,
    /// How often this message was dead-lettered.
    pub attempts: i32,
    /// First filed, RFC 3339.
    pub created_at: String,
    /// Last filed, RFC 3339.
    pub updated_at: String,
    /// The line (its first 64 KiB).
    pub raw: String,
}

/// Dead letters as `dead-letters list` prints them: a table, then how many
/// of how many (`total`, of that kind).
pub fn to_text(rows: &[Stored], total: i64) -> String {
    let mut text = format!(
        "{:>6}  {:<14}  {:>8}  {:<20}  {:<16}  error\n",
        "id", "kind", "attempts", "message", "device"
    );
    for r in rows {
        text.push_str(&format!(
            "{:>6}  {:<14}  {:>8}  {:<20}  {:<16}  {}\n",
            r.id,
            r.kind,
            r.attempts,
            r.message_id.as_deref().unwrap_or("-"),
            r.device_key.as_deref().unwrap_or("-"),
            r.error
        ));
    }
    if rows.len() as i64 == total {
        text.push_str(&format!("{total} dead letters"));
    } else {
        text.push_str(&format!("{} of {total} dead letters", rows.len()));
    }
    text
}

type Row = (
    i64,
    Option<String>,
    Option<String>,
    String,
    String,
    i32,
    Instant,
    Instant,
    String,
);

/// Dead letters, oldest first, of one kind or all.
pub fn list(conn: &mut AnyConnection, kind: Option<&str>, limit: i64) -> QueryResult<Vec<Stored>> {
    let rows: Vec<Row> = dispatch!(conn, c => {
        let mut q = dl::dead_letters
            .select((dl::id, dl::message_id, dl::device_key, dl::kind, dl::error, dl::attempts, dl::created_at, dl::updated_at, dl::raw))
            .order(dl::id)
            .limit(limit)
            .into_boxed();
        if let Some(kind) = kind {
            q = q.filter(dl::kind.eq(kind));
        }
        q.load(c)
    })?;
    let text = |i: Instant| i.0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(rows
        .into_iter()
        .map(
            |(id, message_id, device_key, kind, error, attempts, created, updated, raw)| Stored {
                id,
                message_id,
                device_key,
                kind,
                error,
                attempts,
                created_at: text(created),
                updated_at: text(updated),
                raw,
            },
        )
        .collect())
}

/// How many dead letters there are (of `kind`).
pub fn count(conn: &mut AnyConnection, kind: Option<&str>) -> QueryResult<i64> {
    dispatch!(conn, c => match kind {
        Some(kind) => dl::dead_letters.filter(dl::kind.eq(kind)).count().get_result(c),
        None => dl::dead_letters.count().get_result(c),
    })
}

/// Deletes the dead letters of one kind, optionally only those last filed
/// before `before`. Returns how many.
pub fn purge(
    conn: &mut AnyConnection,
    kind: &str,
    before: Option<chrono::DateTime<Utc>>,
) -> QueryResult<usize> {
    dispatch!(conn, c => match before {
        Some(before) => diesel::delete(
            dl::dead_letters.filter(dl::kind.eq(kind)).filter(dl::updated_at.lt(Instant(before))),
        )
        .execute(c),
        None => diesel::delete(dl::dead_letters.filter(dl::kind.eq(kind))).execute(c),
    })
}
