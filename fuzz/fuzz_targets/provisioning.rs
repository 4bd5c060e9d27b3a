//! Any text as a provisioning file: a value or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use normalizer::core::provisioning::Provisioning;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Provisioning::parse(text) {
        Ok(p) => {
            // A valid file stays valid and names only profiles it can resolve.
            p.validate().expect("parse validated it");
            let _ = p.profiles_needed_from_store();
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
