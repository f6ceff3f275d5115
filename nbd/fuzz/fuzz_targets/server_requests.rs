//! Whatever a client sends, the server neither panics, nor hangs, nor allocates what a
//! length claims: the bytes are everything a client says on one connection (flags,
//! options, then requests), to `serve_connection` serving a 256 KiB export with holes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Errors are expected; a panic, a hang or a leak is the finding.
    drop(rewind_nbd::fake::serve_script(data));
});
