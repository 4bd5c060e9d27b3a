//! CONTRACT section 2: loading reference data, on both backends.

use normalizer::core::provisioning::Provisioning;
use normalizer::db::repo::provisioning;

use crate::support::{both, msg, DEVICES};

#[test]
fn loading_twice_is_idempotent_and_updates_by_key() {
    for t in both() {
        t.provision(DEVICES);
        t.provision(DEVICES);
        let s = t.status();
        assert_eq!(s.devices, 2, "{}", t.name);
        // An update by key: the alarm threshold changes, nothing is duplicated.
        t.provision(r#"{"devices":[{"key":"dev-0042","site":"moved","profile":"th-v1",
            "sensors":[{"metric":"temperature","alarms":[{"name":"too-warm","condition":"gt","threshold":10}]}]}]}"#);
        let summary = t.ingest(&msg(
            "p1",
            "dev-0042",
            "2026-11-29T10:00:00Z",
            r#"{"t":11,"h":30}"#,
        ));
        // temperature: calibration now scale 1 offset 0 (defaults of the new file).
        assert_eq!(
            summary.alerts_opened, 2,
            "{}: too-warm at 10 and too-dry kept from before",
            t.name
        );
        assert_eq!(
            t.snapshot()
                .readings
                .iter()
                .find(|r| r.1 == "temperature")
                .unwrap()
                .3,
            11.0
        );
        assert_eq!(
            t.status().devices,
            2,
            "nothing absent from the file is deleted"
        );
    }
}

#[test]
fn a_device_may_use_a_profile_that_is_already_stored() {
    for t in both() {
        t.provision(DEVICES);
        t.provision(r#"{"devices":[{"key":"dev-late","profile":"th-f","sensors":[{"metric":"temperature"}]}]}"#);
        assert_eq!(
            t.ingest(&msg(
                "s1",
                "dev-late",
                "2026-11-29T10:00:00Z",
                r#"{"temp_f":50}"#
            ))
            .readings_stored,
            1
        );
    }
}

#[test]
fn a_file_that_fails_validation_changes_nothing_and_names_the_item() {
    for t in both() {
        t.provision(DEVICES);
        let before = t.snapshot();
        let file = Provisioning::parse(
            r#"{"profiles":{"new":{"fields":{"a":{"metric":"m"}}}},
                "devices":[{"key":"dev-ok","profile":"new"},{"key":"dev-bad","profile":"missing"}]}"#,
        )
        .unwrap();
        let err = provisioning::provision(&t.db, &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"devices[1] ("dev-bad")"#) && err.contains("\"missing\""),
            "{err}"
        );
        assert_eq!(t.snapshot(), before, "{}", t.name);
        assert_eq!(t.status().devices, 2);
    }
}

#[test]
fn a_profile_loaded_again_replaces_its_field_map() {
    for t in both() {
        t.provision(DEVICES);
        t.provision(r#"{"profiles":{"th-v1":{"fields":{"temp":{"metric":"temperature"}}}}}"#);
        let s = t.ingest(&msg(
            "f1",
            "dev-0042",
            "2026-11-29T10:00:00Z",
            r#"{"t":20,"temp":21}"#,
        ));
        assert_eq!((s.readings_stored, s.unmapped_fields), (1, 1), "{}", t.name);
    }
}

#[test]
fn a_running_normalizer_sees_provisioning_done_by_another_process() {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    for t in both() {
        t.provision(DEVICES);
        // Another process: its own pool on the same database.
        let other = crate::support::open(&t.url, 1);
        let (reader, mut writer) = std::io::pipe().unwrap();
        let completed = AtomicU64::new(0);
        let wait_for = |n: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while completed.load(Ordering::SeqCst) < n {
                assert!(std::time::Instant::now() < deadline, "waited for {n} lines");
                std::thread::yield_now();
            }
        };
        let summary = std::thread::scope(|s| {
            let feeder = s.spawn(|| {
                // A device nobody provisioned yet, and a field its profile
                // does not map yet.
                writeln!(writer, "{}", msg("x1", "dev-late", "2026-11-29T10:00:00Z", r#"{"t":1}"#)).unwrap();
                writeln!(writer, "{}", msg("y1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"temp":21}"#)).unwrap();
                writer.flush().unwrap();
                wait_for(2);
                let file = Provisioning::parse(
                    r#"{"profiles":{"th-v1":{"fields":{"temp":{"metric":"temperature"}}}},
                        "devices":[{"key":"dev-late","profile":"th-v1","sensors":[{"metric":"temperature"}]}]}"#,
                )
                .unwrap();
                provisioning::provision(&other, &file).unwrap();
                writeln!(writer, "{}", msg("x2", "dev-late", "2026-11-29T10:01:00Z", r#"{"temp":2}"#)).unwrap();
                writeln!(writer, "{}", msg("y2", "dev-0042", "2026-11-29T10:01:00Z", r#"{"temp":22}"#)).unwrap();
                drop(writer);
            });
            let summary = normalizer::pipeline::ingest(
                &t.db,
                std::io::BufReader::new(reader),
                &crate::support::options(),
                &normalizer::pipeline::Progress::default(),
                |s| completed.store(s.completed, Ordering::SeqCst),
            )
            .unwrap();
            feeder.join().unwrap();
            summary
        });
        assert_eq!(
            summary.dead_letters_by_kind["unknown_device"], 1,
            "{}",
            t.name
        );
        assert_eq!(summary.processed, 3, "{}", t.name);
        let readings: Vec<String> = t.snapshot().readings.into_iter().map(|r| r.5).collect();
        // By device key: dev-0042's y2, then dev-late's x2. y1 stored
        // nothing (`temp` was not mapped yet), x1 was an unknown device.
        assert_eq!(readings, ["y2", "x2"], "{}", t.name);
    }
}
