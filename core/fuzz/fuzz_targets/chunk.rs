//! Whatever a chunk file holds, decoding it (whole, in part, as an index page, or only its
//! header) answers with its content or an error, never a panic or a hang.
//! The input's layout: `rewind_core::fuzzing::chunk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::chunk(data);
});
