//! The bundle id parser: never panics, and only the canonical form parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchrelay::bundle::BundleId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<BundleId>() {
        assert_eq!(id.to_string(), text, "a parsed id prints as it was written");
    }
});
