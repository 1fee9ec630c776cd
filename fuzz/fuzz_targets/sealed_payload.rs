//! Arbitrary bytes into the sealed-payload path a node runs on every MQTT message:
//! header parse, then open with a fixed pair of keys. Nothing may panic, and nothing
//! but a payload sealed with the right key may open.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::frame::Name;
use outpost::seal::{derive, hint, open, seal, Ends, Header};
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    let (sa, sb) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let (a, b) = (Name::new("central").unwrap(), Name::new("ship1").unwrap());
    let ends = Ends {
        sender: &a,
        receiver: &b,
        sender_public: &pa,
        receiver_public: &pb,
        sender_epoch: 0x11,
        receiver_epoch: 0x21,
    };
    let receiver_key = derive(&sb, &pa, &ends).unwrap();
    let sender_key = derive(&sa, &pb, &ends).unwrap();
    if let Ok((header, len)) = Header::parse(data, &b) {
        if let Ok(plain) = open(&receiver_key, data, &header, len) {
            // Only a real seal opens; re-sealing must give the same bytes back.
            assert_eq!(seal(&sender_key, &header, &plain), data);
        }
    }
    // Sealed input always opens to what went in.
    let header = Header {
        sender: a.clone(),
        receiver: b.clone(),
        sender_epoch: (data.len() % 2 == 0).then_some(0x11),
        receiver_hint: hint(0x21),
        counter: data.len() as u64,
    };
    let sealed = seal(&sender_key, &header, data);
    let (h, len) = Header::parse(&sealed, &b).unwrap();
    assert_eq!(open(&receiver_key, &sealed, &h, len).unwrap(), data);
});
