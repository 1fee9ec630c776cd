//! Arbitrary bytes into the control-socket request parser: it must return a request
//! or an error, never panic, and a parsed request must survive a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::control::{parse_request, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let json = serde_json::to_vec(&req).expect("a parsed request serialises");
        let again: Request = parse_request(&json).expect("a serialised request parses");
        assert_eq!(again, req);
    }
});
