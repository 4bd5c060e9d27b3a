//! The run's tally, printed at the end of `ingest`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::core::DeadLetterKind;
use crate::metrics::DbCounters;
use crate::outcome::Outcome;

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines that ended as processed, duplicate or dead letter.
    pub completed: u64,
    /// Messages applied.
    pub processed: u64,
    /// Messages whose id was already processed.
    pub duplicates: u64,
    /// Lines filed as dead letters.
    pub dead_letters: u64,
    /// Dead letters by kind, every kind listed.
    pub dead_letters_by_kind: BTreeMap<&'static str, u64>,
    /// Readings stored.
    pub readings_stored: u64,
    /// Readings skipped because their sensor had one at that instant.
    pub duplicate_readings: u64,
    /// Payload fields that no sensor takes.
    pub unmapped_fields: u64,
    /// Alerts opened.
    pub alerts_opened: u64,
    /// Alerts closed.
    pub alerts_closed: u64,
    /// The database layer's counters.
    pub database: DbCounters,
    /// Share of transactions that needed a retry and then committed.
    pub recovery_rate: Option<f64>,
    /// Wall time of the run.
    pub elapsed_seconds: f64,
    /// Completed lines per second.
    pub messages_per_second: f64,
}

impl Summary {
    /// An empty tally with every dead-letter kind listed.
    pub fn new() -> Self {
        Summary {
            dead_letters_by_kind: DeadLetterKind::ALL
                .iter()
                .map(|k| (k.as_str(), 0))
                .collect(),
            ..Summary::default()
        }
    }

    /// Counts one line's outcome.
    pub fn record(&mut self, outcome: &Outcome) {
        self.completed += 1;
        match outcome {
            Outcome::Processed(a) => {
                self.processed += 1;
                self.readings_stored += u64::from(a.readings);
                self.duplicate_readings += u64::from(a.duplicate_readings);
                self.unmapped_fields += u64::from(a.unmapped);
                self.alerts_opened += u64::from(a.alerts_opened);
                self.alerts_closed += u64::from(a.alerts_closed);
            }
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::DeadLetter(kind) => {
                self.dead_letters += 1;
                *self.dead_letters_by_kind.entry(kind.as_str()).or_default() += 1;
            }
        }
    }

    /// Adds the database counters and the timing.
    pub fn finish(&mut self, database: DbCounters, elapsed: Duration) {
        self.recovery_rate = (database.needed_retry > 0)
            .then(|| database.recoveries as f64 / database.needed_retry as f64);
        self.database = database;
        self.elapsed_seconds = elapsed.as_secs_f64();
        self.messages_per_second = if self.elapsed_seconds > 0.0 {
            self.completed as f64 / self.elapsed_seconds
        } else {
            0.0
        };
    }

    /// The summary for a person.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let db = &self.database;
        let _ = writeln!(
            s,
            "lines {}: processed {}, duplicate {}, dead letter {}",
            self.lines, self.processed, self.duplicates, self.dead_letters
        );
        let kinds: Vec<String> = self
            .dead_letters_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(s, "dead letters by kind: {}", kinds.join(", "));
        let _ = writeln!(
            s,
            "readings stored {} (duplicate {}, unmapped fields {}), alerts opened {}, closed {}",
            self.readings_stored,
            self.duplicate_readings,
            self.unmapped_fields,
            self.alerts_opened,
            self.alerts_closed
        );
        let retries: Vec<String> = db.retries.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "retries {}: {}", db.total_retries(), retries.join(", "));
        let rate = self
            .recovery_rate
            .map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
        let _ = writeln!(
            s,
            "transactions {}, recovered {} of {} that needed a retry ({rate}), connections opened {}, discarded {}, outage {:.1} s",
            db.transactions, db.recoveries, db.needed_retry, db.connections_opened, db.connections_discarded, db.outage_seconds
        );
        let _ = write!(
            s,
            "elapsed {:.2} s, {:.0} messages/s",
            self.elapsed_seconds, self.messages_per_second
        );
        s
    }
}
