//! The tables, as diesel sees them (CONTRACT section 4 plus the project's own
//! columns). Kept by hand: `UtcTime` stands for `timestamptz` on PostgreSQL
//! and fixed-width TEXT on SQLite, which `diesel print-schema` cannot express.

diesel::table! {
    use diesel::sql_types::*;

    profiles (id) {
        id -> BigInt,
        name -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    profile_fields (id) {
        id -> BigInt,
        profile_id -> BigInt,
        field -> Text,
        metric -> Text,
        scale -> Double,
        offset_value -> Double,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    devices (id) {
        id -> BigInt,
        key -> Text,
        site -> Text,
        profile_id -> BigInt,
        last_seen_at -> Nullable<UtcTime>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    sensors (id) {
        id -> BigInt,
        device_id -> BigInt,
        metric -> Text,
        unit -> Text,
        scale -> Double,
        offset_value -> Double,
        min_value -> Nullable<Double>,
        max_value -> Nullable<Double>,
        last_good_at -> Nullable<UtcTime>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    alarms (id) {
        id -> BigInt,
        sensor_id -> BigInt,
        name -> Text,
        condition -> Text,
        threshold -> Double,
        active -> Bool,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    alerts (id) {
        id -> BigInt,
        alarm_id -> BigInt,
        opened_at -> UtcTime,
        open_value -> Double,
        closed_at -> Nullable<UtcTime>,
        close_value -> Nullable<Double>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    readings (id) {
        id -> BigInt,
        sensor_id -> BigInt,
        ts -> UtcTime,
        value -> Double,
        quality -> Text,
        message_id -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    dead_letters (id) {
        id -> BigInt,
        message_id -> Nullable<Text>,
        device_key -> Nullable<Text>,
        kind -> Text,
        error -> Text,
        raw -> Text,
        attempts -> Integer,
        created_at -> UtcTime,
        updated_at -> UtcTime,
        write_token -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    processed_messages (message_id) {
        message_id -> Text,
        processed_at -> UtcTime,
        write_token -> Text,
    }
}

diesel::joinable!(profile_fields -> profiles (profile_id));
diesel::joinable!(devices -> profiles (profile_id));
diesel::joinable!(sensors -> devices (device_id));
diesel::joinable!(alarms -> sensors (sensor_id));
diesel::joinable!(alerts -> alarms (alarm_id));
diesel::joinable!(readings -> sensors (sensor_id));

diesel::allow_tables_to_appear_in_same_query!(
    profiles,
    profile_fields,
    devices,
    sensors,
    alarms,
    alerts,
    readings,
    dead_letters,
    processed_messages,
    reference_version,
    feed_fences,
);

diesel::table! {
    use diesel::sql_types::*;

    reference_version (id) {
        id -> Integer,
        version -> BigInt,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::db::types::UtcTime;

    feed_fences (partition_key) {
        partition_key -> Text,
        token -> BigInt,
        owner -> Text,
        claimed_at -> UtcTime,
        resume_after -> BigInt,
        resume_stream -> BigInt,
    }
}
