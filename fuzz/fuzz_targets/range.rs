//! The Range header parser: never panics, and a parsed range resolves within the length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len) % (1 << 40);
    if let Ok(Some(range)) = patchrelay::range::parse(header) {
        if let Ok((start, end)) = range.resolve(len) {
            assert!(
                start < end && end <= len,
                "{range:?} resolved to {start}..{end} of {len}"
            );
        }
    }
});
