//! Whatever a manifest file holds (in a plain or an encrypted store), reading it answers
//! with a manifest or an error, never a panic or a hang.
//! The input's layout: `rewind_core::fuzzing::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::manifest(data);
});
