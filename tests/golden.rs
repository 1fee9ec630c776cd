//! Golden bytes: the exact frames outpost stores in SQLite and sends over MQTT, one
//! row per variant (postcard's `tests/loopback.rs`). Each row is checked both ways:
//! the value encodes to the bytes, and the bytes decode to the value.
//!
//! The rows are a spec, not a snapshot: each one was read byte by byte against the
//! postcard wire format (`docs/WIRE.md`), and the spaces in the hex mark its fields.
//! Every struct has a row whose fields all differ, so swapping two fields breaks
//! a row. If a row changes, frames on disks and in flight no longer decode: append
//! variants and bump `FORMAT_VERSION` (or `COMPACT_VERSION`) instead.
//!
//! Pure: its own binary, because it needs neither mosquitto nor the agent.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

use outpost::frame::{
    self, Body, CmdResult, Command, Envelope, ErrorEntry, Exec, Facts, FileOffer, FileState,
    HttpGet, HttpReply, Lane, Name, SentStream, Status, Sync,
};

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn lane(s: &str) -> Lane {
    Lane::new(s).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex that may be spaced out into fields.
fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Fails with every mismatch at once, so a deliberate format change shows all the
/// rows it touches.
fn check(mismatches: Vec<String>) {
    assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n"));
}

/// 1_763_800_000_000 ms (2025-11-22), a realistic clock: a 6-byte varint.
const T: u64 = 1_763_800_000_000;

/// The envelope every body row travels in: central -> ship1, lane `ordered`,
/// seq 1, created at `T`, no ttl.
fn head(body: Body) -> Envelope {
    Envelope {
        from: name("central"),
        to: name("ship1"),
        lane: frame::default_lane(),
        seq: 1,
        created_ms: T,
        ttl_s: None,
        body,
    }
}

/// postcard of [`head`] without its body: str "central", str "ship1", str
/// "ordered", seq 1, created_ms `T` (80 cc b0 d5 aa 33: LEB128, low group first),
/// ttl_s None.
const HEAD: &str = "07 63656e7472616c  05 7368697031  07 6f726465726564  01  80ccb0d5aa33  00";

fn result(seq: u64, status: Status) -> Body {
    Body::Result(CmdResult::without_run(seq, status, "", 0))
}

fn file_status(state: FileState, reason: &str) -> Body {
    Body::FileStatus {
        id: "f1".into(),
        state,
        reason: reason.into(),
    }
}

/// Every variant of `Body`, `Command`, `Status` and `FileState`, as postcard of the
/// body alone. The first byte is always the `Body` discriminant (a varint; all
/// fit in one byte).
fn bodies() -> Vec<(&'static str, Body, &'static str)> {
    vec![
        (
            "command exec, argv only",
            Body::Command(Command::Exec(Exec {
                argv: vec!["uptime".into()],
                timeout_ms: 60_000,
                ..Exec::default()
            })),
            // Command 0, Exec 0, argv [str], env [], cwd None, stdin [], 60000 as a
            // varint (60 d4 03 with the high bits set on all but the last), false.
            "00 00  01 06 757074696d65  00  00  00  e0d403  00",
        ),
        (
            "command exec, every field",
            Body::Command(Command::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "date".into()],
                env: vec![("TZ".into(), "UTC".into())],
                cwd: Some("/tmp".into()),
                stdin: b"hi".to_vec(),
                timeout_ms: 300,
                rerun: true,
            })),
            concat!(
                "00 00  03 02 7368 02 2d63 04 64617465  01 02 545a 03 555443",
                "  01 04 2f746d70  02 6869  ac02  01",
            ),
        ),
        ("command ping", Body::Command(Command::Ping), "00 01"),
        (
            "command http-get",
            Body::Command(Command::HttpGet(HttpGet {
                url: "http://x/".into(),
                timeout_ms: 5_000,
                max_body: 65_536,
            })),
            "00 02  09 687474703a2f2f782f  8827  808004",
        ),
        // Result 1: seq, status, exit_code None, stdout [], stderr [], truncated false,
        // started_ms 0, duration_ms 0, reason "", http None.
        (
            "result ok, never ran",
            result(1, Status::Ok),
            "01  01  00  00  00  00  00  00  00  00  00",
        ),
        (
            "result failed",
            result(1, Status::Failed),
            "01  01  01  00  00  00  00  00  00  00  00",
        ),
        (
            "result timeout",
            result(1, Status::Timeout),
            "01  01  02  00  00  00  00  00  00  00  00",
        ),
        (
            "result expired",
            result(1, Status::Expired),
            "01  01  03  00  00  00  00  00  00  00  00",
        ),
        (
            "result rejected",
            result(1, Status::Rejected),
            "01  01  04  00  00  00  00  00  00  00  00",
        ),
        (
            "result interrupted",
            result(1, Status::Interrupted),
            "01  01  05  00  00  00  00  00  00  00  00",
        ),
        (
            "result cancelled",
            result(1, Status::Cancelled),
            "01  01  06  00  00  00  00  00  00  00  00",
        ),
        (
            "result of a run, every field but http",
            Body::Result(CmdResult {
                seq: 2,
                status: Status::Failed,
                exit_code: Some(-15),
                stdout: b"out".to_vec(),
                stderr: b"e".to_vec(),
                truncated: true,
                started_ms: 1_000,
                duration_ms: 20,
                reason: "killed".into(),
                http: None,
            }),
            // exit_code Some(-15) is 01 then zigzag(-15) = 29 = 1d; 1000 is e8 07.
            "01  02  01  01 1d  03 6f7574  01 65  01  e807  14  06 6b696c6c6564  00",
        ),
        (
            "result of an http-get",
            Body::Result(CmdResult {
                seq: 3,
                status: Status::Ok,
                exit_code: None,
                stdout: b"ok".to_vec(),
                stderr: Vec::new(),
                truncated: false,
                started_ms: 7,
                duration_ms: 9,
                reason: String::new(),
                http: Some(HttpReply {
                    status: 200,
                    headers: vec![("server".into(), "x".into())],
                }),
            }),
            // http Some: status 200 as a u16 varint (c8 01), then one header.
            "01  03  00  00  02 6f6b  00  00  07  09  00  01 c801 01 06 736572766572 01 78",
        ),
        ("ack", Body::Ack { upto: 200 }, "02 c801"),
        (
            "lost",
            Body::Lost {
                reason: "crc".into(),
            },
            "03  03 637263",
        ),
        (
            "discarded",
            Body::Discarded {
                seq: 7,
                reason: "crc".into(),
            },
            "04  07  03 637263",
        ),
        (
            "file offer, no expiry",
            Body::FileOffer(FileOffer {
                id: "f1".into(),
                size: 300,
                sha256: vec![0xab; 32],
                chunk_size: 65_536,
                expires_ms: None,
            }),
            // The hash is a byte vector, so it carries its length (32 = 20).
            concat!(
                "05  02 6631  ac02",
                "  20 abababababababababababababababababababababababababababababababab",
                "  808004  00",
            ),
        ),
        (
            "file offer, expiring",
            Body::FileOffer(FileOffer {
                id: "f1".into(),
                size: 0,
                sha256: vec![0xab; 32],
                chunk_size: 1,
                expires_ms: Some(T),
            }),
            concat!(
                "05  02 6631  00",
                "  20 abababababababababababababababababababababababababababababababab",
                "  01  01 80ccb0d5aa33",
            ),
        ),
        (
            "file chunk",
            Body::FileChunk {
                id: "f1".into(),
                index: 2,
                data: b"abc".to_vec(),
            },
            "06  02 6631  02  03 616263",
        ),
        (
            "file status have",
            file_status(FileState::Have, ""),
            "07  02 6631  00  00",
        ),
        (
            "file status want",
            file_status(FileState::Want, ""),
            "07  02 6631  01  00",
        ),
        (
            "file status done",
            file_status(FileState::Done, ""),
            "07  02 6631  02  00",
        ),
        (
            "file status failed",
            file_status(FileState::Failed, "disk full"),
            "07  02 6631  03  09 6469736b2066756c6c",
        ),
        (
            "file request",
            Body::FileRequest {
                path: "/etc/hosts".into(),
            },
            "08  0a 2f6574632f686f737473",
        ),
        ("started", Body::Started { seq: 5 }, "09 05"),
        // The longest varint: 64 bits in ten groups of seven.
        (
            "hello",
            Body::Hello { nonce: u64::MAX },
            "0a ffffffffffffffffff01",
        ),
        (
            "sync, empty",
            Body::Sync(Sync::default()),
            "0b  00  00  00  00",
        ),
        (
            "sync, every field",
            Body::Sync(Sync {
                want: true,
                echo: 9,
                received: vec![(frame::default_lane(), 3), (lane("bulk"), 300)],
                sent: vec![SentStream {
                    lane: lane("control"),
                    acked: 1,
                    last: 4,
                    doubt: 2,
                }],
            }),
            // want, echo, received [(ordered, 3), (bulk, 300)], sent [(control, 1, 4, 2)].
            concat!(
                "0b  01  09  02 07 6f726465726564 03 04 62756c6b ac02",
                "  01 07 636f6e74726f6c 01 04 02",
            ),
        ),
        ("nack", Body::Nack { upto: 3 }, "0c 03"),
        (
            "withdrawn",
            Body::Withdrawn {
                reason: "ttl".into(),
            },
            "0d  03 74746c",
        ),
        (
            "cancel",
            Body::Cancel {
                lane: Lane::new("ordered").unwrap(),
                seq: 4,
                check: 0x0102_0304,
                stop: true,
                reason: "op".into(),
            },
            "0e  07 6f726465726564 04 84868808 01 02 6f70",
        ),
        (
            "facts",
            Body::Facts(Facts {
                full: false,
                set: vec![("os".into(), "openwrt".into())],
                unset: vec!["ip".into()],
            }),
            "0f  00 01 02 6f73 07 6f70656e777274 01 02 6970",
        ),
        (
            "errors",
            Body::Errors(vec![ErrorEntry {
                kind: "disk".into(),
                text: "full".into(),
                count: 3,
                first_ms: 1,
                last_ms: 2,
            }]),
            "10  01 04 6469736b 04 66756c6c 03 01 02",
        ),
    ]
}

