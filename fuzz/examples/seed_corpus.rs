//! Writes a seed corpus for `frame_decode`: one frame of every body and command
//! variant, plus a payload packing them all.
//!
//! Without seeds libFuzzer must discover the name alphabet and the postcard layout
//! byte by byte; with them it starts from real frames and mutates.
//!
//! Usage: `cargo run --example seed_corpus -- corpus/frame_decode` (from `fuzz/`).

use std::path::PathBuf;

use outpost::frame::{
    self, Body, CmdResult, Command, Envelope, Exec, HttpGet, HttpReply, Lane, Name, Status,
};

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/frame_decode".into()),
    );
    std::fs::create_dir_all(&dir).expect("create corpus directory");

    let frames: Vec<(&str, Vec<u8>)> = envelopes()
        .into_iter()
        .map(|(name, env)| (name, frame::encode(&env).expect("seed encodes")))
        .collect();
    for (name, bytes) in &frames {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
    let payload = frame::pack(frames.iter().map(|(_, b)| b.as_slice()));
    std::fs::write(dir.join("seed-packed"), payload).expect("write seed");
    println!("wrote {} seeds to {}", frames.len() + 1, dir.display());
}

fn envelopes() -> Vec<(&'static str, Envelope)> {
    let central = Name::new("central").unwrap();
    let ship = Name::new("ship1").unwrap();
    let env = |lane: &str, seq, ttl_s, body| Envelope {
        from: central.clone(),
        to: ship.clone(),
        lane: Lane::new(lane).unwrap(),
        seq,
        created_ms: 1_763_800_000_000,
        ttl_s,
        body,
    };
    let exec = Exec {
        argv: vec!["sh".into(), "-c".into(), "uptime".into()],
        env: vec![("LANG".into(), "C".into())],
        cwd: Some("/tmp".into()),
        stdin: b"input".to_vec(),
        timeout_ms: 60_000,
        rerun: true,
    };
    let result = CmdResult {
        seq: 7,
        status: Status::Ok,
        exit_code: Some(0),
        stdout: b"up 3 days\n".to_vec(),
        stderr: b"warning\n".to_vec(),
        truncated: false,
        started_ms: 1_763_800_000_200,
        duration_ms: 3,
        reason: String::new(),
        http: Some(HttpReply {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
        }),
    };
    let get = HttpGet {
        url: "http://127.0.0.1:8080/health".into(),
        timeout_ms: 5_000,
        max_body: 65_536,
    };
    vec![
        (
            "exec",
            env("ordered", 1, Some(300), Body::Command(Command::Exec(exec))),
        ),
        (
            "ping",
            env("control", 2, None, Body::Command(Command::Ping)),
        ),
        (
            "http-get",
            env("parallel.2", 3, None, Body::Command(Command::HttpGet(get))),
        ),
        ("result", env("ordered", 4, None, Body::Result(result))),
        ("ack", env("bulk", 0, None, Body::Ack { upto: 200 })),
        (
            "lost",
            env(
                "ordered",
                5,
                None,
                Body::Lost {
                    reason: "crc mismatch".into(),
                },
            ),
        ),
        (
            "discarded",
            env(
                "ordered",
                0,
                None,
                Body::Discarded {
                    seq: 9,
                    reason: "bad crc".into(),
                },
            ),
        ),
    ]
}
