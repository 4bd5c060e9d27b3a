//! `feed_fences`: the fencing tokens of the NATS feed's partitions.
//!
//! An instance that takes a partition over [`claim`]s it with the revision
//! of its ownership record, which only grows from one owner to the next.
//! Every transaction that applies the partition's messages ends with
//! [`check`]: if another instance has claimed since, the transaction rolls
//! back. On PostgreSQL the check takes a share lock on the fence row, so a
//! claim waits for a transaction that passed its check to commit, and a
//! transaction that checks after a claim committed sees the new token (READ
//! COMMITTED re-reads the row). On SQLite, write transactions run one at a
//! time, so the check and the commit are never split by a claim.
//!
//! The owner also [`record`]s how far the partition is settled (every
//! message through a stream sequence has its outcome committed), with the
//! creation time of the stream the sequence counts in; a claim returns it
//! for the same stream, and the new owner's consumer starts after it.

use chrono::Utc;
use diesel::prelude::*;

use crate::db::schema::feed_fences::dsl as f;
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};

/// A partition's fencing token, as its owner holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The partition's name: `<stream>/<partition>`.
    pub key: std::sync::Arc<str>,
    /// The token: the revision of the ownership record that granted it.
    pub token: i64,
}

/// Raises the partition's token to `fence.token`, for `owner`. Returns the
/// sequence of `stream` (its creation time) through which the partition is
/// settled (0: none recorded, or recorded in another stream of the same
/// name), or `None` when the stored token is already higher: someone
/// claimed it after us, and we do not own it.
pub fn claim(
    conn: &mut AnyConnection,
    fence: &Fence,
    owner: &str,
    stream: i64,
) -> QueryResult<Option<u64>> {
    let now = Instant(Utc::now());
    let inserted = dispatch!(conn, c => diesel::insert_into(f::feed_fences)
        .values((
            f::partition_key.eq(fence.key.as_ref()),
            f::token.eq(fence.token),
            f::owner.eq(owner),
            f::claimed_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))?;
    if inserted == 1 {
        return Ok(Some(0));
    }
    let changed = dispatch!(conn, c => diesel::update(
        f::feed_fences
            .filter(f::partition_key.eq(fence.key.as_ref()))
            .filter(f::token.le(fence.token)),
    )
    .set((f::token.eq(fence.token), f::owner.eq(owner), f::claimed_at.eq(now)))
    .execute(c))?;
    if changed == 0 {
        return Ok(None);
    }
    let (resume, in_stream): (i64, i64) = dispatch!(conn, c => f::feed_fences
        .filter(f::partition_key.eq(fence.key.as_ref()))
        .select((f::resume_after, f::resume_stream))
        .first(c))?;
    Ok(Some(if in_stream == stream {
        resume as u64
    } else {
        0
    }))
}

/// Records that every message of the partition through sequence `through`
/// of `stream` (its creation time) has its outcome committed: only under
/// the fence's own token (a former owner records nothing), and never
/// downwards within one stream. Returns whether the row moved.
pub fn record(
    conn: &mut AnyConnection,
    fence: &Fence,
    stream: i64,
    through: u64,
) -> QueryResult<bool> {
    let through = through as i64;
    let changed = dispatch!(conn, c => diesel::update(
        f::feed_fences
            .filter(f::partition_key.eq(fence.key.as_ref()))
            .filter(f::token.eq(fence.token))
            .filter(f::resume_stream.ne(stream).or(f::resume_after.lt(through))),
    )
    .set((f::resume_after.eq(through), f::resume_stream.eq(stream)))
    .execute(c))?;
    Ok(changed == 1)
}

/// Of `fences`, the ones whose stored token is no longer ours: their
/// partitions were claimed by another instance. Run last in a transaction;
/// one statement for all of them.
pub fn check<'a>(conn: &mut AnyConnection, fences: &[&'a Fence]) -> QueryResult<Vec<&'a Fence>> {
    if fences.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = fences.iter().map(|f| f.key.as_ref()).collect();
    let query = f::feed_fences
        .filter(f::partition_key.eq_any(&keys))
        .select((f::partition_key, f::token));
    let stored: Vec<(String, i64)> = match conn {
        AnyConnection::Pg(c) => query.for_share().load(c)?,
        AnyConnection::Sqlite(c, _) => query.load(c)?,
    };
    Ok(fences
        .iter()
        .filter(|fence| {
            !stored
                .iter()
                .any(|(key, token)| key.as_str() == fence.key.as_ref() && *token == fence.token)
        })
        .copied()
        .collect())
}

/// Every partition's token and owner, by key: for `status`.
pub fn all(conn: &mut AnyConnection) -> QueryResult<Vec<(String, i64, String)>> {
    dispatch!(conn, c => f::feed_fences
        .select((f::partition_key, f::token, f::owner))
        .order(f::partition_key)
        .load(c))
}
