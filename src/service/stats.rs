//! The periodic stats line and the Prometheus text file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use crate::feed::FeedStatus;
use crate::mqtt::MqttStatus;
use crate::pipeline::Summary;

/// What one stats report shows.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// Outcomes and database counters since the start.
    pub summary: &'a Summary,
    /// Lines completed per second over the last interval.
    pub rate: f64,
    /// Pool connections in use.
    pub in_use: u32,
    /// Pool connections idle.
    pub idle: u32,
    /// Jobs queued for the workers.
    pub queued: usize,
    /// Producers connected.
    pub producers: usize,
    /// Since when the database has been unreachable, if it is.
    pub down_since: Option<DateTime<Utc>>,
    /// The NATS feed, when the service consumes one.
    pub feed: Option<&'a FeedStatus>,
    /// The MQTT source, when the service reads a broker.
    pub mqtt: Option<&'a MqttStatus>,
}

impl Report<'_> {
    /// The stats line for the log.
    pub fn line(&self) -> String {
        let s = self.summary;
        let db = &s.database;
        let retries: Vec<String> = db.retries.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let kinds: Vec<String> = s
            .dead_letters_by_kind
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        let state = up_or_down_since(self.down_since);
        format!(
            "stats: {:.1} msg/s; processed={} duplicate={} dead_letter={} [{}]; retries [{}]; pool in_use={} idle={}; queued={}; producers={}; database {state}",
            self.rate,
            s.processed,
            s.duplicates,
            s.dead_letters,
            kinds.join(" "),
            retries.join(" "),
            self.in_use,
            self.idle,
            self.queued,
            self.producers,
        ) + &self.feed.map_or(String::new(), |f| format!("; {}", feed_line(f)))
            + &self.mqtt.map_or(String::new(), |m| format!("; {}", mqtt_line(m)))
    }

    /// The counters in Prometheus text exposition format: one family a
    /// row of `families`, written by one loop.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for family in self.families() {
            let name = family.name;
            let _ = writeln!(out, "# HELP normalizer_{name} {}", family.help);
            let _ = writeln!(out, "# TYPE normalizer_{name} {}", family.kind.as_str());
            for (labels, value) in family.samples {
                let _ = writeln!(out, "normalizer_{name}{labels} {value}");
            }
        }
        out
    }

    /// Every metric family: the outcomes, the database's counters, the
    /// service's gauges.
    fn families(&self) -> Vec<Family> {
        let mut all = self.outcome_families();
        all.extend(self.database_families());
        all.extend(self.service_families());
        if let Some(feed) = self.feed {
            all.extend(feed_families(feed));
        }
        if let Some(mqtt) = self.mqtt {
            all.extend(mqtt_families(mqtt));
        }
        all
    }

    fn outcome_families(&self) -> Vec<Family> {
        let s = self.summary;
        let outcomes = [
            ("processed", s.processed),
            ("duplicate", s.duplicates),
            ("dead_letter", s.dead_letters),
        ];
        vec![
            Family::counter("lines_total", "Lines that ended, by outcome.")
                .by("outcome", outcomes.iter().map(|(k, n)| (*k, *n))),
            Family::counter("dead_letters_total", "Dead letters by kind.").by(
                "kind",
                s.dead_letters_by_kind.iter().map(|(k, n)| (&**k, *n)),
            ),
            Family::counter("readings_stored_total", "Readings stored.").of(s.readings_stored),
            Family::counter("alerts_opened_total", "Alerts opened.").of(s.alerts_opened),
            Family::counter("alerts_closed_total", "Alerts closed.").of(s.alerts_closed),
        ]
    }

    fn database_families(&self) -> Vec<Family> {
        let db = &self.summary.database;
        vec![
            Family::counter("transactions_total", "Transactions committed.").of(db.transactions),
            Family::counter("retries_total", "Transaction retries by error class.")
                .by("class", db.retries.iter().map(|(k, n)| (&**k, *n))),
            Family::counter(
                "recoveries_total",
                "Transactions that committed after a retry.",
            )
            .of(db.recoveries),
            Family::counter("connections_opened_total", "Database connections opened.")
                .of(db.connections_opened),
            Family::counter(
                "connections_discarded_total",
                "Database connections discarded as broken.",
            )
            .of(db.connections_discarded),
            Family::counter(
                "outage_seconds_total",
                "Seconds the database was unreachable.",
            )
            .value(db.outage_seconds),
        ]
    }

    fn service_families(&self) -> Vec<Family> {
        let pool = [("in_use", self.in_use), ("idle", self.idle)];
        let up = if self.down_since.is_none() { 1 } else { 0 };
        vec![
            Family::gauge("pool_connections", "Pool connections by state.")
                .by("state", pool.iter().map(|(k, n)| (*k, u64::from(*n)))),
            Family::gauge("queued_jobs", "Jobs waiting for a worker.").of(self.queued as u64),
            Family::gauge("producers", "Producers connected.").of(self.producers as u64),
            Family::gauge("database_up", "1 while the database is reachable.").of(up),
        ]
    }
}

