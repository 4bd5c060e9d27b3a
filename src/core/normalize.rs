//! Payload values into readings (CONTRACT section 3, step 4).

use std::collections::HashMap;

use serde_json::Value;

use super::message::json_type;

/// How a profile maps one raw payload field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    /// The metric the field measures.
    pub metric: String,
    /// Multiplies the raw value.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

/// A device's sensor for one metric, with its calibration and bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorSpec {
    /// The sensor's row id.
    pub id: i64,
    /// Multiplies the profile-mapped value.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Lowest good value (inclusive); `None` is unbounded.
    pub min: Option<f64>,
    /// Highest good value (inclusive); `None` is unbounded.
    pub max: Option<f64>,
}

/// What the normalizer needs to know of a device to normalize its payloads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSpec {
    /// Raw field name to mapping, from the device's profile.
    pub fields: HashMap<String, FieldMapping>,
    /// Metric to sensor.
    pub sensors: HashMap<String, SensorSpec>,
}

/// Whether a value lies within its sensor's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// `min <= value <= max`.
    Good,
    /// Outside the bounds.
    OutOfRange,
}

impl Quality {
    /// The quality as stored in `readings.quality`.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::OutOfRange => "out_of_range",
        }
    }
}

/// One normalized value for one sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The sensor's row id.
    pub sensor_id: i64,
    /// The calibrated value.
    pub value: f64,
    /// Good or out of range.
    pub quality: Quality,
}

/// A payload turned into readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalized {
    /// One reading per mapped, non-null field, ordered by sensor id.
    pub readings: Vec<Reading>,
    /// Fields the profile does not map, or mapped to a metric without sensor.
    pub unmapped: u32,
    /// Mapped fields whose value was `null`.
    pub nulls: u32,
}

/// Computes `(raw * field.scale + field.offset) * sensor.scale + sensor.offset`
/// in f64, in exactly that order (no fused multiply-add).
pub fn calibrate(raw: f64, field: &FieldMapping, sensor: &SensorSpec) -> f64 {
    let mapped = raw * field.scale + field.offset;
    mapped * sensor.scale + sensor.offset
}

/// Good when `min <= value <= max`, bounds inclusive and absent ones open.
pub fn quality(value: f64, sensor: &SensorSpec) -> Quality {
    let above_min = sensor.min.is_none_or(|min| min <= value);
    let below_max = sensor.max.is_none_or(|max| value <= max);
    if above_min && below_max {
        Quality::Good
    } else {
        Quality::OutOfRange
    }
}

