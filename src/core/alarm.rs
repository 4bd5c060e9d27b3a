//! Alarm decisions (CONTRACT section 3, step 6).

use chrono::{DateTime, Utc};

/// How a reading is compared with an alarm's threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// `value > threshold`
    Gt,
    /// `value >= threshold`
    Gte,
    /// `value < threshold`
    Lt,
    /// `value <= threshold`
    Lte,
}

impl Condition {
    /// Every condition, as the provisioning file spells them.
    pub const NAMES: &'static str = "gt, gte, lt, lte";

    /// Parses `gt`, `gte`, `lt` or `lte`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gt" => Some(Condition::Gt),
            "gte" => Some(Condition::Gte),
            "lt" => Some(Condition::Lt),
            "lte" => Some(Condition::Lte),
            _ => None,
        }
    }

    /// The condition as stored in `alarms.condition`.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Gt => "gt",
            Condition::Gte => "gte",
            Condition::Lt => "lt",
            Condition::Lte => "lte",
        }
    }

    /// Whether the condition holds for a value.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Condition::Gt => value > threshold,
            Condition::Gte => value >= threshold,
            Condition::Lt => value < threshold,
            Condition::Lte => value <= threshold,
        }
    }
}

/// What a reading does to one alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Open an alert at this reading.
    Open,
    /// Close the open alert at this reading.
    Close,
    /// Nothing changes.
    Stay,
}

/// Whether a newly stored good reading at `ts` is the sensor's latest, i.e.
/// later than every earlier good reading (`latest_good`); only such a reading
/// evaluates alarms. A late reading changes no alarm.
pub fn evaluates_alarms(ts: DateTime<Utc>, latest_good: Option<DateTime<Utc>>) -> bool {
    latest_good.is_none_or(|latest| ts > latest)
}

/// Decides what a reading that evaluates alarms does to one active alarm.
pub fn transition(
    condition: Condition,
    threshold: f64,
    value: f64,
    has_open_alert: bool,
) -> Transition {
    match (condition.holds(value, threshold), has_open_alert) {
        (true, false) => Transition::Open,
        (false, true) => Transition::Close,
        _ => Transition::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn conditions_compare_as_named() {
        let table = [
            (Condition::Gt, 26.0, false, true),
            (Condition::Gte, 26.0, true, true),
            (Condition::Lt, 26.0, false, false),
            (Condition::Lte, 26.0, true, false),
        ];
        for (c, threshold, at_threshold, above) in table {
            assert_eq!(c.holds(26.0, threshold), at_threshold, "{c:?} at threshold");
            assert_eq!(c.holds(26.5, threshold), above, "{c:?} above");
            assert_eq!(Condition::parse(c.as_str()), Some(c));
        }
        assert_eq!(Condition::parse("GT"), None);
    }

    #[test]
    fn an_alert_opens_once_and_closes_once() {
        assert_eq!(
            transition(Condition::Gt, 26.0, 27.0, false),
            Transition::Open
        );
        assert_eq!(
            transition(Condition::Gt, 26.0, 28.0, true),
            Transition::Stay
        );
        assert_eq!(
            transition(Condition::Gt, 26.0, 25.0, true),
            Transition::Close
        );
        assert_eq!(
            transition(Condition::Gt, 26.0, 25.0, false),
            Transition::Stay
        );
    }

    #[test]
    fn only_a_reading_later_than_every_good_one_evaluates_alarms() {
        let latest = Some(at("2026-11-29T12:00:00Z"));
        assert!(evaluates_alarms(at("2026-11-29T12:00:00.000001Z"), latest));
        assert!(
            !evaluates_alarms(at("2026-11-29T12:00:00Z"), latest),
            "same instant is not later"
        );
        assert!(
            !evaluates_alarms(at("2026-11-29T11:00:00Z"), latest),
            "late reading"
        );
        assert!(
            evaluates_alarms(at("1970-01-01T00:00:00Z"), None),
            "first good reading"
        );
    }
}
