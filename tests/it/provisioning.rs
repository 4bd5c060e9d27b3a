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
        let err =
            t.db.transaction(|c| provisioning::load(c, &file))
                .unwrap()
                .unwrap_err();
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