/// The `Body` discriminant postcard writes first. No wildcard: a new variant does
/// not compile until it is given its number here and a row above.
fn body_index(body: &Body) -> u8 {
    match body {
        // The nested enums are held to the same: every variant named, no wildcard.
        Body::Command(Command::Exec(_) | Command::Ping | Command::HttpGet(_)) => 0,
        Body::Result(CmdResult {
            status:
                Status::Ok
                | Status::Failed
                | Status::Timeout
                | Status::Expired
                | Status::Rejected
                | Status::Interrupted
                | Status::Cancelled,
            ..
        }) => 1,
        Body::Ack { .. } => 2,
        Body::Lost { .. } => 3,
        Body::Discarded { .. } => 4,
        Body::FileOffer(_) => 5,
        Body::FileChunk { .. } => 6,
        Body::FileStatus {
            state: FileState::Have | FileState::Want | FileState::Done | FileState::Failed,
            ..
        } => 7,
        Body::FileRequest { .. } => 8,
        Body::Started { .. } => 9,
        Body::Hello { .. } => 10,
        Body::Sync(_) => 11,
        Body::Nack { .. } => 12,
        Body::Withdrawn { .. } => 13,
        Body::Cancel { .. } => 14,
        Body::Facts(_) => 15,
        Body::Errors(_) => 16,
    }
}

