//! Every rule of CONTRACT section 3, on a real SQLite file and a real
//! PostgreSQL database.

use crate::support::{both, msg, TestDb, DEVICES};

fn provisioned() -> Vec<TestDb> {
    let dbs = both();
    for t in &dbs {
        t.provision(DEVICES);
    }
    dbs
}

#[test]
fn a_valid_message_stores_calibrated_readings_with_their_quality() {
    for t in provisioned() {
        let s = t.ingest(&msg(
            "m1",
            "dev-0042",
            "2026-11-29T15:00:00.2509999+01:00",
            r#"{"t":21.5,"h":120,"bat_mv":3610,"x":1}"#,
        ));
        assert_eq!(
            (s.processed, s.readings_stored, s.unmapped_fields),
            (1, 2, 2),
            "{}",
            t.name
        );
        let snap = t.snapshot();
        assert_eq!(
            snap.readings,
            vec![
                (
                    "dev-0042".into(),
                    "humidity".into(),
                    "2026-11-29T14:00:00.250999Z".into(),
                    120.0,
                    "out_of_range".into(),
                    "m1".into()
                ),
                (
                    "dev-0042".into(),
                    "temperature".into(),
                    "2026-11-29T14:00:00.250999Z".into(),
                    (21.5 * 1.0 + 0.0) * 1.0 + -0.3,
                    "good".into(),
                    "m1".into()
                ),
            ],
            "{}",
            t.name
        );
        assert_eq!(snap.processed, vec!["m1".to_string()]);
        assert_eq!(
            snap.devices[0],
            (
                "dev-0042".into(),
                Some("2026-11-29T14:00:00.250999Z".into())
            )
        );
        assert!(snap.dead_letters.is_empty());
    }
}

#[test]
fn field_and_sensor_calibration_apply_in_the_contract_order() {
    for t in provisioned() {
        t.ingest(&msg(
            "f1",
            "dev-f",
            "2026-11-29T10:00:00Z",
            r#"{"temp_f":70.7}"#,
        ));
        let v = t.snapshot().readings[0].3;
        assert_eq!(
            v,
            (70.7 * 0.5555555555555556 + -17.77777777777778) * 1.0 + 0.0,
            "{}",
            t.name
        );
    }
}

