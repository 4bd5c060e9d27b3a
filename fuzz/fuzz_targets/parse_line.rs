//! Any bytes as an input stream: the line reader and the message parser end
//! every line as a message, a rejection or a blank, never a panic or a hang;
//! a message's payload then normalizes to readings or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use normalizer::core::message::{parse_line, Parsed};
use normalizer::core::normalize::{normalize, DeviceSpec, FieldMapping, SensorSpec};
use normalizer::input::LineReader;

fuzz_target!(|data: &[u8]| {
    let mut device = DeviceSpec::default();
    for (i, field) in ["t", "h", "bat_mv", "x"].iter().enumerate() {
        let metric = format!("m{i}");
        device.fields.insert(field.to_string(), FieldMapping { metric: metric.clone(), scale: 0.5, offset: -3.0 });
        device.sensors.insert(metric, SensorSpec { id: i as i64, scale: 1.5, offset: 1.0, min: Some(-10.0), max: Some(1e6) });
    }
    let mut reader = LineReader::new(data);
    let mut lines = 0;
    while let Some(line) = reader.next_line().expect("reading from memory cannot fail") {
        lines += 1;
        match parse_line(&line.bytes, line.oversize) {
            Parsed::Blank => {}
            Parsed::Rejected(r) => assert!(!r.error.is_empty()),
            Parsed::Message(m) => {
                assert!(normalizer::core::message::is_valid_key(&m.id));
                if let Ok(n) = normalize(&m.payload, &device) {
                    assert!(n.readings.iter().all(|r| r.value.is_finite()));
                }
            }
        }
    }
    assert!(lines <= data.iter().filter(|&&b| b == b'\n').count() + 1);
});
