//! Whatever domain XML a checkpoint holds (in its manifest, or in a save image's head),
//! reading and rewriting it as a restore does answers with a result or an error, never a
//! panic or a hang; a rewritten document is still XML.
//! The input's layout: `rewind_core::fuzzing::domain_xml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::domain_xml(data);
});
