//! Whatever `rewind-store.json` holds, reading it and opening the store answers with a
//! store or an error, never a panic or a hang.
//! The input's layout: `rewind_core::fuzzing::store_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::store_header(data);
});