/// The feed's part of the stats line: `nats partitions [0,3,7] of 3
/// instances; pending=12; redelivered=0; nats up`.
fn feed_line(feed: &FeedStatus) -> String {
    let partitions = feed.partitions.lock().expect("status lock");
    let owned: Vec<String> = partitions.keys().map(u32::to_string).collect();
    let pending: u64 = partitions.values().map(|p| p.pending).sum();
    let state = if feed.refused.load(Ordering::Relaxed) {
        "refused (Authorization Violation)".to_string()
    } else {
        up_or_down_since(*feed.down_since.lock().expect("status lock"))
    };
    format!(
        "nats partitions [{}] of {} instances; pending={pending}; redelivered={}; nats {state}",
        owned.join(","),
        feed.instances.load(Ordering::Relaxed),
        feed.redeliveries.load(Ordering::Relaxed),
    )
}

/// The MQTT source's part of the stats line: `mqtt received=N
/// acknowledged=N in_flight=N redelivered=N; broker up`.
fn mqtt_line(mqtt: &MqttStatus) -> String {
    let state = if mqtt.refused.load(Ordering::Relaxed) {
        "refused".to_string()
    } else {
        up_or_down_since(*mqtt.down_since.lock().expect("status lock"))
    };
    format!(
        "mqtt received={} acknowledged={} in_flight={} redelivered={}; broker {state}",
        mqtt.received.load(Ordering::Relaxed),
        mqtt.acknowledged.load(Ordering::Relaxed),
        mqtt.in_flight.load(Ordering::Relaxed),
        mqtt.redelivered.load(Ordering::Relaxed),
    )
}

/// The MQTT source's metrics.
fn mqtt_families(mqtt: &MqttStatus) -> Vec<Family> {
    let up = u64::from(mqtt.down_since.lock().expect("status lock").is_none());
    vec![
        Family::counter(
            "mqtt_received_total",
            "PUBLISH packets received from the broker, redeliveries included.",
        )
        .of(mqtt.received.load(Ordering::Relaxed)),
        Family::counter(
            "mqtt_redelivered_total",
            "PUBLISH packets the broker sent again (DUP set).",
        )
        .of(mqtt.redelivered.load(Ordering::Relaxed)),
        Family::counter(
            "mqtt_acknowledged_total",
            "PUBACKs sent, each after its message's outcome committed.",
        )
        .of(mqtt.acknowledged.load(Ordering::Relaxed)),
        Family::gauge(
            "mqtt_in_flight_messages",
            "Messages received and handed to the workers whose outcome is not back.",
        )
        .of(mqtt.in_flight.load(Ordering::Relaxed)),
        Family::gauge("mqtt_up", "1 while the MQTT broker is connected.").of(up),
    ]
}

