//! Hostile input against a running node: forged, replayed and unauthorised payloads,
//! what the broker can see, nonce safety across crashes, key file permissions.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use x25519_dalek::{PublicKey, StaticSecret};

use outpost::frame::{self, Body, Command as Cmd, Envelope, Exec, Name};
use outpost::seal::{self, Header};

use crate::agent::{introduce, outpost, Agent};
use crate::support::broker::Broker;
use crate::support::mqtt::{assert_no_nonce_reused, publish, Capture};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// A payload (in wire form) asking ship1 to create `marker`, as if from `from`.
fn touch_frame(from: &str, seq: u64, marker: &Path) -> Vec<u8> {
    let env = Envelope {
        from: name(from),
        to: name("ship1"),
        lane: frame::default_lane(),
        seq,
        created_ms: outpost::agent::now_ms(),
        ttl_s: None,
        body: Body::Command(Cmd::Exec(Exec {
            argv: vec!["touch".into(), marker.to_str().unwrap().into()],
            timeout_ms: 10_000,
            ..Exec::default()
        })),
    };
    let packed = frame::pack([frame::encode(&env).unwrap().as_slice()]);
    frame::compact(
        &packed,
        &name(from),
        &name("ship1"),
        outpost::agent::now_ms(),
    )
    .unwrap()
}

/// Seals `plain` as `sender` -> ship1 with a key pair of our own making, for
/// ship1's real store epoch (so that only the key is wrong).
fn forge(
    sender: &str,
    secret: &StaticSecret,
    ship: (&PublicKey, u64),
    plain: &[u8],
    counter: u64,
) -> Vec<u8> {
    let (ship_public, ship_epoch) = ship;
    let ours = PublicKey::from(secret);
    let sender_epoch = 0x0bad_0bad_0bad_0bad;
    let ends = seal::Ends {
        sender: &name(sender),
        receiver: &name("ship1"),
        sender_public: &ours,
        receiver_public: ship_public,
        sender_epoch,
        receiver_epoch: ship_epoch,
    };
    let key = seal::derive(secret, ship_public, &ends).unwrap();
    seal::seal(
        &key,
        &Header {
            sender: name(sender),
            receiver: name("ship1"),
            sender_epoch: Some(sender_epoch),
            receiver_hint: seal::hint(ship_epoch),
            counter,
        },
        plain,
    )
}

fn epoch_of(agent: &Agent) -> u64 {
    u64::from_str_radix(agent.status()["store"]["epoch"].as_str().unwrap(), 16).unwrap()
}

fn public_of(agent: &Agent) -> PublicKey {
    let hex = agent.status()["security"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    PublicKey::from(seal::from_hex32(&hex).unwrap())
}

fn rejected(agent: &Agent) -> BTreeMap<String, u64> {
    serde_json::from_value(agent.status()["security"]["rejected"].clone()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[test]
fn forged_unsealed_flipped_and_replayed_payloads_never_run_and_the_node_keeps_serving() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/+/in");
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1 online", LONG, || {
        central.sees_online("ship1")
    });

    // A first exchange settles the handshake between the two stores; what follows
    // is ordinary traffic, every payload of which ship1 takes (and so must refuse
    // when it comes again).
    central.cli(&["send", "--to", "ship1", "ping"]);
    let settled = capture.payloads("outpost/ship1/in").len();

    // One legitimate command with a visible side effect, captured on the way.
    let count = ship.dir.join("count");
    let script = format!("echo run >> {}; echo secret-output-4711", count.display());
    let out = central.cli(&["send", "--to", "ship1", "exec", "--", "sh", "-c", &script]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ship1: secret-output-4711\n"
    );

    // The broker saw neither the command nor its output.
    wait_until("the result payload was captured", LONG, || {
        !capture.payloads("outpost/central/in").is_empty()
    });
    for (topic, bytes) in capture.all() {
        for needle in ["secret-output-4711", "echo run", "count"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == hex(needle)),
                "{topic} carried {needle:?} in clear"
            );
        }
    }

    // Every valid payload central sent ship1 so far, to replay later.
    let originals = capture.payloads("outpost/ship1/in")[settled..].to_vec();
    let marker = ship.dir.join("forged-marker");
    let ship_id = (&public_of(&ship), epoch_of(&ship));
    let mallory = StaticSecret::from([7u8; 32]);
    let attempts: Vec<(&str, Vec<u8>)> = vec![
        // A sender nobody trusts.
        (
            "untrusted sender mallory",
            forge(
                "mallory",
                &mallory,
                ship_id,
                &touch_frame("mallory", 1, &marker),
                1,
            ),
        ),
        // A trusted name, sealed with another key.
        (
            "bad seal from central",
            forge(
                "central",
                &mallory,
                ship_id,
                &touch_frame("central", 2, &marker),
                1 << 40,
            ),
        ),
        // Plain frames, no seal at all.
        ("unsealed", touch_frame("central", 2, &marker)),
        // A captured valid payload with one bit flipped.
        ("bad seal from central", {
            let mut b = originals[0].clone();
            let last = b.len() - 1;
            b[last] ^= 1;
            b
        }),
    ];
    for (_, payload) in &attempts {
        publish(&broker, "outpost/ship1/in", payload, tmp.path());
    }
    for p in &originals {
        publish(&broker, "outpost/ship1/in", p, tmp.path());
    }
    wait_until("ship1 counted every hostile payload", LONG, || {
        let r = rejected(&ship);
        eprintln!("rejected so far: {r:?}");
        let n = |k: &str| r.get(k).copied().unwrap_or(0);
        n("untrusted sender") >= 1
            && n("bad seal") >= 2
            && n("unsealed") >= 1
            && n("replay") >= originals.len() as u64
    });
    assert!(!marker.exists(), "a forged command ran");
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "run\n",
        "the replayed command ran again"
    );

    // Still serving the legitimate stream.
    let out = central.cli(&["send", "--to", "ship1", "exec", "--", "echo", "still-here"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ship1: still-here\n",
        "{out:?}"
    );
}

