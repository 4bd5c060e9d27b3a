//! Counts for operators and tests.

use diesel::dsl::{count_star, max};
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{alerts, dead_letters, devices, processed_messages, readings};
use crate::db::types::Instant;
use crate::db::{dispatch, AnyConnection};

/// What the database holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// Rows in `processed_messages`.
    pub processed_messages: i64,
    /// Rows in `readings`.
    pub readings: i64,
    /// Alerts without `closed_at`.
    pub open_alerts: i64,
    /// Alerts in all.
    pub alerts: i64,
    /// Devices provisioned.
    pub devices: i64,
    /// Dead-letter rows by kind.
    pub dead_letters: Vec<(String, i64)>,
    /// The latest `last_seen_at` of any device, RFC 3339.
    pub last_message_at: Option<String>,
    /// The NATS feed's partitions as last claimed: (partition, owner,
    /// fencing token); empty without a feed.
    pub partitions: Vec<(String, String, i64)>,
}

impl Status {
    /// The counts as `normalizer status` prints them, one per line.
    pub fn to_text(&self) -> String {
        let kinds: Vec<String> = self
            .dead_letters
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        [
            format!("messages processed: {}", self.processed_messages),
            format!("readings: {}", self.readings),
            format!("alerts: {} ({} open)", self.alerts, self.open_alerts),
            format!("devices: {}", self.devices),
            format!(
                "dead letters: {}",
                if kinds.is_empty() {
                    "none".into()
                } else {
                    kinds.join(", ")
                }
            ),
            format!(
                "last message at: {}",
                self.last_message_at.as_deref().unwrap_or("never")
            ),
        ]
        .into_iter()
        .chain(self.partitions_text())
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// `nats partitions: host-a-1 0,3,5; host-b-2 1,2,4` (owners as last
    /// claimed, in partition order).
    fn partitions_text(&self) -> Option<String> {
        if self.partitions.is_empty() {
            return None;
        }
        let mut owners: Vec<(&str, Vec<&str>)> = Vec::new();
        let mut sorted: Vec<&(String, String, i64)> = self.partitions.iter().collect();
        sorted.sort_by_key(|(p, _, _)| {
            let (stream, n) = p.rsplit_once('/').unwrap_or((p, "0"));
            (stream.to_string(), n.parse::<u32>().unwrap_or(0))
        });
        for (partition, owner, _) in sorted {
            let n = partition.rsplit('/').next().unwrap_or(partition);
            match owners.iter_mut().find(|(o, _)| o == owner) {
                Some((_, list)) => list.push(n),
                None => owners.push((owner, vec![n])),
            }
        }
        let owners: Vec<String> = owners
            .iter()
            .map(|(o, list)| format!("{o} {}", list.join(",")))
            .collect();
        Some(format!(
            "nats partitions (as last claimed): {}",
            owners.join("; ")
        ))
    }
}

/// Reads the counts.
pub fn read(conn: &mut AnyConnection) -> QueryResult<Status> {
    dispatch!(conn, c => {
        let last: Option<Instant> = devices::table.select(max(devices::last_seen_at)).first(c)?;
        Ok(Status {
            processed_messages: processed_messages::table.select(count_star()).first(c)?,
            readings: readings::table.select(count_star()).first(c)?,
            open_alerts: alerts::table.filter(alerts::closed_at.is_null()).select(count_star()).first(c)?,
            alerts: alerts::table.select(count_star()).first(c)?,
            devices: devices::table.select(count_star()).first(c)?,
            dead_letters: dead_letters::table
                .group_by(dead_letters::kind)
                .select((dead_letters::kind, count_star()))
                .order(dead_letters::kind)
                .load(c)?,
            last_message_at: last.map(|i| i.0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            partitions: Vec::new(),
        })
    })
    .and_then(|status: Status| {
        let partitions = super::fences::all(conn)?
            .into_iter()
            .map(|(p, token, owner)| (p, owner, token))
            .collect();
        Ok(Status { partitions, ..status })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_listed_by_owner_in_partition_order() {
        let status = Status {
            partitions: vec![
                ("normalizer/10".into(), "b".into(), 40),
                ("normalizer/2".into(), "a".into(), 12),
                ("normalizer/1".into(), "b".into(), 11),
            ],
            ..Status::default()
        };
        assert!(status
            .to_text()
            .ends_with("nats partitions (as last claimed): b 1,10; a 2"));
        assert!(!Status::default().to_text().contains("nats"));
    }
}