/// `up`, or `down since <RFC 3339>`: how the stats line says a peer is.
pub(crate) fn up_or_down_since(down_since: Option<DateTime<Utc>>) -> String {
    match down_since {
        None => "up".to_string(),
        Some(t) => format!(
            "down since {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    }
}

/// The NATS feed's metrics: which partitions this instance owns, and each
/// one's backlog.
fn feed_families(feed: &FeedStatus) -> Vec<Family> {
    let partitions = feed.partitions.lock().expect("status lock").clone();
    let labels: Vec<(String, &crate::feed::PartitionStatus)> =
        partitions.iter().map(|(n, p)| (n.to_string(), p)).collect();
    let up = u64::from(feed.down_since.lock().expect("status lock").is_none());
    vec![
        Family::gauge(
            "nats_partition_token",
            "Partitions this instance owns, with the fencing token it holds each by.",
        )
        .by(
            "partition",
            labels.iter().map(|(n, p)| (n.as_str(), p.token as u64)),
        ),
        Family::gauge(
            "nats_pending_messages",
            "Messages of each owned partition not yet delivered to this instance.",
        )
        .by(
            "partition",
            labels.iter().map(|(n, p)| (n.as_str(), p.pending)),
        ),
        Family::gauge(
            "nats_in_flight_messages",
            "Messages of each owned partition delivered and not yet acknowledged.",
        )
        .by(
            "partition",
            labels.iter().map(|(n, p)| (n.as_str(), p.in_flight)),
        ),
        Family::counter(
            "nats_redeliveries_total",
            "Messages the server delivered more than once.",
        )
        .of(feed.redeliveries.load(std::sync::atomic::Ordering::Relaxed)),
        Family::counter(
            "nats_acknowledged_total",
            "Messages acknowledged after their outcome committed.",
        )
        .of(feed.acknowledged.load(std::sync::atomic::Ordering::Relaxed)),
        Family::counter(
            "nats_fenced_total",
            "Messages that ended at a fence: their partition was taken over, their new owner applies them.",
        )
        .of(feed.fenced.load(std::sync::atomic::Ordering::Relaxed)),
        Family::gauge(
            "nats_instances",
            "Instances sharing the feed, as last seen.",
        )
        .of(feed.instances.load(std::sync::atomic::Ordering::Relaxed)),
        Family::gauge("nats_up", "1 while NATS is reachable.").of(up),
    ]
}

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One metric family and its samples (label set, value).
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn counter(name: &'static str, help: &'static str) -> Self {
        Family {
            name,
            kind: Kind::Counter,
            help,
            samples: vec![],
        }
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Family {
            kind: Kind::Gauge,
            ..Family::counter(name, help)
        }
    }

    /// One sample without labels.
    fn value(mut self, value: f64) -> Self {
        self.samples.push((String::new(), value));
        self
    }

    fn of(self, value: u64) -> Self {
        self.value(value as f64)
    }

    /// One sample per label value.
    fn by<'a>(mut self, label: &str, values: impl Iterator<Item = (&'a str, u64)>) -> Self {
        for (key, value) in values {
            self.samples
                .push((format!("{{{label}=\"{key}\"}}"), value as f64));
        }
        self
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same
/// folder, then a rename, so a reader never sees half a file.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_samples_for_every_metric() {
        let summary = Summary::new();
        let mqtt = MqttStatus::default();
        let report = Report {
            summary: &summary,
            rate: 0.0,
            in_use: 1,
            idle: 2,
            queued: 0,
            producers: 3,
            down_since: None,
            feed: None,
            mqtt: Some(&mqtt),
        };
        let text = report.prometheus();
        let mut declared = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared = Some(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(Some(name.to_string()), declared, "{line}");
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<f64>().unwrap();
            }
        }
        assert!(text.contains("normalizer_producers 3"));
        assert!(text.contains("normalizer_dead_letters_total{kind=\"malformed\"} 0"));
        assert!(report.line().contains("database up"));
        assert!(text.contains("normalizer_mqtt_up 1"));
        assert!(report.line().ends_with("; broker up"), "{}", report.line());
    }
}
