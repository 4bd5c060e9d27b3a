//! `UtcTime`: one SQL type for instants on both backends.
//!
//! PostgreSQL stores `timestamptz`. SQLite has no time type; it stores TEXT
//! of the fixed-width form `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so that comparing
//! the text compares the instants (and `max()` and `ORDER BY` work).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{SqlType, Text, Timestamptz};
use diesel::sqlite::{Sqlite, SqliteValue};

/// An instant in UTC: `timestamptz` on PostgreSQL, fixed-width TEXT on SQLite.
#[derive(Debug, Clone, Copy, Default, SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(oid = 1184, array_oid = 1185))]
#[diesel(sqlite_type(name = "Text"))]
pub struct UtcTime;

impl diesel::sql_types::SqlOrd for UtcTime {}

/// A UTC instant as the database layer reads and writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow)]
#[diesel(sql_type = UtcTime)]
pub struct Instant(pub DateTime<Utc>);

/// The SQLite text form of an instant.
pub(super) const SQLITE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

impl ToSql<UtcTime, Pg> for Instant {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <DateTime<Utc> as ToSql<Timestamptz, Pg>>::to_sql(&self.0, &mut out.reborrow())
    }
}

impl FromSql<UtcTime, Pg> for Instant {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        <DateTime<Utc> as FromSql<Timestamptz, Pg>>::from_sql(bytes).map(Instant)
    }
}

impl ToSql<UtcTime, Sqlite> for Instant {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.sqlite_text());
        Ok(IsNull::No)
    }
}

impl Instant {
    /// The text SQLite stores for this instant, whichever path binds it
    /// (diesel's or a [`super::Fixed`] statement's): the same text as
    /// `SQLITE_FORMAT` for the years 0 to 9999, written without parsing a
    /// format string for each value (a tested fact).
    pub(crate) fn sqlite_text(&self) -> String {
        use chrono::{Datelike, Timelike};
        let t = self.0.naive_utc();
        let nanos = t.nanosecond();
        // Outside the fixed width, or a leap second: chrono's own form.
        if !(1..=9999).contains(&t.year()) || nanos >= 1_000_000_000 {
            return self.0.to_rfc3339_opts(SecondsFormat::Micros, true);
        }
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let fields = [
            (0..4, t.year().unsigned_abs()),
            (5..7, t.month()),
            (8..10, t.day()),
            (11..13, t.hour()),
            (14..16, t.minute()),
            (17..19, t.second()),
            (20..26, nanos / 1000),
        ];
        for (at, mut n) in fields {
            for digit in text[at].iter_mut().rev() {
                *digit = b'0' + (n % 10) as u8;
                n /= 10;
            }
        }
        std::str::from_utf8(&text).expect("ASCII digits").to_owned()
    }
}

impl FromSql<UtcTime, Sqlite> for Instant {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Sqlite>>::from_sql(value)?;
        if let Ok(instant) = DateTime::parse_from_rfc3339(&text) {
            return Ok(Instant(instant.to_utc()));
        }
        let naive = NaiveDateTime::parse_from_str(&text, SQLITE_FORMAT)
            .or_else(|_| NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.f"))
            .map_err(|e| format!("{text:?} is not a stored instant: {e}"))?;
        Ok(Instant(naive.and_utc()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlite_form_sorts_as_the_instants_do() {
        let a: DateTime<Utc> = "2026-11-29T09:59:59.999999Z".parse().unwrap();
        let b: DateTime<Utc> = "2026-11-29T10:00:00Z".parse().unwrap();
        let (ta, tb) = (
            a.format(SQLITE_FORMAT).to_string(),
            b.format(SQLITE_FORMAT).to_string(),
        );
        assert_eq!(tb, "2026-11-29T10:00:00.000000Z");
        assert!(ta < tb);
    }

    #[test]
    fn the_fast_form_is_the_format_s_and_reads_back() {
        let mut t: DateTime<Utc> = "0001-01-01T00:00:00Z".parse().unwrap();
        let end: DateTime<Utc> = "9999-12-31T23:59:59.999999Z".parse().unwrap();
        let step = chrono::Duration::seconds(86_400 * 37 + 3_723)
            + chrono::Duration::microseconds(1_234_567);
        while t <= end {
            let fast = Instant(t).sqlite_text();
            assert_eq!(fast, t.format(SQLITE_FORMAT).to_string());
            assert_eq!(fast, t.to_rfc3339_opts(SecondsFormat::Micros, true));
            let back = DateTime::parse_from_rfc3339(&fast).unwrap().to_utc();
            assert_eq!(back, t);
            t += step;
        }
        // Nanoseconds are cut to microseconds, as the format does.
        let t: DateTime<Utc> = "2026-11-29T10:00:00.123456789Z".parse().unwrap();
        assert_eq!(Instant(t).sqlite_text(), "2026-11-29T10:00:00.123456Z");
    }

    #[test]
    fn a_leap_second_and_years_past_the_fixed_width_keep_chrono_s_form() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 1_500_000)
            .unwrap()
            .and_utc();
        let far: DateTime<Utc> = "+10000-01-01T00:00:00Z".parse().unwrap();
        for t in [leap, far] {
            assert_eq!(
                Instant(t).sqlite_text(),
                t.to_rfc3339_opts(SecondsFormat::Micros, true)
            );
        }
    }
}