#[test]
fn every_body_variant_encodes_to_its_golden_bytes_in_a_frame() {
    let mut bad = Vec::new();
    for (what, body, golden) in bodies() {
        let env = head(body);
        // A frame is [version][postcard(envelope)][crc32 LE]; the rows below pin the
        // CRC of whole frames.
        let mut expected = vec![frame::FORMAT_VERSION];
        expected.extend(unhex(HEAD));
        expected.extend(unhex(golden));
        expected.extend(crc32fast::hash(&expected).to_le_bytes());
        let got = frame::encode(&env).unwrap();
        if got != expected {
            let body = &got[1 + unhex(HEAD).len()..got.len() - 4];
            bad.push(format!("{what}: body is {}", hex(body)));
            continue;
        }
        match frame::decode(&expected) {
            Ok(back) if back == env => {}
            other => bad.push(format!("{what}: decodes to {other:?}")),
        }
    }
    check(bad);
}

#[test]
fn the_table_covers_every_variant_with_its_discriminant() {
    let rows = bodies();
    for (what, body, golden) in &rows {
        assert_eq!(unhex(golden)[0], body_index(body), "{what}");
    }
    let mut bodies: Vec<u8> = rows.iter().map(|(_, b, _)| body_index(b)).collect();
    bodies.dedup();
    assert_eq!(bodies, (0..17).collect::<Vec<u8>>());
    let commands: Vec<&str> = rows
        .iter()
        .filter_map(|(_, b, _)| match b {
            Body::Command(c) => Some(c.method().as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(commands, ["exec", "exec", "ping", "http-get"]);
    let statuses: Vec<Status> = rows
        .iter()
        .filter_map(|(_, b, _)| match b {
            Body::Result(r) if r.started_ms == 0 => Some(r.status),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        [
            Status::Ok,
            Status::Failed,
            Status::Timeout,
            Status::Expired,
            Status::Rejected,
            Status::Interrupted,
            Status::Cancelled,
        ]
    );
    let states: Vec<FileState> = rows
        .iter()
        .filter_map(|(_, b, _)| match b {
            Body::FileStatus { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            FileState::Have,
            FileState::Want,
            FileState::Done,
            FileState::Failed,
        ]
    );
}

fn uptime() -> Envelope {
    head(Body::Command(Command::Exec(Exec {
        argv: vec!["uptime".into()],
        timeout_ms: 60_000,
        ..Exec::default()
    })))
}

fn uptime_result() -> Envelope {
    Envelope {
        from: name("ship1"),
        to: name("central"),
        lane: frame::default_lane(),
        seq: 1,
        created_ms: T + 250,
        ttl_s: None,
        body: Body::Result(CmdResult {
            seq: 1,
            status: Status::Ok,
            exit_code: Some(0),
            stdout: b" 10:02:01 up 3 days,  4:05,  0 users,  load average: 0.00, 0.01, 0.05\n"
                .to_vec(),
            stderr: Vec::new(),
            truncated: false,
            started_ms: T + 200,
            duration_ms: 3,
            reason: String::new(),
            http: None,
        }),
    }
}

/// Whole frames, CRC included.
fn frames() -> Vec<(&'static str, Envelope, &'static str)> {
    vec![
        (
            "exec uptime",
            uptime(),
            concat!(
                "01  07 63656e7472616c 05 7368697031 07 6f726465726564 01 80ccb0d5aa33 00",
                "  00 00 01 06 757074696d65 00 00 00 e0d403 00  248ecb5c",
            ),
        ),
        (
            "its result",
            uptime_result(),
            // stdout is 70 bytes (46); the CRC is 73c62d99 as a little-endian u32.
            concat!(
                "01  05 7368697031 07 63656e7472616c 07 6f726465726564 01 facdb0d5aa33 00",
                "  01 01 00 01 00  46 2031303a30323a3031207570203320646179732c2020343a30352c20",
                "2030207573657273 2c20206c6f616420617665726167653a20302e30302c20302e30312c20",
                "302e30350a  00 00 c8cdb0d5aa33 03 00 00  992dc673",
            ),
        ),
        (
            "an ack",
            Envelope {
                from: name("ship1"),
                to: name("central"),
                lane: frame::default_lane(),
                seq: 0,
                created_ms: T + 300,
                ttl_s: None,
                body: Body::Ack { upto: 200 },
            },
            concat!(
                "01  05 7368697031 07 63656e7472616c 07 6f726465726564 00 acceb0d5aa33 00",
                "  02 c801  abab8e5d",
            ),
        ),
        (
            "a chunk with a ttl on another lane",
            Envelope {
                from: name("a"),
                to: name("b"),
                lane: lane("bulk"),
                seq: 300,
                created_ms: 5,
                ttl_s: Some(3_600),
                body: Body::FileChunk {
                    id: "f".into(),
                    index: 0,
                    data: vec![0xff],
                },
            },
            // seq 300 (ac 02), created 5, ttl Some(3600) (01 90 1c).
            "01  01 61 01 62 04 62756c6b ac02 05 01 901c  06 01 66 00 01 ff  314f3472",
        ),
    ]
}

#[test]
fn frames_encode_to_golden_bytes_with_version_and_crc() {
    let mut bad = Vec::new();
    for (what, env, golden) in frames() {
        let got = frame::encode(&env).unwrap();
        if got != unhex(golden) {
            bad.push(format!("{what}: {}", hex(&got)));
            continue;
        }
        match frame::decode(&unhex(golden)) {
            Ok(back) if back == env => {}
            other => bad.push(format!("{what}: decodes to {other:?}")),
        }
    }
    check(bad);
}

#[test]
fn packed_frames_carry_varint_lengths() {
    let ack = frame::encode(&frames()[2].1).unwrap();
    let big = [0u8; 200];
    let packed = frame::pack([ack.as_slice(), &big[..]]);
    // 38 bytes of ack (0x26), then 200 as the varint c8 01.
    assert_eq!(hex(&packed[..1]), "26");
    assert_eq!(hex(&packed[1 + ack.len()..1 + ack.len() + 2]), "c801");
    assert_eq!(packed.len(), 1 + 38 + 2 + 200);
    let back: Vec<&[u8]> = frame::unpack(&packed).map(Result::unwrap).collect();
    assert_eq!(back, [ack.as_slice(), &big[..]]);
}

/// Compact wire payloads: (what, frames, sender's clock when sent, golden bytes).
fn compacts() -> Vec<(&'static str, Vec<Envelope>, u64, &'static str)> {
    let mut ack = uptime_result();
    ack.lane = lane("control");
    ack.seq = 0;
    ack.created_ms = T;
    ack.body = Body::Ack { upto: 3 };
    let mut started = uptime_result();
    started.seq = 5;
    started.created_ms = T + 10;
    started.body = Body::Started { seq: 2 };
    let mut withdrawn = uptime_result();
    withdrawn.seq = 4;
    withdrawn.created_ms = T - 5;
    withdrawn.ttl_s = Some(60);
    withdrawn.body = Body::Withdrawn {
        reason: "ttl".into(),
    };
    vec![
        (
            "exec uptime sent 250 ms after it was made",
            vec![uptime()],
            T + 250,
            // Lane Default (01), seq +1 (zigzag 02), age 250 (zigzag 500 = f4 03), no
            // ttl, then the body as in a frame. No names, no CRC.
            "01  01 02 f403 00  00 00 01 06 757074696d65 00 00 00 e0d403 00",
        ),
        (
            "a named lane, the default lane, the same lane; seq and time going back",
            vec![ack, started, withdrawn],
            T + 250,
            // Named(control) with seq +0 and age 250; Default with seq +5 (0a) and
            // +10 ms (14); Same with seq -1 (01), -15 ms (1d) and ttl Some(60).
            concat!(
                "01  02 07 636f6e74726f6c 00 f403 00 02 03",
                "  01 0a 14 00 09 02  00 01 1d 01 3c 0d 03 74746c",
            ),
        ),
    ]
}

#[test]
fn compact_payloads_encode_to_golden_bytes_and_expand_to_the_frames() {
    let mut bad = Vec::new();
    for (what, envs, now, golden) in compacts() {
        let (from, to) = (&envs[0].from, &envs[0].to);
        let encoded: Vec<Vec<u8>> = envs.iter().map(|e| frame::encode(e).unwrap()).collect();
        let packed = frame::pack(encoded.iter().map(Vec::as_slice));
        let got = frame::compact(&packed, from, to, now).unwrap();
        if got != unhex(golden) {
            bad.push(format!("{what}: {}", hex(&got)));
            continue;
        }
        // Received at the same instant on an equal clock: the very same frames.
        let (back, err) = frame::expand(&unhex(golden), from, to, now);
        if back != packed || err.is_some() {
            bad.push(format!("{what}: expands to {} ({err:?})", hex(&back)));
        }
    }
    check(bad);
}

/// Deflated payloads (`compress::restore`, `compress::shrink`): (what, the compact
/// payload inside, golden bytes as sent).
fn deflateds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let one = frame::pack([frame::encode(&uptime()).unwrap().as_slice()]);
    let one = frame::compact(&one, &name("central"), &name("ship1"), T + 250).unwrap();
    let mut results = Vec::new();
    for i in 0..4u64 {
        let mut r = uptime_result();
        r.seq = i + 1;
        r.created_ms = T + 250 + i * 1000;
        if let Body::Result(res) = &mut r.body {
            res.seq = i + 1;
            res.started_ms = T + 200 + i * 1000;
        }
        results.push(frame::encode(&r).unwrap());
    }
    let four = frame::pack(results.iter().map(Vec::as_slice));
    let four = frame::compact(&four, &name("ship1"), &name("central"), T + 4000).unwrap();
    vec![
        (
            "exec uptime in one stored DEFLATE block, as any encoder may write it",
            one,
            // DEFLATED, then RFC 1951: BFINAL 1, BTYPE 00 (stored) in the first
            // byte, LEN 23 and its complement as u16 LE, the 23 compact bytes.
            "02  01 1700 e8ff  01 01 02 f403 00 00 00 01 06 757074696d65 00 00 00 e0d403 00",
        ),
        (
            "four uptime results, as shrink sends them",
            four,
            // 369 compact bytes in 130: DEFLATED, then one final block with
            // dynamic Huffman codes (BTYPE 10) and back-references to the first
            // result's text.
            concat!(
                "02  ",
                "adcc310ac2401484e1791b2b1baf300708f2d698e61dc07b2c64b111948408761ec33358",
                "e518160a36292dbd8726a449bfcd3f30c527e29e06110876f46aba31f56c4f2c58854b93",
                "935bd3f23fcab689f5701c8ea16238c73aeca351d7aaf9503fb65c028f57d7df8b0c807b",
                "af202ea5ddf5333b4b69df3e337b91d2be7e27fb07",
            ),
        ),
    ]
}

#[test]
fn deflated_payloads_restore_to_their_compact_form_and_shrink_makes_them() {
    use outpost::compress;
    let mut bad = Vec::new();
    for (what, compact, golden) in deflateds() {
        match compress::restore(&unhex(golden)) {
            Ok(back) if *back == compact[..] => {}
            other => bad.push(format!("{what}: restores to {other:?}")),
        }
        // Stored blocks are never what shrink writes; its own output is pinned too
        // (a new miniz_oxide may deflate differently: then the row takes the new
        // bytes, and the old ones must still restore).
        if golden.starts_with("02  01 ") {
            continue;
        }
        let sent = compress::shrink(compact.clone());
        if sent != unhex(golden) {
            bad.push(format!(
                "{what}: shrinks to {} (from {} bytes)",
                hex(&sent),
                compact.len()
            ));
        }
    }
    check(bad);
}
