//! Counters shared by the database layer and the pipeline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Why a transaction had to be retried; the labels of the retry counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// 40001: serialization failure.
    Serialization,
    /// 40P01: deadlock detected.
    Deadlock,
    /// 55P03: lock not available, or `lock_timeout`.
    LockTimeout,
    /// 57014: `statement_timeout` or a cancel.
    StatementTimeout,
    /// Class 08, a closed socket, a refused connection, a failed rollback.
    ConnectionLost,
    /// 57P01..57P03: the server is shutting down, restarting or starting up.
    AdminShutdown,
    /// 53300: too many connections.
    TooManyConnections,
    /// SQLite BUSY or LOCKED.
    Busy,
    /// A call had no answer within the client-side deadline; its
    /// connection was abandoned.
    NoAnswer,
    /// 53100, `SQLITE_FULL`: the database's disk is full.
    DiskFull,
    /// 53200: the server is out of memory.
    OutOfMemory,
    /// Anything else that was retried.
    Other,
}

impl Cause {
    /// Every cause, in the order summaries list them.
    pub const ALL: [Cause; 12] = [
        Cause::Serialization,
        Cause::Deadlock,
        Cause::LockTimeout,
        Cause::StatementTimeout,
        Cause::ConnectionLost,
        Cause::AdminShutdown,
        Cause::TooManyConnections,
        Cause::Busy,
        Cause::NoAnswer,
        Cause::DiskFull,
        Cause::OutOfMemory,
        Cause::Other,
    ];

    /// The cause's label in summaries and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Serialization => "serialization",
            Cause::Deadlock => "deadlock",
            Cause::LockTimeout => "lock_timeout",
            Cause::StatementTimeout => "statement_timeout",
            Cause::ConnectionLost => "connection_lost",
            Cause::AdminShutdown => "admin_shutdown",
            Cause::TooManyConnections => "too_many_connections",
            Cause::Busy => "busy",
            Cause::NoAnswer => "no_answer",
            Cause::DiskFull => "disk_full",
            Cause::OutOfMemory => "out_of_memory",
            Cause::Other => "other",
        }
    }

    fn index(self) -> usize {
        Cause::ALL.iter().position(|c| *c == self).expect("listed")
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live counters of the database layer. Cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct DbMetrics {
    transactions: AtomicU64,
    retries: [AtomicU64; Cause::ALL.len()],
    needed_retry: AtomicU64,
    recoveries: AtomicU64,
    connections_opened: AtomicU64,
    connections_discarded: AtomicU64,
    outage_ms: AtomicU64,
}

impl DbMetrics {
    pub(crate) fn transaction_committed(&self, retries: u32) {
        self.transactions.fetch_add(1, Relaxed);
        if retries > 0 {
            self.recoveries.fetch_add(1, Relaxed);
        }
    }
    pub(crate) fn retried(&self, cause: Cause, first_retry: bool) {
        self.retries[cause.index()].fetch_add(1, Relaxed);
        if first_retry {
            self.needed_retry.fetch_add(1, Relaxed);
        }
    }
    pub(crate) fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Relaxed);
    }
    pub(crate) fn connection_discarded(&self) {
        self.connections_discarded.fetch_add(1, Relaxed);
    }
    pub(crate) fn outage_ended(&self, ms: u64) {
        self.outage_ms.fetch_add(ms, Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> DbCounters {
        DbCounters {
            transactions: self.transactions.load(Relaxed),
            retries: Cause::ALL
                .iter()
                .map(|c| (c.as_str(), self.retries[c.index()].load(Relaxed)))
                .collect(),
            needed_retry: self.needed_retry.load(Relaxed),
            recoveries: self.recoveries.load(Relaxed),
            connections_opened: self.connections_opened.load(Relaxed),
            connections_discarded: self.connections_discarded.load(Relaxed),
            outage_seconds: self.outage_ms.load(Relaxed) as f64 / 1000.0,
        }
    }
}

/// A copy of [`DbMetrics`], for summaries.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DbCounters {
    /// Transactions committed.
    pub transactions: u64,
    /// Retries by cause, every cause listed.
    pub retries: BTreeMap<&'static str, u64>,
    /// Transactions that failed at least once.
    pub needed_retry: u64,
    /// Transactions that committed after at least one retry.
    pub recoveries: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// Connections discarded as broken.
    pub connections_discarded: u64,
    /// Seconds the database was unreachable, summed over outages.
    pub outage_seconds: f64,
}

impl DbCounters {
    /// Retries of all causes.
    pub fn total_retries(&self) -> u64 {
        self.retries.values().sum()
    }

    /// The retries of one cause.
    pub fn retries_of(&self, cause: Cause) -> u64 {
        self.retries.get(cause.as_str()).copied().unwrap_or(0)
    }
}
