//! Synthetic but realistic input: a provisioning file and a message stream
//! for benchmarks and chaos runs (`normalizer gen`). Deterministic per seed.

use std::io::{self, Write};

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// What to generate. Defaults in `impl Default`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Devices provisioned (and a few more that are not).
    pub devices: usize,
    /// Messages written, bad lines and duplicates included.
    pub messages: usize,
    /// The random seed.
    pub seed: u64,
    /// Share of lines that are malformed, invalid or from unknown devices.
    pub bad_share: f64,
    /// Share of lines that repeat an earlier message (a gateway replaying).
    pub duplicate_share: f64,
    /// Share of messages that arrive late (older than the device's latest).
    pub late_share: f64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            devices: 100,
            messages: 10_000,
            seed: 1,
            bad_share: 0.005,
            duplicate_share: 0.005,
            late_share: 0.01,
        }
    }
}

const PROFILES: [&str; 3] = ["th-v1", "th-f", "lux-v2"];

/// The provisioning file for `options.devices` devices.
pub fn provisioning(options: &GenOptions) -> Value {
    let profiles = json!({
        "th-v1": {"fields": {"t": {"metric": "temperature"}, "h": {"metric": "humidity"},
                             "bat_mv": {"metric": "battery", "scale": 0.001}}},
        "th-f": {"fields": {"temp_f": {"metric": "temperature", "scale": 0.5555555555555556,
                                       "offset": -17.77777777777778},
                            "rh": {"metric": "humidity"}}},
        "lux-v2": {"fields": {"lux": {"metric": "light"}, "bat_mv": {"metric": "battery", "scale": 0.001}}}
    });
    let devices: Vec<Value> = (0..options.devices)
        .map(|d| {
            let sensors = match PROFILES[d % 3] {
                "lux-v2" => json!([
                    {"metric": "light", "unit": "lx", "min": 0, "max": 100000,
                     "alarms": [{"name": "too-bright", "condition": "gt", "threshold": 200}]},
                    {"metric": "battery", "unit": "V", "min": 2.0, "max": 3.7,
                     "alarms": [{"name": "battery-low", "condition": "lte", "threshold": 3.3}]}
                ]),
                _ => json!([
                    {"metric": "temperature", "unit": "°C", "offset": -0.2, "min": -40, "max": 85,
                     "alarms": [{"name": "too-warm", "condition": "gt", "threshold": 23.5}]},
                    {"metric": "humidity", "unit": "%", "min": 0, "max": 100,
                     "alarms": [{"name": "too-dry", "condition": "lt", "threshold": 38},
                                {"name": "too-humid", "condition": "gte", "threshold": 65}]},
                    {"metric": "battery", "unit": "V", "min": 2.0, "max": 3.7}
                ]),
            };
            json!({"key": device_key(d), "site": format!("site-{}/room-{}", d / 20, d % 20),
                   "profile": PROFILES[d % 3], "sensors": sensors})
        })
        .collect();
    json!({"profiles": profiles, "devices": devices})
}

fn device_key(d: usize) -> String {
    format!("dev-{d:05}")
}

/// Writes `options.messages` lines of JSON to `out`.
pub fn messages(options: &GenOptions, out: &mut impl Write) -> io::Result<()> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let start: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().expect("a valid instant");
    let devices = options.devices.max(1);
    let mut recent: Vec<String> = Vec::with_capacity(64);
    for i in 0..options.messages {
        let roll: f64 = rng.random();
        let line = if roll < options.bad_share {
            bad_line(&mut rng, i, options.seed)
        } else if roll < options.bad_share + options.duplicate_share && !recent.is_empty() {
            recent[rng.random_range(0..recent.len())].clone()
        } else {
            let d = i % devices;
            let step = (i / devices) as i64;
            let mut ts = start
                + Duration::seconds(step * 60)
                + Duration::milliseconds(rng.random_range(0..1000));
            if rng.random::<f64>() < options.late_share {
                ts -= Duration::minutes(rng.random_range(2..30));
            }
            let line = good_line(&mut rng, d, step, ts, &format!("g{}-{i:09}", options.seed));
            if recent.len() < 64 {
                recent.push(line.clone());
            } else {
                let slot = rng.random_range(0..recent.len());
                recent[slot] = line.clone();
            }
            line
        };
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn good_line(rng: &mut StdRng, d: usize, step: i64, ts: DateTime<Utc>, id: &str) -> String {
    // A daily cycle with noise, so alarms open and close.
    let phase = (step % 1440) as f64 / 1440.0 * std::f64::consts::TAU + d as f64;
    let day = phase.sin();
    let payload = match PROFILES[d % 3] {
        "th-v1" => json!({
            "t": round(21.0 + 3.0 * day + rng.random_range(-0.3..0.3)),
            "h": round(45.0 - 9.0 * day + rng.random_range(-1.0..1.0)),
            "bat_mv": 3600 - (step / 100) % 400,
            "rssi": -60 - (d % 30) as i64
        }),
        "th-f" => json!({
            "temp_f": round(70.0 + 5.0 * day + rng.random_range(-0.5..0.5)),
            "rh": if rng.random::<f64>() < 0.02 { Value::Null } else { json!(round(50.0 + 8.0 * day)) }
        }),
        _ => json!({
            "lux": round((400.0 * day).max(0.0)),
            "bat_mv": 3400 - (step / 50) % 300
        }),
    };
    json!({"id": id, "device": device_key(d),
           "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "payload": payload})
    .to_string()
}

fn bad_line(rng: &mut StdRng, i: usize, seed: u64) -> String {
    match rng.random_range(0..4) {
        0 => format!("{{\"id\":\"b{seed}-{i}\",\"device\":"),
        1 => json!({"id": format!("b{seed}-{i}"), "device": "dev-00000", "ts": "not a time", "payload": {}}).to_string(),
        2 => json!({"id": format!("b{seed}-{i}"), "device": format!("ghost-{}", i % 7),
                    "ts": "2026-11-01T00:00:00Z", "payload": {"t": 1}})
        .to_string(),
        _ => json!({"id": format!("b{seed}-{i}"), "device": "dev-00000",
                    "ts": "2026-11-01T00:00:00Z", "payload": {"t": "warm"}})
        .to_string(),
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::message::{parse_line, Parsed};
    use crate::core::provisioning::Provisioning;

    #[test]
    fn the_output_is_deterministic_valid_and_varied() {
        let options = GenOptions {
            devices: 12,
            messages: 3000,
            seed: 7,
            ..GenOptions::default()
        };
        let mut a = vec![];
        let mut b = vec![];
        messages(&options, &mut a).unwrap();
        messages(&options, &mut b).unwrap();
        assert_eq!(a, b);
        let (mut ok, mut bad) = (0, 0);
        for line in a.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            match parse_line(line, false) {
                Parsed::Message(_) => ok += 1,
                _ => bad += 1,
            }
        }
        assert_eq!(ok + bad, 3000);
        assert!(bad > 0 && bad < 60, "{bad}");
        let text = provisioning(&options).to_string();
        assert_eq!(Provisioning::parse(&text).unwrap().devices.len(), 12);
    }
}
