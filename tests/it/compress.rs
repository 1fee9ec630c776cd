//! Compression on the wire (`compress.rs`) through the real binaries: command
//! outputs of every kind come back byte for byte, text travels deflated and random
//! bytes plain, and a sealed decompression bomb or a corrupt deflated payload from
//! a trusted sender is refused, quarantined and logged once, never run, while the
//! node keeps serving.

use std::time::Duration;

use x25519_dalek::{PublicKey, StaticSecret};

use outpost::compress::DEFLATED;
use outpost::frame::{self, Body, Command as Cmd, Envelope, Exec, Name};
use outpost::seal::{self, Header};

use crate::support::broker::Broker;
use crate::support::mqtt::{publish, Capture};
use crate::support::outpost::{count_log, introduce, keygen, trust, Agent};
use crate::support::{wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// Runs `script` on ship1 and returns the stdout bytes of its result as central
/// stored them (read from its store: the control socket shows text, lossily).
fn run_at_ship(central: &Agent, script: &str) -> Vec<u8> {
    let job = central.send_exec("ship1", "ordered", &["sh", "-c", script], None);
    wait_until("the result", LONG, || {
        !central.job(job)["targets"][0]["result"].is_null()
    });
    let target = &central.job(job)["targets"][0];
    assert_eq!(target["result"]["status"], "ok", "{script}: {target}");
    let db = rusqlite::Connection::open_with_flags(
        central.dir.join("store.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let bytes: Vec<u8> = db
        .query_row(
            "SELECT frame FROM results WHERE peer = 'ship1' AND lane = 'ordered' AND seq = ?1",
            [target["seq"].as_i64().unwrap()],
            |row| row.get(0),
        )
        .unwrap();
    match frame::decode(&bytes).unwrap().body {
        Body::Result(r) => r.stdout,
        other => panic!("{other:?}"),
    }
}

#[test]
fn real_command_outputs_round_trip_exactly_text_deflated_and_random_bytes_plain() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/central/in");
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    // Room for outputs larger than one 64 KiB payload: such a result travels
    // alone, deflated up to the receiver's limit.
    let ship = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &["--output-cap", "512KiB"],
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let cases = [
        ("ps", "ps aux", false),
        ("df", "df -h", false),
        ("ip", "{ ip a; cat /proc/cpuinfo; }", false),
        (
            "repetitive",
            "yes 'outpost compresses repetitive output' | head -n 8000",
            true,
        ),
        ("random", "head -c 100000 /dev/urandom", false),
        ("empty", "true", false),
    ];
    for (i, (what, cmd, _)) in cases.iter().enumerate() {
        // The node keeps what it printed, to compare with what central received.
        let kept = tmp.path().join(format!("kept-{i}"));
        let script = format!("{cmd} > {k}; cat {k}", k = kept.display());
        let before = capture.all().len();
        let got = run_at_ship(&central, &script);
        let sent = std::fs::read(&kept).unwrap();
        assert!(
            got == sent,
            "{what}: {} bytes back of {}",
            got.len(),
            sent.len()
        );
        let largest = capture.all()[before..]
            .iter()
            .map(|(_, p)| p.len())
            .max()
            .unwrap_or(0);
        match *what {
            // 296,000 bytes of one line repeated: a result frame larger than a
            // payload, so alone in one, deflated a hundredfold.
            "repetitive" => {
                assert_eq!(sent.len(), 296_000);
                assert!(largest < 20_000, "{what}: a payload of {largest} bytes");
            }
            // Incompressible: sent as it is, not grown.
            "random" => assert!(
                (100_000..100_200).contains(&largest),
                "{what}: a payload of {largest} bytes"
            ),
            "ps" | "ip" => assert!(
                largest < sent.len() * 3 / 4,
                "{what}: a payload of {largest} bytes for {} of output",
                sent.len()
            ),
            _ => {}
        }
    }
    assert_eq!(count_log(&ship, "bad payload"), 0, "{}", ship.log());
    assert_eq!(count_log(&central, "bad payload"), 0, "{}", central.log());
}

/// Seals `plain` as mallory (whose secret the test holds, and whom ship1 trusts)
/// for ship1's current store.
fn seal_as_mallory(secret: &StaticSecret, ship: &Agent, plain: &[u8], counter: u64) -> Vec<u8> {
    let status = ship.status();
    let ship_epoch = u64::from_str_radix(status["store"]["epoch"].as_str().unwrap(), 16).unwrap();
    let ship_public = PublicKey::from(
        seal::from_hex32(status["security"]["public_key"].as_str().unwrap()).unwrap(),
    );
    let sender_epoch = 0x3333_4444_5555_6667;
    let ends = seal::Ends {
        sender: &name("mallory"),
        receiver: &name("ship1"),
        sender_public: &PublicKey::from(secret),
        receiver_public: &ship_public,
        sender_epoch,
        receiver_epoch: ship_epoch,
    };
    let key = seal::derive(secret, &ship_public, &ends).unwrap();
    let header = Header {
        sender: name("mallory"),
        receiver: name("ship1"),
        sender_epoch: Some(sender_epoch),
        receiver_hint: seal::hint(ship_epoch),
        counter,
    };
    seal::seal(&key, &header, plain)
}

#[test]
fn a_sealed_decompression_bomb_is_refused_quarantined_and_logged_once_and_the_node_keeps_serving() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    // A sender ship1 trusts with exec, whose key we hold: what a compromised or
    // broken peer could send.
    let mallory = keygen(tmp.path(), "mallory");
    trust(tmp.path(), "ship1", "mallory", &mallory, "exec");
    let key_hex = std::fs::read_to_string(tmp.path().join("mallory/node.key")).unwrap();
    let secret = StaticSecret::from(seal::from_hex32(key_hex.trim()).unwrap());
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let quarantined = || ship.status()["store"]["quarantined"].as_u64().unwrap();
    let before = quarantined();

    // A real command first (it would create `marker`), then 64 MiB of zeros: a
    // payload of about 64 KiB that inflates a thousandfold.
    let marker = tmp.path().join("bomb-ran");
    let env = Envelope {
        from: name("mallory"),
        to: name("ship1"),
        lane: frame::default_lane(),
        seq: 1,
        created_ms: outpost::agent::now_ms(),
        ttl_s: None,
        body: Body::Command(Cmd::Exec(Exec {
            argv: vec!["touch".into(), marker.to_str().unwrap().into()],
            timeout_ms: 10_000,
            ..Exec::default()
        })),
    };
    let packed = frame::pack([frame::encode(&env).unwrap().as_slice()]);
    let mut inner = frame::compact(
        &packed,
        &name("mallory"),
        &name("ship1"),
        outpost::agent::now_ms(),
    )
    .unwrap();
    inner.resize(inner.len() + (64 << 20), 0);
    let mut bomb = vec![DEFLATED];
    bomb.extend(miniz_oxide::deflate::compress_to_vec(&inner, 9));
    drop(inner);
    assert!(bomb.len() < 100 * 1024, "{} bytes", bomb.len());
    let dir = tmp.path();
    publish(
        &broker,
        "outpost/ship1/in",
        &seal_as_mallory(&secret, &ship, &bomb, 1),
        dir,
    );
    wait_until("the bomb quarantined", LONG, || quarantined() == before + 1);
    // A corrupt deflated payload goes the same way.
    let corrupt = [DEFLATED, 0xff, 0xfe, 0xfd, 0x00, 0x11];
    publish(
        &broker,
        "outpost/ship1/in",
        &seal_as_mallory(&secret, &ship, &corrupt, 2),
        dir,
    );
    wait_until("the corrupt payload quarantined", LONG, || {
        quarantined() == before + 2
    });
    let rejected = &ship.status()["security"]["rejected"];
    assert_eq!(rejected["bad payload"], 2, "{rejected}");
    // Logged once: the second refusal of the kind within a minute is counted only.
    assert_eq!(
        count_log(&ship, "decompression bomb"),
        1,
        "{}",
        ship.full_log()
    );
    assert!(!marker.exists(), "a command inside the bomb ran");
    // Inflating stopped at its limit, about 1 MiB, never near 64 MiB.
    assert!(
        ship.peak_rss_kib() < 48 * 1024,
        "peak RSS {} KiB",
        ship.peak_rss_kib()
    );

    // The node keeps serving its real peer.
    let job = central.send_exec("ship1", "ordered", &["echo", "still here"], None);
    wait_until("the next command's result", LONG, || {
        !central.job(job)["targets"][0]["result"].is_null()
    });
    let result = &central.job(job)["targets"][0]["result"];
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["stdout"], "still here\n", "{result}");
    assert!(!marker.exists(), "a command inside the bomb ran");
}
