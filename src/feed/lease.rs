//! Who owns which partition: leases in the ownership bucket.
//!
//! Keys: `member.<instance>` for each running instance, `partition.<n>` for
//! each owned partition, both holding the instance's name and renewed well
//! within the bucket's TTL (the lease). `create` succeeds only where a key is
//! absent (free, or expired with its owner), `update` only with the revision
//! the updater last saw: two instances can never both hold a key. The
//! revision that `create` returned is the owner's fencing token: revisions
//! of a bucket only grow, so a later owner always holds a higher token.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::TryStreamExt;

/// How many of `partitions` the instance `me` should own, among `members`
/// (sorted names, `me` among them): an even share, the remainder going to
/// the first names. 3 instances, 16 partitions: 6, 5, 5.
/// An instance not yet listed (its key not written yet) counts itself in.
pub fn fair_share(partitions: u32, members: &[String], me: &str) -> u32 {
    let mut all: Vec<&str> = members.iter().map(String::as_str).collect();
    if !all.contains(&me) {
        all.push(me);
        all.sort_unstable();
    }
    let count = all.len() as u32;
    let rank = all.iter().position(|m| *m == me).expect("listed") as u32;
    partitions / count + u32::from(rank < partitions % count)
}

pub(super) fn member_key(instance: &str) -> String {
    format!("member.{instance}")
}

pub(super) fn partition_key(n: u32) -> String {
    format!("partition.{n}")
}

/// What the bucket says now.
#[derive(Debug, Default)]
pub(super) struct View {
    /// Running instances, sorted.
    pub members: Vec<String>,
    /// Partitions that someone holds.
    pub held: std::collections::BTreeSet<u32>,
}

/// Reads every live key (expired ones are gone from the bucket): the
/// bucket's subjects from one stream info request, then the last entry of
/// each by a direct get, which leaves deleted keys out. No consumer: the
/// client's key listing creates an ephemeral consumer each time, two
/// proposals to the cluster's meta layer (create, remove), about 1.5 a
/// second with three instances; under that load (and a busy machine) a
/// node restarted in CI stayed "not current" with the meta layer for over
/// a minute.
pub(super) async fn view(store: &kv::Store) -> anyhow::Result<View> {
    // Bounded, so that a server that never answers cannot hold the
    // ownership loop.
    let entries = tokio::time::timeout(Duration::from_secs(5), live_entries(store))
        .await
        .map_err(|_| anyhow::anyhow!("reading the ownership bucket took over 5 s"))??;
    Ok(View::of(entries.into_iter().map(|entry| entry.key)))
}

/// Gives up every key that still holds `value` (this instance's name), and
/// says how many there were. At shutdown, after the leases the instance
/// knows of: a shutdown cancels the balancing round under way, and a
/// `create` that it had sent may have landed unrecorded; left alone, its
/// partition would stay idle until the lease ran out (10 s by default).
/// Nobody else writes this name, so each such key is this instance's.
pub(super) async fn release_named(store: &kv::Store, value: &str) -> anyhow::Result<usize> {
    let mut released = 0;
    for entry in live_entries(store).await? {
        if entry.value.as_ref() == value.as_bytes() {
            store
                .delete_expect_revision(&entry.key, Some(entry.revision))
                .await?;
            released += 1;
        }
    }
    Ok(released)
}

/// The bucket's live entries, deleted keys left out.
async fn live_entries(store: &kv::Store) -> anyhow::Result<Vec<kv::Entry>> {
    let subjects: Vec<(String, usize)> = store
        .stream
        .info_with_subjects(format!("{}>", store.prefix))
        .await?
        .try_collect()
        .await?;
    let entries = subjects.iter().filter_map(|(subject, _)| {
        let key = subject.strip_prefix(store.prefix.as_str())?;
        Some(async move { store.entry(key).await })
    });
    let entries = futures_util::future::try_join_all(entries).await?;
    Ok(entries
        .into_iter()
        .flatten()
        .filter(|entry| entry.operation == kv::Operation::Put)
        .collect())
}

impl View {
    /// The view that a listing of `keys` gives.
    fn of(keys: impl IntoIterator<Item = String>) -> View {
        let mut view = View::default();
        for key in keys {
            if let Some(name) = key.strip_prefix("member.") {
                view.members.push(name.to_string());
            } else if let Some(n) = key.strip_prefix("partition.") {
                if let Ok(n) = n.parse() {
                    view.held.insert(n);
                }
            }
        }
        view.members.sort();
        view.members.dedup();
        view
    }
}

