//! Whatever a server sends, the client neither panics nor allocates what a length claims:
//! the bytes are a whole conversation from the server's side (greeting, option replies,
//! then replies to a read, a block status, a write and a flush).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rewind_nbd::fake::converse(data);
});
