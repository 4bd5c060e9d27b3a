//! The periodic stats line and the Prometheus text file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};

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
        let state = match self.down_since {
            None => "up".to_string(),
            Some(t) => format!(
                "down since {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        };
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
        )
    }

    /// The counters in Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let s = self.summary;
        let db = &s.database;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP normalizer_{name} {help}");
            let _ = writeln!(out, "# TYPE normalizer_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "normalizer_{name}{labels} {value}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v as f64)];
        metric(
            "lines_total",
            "counter",
            "Lines that ended, by outcome.",
            vec![
                ("{outcome=\"processed\"}".into(), s.processed as f64),
                ("{outcome=\"duplicate\"}".into(), s.duplicates as f64),
                ("{outcome=\"dead_letter\"}".into(), s.dead_letters as f64),
            ],
        );
        metric(
            "dead_letters_total",
            "counter",
            "Dead letters by kind.",
            s.dead_letters_by_kind
                .iter()
                .map(|(k, n)| (format!("{{kind=\"{k}\"}}"), *n as f64))
                .collect(),
        );
        metric(
            "readings_stored_total",
            "counter",
            "Readings stored.",
            plain(s.readings_stored),
        );
        metric(
            "alerts_opened_total",
            "counter",
            "Alerts opened.",
            plain(s.alerts_opened),
        );
        metric(
            "alerts_closed_total",
            "counter",
            "Alerts closed.",
            plain(s.alerts_closed),
        );
        metric(
            "transactions_total",
            "counter",
            "Transactions committed.",
            plain(db.transactions),
        );
        metric(
            "retries_total",
            "counter",
            "Transaction retries by error class.",
            db.retries
                .iter()
                .map(|(k, n)| (format!("{{class=\"{k}\"}}"), *n as f64))
                .collect(),
        );
        metric(
            "recoveries_total",
            "counter",
            "Transactions that committed after a retry.",
            plain(db.recoveries),
        );
        metric(
            "connections_opened_total",
            "counter",
            "Database connections opened.",
            plain(db.connections_opened),
        );
        metric(
            "connections_discarded_total",
            "counter",
            "Database connections discarded as broken.",
            plain(db.connections_discarded),
        );
        metric(
            "outage_seconds_total",
            "counter",
            "Seconds the database was unreachable.",
            vec![(String::new(), db.outage_seconds)],
        );
        metric(
            "pool_connections",
            "gauge",
            "Pool connections by state.",
            vec![
                ("{state=\"in_use\"}".into(), f64::from(self.in_use)),
                ("{state=\"idle\"}".into(), f64::from(self.idle)),
            ],
        );
        metric(
            "queued_jobs",
            "gauge",
            "Jobs waiting for a worker.",
            vec![(String::new(), self.queued as f64)],
        );
        metric(
            "producers",
            "gauge",
            "Producers connected.",
            vec![(String::new(), self.producers as f64)],
        );
        metric(
            "database_up",
            "gauge",
            "1 while the database is reachable.",
            vec![(
                String::new(),
                if self.down_since.is_none() { 1.0 } else { 0.0 },
            )],
        );
        out
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
        let report = Report {
            summary: &summary,
            rate: 0.0,
            in_use: 1,
            idle: 2,
            queued: 0,
            producers: 3,
            down_since: None,
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
    }
}