#[test]
fn command_from_a_sender_trusted_for_other_methods_comes_back_rejected_until_trust_changes() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "ping");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1 online", LONG, || {
        central.sees_online("ship1")
    });
    let marker = ship.dir.join("ran");
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--json",
        "exec",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "rejected");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("central is not allowed to use exec"),
        "{v}"
    );
    assert!(!marker.exists());
    assert!(central
        .cli(&["send", "--to", "ship1", "ping"])
        .status
        .success());

    // Widen the trust by editing it; the running agent picks it up.
    let central_key = central.status()["security"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let ship_dir = ship.dir.to_str().unwrap();
    outpost(&[
        "keys",
        "trust",
        "--state-dir",
        ship_dir,
        "central",
        &central_key,
        "--allow",
        "exec,ping",
    ]);
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "exec",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(marker.exists());
}

#[test]
fn killing_senders_mid_stream_never_reuses_a_nonce() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/+/in");
    let mut central = Agent::start_with(
        "central",
        &broker.url(),
        tmp.path(),
        &["--durability", "normal"],
    );
    let mut ship = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &["--durability", "normal"],
    );
    wait_until("central sees ship1 online", LONG, || {
        central.sees_online("ship1")
    });
    let file = ship.dir.join("n");
    for round in 0..6 {
        for i in 0..30 {
            central.send_exec(
                "ship1",
                "ordered",
                &[
                    "sh",
                    "-c",
                    &format!("echo {round}-{i} >> {}", file.display()),
                ],
                None,
            );
        }
        // Kill whichever side is busiest right now, mid-stream.
        let lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count();
        wait_until("some progress", LONG, || {
            std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .count()
                > lines
        });
        if round % 2 == 0 {
            central.kill9_and_restart();
        } else {
            ship.kill9_and_restart();
        }
    }
    let total = 180;
    wait_for("every result", Duration::from_secs(300), || {
        let r = central.results(total + 10);
        (r.len() >= total as usize).then_some(())
    });
    let n = assert_no_nonce_reused(&capture);
    assert!(n > 50, "captured {n} payloads");
}

#[test]
fn agent_refuses_a_private_key_others_can_read() {
    let tmp = TempDir::new();
    let dir = tmp.path().join("n");
    outpost(&[
        "keys",
        "gen",
        "--state-dir",
        dir.to_str().unwrap(),
        "--name",
        "n",
    ]);
    let key = dir.join("node.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "agent",
            "--name",
            "n",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--state-dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("accessible by others (mode 644)") && err.contains("chmod 600"),
        "{err}"
    );
    let show = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["keys", "show", "--state-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!show.status.success());
}

#[test]
fn control_socket_answers_garbage_with_errors_and_keeps_serving() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new();
    let broker = Broker::start();
    let agent = Agent::start_with("n1", &broker.url(), tmp.path(), &[]);
    let sock = agent.dir.join("control.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&agent.dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut ask = |line: &[u8]| -> Value {
        s.write_all(line).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    for junk in [
        &b"not json\n"[..],
        b"{\"op\":\"nope\"}\n",
        b"\xff\xfe\n",
        b"{\"op\":\"job\",\"id\":\"x\"}\n",
    ] {
        let r = ask(junk);
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"].as_str().unwrap().starts_with("bad request"),
            "{r}"
        );
    }
    assert_eq!(
        ask(b"{\"op\":\"status\"}\n")["ok"],
        true,
        "the same connection still serves"
    );

    // An oversized line: an error, then the agent hangs up that connection only.
    let mut big = UnixStream::connect(&sock).unwrap();
    big.set_read_timeout(Some(LONG)).unwrap();
    let line = vec![b'x'; 2 * 1024 * 1024];
    let writer = std::thread::spawn(move || {
        let _ = big.write_all(&line);
        big
    });
    let mut big = writer.join().unwrap();
    let mut reply = String::new();
    let _ = big.read_to_string(&mut reply);
    assert!(reply.contains("exceeds"), "{reply}");
    assert_eq!(
        agent.status()["ok"],
        true,
        "new connections are still served"
    );
}
