//! The in-order acknowledgement window of a source that may only confirm a
//! prefix of what it handed out: JetStream's cumulative ack (one `+ACK` on
//! the last message of a settled prefix confirms every message before it),
//! MQTT's PUBACKs (sent in the order of the PUBLISHes, MQTT 3.1.1 section
//! 4.6). Each line is settled when its outcome is committed (or it ended
//! without one: fenced, cancelled); the window releases the longest prefix
//! whose every line committed, so the acknowledgement point never passes a
//! line whose outcome is not in the database.
//!
//! The socket's protocol acknowledges each line by its number, in any
//! order; the service still keeps each connection's window, to tell a
//! producer that was cut off the line through which everything is
//! committed (`service::connection`).

use std::collections::BTreeMap;

/// Lines handed out and not yet released, by their position in the
/// source (a stream sequence, an arrival number), each with what the
/// source needs to acknowledge it (`T`: a reply subject, a packet id).
#[derive(Debug)]
pub struct AckWindow<T> {
    slots: BTreeMap<u64, Slot<T>>,
}

#[derive(Debug)]
struct Slot<T> {
    /// Deliveries of it not yet settled (a redelivery may overlap the
    /// first delivery).
    open: u32,
    /// Its last settled delivery committed.
    committed: bool,
    /// The last delivery's token.
    token: T,
}

impl<T> Default for AckWindow<T> {
    fn default() -> Self {
        AckWindow {
            slots: BTreeMap::new(),
        }
    }
}

impl<T> AckWindow<T> {
    /// Line `position` was handed out (again, if it is already there: the
    /// newest token is the one to acknowledge with).
    pub fn delivered(&mut self, position: u64, token: T) {
        match self.slots.get_mut(&position) {
            Some(slot) => {
                slot.open += 1;
                slot.token = token;
            }
            None => {
                self.slots.insert(
                    position,
                    Slot {
                        open: 1,
                        committed: false,
                        token,
                    },
                );
            }
        }
    }

    /// One delivery of line `position` ended: its outcome `committed`, or
    /// not (then it waits for a redelivery, and so does every line after
    /// it). Returns the lines released now, in order, with their tokens;
    /// empty when the settled prefix did not grow.
    pub fn settled(&mut self, position: u64, committed: bool) -> Vec<(u64, T)> {
        if let Some(slot) = self.slots.get_mut(&position) {
            slot.open = slot.open.saturating_sub(1);
            slot.committed = committed;
        }
        let mut released = Vec::new();
        while let Some(entry) = self.slots.first_entry() {
            let slot = entry.get();
            if slot.open > 0 || !slot.committed {
                break;
            }
            let (position, slot) = entry.remove_entry();
            released.push((position, slot.token));
        }
        released
    }

    /// Lines handed out and not released.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a case: a delivery, or a settlement and the positions
    /// it must release.
    enum Step {
        Deliver(u64, &'static str),
        Settle(u64, bool, &'static [(u64, &'static str)]),
    }
    use Step::{Deliver, Settle};

    fn check(name: &str, steps: &[Step], left: usize) {
        let mut w = AckWindow::default();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Deliver(p, token) => w.delivered(*p, *token),
                Settle(p, committed, want) => {
                    let got = w.settled(*p, *committed);
                    assert_eq!(got, want.to_vec(), "{name}, step {i}");
                }
            }
        }
        assert_eq!(w.len(), left, "{name}: left waiting");
    }

    #[test]
    fn only_a_committed_prefix_is_released_in_order() {
        check(
            "in order",
            &[
                Deliver(1, "a"),
                Deliver(2, "b"),
                Settle(1, true, &[(1, "a")]),
                Settle(2, true, &[(2, "b")]),
            ],
            0,
        );
        check(
            "out of order: later lines wait for the first",
            &[
                Deliver(1, "a"),
                Deliver(2, "b"),
                Deliver(3, "c"),
                Settle(3, true, &[]),
                Settle(2, true, &[]),
                Settle(1, true, &[(1, "a"), (2, "b"), (3, "c")]),
            ],
            0,
        );
        check(
            "a failed line holds everything after it until redelivered",
            &[
                Deliver(4, "d"),
                Deliver(5, "e"),
                Settle(4, false, &[]),
                Settle(5, true, &[]),
                Deliver(4, "d2"),
                Settle(4, true, &[(4, "d2"), (5, "e")]),
            ],
            0,
        );
        check(
            "an overlapping redelivery holds its line until both end",
            &[
                Deliver(7, "g"),
                Deliver(7, "g2"),
                Settle(7, true, &[]),
                Settle(7, true, &[(7, "g2")]),
            ],
            0,
        );
        check(
            "a settlement of a line not handed out releases nothing",
            &[Deliver(2, "b"), Settle(9, true, &[])],
            1,
        );
        check(
            "gaps in the positions are no holes (sequences of other subjects)",
            &[
                Deliver(10, "j"),
                Deliver(20, "t"),
                Settle(20, true, &[]),
                Settle(10, true, &[(10, "j"), (20, "t")]),
            ],
            0,
        );
    }
}
