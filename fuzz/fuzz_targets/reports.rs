//! The report batch and beacon decoders: never panic on any body. Beacons are signed
//! with the key first, so the fuzzer reaches the JSON behind the signature check.
#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [3; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = patchrelay::reports::parse_batch(data, patchrelay::reports::MAX_BATCH) {
        assert!(batch.len() <= patchrelay::reports::MAX_BATCH);
    }
    let signature = patchrelay::reports::sign(&KEY, data);
    let _ = patchrelay::beacon::decode(
        &KEY,
        Some(&signature),
        data,
        std::time::Duration::from_secs(300),
        true,
    );
});
