//! Loading a provisioning file: one transaction of idempotent upserts.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::upsert::excluded;
use serde::Serialize;

use crate::core::provisioning::Provisioning;
use crate::db::schema::{alarms, devices, profile_fields, profiles, sensors};
use crate::db::{dispatch, AnyConnection};

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

/// Upserts the file's profiles, devices, sensors and alarms by their keys;
/// deletes nothing that the file does not name. The inner `Err` names a
/// device whose profile is neither in the file nor stored; it is found before
/// anything is written.
pub fn load(conn: &mut AnyConnection, file: &Provisioning) -> QueryResult<Result<Loaded, String>> {
    let mut profile_ids: HashMap<&str, i64> = HashMap::new();
    for name in file.profiles_needed_from_store() {
        match stored_profile(conn, name)? {
            Some(id) => {
                profile_ids.insert(name, id);
            }
            None => {
                let (i, device) = file
                    .devices
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d.profile == name)
                    .expect("a needed profile is named by a device");
                return Ok(Err(format!(
                    "devices[{i}] ({:?}): profile {name:?} is neither in the file nor already stored",
                    device.key
                )));
            }
        }
    }
    let mut loaded = Loaded::default();
    for (name, profile) in &file.profiles {
        let id = upsert_profile(conn, name)?;
        replace_fields(conn, id, profile)?;
        profile_ids.insert(name, id);
        loaded.profiles += 1;
    }
    for device in &file.devices {
        use devices::dsl as d;
        let row = (
            d::key.eq(&device.key),
            d::site.eq(&device.site),
            d::profile_id.eq(profile_ids[device.profile.as_str()]),
        );
        let device_id: i64 = dispatch!(conn, c => diesel::insert_into(d::devices)
            .values(row)
            .on_conflict(d::key)
            .do_update()
            .set((d::site.eq(excluded(d::site)), d::profile_id.eq(excluded(d::profile_id))))
            .returning(d::id)
            .get_result(c))?;
        loaded.devices += 1;
        for sensor in &device.sensors {
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
            let sensor_id: i64 = dispatch!(conn, c => diesel::insert_into(s::sensors)
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
                .get_result(c))?;
            loaded.sensors += 1;
            for alarm in &sensor.alarms {
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
                    .execute(c))?;
                loaded.alarms += 1;
            }
        }
    }
    super::reference::bump(conn)?;
    Ok(Ok(loaded))
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
