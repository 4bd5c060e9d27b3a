//! Loading a provisioning file: one transaction of idempotent upserts.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::upsert::excluded;
use serde::Serialize;

use crate::core::provisioning::{Alarm, Device, Provisioning, Sensor};
use crate::db::schema::{alarms, devices, profile_fields, profiles, sensors};
use crate::db::{dispatch, AnyConnection, Database, Failure};

/// What a load upserted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Loaded {
    /// Profiles written.
    pub profiles: usize,
    /// Devices written.
    pub devices: usize,
    /// Sensors written.
    pub sensors: usize,
    /// Alarms written.
    pub alarms: usize,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "provisioned {} profiles, {} devices, {} sensors, {} alarms",
            self.profiles, self.devices, self.sensors, self.alarms
        )
    }
}

/// Why a provisioning file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The file names a profile that is neither in it nor stored; nothing
    /// was written. The text names the device.
    #[error("{0}")]
    UnknownProfile(String),
    /// The database did not take it.
    #[error(transparent)]
    Database(#[from] Failure),
}

/// Loads `file`: checks that every profile a device names exists, then
/// upserts profiles, devices, sensors and alarms by their keys in one
/// transaction; deletes nothing that the file does not name. (Profiles are
/// never deleted, so one seen stored by the check is still there for the
/// load.)
pub fn provision(db: &Database, file: &Provisioning) -> Result<Loaded, ProvisionError> {
    if let Some(problem) = db.transaction(|conn| unknown_profile(conn, file))? {
        return Err(ProvisionError::UnknownProfile(problem));
    }
    Ok(db.transaction(|conn| load(conn, file))?)
}

/// The first device whose profile is neither in the file nor stored, named.
fn unknown_profile(conn: &mut AnyConnection, file: &Provisioning) -> QueryResult<Option<String>> {
    for name in file.profiles_needed_from_store() {
        if stored_profile(conn, name)?.is_none() {
            let (i, device) = file
                .devices
                .iter()
                .enumerate()
                .find(|(_, d)| d.profile == name)
                .expect("a needed profile is named by a device");
            return Ok(Some(format!(
                "devices[{i}] ({:?}): profile {name:?} is neither in the file nor already stored",
                device.key
            )));
        }
    }
    Ok(None)
}

/// The upserts, in one transaction, after [`unknown_profile`] found none.
fn load(conn: &mut AnyConnection, file: &Provisioning) -> QueryResult<Loaded> {
    let mut loaded = Loaded::default();
    let mut profile_ids: HashMap<&str, i64> = HashMap::new();
    for name in file.profiles_needed_from_store() {
        let id = stored_profile(conn, name)?.ok_or(diesel::result::Error::NotFound)?;
        profile_ids.insert(name, id);
    }
    for (name, profile) in &file.profiles {
        let id = upsert_profile(conn, name)?;
        replace_fields(conn, id, profile)?;
        profile_ids.insert(name, id);
        loaded.profiles += 1;
    }
    for device in &file.devices {
        let device_id = upsert_device(conn, device, profile_ids[device.profile.as_str()])?;
        loaded.devices += 1;
        for sensor in &device.sensors {
            let sensor_id = upsert_sensor(conn, device_id, sensor)?;
            loaded.sensors += 1;
            for alarm in &sensor.alarms {
                upsert_alarm(conn, sensor_id, alarm)?;
                loaded.alarms += 1;
            }
        }
    }
    super::reference::bump(conn)?;
    Ok(loaded)
}

fn upsert_device(conn: &mut AnyConnection, device: &Device, profile_id: i64) -> QueryResult<i64> {
    use devices::dsl as d;
    let row = (
        d::key.eq(&device.key),
        d::site.eq(&device.site),
        d::profile_id.eq(profile_id),
    );
    dispatch!(conn, c => diesel::insert_into(d::devices)
        .values(row)
        .on_conflict(d::key)
        .do_update()
        .set((d::site.eq(excluded(d::site)), d::profile_id.eq(excluded(d::profile_id))))
        .returning(d::id)
        .get_result(c))
}

fn upsert_sensor(conn: &mut AnyConnection, device_id: i64, sensor: &Sensor) -> QueryResult<i64> {
    use sensors::dsl as s;
    let row = (
        s::device_id.eq(device_id),
        s::metric.eq(&sensor.metric),
        s::unit.eq(&sensor.unit),
        s::scale.eq(sensor.scale),
        s::offset_value.eq(sensor.offset),
        s::min_value.eq(sensor.min),
        s::max_value.eq(sensor.max),
    );
    dispatch!(conn, c => diesel::insert_into(s::sensors)
        .values(row)
        .on_conflict((s::device_id, s::metric))
        .do_update()
        .set((
            s::unit.eq(excluded(s::unit)),
            s::scale.eq(excluded(s::scale)),
            s::offset_value.eq(excluded(s::offset_value)),
            s::min_value.eq(excluded(s::min_value)),
            s::max_value.eq(excluded(s::max_value)),
        ))
        .returning(s::id)
        .get_result(c))
}

fn upsert_alarm(conn: &mut AnyConnection, sensor_id: i64, alarm: &Alarm) -> QueryResult<usize> {
    use alarms::dsl as a;
    let row = (
        a::sensor_id.eq(sensor_id),
        a::name.eq(&alarm.name),
        a::condition.eq(&alarm.condition),
        a::threshold.eq(alarm.threshold),
        a::active.eq(alarm.active),
    );
    dispatch!(conn, c => diesel::insert_into(a::alarms)
        .values(row)
        .on_conflict((a::sensor_id, a::name))
        .do_update()
        .set((
            a::condition.eq(excluded(a::condition)),
            a::threshold.eq(excluded(a::threshold)),
            a::active.eq(excluded(a::active)),
        ))
        .execute(c))
}

fn stored_profile(conn: &mut AnyConnection, name: &str) -> QueryResult<Option<i64>> {
    use profiles::dsl as p;
    dispatch!(conn, c => p::profiles.filter(p::name.eq(name)).select(p::id).first(c).optional())
}

fn upsert_profile(conn: &mut AnyConnection, name: &str) -> QueryResult<i64> {
    use profiles::dsl as p;
    dispatch!(conn, c => diesel::insert_into(p::profiles)
        .values(p::name.eq(name))
        .on_conflict(p::name)
        .do_update()
        .set(p::name.eq(excluded(p::name)))
        .returning(p::id)
        .get_result(c))
}

/// A profile's field map is its value: loading it again replaces the map.
fn replace_fields(
    conn: &mut AnyConnection,
    profile_id: i64,
    profile: &crate::core::provisioning::Profile,
) -> QueryResult<()> {
    use profile_fields::dsl as f;
    let rows: Vec<_> = profile
        .fields
        .iter()
        .map(|(field, m)| {
            (
                f::profile_id.eq(profile_id),
                f::field.eq(field),
                f::metric.eq(&m.metric),
                f::scale.eq(m.scale),
                f::offset_value.eq(m.offset),
            )
        })
        .collect();
    dispatch!(conn, c => {
        diesel::delete(f::profile_fields.filter(f::profile_id.eq(profile_id))).execute(c)?;
        for row in &rows {
            diesel::insert_into(f::profile_fields).values(*row).execute(c)?;
        }
        Ok(())
    })
}
