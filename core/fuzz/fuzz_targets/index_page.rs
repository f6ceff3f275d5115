//! Whatever an index page holds, decoding it for any page of an object of any size answers
//! with its entries or an error, never a panic or a hang.
//! The input's layout: `rewind_core::fuzzing::index_page`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = rewind_core::fuzzing::index_page(data);
});