/// A key this instance holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    /// The revision to update from.
    pub revision: u64,
    /// When the last successful write was sent: the lease runs from there.
    pub written: Instant,
}

/// How renewing a lease went.
pub(super) enum Renewal {
    Renewed(Lease),
    /// Someone else holds the key now, or it expired: the lease is gone.
    Lost,
    /// NATS did not answer; the lease stands until it runs out.
    Unknown(String),
}

/// Takes `key` if it is free. `None`: someone holds it.
pub(super) async fn acquire(
    store: &kv::Store,
    key: &str,
    value: &str,
) -> anyhow::Result<Option<Lease>> {
    let written = Instant::now();
    match store
        .create(key, Bytes::copy_from_slice(value.as_bytes()))
        .await
    {
        Ok(revision) => Ok(Some(Lease { revision, written })),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Renews a lease.
pub(super) async fn renew(store: &kv::Store, key: &str, value: &str, lease: Lease) -> Renewal {
    let written = Instant::now();
    match store
        .update(
            key,
            Bytes::copy_from_slice(value.as_bytes()),
            lease.revision,
        )
        .await
    {
        Ok(revision) => Renewal::Renewed(Lease { revision, written }),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            // An earlier renewal whose answer was lost (a stream leader
            // lost mid-write) may have landed: the key then still holds our
            // name, at a revision we did not see. Nobody else writes our
            // name, so it is still ours; the lease runs from the last write
            // we saw confirmed until the next renewal.
            match store.entry(key).await {
                Ok(Some(entry))
                    if entry.operation == kv::Operation::Put
                        && entry.value.as_ref() == value.as_bytes() =>
                {
                    Renewal::Renewed(Lease {
                        revision: entry.revision,
                        written: lease.written,
                    })
                }
                Ok(_) => Renewal::Lost,
                Err(e) => Renewal::Unknown(e.to_string()),
            }
        }
        Err(e) => Renewal::Unknown(e.to_string()),
    }
}

/// Gives a lease up, if it is still ours.
pub(super) async fn release(store: &kv::Store, key: &str, lease: Lease) {
    if let Err(e) = store
        .delete_expect_revision(key, Some(lease.revision))
        .await
    {
        log::debug!("releasing {key}: {e} (it expires by itself)");
    }
}

/// Whether a lease written at `written` still holds, with a margin for the
/// clocks of this host and the server's expiry.
pub(super) fn holds(lease: &Lease, ttl: Duration) -> bool {
    lease.written.elapsed() + ttl / 10 < ttl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i{i}")).collect()
    }

    #[test]
    fn shares_are_even_and_cover_every_partition() {
        for (instances, partitions) in [
            (1, 16),
            (2, 16),
            (3, 16),
            (5, 16),
            (16, 16),
            (20, 16),
            (3, 1),
        ] {
            let members = names(instances);
            let shares: Vec<u32> = members
                .iter()
                .map(|m| fair_share(partitions, &members, m))
                .collect();
            assert_eq!(shares.iter().sum::<u32>(), partitions, "{shares:?}");
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "{shares:?}");
        }
        assert_eq!(
            names(3)
                .iter()
                .map(|m| fair_share(16, &names(3), m))
                .collect::<Vec<_>>(),
            [6, 5, 5]
        );
    }

    #[test]
    fn a_key_listed_twice_counts_once() {
        let listing = [
            "member.b",
            "partition.3",
            "member.a",
            "member.b",
            "partition.3",
        ];
        let view = View::of(listing.map(String::from));
        assert_eq!(view.members, ["a", "b"]);
        assert_eq!(view.held.into_iter().collect::<Vec<_>>(), [3]);
        assert_eq!(
            fair_share(
                16,
                &View::of(["member.a".into(), "member.a".into()]).members,
                "a"
            ),
            16
        );
    }

    #[test]
    fn an_instance_not_yet_listed_counts_itself_last() {
        assert_eq!(fair_share(16, &names(2), "z"), 5);
        assert_eq!(fair_share(16, &names(2), "a"), 6);
        assert_eq!(fair_share(16, &[], "z"), 16);
    }
}
