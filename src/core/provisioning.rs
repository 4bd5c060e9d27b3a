//! The provisioning file (CONTRACT section 2): parsing and validation.
//!
//! Everything that can be checked without the database is checked here, so a
//! bad file is refused before anything is written. The one check that needs
//! the database (a device naming a profile that is only stored, not in the
//! file) is made by the loader, before its first write.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::alarm::Condition;
use super::message::is_valid_key;

/// A parsed provisioning file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provisioning {
    /// Profile name to profile.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// Devices, in file order.
    #[serde(default)]
    pub devices: Vec<Device>,
}

/// How a kind of device names its payload fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Raw field name to mapping.
    pub fields: BTreeMap<String, Field>,
}

/// One raw field of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The metric it measures.
    pub metric: String,
    /// Multiplies the raw value (default 1).
    #[serde(default = "one")]
    pub scale: f64,
    /// Added after scaling (default 0).
    #[serde(default)]
    pub offset: f64,
}

/// A device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device's key, as messages name it.
    pub key: String,
    /// Where it is (default "").
    #[serde(default)]
    pub site: String,
    /// The profile's name.
    pub profile: String,
    /// Its sensors.
    #[serde(default)]
    pub sensors: Vec<Sensor>,
}

/// A sensor of a device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sensor {
    /// The metric it measures.
    pub metric: String,
    /// Unit of its values (default "").
    #[serde(default)]
    pub unit: String,
    /// Calibration factor (default 1).
    #[serde(default = "one")]
    pub scale: f64,
    /// Calibration offset (default 0).
    #[serde(default)]
    pub offset: f64,
    /// Lowest good value, inclusive (absent: unbounded).
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest good value, inclusive (absent: unbounded).
    #[serde(default)]
    pub max: Option<f64>,
    /// Its alarms.
    #[serde(default)]
    pub alarms: Vec<Alarm>,
}

