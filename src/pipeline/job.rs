//! A line on its way to a worker: what it is to do (`Work`), where it came
//! from (`Origin`), and its share of the queue's byte budget (`Cost`, given
//! back when the job is dropped). Shared by the worker pool, which queues
//! jobs, and the apply engine, which consumes them.

use std::sync::Arc;

use crossbeam_channel::Sender;

use super::Done;
use crate::core::{Message, Rejection};
use crate::db::repo::fences::Fence;

pub(super) enum Work {
    Apply { message: Message, raw: Vec<u8> },
    Reject { rejection: Rejection, raw: Vec<u8> },
}

/// One line on its way to a worker.
pub struct Job {
    pub(super) ticket: u64,
    pub(super) work: Work,
    pub(super) reply: Sender<Done>,
    pub(super) cost: Cost,
    pub(super) origin: Option<Origin>,
}

/// Where a line of a source that delivers again came from (a NATS
/// partition, an MQTT session): what makes its writes exactly-once across
/// redeliveries, and who may commit them.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The write token of this line: the same on every delivery of it (its
    /// stream and sequence; its MQTT session, packet id and content), so a
    /// redelivered line whose first delivery committed finds its own token
    /// and changes nothing.
    pub token: String,
    /// The partition's fence, checked in every transaction of the line
    /// (none: a source without ownership, such as MQTT).
    pub fence: Option<Fence>,
}

/// A job's share of the queue budget, given back when the job is dropped.
pub(super) struct Cost {
    bytes: usize,
    budget: Arc<Budget>,
}

impl Cost {
    /// `work`'s share of `budget`, once it fits (the caller waits until then).
    pub(super) fn taken(budget: &Arc<Budget>, work: &Work) -> Cost {
        let bytes = work.cost();
        budget.acquire(bytes);
        Cost {
            bytes,
            budget: budget.clone(),
        }
    }
}

impl Cost {
    /// Gives the shares of `costs` back together: one lock and one wake-up
    /// for each budget instead of one for each job (the one SQLite writer
    /// ends tens of thousands of jobs a commit). Each cost is then empty.
    pub(super) fn release_together<'a>(costs: impl IntoIterator<Item = &'a mut Cost>) {
        let mut shares: Vec<(&Arc<Budget>, usize)> = Vec::new();
        for cost in costs {
            let bytes = std::mem::take(&mut cost.bytes);
            match shares
                .iter_mut()
                .find(|(b, _)| Arc::ptr_eq(b, &cost.budget))
            {
                Some((_, sum)) => *sum += bytes,
                None => shares.push((&cost.budget, bytes)),
            }
        }
        for (budget, bytes) in shares {
            budget.release(bytes);
        }
    }
}

impl Drop for Cost {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

impl Work {
    /// Roughly the bytes a queued job holds: its line twice (raw, parsed).
    fn cost(&self) -> usize {
        match self {
            Work::Apply { raw, .. } | Work::Reject { raw, .. } => 256 + 2 * raw.len(),
        }
    }
}

/// A bound on the bytes queued for the workers, so that memory stays flat
/// whatever the lines hold: the reader waits while the budget is spent.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits until `cost` fits (a job larger than the whole budget goes
    /// through alone).
    fn acquire(&self, cost: usize) {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + cost > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += cost;
    }

    fn release(&self, cost: usize) {
        let mut used = self.used.lock().expect("budget lock");
        *used = used.saturating_sub(cost);
        self.freed.notify_all();
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        *self.used.lock().expect("budget lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_budget_blocks_until_jobs_are_done_and_lets_a_huge_job_through_alone() {
        let budget = Arc::new(Budget::new(100));
        budget.acquire(500); // larger than the whole budget: goes through alone
        assert_eq!(budget.used(), 500);
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        std::thread::scope(|s| {
            s.spawn(|| {
                budget.acquire(30);
                tx.send(()).unwrap();
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(100))
                    .is_err(),
                "blocked while spent"
            );
            budget.release(500);
            rx.recv_timeout(std::time::Duration::from_secs(5))
                .expect("released");
        });
        assert_eq!(budget.used(), 30);
    }

    #[test]
    fn costs_released_together_give_each_budget_its_share_once() {
        let (a, b) = (Arc::new(Budget::new(1000)), Arc::new(Budget::new(1000)));
        let cost = |budget: &Arc<Budget>, bytes| {
            budget.acquire(bytes);
            Cost {
                bytes,
                budget: budget.clone(),
            }
        };
        let mut done = vec![cost(&a, 10), cost(&b, 5), cost(&a, 20)];
        let still_queued = cost(&a, 7);
        assert_eq!((a.used(), b.used()), (37, 5));
        Cost::release_together(done.iter_mut());
        assert_eq!((a.used(), b.used()), (7, 0));
        drop(done);
        assert_eq!(
            (a.used(), b.used()),
            (7, 0),
            "released once, not again when dropped"
        );
        drop(still_queued);
        assert_eq!(a.used(), 0);
    }
}
