//! Feeds arbitrary bytes to the frame decoders.
//!
//! Checks that `frame::decode` and `frame::unpack` never panic, that `unpack` stops
//! after its first error, and that every envelope that decodes re-encodes to bytes
//! that decode to an equal envelope. The bytes need not be identical: postcard
//! accepts over-long varints that `encode` never writes.
//!
//! Random bytes almost never carry a valid CRC, which would leave the postcard
//! decoder unexercised, so each input is also tried with its last four bytes
//! replaced by the right CRC.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::frame;

fuzz_target!(|data: &[u8]| {
    roundtrip(data);
    roundtrip(&with_crc(data));
    unpack_all(data);
});

/// Decodes `bytes`; if that works, the envelope must survive encode and decode.
fn roundtrip(bytes: &[u8]) {
    let Ok(env) = frame::decode(bytes) else {
        return;
    };
    let again = frame::encode(&env).expect("a decoded envelope re-encodes");
    assert!(again.len() <= bytes.len(), "re-encoding grew the frame");
    assert_eq!(frame::decode(&again), Ok(env));
}

/// Splits `payload`, decodes every frame, and checks the split itself.
fn unpack_all(payload: &[u8]) {
    let mut frames = Vec::new();
    let mut items = frame::unpack(payload);
    for item in items.by_ref() {
        match item {
            Ok(f) => {
                roundtrip(f);
                roundtrip(&with_crc(f));
                frames.push(f);
            }
            Err(_) => break,
        }
    }
    assert!(
        items.next().is_none(),
        "unpack yielded items after an error"
    );

    let used: usize = frames.iter().map(|f| frame::packed_len(f.len())).sum();
    assert!(
        used <= payload.len(),
        "unpack yielded more bytes than it was given"
    );
    let repacked = frame::pack(frames.iter().copied());
    let again: Vec<&[u8]> = frame::unpack(&repacked)
        .collect::<Result<_, _>>()
        .expect("a packed payload unpacks");
    assert_eq!(again, frames);
}

/// `bytes` with the last four replaced by the CRC of the rest, as `encode` would write.
fn with_crc(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if let Some(n) = out.len().checked_sub(4) {
        let crc = crc32fast::hash(&out[..n]).to_le_bytes();
        out[n..].copy_from_slice(&crc);
    }
    out
}