/// An alarm on a sensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alarm {
    /// Its name, unique per sensor.
    pub name: String,
    /// `gt`, `gte`, `lt` or `lte`.
    pub condition: String,
    /// What values are compared with.
    pub threshold: f64,
    /// Whether it is evaluated (default true).
    #[serde(default = "yes")]
    pub active: bool,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl Provisioning {
    /// Parses and validates a provisioning file's text. The error names the
    /// offending item.
    pub fn parse(text: &str) -> Result<Self, String> {
        // serde would also read a struct from an array: insist on an object.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !value.is_object() {
            return Err("the file must hold a JSON object with `profiles` and `devices`".into());
        }
        let file: Provisioning = serde_json::from_str(text).map_err(|e| e.to_string())?;
        file.validate()?;
        Ok(file)
    }

    /// Checks every rule that needs no database.
    pub fn validate(&self) -> Result<(), String> {
        for (name, profile) in &self.profiles {
            let at = format!("profile {name:?}");
            check_name(name, &at)?;
            let mut metrics = HashSet::new();
            for (field, mapping) in &profile.fields {
                let at = format!("{at}, field {field:?}");
                check_name(field, &at)?;
                check_name(&mapping.metric, &format!("{at}, metric"))?;
                check_finite(mapping.scale, &at, "scale")?;
                check_finite(mapping.offset, &at, "offset")?;
                if !metrics.insert(mapping.metric.as_str()) {
                    return Err(format!(
                        "{at}: metric {:?} is already mapped by another field of the profile",
                        mapping.metric
                    ));
                }
            }
        }
        let mut keys = HashSet::new();
        for (i, device) in self.devices.iter().enumerate() {
            let at = format!("devices[{i}] ({:?})", device.key);
            if !is_valid_key(&device.key) {
                return Err(format!(
                    "{at}: key must be 1 to 200 characters without control characters"
                ));
            }
            if !keys.insert(device.key.as_str()) {
                return Err(format!("{at}: the key appears twice in the file"));
            }
            check_name(&device.profile, &format!("{at}, profile"))?;
            let mut metrics = HashSet::new();
            for (j, sensor) in device.sensors.iter().enumerate() {
                let at = format!("{at}, sensors[{j}] ({:?})", sensor.metric);
                check_name(&sensor.metric, &at)?;
                if !metrics.insert(sensor.metric.as_str()) {
                    return Err(format!("{at}: the device has this metric twice"));
                }
                check_finite(sensor.scale, &at, "scale")?;
                check_finite(sensor.offset, &at, "offset")?;
                for (bound, v) in [("min", sensor.min), ("max", sensor.max)] {
                    if let Some(v) = v {
                        check_finite(v, &at, bound)?;
                    }
                }
                if let (Some(min), Some(max)) = (sensor.min, sensor.max) {
                    if min > max {
                        return Err(format!("{at}: min {min} is greater than max {max}"));
                    }
                }
                let mut names = HashSet::new();
                for (k, alarm) in sensor.alarms.iter().enumerate() {
                    let at = format!("{at}, alarms[{k}] ({:?})", alarm.name);
                    check_name(&alarm.name, &at)?;
                    if !names.insert(alarm.name.as_str()) {
                        return Err(format!("{at}: the sensor has this alarm name twice"));
                    }
                    if Condition::parse(&alarm.condition).is_none() {
                        return Err(format!(
                            "{at}: condition {:?} is not one of {}",
                            alarm.condition,
                            Condition::NAMES
                        ));
                    }
                    check_finite(alarm.threshold, &at, "threshold")?;
                }
            }
        }
        Ok(())
    }

    /// Profile names that devices use but the file does not define.
    pub fn profiles_needed_from_store(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .devices
            .iter()
            .map(|d| d.profile.as_str())
            .filter(|p| !self.profiles.contains_key(*p))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

fn check_name(s: &str, at: &str) -> Result<(), String> {
    if is_valid_key(s) {
        Ok(())
    } else {
        Err(format!(
            "{at}: name {s:?} must be 1 to 200 characters without control characters"
        ))
    }
}

fn check_finite(v: f64, at: &str, what: &str) -> Result<(), String> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(format!("{at}: {what} must be a finite number"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_EXAMPLE: &str = r#"{
      "profiles": {
        "th-v1": {"fields": {"t": {"metric": "temperature"},
                             "h": {"metric": "humidity"},
                             "bat_mv": {"metric": "battery", "scale": 0.001}}},
        "th-f":  {"fields": {"temp_f": {"metric": "temperature",
                                        "scale": 0.5555555555555556,
                                        "offset": -17.77777777777778}}}
      },
      "devices": [
        {"key": "dev-0042", "site": "museum-a/room-1", "profile": "th-v1",
         "sensors": [
           {"metric": "temperature", "unit": "°C", "scale": 1.0, "offset": -0.3,
            "min": -40, "max": 85,
            "alarms": [{"name": "too-warm", "condition": "gt", "threshold": 26.0}]},
           {"metric": "humidity", "unit": "%", "min": 0, "max": 100,
            "alarms": [{"name": "too-dry", "condition": "lt", "threshold": 35},
                       {"name": "too-humid", "condition": "gte", "threshold": 65,
                        "active": false}]}
         ]}
      ]
    }"#;

    #[test]
    fn the_contract_example_parses_with_its_defaults() {
        let p = Provisioning::parse(CONTRACT_EXAMPLE).unwrap();
        assert_eq!(p.profiles["th-v1"].fields["t"].scale, 1.0);
        assert_eq!(p.profiles["th-v1"].fields["bat_mv"].scale, 0.001);
        assert_eq!(p.profiles["th-v1"].fields["bat_mv"].offset, 0.0);
        let humidity = &p.devices[0].sensors[1];
        assert_eq!((humidity.scale, humidity.offset), (1.0, 0.0));
        assert_eq!((humidity.min, humidity.max), (Some(0.0), Some(100.0)));
        assert!(humidity.alarms[0].active);
        assert!(!humidity.alarms[1].active);
        assert!(p.profiles_needed_from_store().is_empty());
    }

    fn error_of(text: &str) -> String {
        Provisioning::parse(text).unwrap_err()
    }

    #[test]
    fn a_bad_item_is_named_in_the_error() {
        let e = error_of(
            r#"{"devices":[{"key":"d1","profile":"p","sensors":[{"metric":"t","alarms":[{"name":"a","condition":"above","threshold":1}]}]}]}"#,
        );
        assert!(
            e.contains(r#"devices[0] ("d1"), sensors[0] ("t"), alarms[0] ("a")"#),
            "{e}"
        );
        assert!(e.contains("gt, gte, lt, lte"), "{e}");
    }

    #[test]
    fn a_profile_may_not_map_two_fields_to_one_metric() {
        let e =
            error_of(r#"{"profiles":{"p":{"fields":{"a":{"metric":"t"},"b":{"metric":"t"}}}}}"#);
        assert!(
            e.contains(r#"profile "p""#) && e.contains("already mapped"),
            "{e}"
        );
    }

    #[test]
    fn structural_errors_are_refused() {
        for (text, expected) in [
            (r#"{"devices":[{"key":"","profile":"p"}]}"#, "key must be"),
            (
                r#"{"devices":[{"key":"a","profile":"p"},{"key":"a","profile":"p"}]}"#,
                "twice",
            ),
            (
                r#"{"devices":[{"key":"a","profile":"p","sensors":[{"metric":"t"},{"metric":"t"}]}]}"#,
                "metric twice",
            ),
            (
                r#"{"devices":[{"key":"a","profile":"p","sensors":[{"metric":"t","min":5,"max":1}]}]}"#,
                "greater than max",
            ),
            (
                r#"{"devices":[{"key":"a","profile":"p","sensors":[{"metric":"t","treshold":1}]}]}"#,
                "unknown field `treshold`",
            ),
            (r#"{"devices":[{"key":"a"}]}"#, "missing field `profile`"),
            (
                r#"{"devices":[{"key":"a","profile":"p","sensors":[{"metric":"t","alarms":[{"name":"x","condition":"gt","threshold":1},{"name":"x","condition":"lt","threshold":2}]}]}]}"#,
                "alarm name twice",
            ),
            ("[]", "must hold a JSON object"),
            ("{", "EOF while parsing"),
        ] {
            let e = error_of(text);
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn profiles_not_in_the_file_must_come_from_the_store() {
        let p = Provisioning::parse(
            r#"{"devices":[{"key":"a","profile":"old"},{"key":"b","profile":"old"}]}"#,
        )
        .unwrap();
        assert_eq!(p.profiles_needed_from_store(), vec!["old"]);
    }
}
