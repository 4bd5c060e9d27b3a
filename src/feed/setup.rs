//! Creating (or checking) what the feed needs on the cluster: the stream
//! with one subject per partition, and the ownership bucket. Idempotent: a
//! second instance finds both and checks that they fit.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::NatsOptions;

/// Messages are kept this long (the stream's `max_age`): long enough for
/// any outage, bounded so a disk does not fill.
pub(super) const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The stream's subject of partition `n`.
pub(super) fn partition_subject(stream: &str, n: u32) -> String {
    format!("{stream}.p.{n}.>")
}

/// A setting of the cluster that does not fit this instance: fatal at
/// start, nothing consumed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Mismatch(pub(super) String);

/// The stream, created with `options.partitions` subjects if it does not
/// exist. Returns it and the partition count it has.
pub(super) async fn stream(
    js: &jetstream::Context,
    options: &NatsOptions,
) -> Result<stream::Stream, anyhow::Error> {
    let wanted: Vec<String> = (0..options.partitions)
        .map(|n| partition_subject(&options.stream, n))
        .collect();
    let config = stream::Config {
        name: options.stream.clone(),
        description: Some(format!(
            "normalizer feed: {} partitions by device",
            options.partitions
        )),
        subjects: wanted.clone(),
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        max_age: RETENTION,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create or open the stream {}: {e}", options.stream))?;
    let info = stream.info().await?.clone();
    let have = &info.config.subjects;
    if have != &wanted {
        let partitions = have
            .iter()
            .filter(|s| s.starts_with(&format!("{}.p.", options.stream)))
            .count();
        return Err(Mismatch(format!(
            "the stream {} has the subjects [{}] ({partitions} partitions), not the {} partitions this instance is set for; start it with --nats-partitions {partitions}, or use another --nats-stream",
            options.stream,
            have.join(", "),
            options.partitions,
        ))
        .into());
    }
    if info.config.num_replicas != options.replicas {
        log::info!(
            "the stream {} has {} replicas (--nats-replicas {} applies only when creating it)",
            options.stream,
            info.config.num_replicas,
            options.replicas
        );
    }
    Ok(stream)
}

/// The ownership bucket. `create_key_value` cannot be used against
/// nats-server 2.9 (it asks for the account's info, whose answer it cannot
/// parse), so the bucket's stream is made as the key-value layout wants it,
/// then opened as a bucket.
pub(super) async fn bucket(
    js: &jetstream::Context,
    options: &NatsOptions,
) -> Result<jetstream::kv::Store, anyhow::Error> {
    let bucket = options.bucket();
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        max_age: options.lease,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create or open the bucket {bucket}: {e}"))?;
    let ttl = stream.info().await?.config.max_age;
    if ttl != options.lease {
        return Err(Mismatch(format!(
            "the ownership bucket {bucket} has a lease of {:?}, this instance {:?}; start every instance with the same --nats-lease",
            ttl, options.lease
        ))
        .into());
    }
    js.get_key_value(bucket.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the bucket {bucket}: {e}"))
}
