//! The WireGuard UAPI `set` parser (`wg set` talks to it through a root-only socket).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::control::uapi::apply_set;
use meshd::dataplane::DeviceSpec;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    if let Ok(spec) = apply_set(&DeviceSpec::default(), &lines) {
        let _ = apply_set(&spec, &lines);
    }
});