#[test]
fn bounds_are_inclusive() {
    for t in provisioned() {
        let input = [
            msg("b1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"h":0}"#),
            msg("b2", "dev-0042", "2026-11-29T10:01:00Z", r#"{"h":100}"#),
            msg(
                "b3",
                "dev-0042",
                "2026-11-29T10:02:00Z",
                r#"{"h":100.0001}"#,
            ),
        ]
        .join("\n");
        t.ingest(&input);
        let q: Vec<String> = t.snapshot().readings.into_iter().map(|r| r.4).collect();
        assert_eq!(q, vec!["good", "good", "out_of_range"], "{}", t.name);
    }
}

#[test]
fn a_processed_id_is_a_duplicate_and_changes_nothing() {
    for t in provisioned() {
        t.ingest(&msg(
            "d1",
            "dev-0042",
            "2026-11-29T10:00:00Z",
            r#"{"t":20}"#,
        ));
        let before = t.snapshot();
        let s = t.ingest(&msg(
            "d1",
            "dev-0042",
            "2026-11-29T11:00:00Z",
            r#"{"t":99,"h":"bad"}"#,
        ));
        assert_eq!(
            (s.duplicates, s.processed, s.dead_letters),
            (1, 0, 0),
            "{}",
            t.name
        );
        assert_eq!(t.snapshot(), before, "{}", t.name);
    }
}

#[test]
fn an_unknown_device_is_dead_lettered_and_succeeds_after_provisioning() {
    for t in provisioned() {
        let line = msg("u1", "dev-new", "2026-11-29T10:00:00Z", r#"{"t":20}"#);
        let s = t.ingest(&line);
        assert_eq!(s.dead_letters_by_kind["unknown_device"], 1, "{}", t.name);
        let snap = t.snapshot();
        assert!(
            snap.processed.is_empty(),
            "the id is not recorded as processed"
        );
        assert_eq!(snap.dead_letters[0].0.as_deref(), Some("u1"));
        assert_eq!(snap.dead_letters[0].1.as_deref(), Some("dev-new"));
        assert_eq!(snap.dead_letters[0].4, line);

        t.provision(r#"{"devices":[{"key":"dev-new","profile":"th-v1","sensors":[{"metric":"temperature"}]}]}"#);
        let s = t.ingest(&line);
        assert_eq!(s.processed, 1, "{}", t.name);
        let snap = t.snapshot();
        assert!(
            snap.dead_letters.is_empty(),
            "the dead letter is removed once processed"
        );
        assert_eq!(snap.readings.len(), 1);
    }
}

#[test]
fn a_processed_batch_removes_only_its_own_ids_dead_letters() {
    use normalizer::core::message::{parse_line, Parsed};
    use normalizer::db::repo::batch;
    use normalizer::db::repo::reference::ReferenceCache;

    let line = |id: &str| msg(id, "dev-late", "2026-11-29T10:00:00Z", r#"{"t":20}"#);
    for t in provisioned() {
        // Seven dead letters, m2 to m8, of a device not yet provisioned.
        let letters: Vec<String> = (2..=8).map(|i| line(&format!("m{i}"))).collect();
        let s = t.ingest(&letters.join("\n"));
        assert_eq!(s.dead_letters_by_kind["unknown_device"], 7, "{}", t.name);
        t.provision(r#"{"devices":[{"key":"dev-late","profile":"th-v1","sensors":[{"metric":"temperature"}]}]}"#);
        let cache = ReferenceCache::default();
        // SQLite finds the rows to remove by one walk over the batch's id
        // range when it holds no more rows than the batch has ids, else by
        // id: m1..m9 holds seven for three ids (by id), m3..m3 one (a walk).
        for batch_ids in [&["m1", "m5", "m9"][..], &["m3"]] {
            let lines: Vec<String> = batch_ids.iter().map(|id| line(id)).collect();
            let messages: Vec<_> = lines
                .iter()
                .map(|l| match parse_line(l.as_bytes(), false) {
                    Parsed::Message(m) => m,
                    _ => panic!("{l}"),
                })
                .collect();
            let tokens: Vec<String> = batch_ids.iter().map(|id| format!("token-{id}")).collect();
            let items: Vec<batch::Item<'_>> = messages
                .iter()
                .zip(&lines)
                .zip(&tokens)
                .map(|((message, raw), token)| batch::Item::Message {
                    message,
                    raw: raw.as_bytes(),
                    token,
                })
                .collect();
            let outcomes =
                t.db.transaction(|c| batch::apply(c, &items, &cache))
                    .unwrap();
            assert_eq!(outcomes.len(), batch_ids.len(), "{}", t.name);
        }
        let mut left: Vec<Option<String>> = t
            .snapshot()
            .dead_letters
            .into_iter()
            .map(|row| row.0)
            .collect();
        left.sort();
        let expected: Vec<Option<String>> = ["m2", "m4", "m6", "m7", "m8"]
            .iter()
            .map(|id| Some(id.to_string()))
            .collect();
        assert_eq!(left, expected, "{}", t.name);
    }
}

#[test]
fn nulls_are_skipped_and_a_non_number_invalidates_the_whole_message() {
    for t in provisioned() {
        let s = t.ingest(&msg(
            "n1",
            "dev-0042",
            "2026-11-29T10:00:00Z",
            r#"{"t":null,"h":50}"#,
        ));
        assert_eq!((s.processed, s.readings_stored), (1, 1), "{}", t.name);
        let s = t.ingest(&msg(
            "n2",
            "dev-0042",
            "2026-11-29T10:01:00Z",
            r#"{"t":21,"h":"50"}"#,
        ));
        assert_eq!(s.dead_letters_by_kind["invalid"], 1, "{}", t.name);
        let snap = t.snapshot();
        assert_eq!(snap.readings.len(), 1, "nothing of n2 is stored");
        assert!(!snap.processed.contains(&"n2".to_string()));
        assert!(
            snap.dead_letters[0].3.contains("`h`"),
            "{:?}",
            snap.dead_letters[0]
        );
    }
}

#[test]
fn a_non_finite_value_is_invalid() {
    for t in provisioned() {
        t.provision(r#"{"devices":[{"key":"dev-big","profile":"th-v1","sensors":[{"metric":"temperature","scale":1e10}]}]}"#);
        let s = t.ingest(&msg(
            "x1",
            "dev-big",
            "2026-11-29T10:00:00Z",
            r#"{"t":1e300}"#,
        ));
        assert_eq!(s.dead_letters_by_kind["invalid"], 1, "{}", t.name);
        assert!(t.snapshot().readings.is_empty());
    }
}

#[test]
fn a_second_reading_at_the_same_instant_keeps_the_first() {
    for t in provisioned() {
        let input = [
            msg("r1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":20}"#),
            msg(
                "r2",
                "dev-0042",
                "2026-11-29T11:00:00+01:00",
                r#"{"t":30,"h":50}"#,
            ),
        ]
        .join("\n");
        let s = t.ingest(&input);
        assert_eq!(
            (s.processed, s.readings_stored, s.duplicate_readings),
            (2, 2, 1),
            "{}",
            t.name
        );
        let snap = t.snapshot();
        let temps: Vec<_> = snap
            .readings
            .iter()
            .filter(|r| r.1 == "temperature")
            .collect();
        assert_eq!(temps.len(), 1);
        assert_eq!(temps[0].5, "r1", "{}", t.name);
        assert_eq!(snap.processed, vec!["r1".to_string(), "r2".to_string()]);
    }
}

#[test]
fn alerts_open_and_close_on_the_latest_good_reading_only() {
    for t in provisioned() {
        // too-warm: t - 0.3 > 26. too-dry: h < 35. too-humid is inactive.
        let input = [
            msg(
                "a1",
                "dev-0042",
                "2026-11-29T10:00:00Z",
                r#"{"t":27,"h":70}"#,
            ), // opens too-warm
            msg("a2", "dev-0042", "2026-11-29T10:10:00Z", r#"{"t":28}"#), // stays open
            msg("a3", "dev-0042", "2026-11-29T09:00:00Z", r#"{"t":10}"#), // late: no change
            msg("a4", "dev-0042", "2026-11-29T10:20:00Z", r#"{"t":100}"#), // out of range: no change
            msg("a5", "dev-0042", "2026-11-29T10:30:00Z", r#"{"t":26.3}"#), // 26.0 not > 26: closes
            msg(
                "a6",
                "dev-0042",
                "2026-11-29T10:40:00Z",
                r#"{"t":26.4,"h":30}"#,
            ), // reopens; opens too-dry
        ]
        .join("\n");
        let s = t.ingest_on(1, &input);
        assert_eq!((s.alerts_opened, s.alerts_closed), (3, 1), "{}", t.name);
        let alerts = t.snapshot().alerts;
        let warm: Vec<_> = alerts.iter().filter(|a| a.2 == "too-warm").collect();
        assert_eq!(warm.len(), 2, "{}: {alerts:?}", t.name);
        assert_eq!(warm[0].3, "2026-11-29T10:00:00.000000Z");
        assert_eq!(warm[0].4, 27.0 - 0.3);
        assert_eq!(warm[0].5.as_deref(), Some("2026-11-29T10:30:00.000000Z"));
        assert_eq!(warm[0].6, Some(26.3 - 0.3));
        assert_eq!(
            (warm[1].5.clone(), warm[1].6),
            (None, None),
            "the second alert is open"
        );
        let dry: Vec<_> = alerts.iter().filter(|a| a.2 == "too-dry").collect();
        assert_eq!(dry.len(), 1);
        assert!(
            alerts.iter().all(|a| a.2 != "too-humid"),
            "an inactive alarm never fires"
        );
    }
}

#[test]
fn a_late_reading_is_stored_but_changes_no_alarm() {
    for t in provisioned() {
        let input = [
            msg("l1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":20}"#),
            msg("l2", "dev-0042", "2026-11-29T09:00:00Z", r#"{"t":40}"#),
        ]
        .join("\n");
        let s = t.ingest_on(1, &input);
        assert_eq!((s.readings_stored, s.alerts_opened), (2, 0), "{}", t.name);
        let snap = t.snapshot();
        assert_eq!(
            snap.devices[0].1.as_deref(),
            Some("2026-11-29T10:00:00.000000Z"),
            "last_seen_at is the latest ts"
        );
    }
}

#[test]
fn a_message_with_no_mapped_field_is_still_processed() {
    for t in provisioned() {
        let s = t.ingest(&msg(
            "e1",
            "dev-0042",
            "2026-11-29T10:00:00Z",
            r#"{"rssi":-70}"#,
        ));
        assert_eq!(
            (s.processed, s.readings_stored, s.unmapped_fields),
            (1, 0, 1),
            "{}",
            t.name
        );
        assert_eq!(
            t.snapshot().devices[0].1.as_deref(),
            Some("2026-11-29T10:00:00.000000Z")
        );
    }
}

#[test]
fn dead_letters_keep_ids_only_when_valid_and_raw_is_sanitized() {
    for t in provisioned() {
        let long_id = "i".repeat(201);
        let input = [
            "not json".to_string(),
            format!(r#"{{"id":"{long_id}","device":"dev-0042","ts":"2026-11-29T10:00:00Z","payload":{{}}}}"#),
            r#"{"id":"ctl","device":"bad\u0001key","ts":"nope","payload":{}}"#.to_string(),
            "{\"id\":\"nul\",\"device\":\"d\u{0}\",\"payload\":{}}".to_string(),
        ]
        .join("\n");
        let mut bytes = input.into_bytes();
        bytes.extend_from_slice(b"\n{\"id\":\"\xff\xfe\"}\n");
        let s = crate::support::ingest_bytes(&t, bytes);
        assert_eq!(s.dead_letters, 5, "{}", t.name);
        let dl = t.snapshot().dead_letters;
        let by_raw = |needle: &str| {
            dl.iter()
                .find(|d| d.4.contains(needle))
                .unwrap_or_else(|| panic!("{needle}: {dl:?}"))
        };
        let not_json = by_raw("not json");
        assert_eq!(
            (not_json.0.clone(), not_json.1.clone(), not_json.2.as_str()),
            (None, None, "malformed")
        );
        let long = by_raw(&long_id);
        assert_eq!(
            (long.0.clone(), long.1.as_deref(), long.2.as_str()),
            (None, Some("dev-0042"), "invalid")
        );
        let ctl = by_raw("nope");
        assert_eq!((ctl.0.as_deref(), ctl.1.clone()), (Some("ctl"), None));
        let nul = by_raw("\"nul\"");
        assert!(
            nul.4.contains("d\u{FFFD}") || nul.4.contains("d\\u0000"),
            "{nul:?}"
        );
        assert!(!nul.4.contains('\0'));
        assert_eq!(
            nul.2, "malformed",
            "a raw NUL inside a JSON string is not JSON"
        );
        let bad = by_raw("{\"id\":\"\u{FFFD}");
        assert_eq!(bad.2, "malformed");
        assert_eq!(bad.4, "{\"id\":\"\u{FFFD}\u{FFFD}\"}");
    }
}

#[test]
fn a_dead_lettered_id_has_one_row_and_unreadable_lines_add_rows() {
    for t in provisioned() {
        let first = msg("dl1", "dev-nope", "2026-11-29T10:00:00Z", r#"{"t":1}"#);
        let second = msg("dl1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":"x"}"#);
        t.ingest(&first);
        t.ingest(&format!("{second}\ngarbage"));
        t.ingest("garbage");
        let dl = t.snapshot().dead_letters;
        let with_id: Vec<_> = dl
            .iter()
            .filter(|d| d.0.as_deref() == Some("dl1"))
            .collect();
        assert_eq!(with_id.len(), 1, "{}", t.name);
        assert_eq!(with_id[0].2, "invalid", "the latest kind");
        assert_eq!(with_id[0].4, second, "the latest raw line");
        assert_eq!(with_id[0].5, 2, "attempts");
        assert_eq!(dl.iter().filter(|d| d.0.is_none()).count(), 2, "{}", t.name);
    }
}

#[test]
fn one_devices_messages_apply_in_arrival_order_across_many_workers() {
    for t in provisioned() {
        // Alternating hot and cool readings: the alert count is only right
        // if each device's messages apply in order.
        let mut lines = vec![];
        for i in 0..200 {
            let t_value = if i % 2 == 0 { 30 } else { 20 };
            lines.push(msg(
                &format!("o{i}"),
                "dev-0042",
                &format!("2026-11-29T10:{:02}:{:02}Z", i / 60, i % 60),
                &format!(r#"{{"t":{t_value}}}"#),
            ));
            lines.push(msg(
                &format!("p{i}"),
                "dev-f",
                &format!("2026-11-29T10:{:02}:{:02}Z", i / 60, i % 60),
                r#"{"temp_f":60}"#,
            ));
        }
        let s = t.ingest_on(4, &lines.join("\n"));
        assert_eq!((s.alerts_opened, s.alerts_closed), (100, 100), "{}", t.name);
    }
}

#[test]
fn replaying_the_same_input_changes_nothing_but_dead_letter_attempts() {
    let input = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/messages.jsonl"
    ))
    .unwrap();
    let devices = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/devices.json"
    ))
    .unwrap();
    let mut snapshots = vec![];
    for t in both() {
        t.provision(&devices);
        let first = t.ingest(&input);
        let before = t.snapshot();
        let second = t.ingest(&input);
        let after = t.snapshot();
        assert_eq!(second.processed, 0, "{}", t.name);
        assert_eq!(
            second.duplicates,
            first.processed + first.duplicates,
            "{}",
            t.name
        );
        assert_eq!(after.readings, before.readings);
        assert_eq!(after.alerts, before.alerts);
        assert_eq!(after.processed, before.processed);
        assert_eq!(after.devices, before.devices);
        let with_id = |s: &normalizer::db::repo::snapshot::Snapshot| {
            s.dead_letters
                .iter()
                .filter(|d| d.0.is_some())
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            with_id(&before).len(),
            with_id(&after).len(),
            "{}: the same dead letters with an id",
            t.name
        );
        for (b, a) in with_id(&before).iter().zip(with_id(&after).iter()) {
            assert_eq!(
                (&a.0, &a.2, a.5),
                (&b.0, &b.2, b.5 + 1),
                "{}: attempts + 1",
                t.name
            );
        }
        let without = |s: &normalizer::db::repo::snapshot::Snapshot| {
            s.dead_letters.iter().filter(|d| d.0.is_none()).count()
        };
        assert_eq!(
            without(&after),
            2 * without(&before),
            "{}: lines without an id add rows",
            t.name
        );
        snapshots.push(before);
    }
    assert_eq!(
        snapshots[0], snapshots[1],
        "SQLite and PostgreSQL end in the same state"
    );
}
