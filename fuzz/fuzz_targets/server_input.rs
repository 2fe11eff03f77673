//! Arbitrary client bytes through option negotiation and request parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinbd_protocol::fuzzing::server_input(data);
});
