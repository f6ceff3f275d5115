//! Whatever `config.ron` holds, loading it answers with a configuration or an error, never a
//! panic or a hang; a configuration that loads is saved and loads back the same.
//! The input's layout: `rewind_core::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::config(data);
});
