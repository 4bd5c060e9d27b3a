//! The input stream itself: every line is accounted for, whatever it holds.

use crate::support::{both, ingest_bytes, msg, DEVICES};

#[test]
fn hostile_lines_are_each_accounted_for_and_never_stop_the_stream() {
    for t in both() {
        t.provision(DEVICES);
        let mut input = Vec::new();
        input.extend_from_slice(
            msg("h1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":20}"#).as_bytes(),
        );
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(&vec![b'x'; 2 * 1024 * 1024]); // a 2 MiB line
        input.extend_from_slice(b"\n\0\0\0\n"); // NUL bytes
        input.extend_from_slice(b"\xc3\x28 not utf-8\n");
        input.extend_from_slice(b"   \r\n\n\t\n"); // blank lines: skipped
        input.extend_from_slice(
            msg("h2", "dev-0042", "2026-11-29T10:01:00Z", r#"{"t":21}"#).as_bytes(),
        );
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(
            msg("h3", "dev-0042", "2026-11-29T10:02:00Z", r#"{"t":22}"#).as_bytes(),
        ); // no newline
        let s = ingest_bytes(&t, input);
        assert_eq!(
            (s.lines, s.processed, s.dead_letters_by_kind["malformed"]),
            (6, 3, 3),
            "{}",
            t.name
        );
        let dl = t.snapshot().dead_letters;
        let long = dl
            .iter()
            .find(|d| d.3.contains("longer than"))
            .expect("the 2 MiB line");
        assert_eq!(long.4.len(), 64 * 1024, "its first 64 KiB");
        assert!(dl.iter().all(|d| !d.4.contains('\0')));
    }
}

#[test]
fn an_empty_file_and_a_file_of_only_bad_lines_finish() {
    for t in both() {
        let s = ingest_bytes(&t, Vec::new());
        assert_eq!((s.lines, s.completed), (0, 0));
        let s = ingest_bytes(&t, b"x\ny\n{}\n[]\n".to_vec());
        assert_eq!((s.lines, s.dead_letters), (4, 4), "{}", t.name);
        assert_eq!(
            s.dead_letters_by_kind["invalid"], 1,
            "{{}} lacks every field"
        );
    }
}

#[test]
fn sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys() {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        journal_mode: String,
    }
    #[derive(QueryableByName)]
    struct Fk {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        foreign_keys: i32,
    }
    #[derive(QueryableByName)]
    struct Busy {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeout: i32,
    }
    let t = crate::support::sqlite();
    let (mode, fk, busy) =
        t.db.transaction(|c| match c {
            normalizer::db::AnyConnection::Sqlite(c, _) => Ok((
                diesel::sql_query("PRAGMA journal_mode")
                    .get_result::<Mode>(c)?
                    .journal_mode,
                diesel::sql_query("PRAGMA foreign_keys")
                    .get_result::<Fk>(c)?
                    .foreign_keys,
                diesel::sql_query("PRAGMA busy_timeout")
                    .get_result::<Busy>(c)?
                    .timeout,
            )),
            _ => unreachable!(),
        })
        .unwrap();
    assert_eq!((mode.as_str(), fk), ("wal", 1));
    assert!(busy > 0);
}