/// Normalizes a payload for a device. An `Err` says why the whole message is
/// `invalid`; nothing of it may be stored then.
pub fn normalize(payload: &[(String, Value)], device: &DeviceSpec) -> Result<Normalized, String> {
    let mut out = Normalized::default();
    for (name, value) in payload {
        let Some((field, sensor)) = device
            .fields
            .get(name)
            .and_then(|f| device.sensors.get(&f.metric).map(|s| (f, s)))
        else {
            out.unmapped += 1;
            continue;
        };
        let raw = match value {
            Value::Null => {
                out.nulls += 1;
                continue;
            }
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| format!("payload field `{name}` is not a usable number"))?,
            other => {
                return Err(format!(
                    "payload field `{name}` is {}, not a number",
                    json_type(other)
                ))
            }
        };
        let value = calibrate(raw, field, sensor);
        if !value.is_finite() {
            return Err(format!(
                "payload field `{name}` = {raw} gives a non-finite value ({value})"
            ));
        }
        out.readings.push(Reading {
            sensor_id: sensor.id,
            value,
            quality: quality(value, sensor),
        });
    }
    out.readings.sort_by_key(|r| r.sensor_id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device() -> DeviceSpec {
        let mut d = DeviceSpec::default();
        d.fields.insert(
            "t".into(),
            FieldMapping {
                metric: "temperature".into(),
                scale: 1.0,
                offset: 0.0,
            },
        );
        d.fields.insert(
            "temp_f".into(),
            FieldMapping {
                metric: "temperature_f".into(),
                scale: 0.555_555_555_555_555_6,
                offset: -17.777_777_777_777_78,
            },
        );
        d.fields.insert(
            "bat_mv".into(),
            FieldMapping {
                metric: "battery".into(),
                scale: 0.001,
                offset: 0.0,
            },
        );
        d.fields.insert(
            "co2".into(),
            FieldMapping {
                metric: "co2".into(),
                scale: 1.0,
                offset: 0.0,
            },
        );
        d.sensors.insert(
            "temperature".into(),
            SensorSpec {
                id: 1,
                scale: 1.0,
                offset: -0.3,
                min: Some(-40.0),
                max: Some(85.0),
            },
        );
        d.sensors.insert(
            "temperature_f".into(),
            SensorSpec {
                id: 3,
                scale: 1.0,
                offset: 0.0,
                min: None,
                max: None,
            },
        );
        d.sensors.insert(
            "battery".into(),
            SensorSpec {
                id: 2,
                scale: 1.0,
                offset: 0.0,
                min: Some(3.0),
                max: None,
            },
        );
        d
    }

    fn obj(v: Value) -> Vec<(String, Value)> {
        v.as_object().unwrap().clone().into_iter().collect()
    }

    #[test]
    fn values_are_computed_in_the_contract_order() {
        let d = device();
        let n = normalize(&obj(json!({"t": 21.5, "bat_mv": 3610, "temp_f": 70.7})), &d).unwrap();
        assert_eq!(n.readings.len(), 3);
        assert_eq!(n.readings[0].value, (21.5 * 1.0 + 0.0) * 1.0 + -0.3);
        assert_eq!(n.readings[1].value, (3610.0 * 0.001 + 0.0) * 1.0 + 0.0);
        let f = &d.fields["temp_f"];
        assert_eq!(n.readings[2].value, (70.7 * f.scale + f.offset) * 1.0 + 0.0);
        // A fused multiply-add would round once, not twice, and differ here.
        assert_ne!(n.readings[2].value, 70.7f64.mul_add(f.scale, f.offset));
    }

    #[test]
    fn bounds_are_inclusive_and_absent_bounds_are_open() {
        let s = SensorSpec {
            id: 1,
            scale: 1.0,
            offset: 0.0,
            min: Some(0.0),
            max: Some(100.0),
        };
        assert_eq!(quality(0.0, &s), Quality::Good);
        assert_eq!(quality(100.0, &s), Quality::Good);
        assert_eq!(quality(-0.000_001, &s), Quality::OutOfRange);
        assert_eq!(quality(100.000_001, &s), Quality::OutOfRange);
        let open = SensorSpec {
            min: None,
            max: None,
            ..s
        };
        assert_eq!(quality(-1e300, &open), Quality::Good);
    }

    #[test]
    fn nulls_are_skipped_and_unmapped_fields_counted() {
        let n = normalize(&obj(json!({"t": null, "x": "text", "co2": 400})), &device()).unwrap();
        assert!(n.readings.is_empty());
        assert_eq!(n.nulls, 1);
        assert_eq!(n.unmapped, 2, "x is not mapped; co2 has no sensor");
    }

    #[test]
    fn a_non_number_in_a_mapped_field_invalidates_the_whole_message() {
        for bad in [json!("21.5"), json!(true), json!([1]), json!({"v": 1})] {
            let err = normalize(&obj(json!({"bat_mv": 3600, "t": bad})), &device()).unwrap_err();
            assert!(err.contains("`t`"), "{err}");
        }
    }

    #[test]
    fn a_non_finite_result_is_invalid() {
        let err = normalize(&obj(json!({"t": 1e308, "bat_mv": 1})), &{
            let mut d = device();
            d.sensors.get_mut("temperature").unwrap().scale = 10.0;
            d
        })
        .unwrap_err();
        assert!(err.contains("non-finite"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_kept_with_their_quality() {
        let n = normalize(&obj(json!({"t": 120, "bat_mv": 2000})), &device()).unwrap();
        assert!(n.readings.iter().all(|r| r.quality == Quality::OutOfRange));
    }
}
