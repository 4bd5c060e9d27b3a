//! Reference data (devices, profile mappings, sensors, active alarms) cached
//! in memory, so that batches do not read it again and again. A provisioning
//! load bumps `reference_version` in its transaction; each batch reads that
//! one number and reloads the cache when it moved, also when another process
//! provisioned.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use diesel::prelude::*;

use crate::core::alarm::Condition;
use crate::core::normalize::{DeviceSpec, FieldMapping, SensorSpec};
use crate::db::schema::{alarms, devices, profile_fields, reference_version, sensors};
use crate::db::{dispatch, AnyConnection};

/// An active alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmDef {
    /// Its row id.
    pub id: i64,
    /// Its condition.
    pub condition: Condition,
    /// Its threshold.
    pub threshold: f64,
}

/// One version of the reference data.
#[derive(Debug, Default)]
pub struct Reference {
    /// The `reference_version` it was read at.
    pub version: i64,
    /// Device key to (device id, profile id).
    pub devices: HashMap<String, (i64, i64)>,
    /// Device id to its mappings and sensors.
    pub specs: HashMap<i64, DeviceSpec>,
    /// Sensor id to its active alarms, by id.
    pub alarms: HashMap<i64, Vec<AlarmDef>>,
}

/// The cache, shared by the workers.
#[derive(Debug, Default)]
pub struct ReferenceCache {
    current: RwLock<Option<Arc<Reference>>>,
}

impl ReferenceCache {
    /// The reference data as of this transaction: the cached copy when the
    /// stored version has not moved and it knows every device in `devices`,
    /// else a fresh load. Read it after locking the devices, so that a
    /// provisioning that committed before the lock is seen.
    pub fn current(
        &self,
        conn: &mut AnyConnection,
        devices: &[i64],
    ) -> QueryResult<Arc<Reference>> {
        let version: i64 = dispatch!(conn, c => reference_version::table
            .select(reference_version::version)
            .first(c))?;
        if let Some(cached) = self.current.read().expect("cache lock").as_ref() {
            if cached.version == version && devices.iter().all(|d| cached.specs.contains_key(d)) {
                return Ok(cached.clone());
            }
        }
        let fresh = Arc::new(load(conn, version)?);
        log::debug!(
            "reference data reloaded at version {version}: {} devices",
            fresh.devices.len()
        );
        *self.current.write().expect("cache lock") = Some(fresh.clone());
        Ok(fresh)
    }
}

/// Marks the reference data changed; part of every provisioning load.
pub fn bump(conn: &mut AnyConnection) -> QueryResult<usize> {
    use reference_version::dsl as r;
    dispatch!(conn, c => diesel::update(r::reference_version.find(1)).set(r::version.eq(r::version + 1)).execute(c))
}

fn load(conn: &mut AnyConnection, version: i64) -> QueryResult<Reference> {
    let device_rows: Vec<(i64, String, i64)> = dispatch!(conn, c => devices::table
        .select((devices::id, devices::key, devices::profile_id))
        .load(c))?;
    let field_rows: Vec<(i64, String, String, f64, f64)> = dispatch!(conn, c => profile_fields::table
        .select((profile_fields::profile_id, profile_fields::field, profile_fields::metric, profile_fields::scale, profile_fields::offset_value))
        .load(c))?;
    type SensorRow = (i64, i64, String, f64, f64, Option<f64>, Option<f64>);
    let sensor_rows: Vec<SensorRow> = dispatch!(conn, c => sensors::table
        .select((sensors::id, sensors::device_id, sensors::metric, sensors::scale, sensors::offset_value, sensors::min_value, sensors::max_value))
        .load(c))?;
    let alarm_rows: Vec<(i64, i64, String, f64)> = dispatch!(conn, c => alarms::table
        .filter(alarms::active.eq(true))
        .select((alarms::id, alarms::sensor_id, alarms::condition, alarms::threshold))
        .order(alarms::id)
        .load(c))?;

    let mut fields: HashMap<i64, HashMap<String, FieldMapping>> = HashMap::new();
    for (profile, field, metric, scale, offset) in field_rows {
        map_field(
            fields.entry(profile).or_default(),
            field,
            (metric, scale, offset),
        );
    }
    let mut reference = Reference {
        version,
        ..Reference::default()
    };
    for (id, key, profile) in device_rows {
        let spec = DeviceSpec {
            fields: fields.get(&profile).cloned().unwrap_or_default(),
            ..DeviceSpec::default()
        };
        reference.specs.insert(id, spec);
        reference.devices.insert(key, (id, profile));
    }
    for (id, device, metric, scale, offset, min, max) in sensor_rows {
        if let Some(spec) = reference.specs.get_mut(&device) {
            add_sensor(spec, metric, (id, scale, offset, min, max));
        }
    }
    for (id, sensor, condition, threshold) in alarm_rows {
        match Condition::parse(&condition) {
            Some(condition) => reference.alarms.entry(sensor).or_default().push(AlarmDef {
                id,
                condition,
                threshold,
            }),
            None => log::warn!("alarm {id} has an unknown condition {condition:?}; skipped"),
        }
    }
    Ok(reference)
}

/// A profile field's row into its mapping: (metric, scale, offset).
pub(super) fn map_field(
    fields: &mut HashMap<String, FieldMapping>,
    field: String,
    (metric, scale, offset): (String, f64, f64),
) {
    fields.insert(
        field,
        FieldMapping {
            metric,
            scale,
            offset,
        },
    );
}

/// A sensor's row into the device's spec: (id, scale, offset, min, max).
pub(super) fn add_sensor(
    spec: &mut DeviceSpec,
    metric: String,
    (id, scale, offset, min, max): (i64, f64, f64, Option<f64>, Option<f64>),
) {
    spec.sensors.insert(
        metric,
        SensorSpec {
            id,
            scale,
            offset,
            min,
            max,
        },
    );
}
