//! What a fleet costs an idle node on its link (issue 13), with the real binary and
//! a real mosquitto, bytes counted by a TCP proxy in front of the broker:
//!
//! - `facts`: bytes per day an idle node spends on facts. A node reads its facts
//!   every second (300 times the default `facts_interval`) for a while; every
//!   change it sends is counted, and a full set (forced by a short
//!   `facts_refresh`) is measured on the wire. At the defaults a day costs one
//!   full set plus the changes seen per reading times 288 readings.
//! - `presence`: bytes one node downloads when it reconnects in a fleet of 1,000
//!   retained presence messages: subscribed to `{prefix}/+/presence` (what every
//!   agent did before issue 11), and to the presence of the peers it trusts (what
//!   the agent does now), by a plain MQTT client with each subscription set, and by
//!   the real agent trusting three peers.
//!
//!   cargo bench --bench fleet                # both
//!   cargo bench --bench fleet -- presence    # one
//!   OUTPOST_BENCH_SECS=300 cargo bench --bench fleet -- facts   # a longer idle window
//!
//! Prints numbers; asserts nothing beyond what it needs to measure.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use outpost::control::Request;
use support::broker::Broker;
use support::outpost::{count_log, keygen, trust, Agent};
use support::proxy::Proxy;
use support::{wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);
const FLEET: usize = 1000;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if want("facts") {
        facts();
    }
    if want("presence") {
        presence();
    }
}

fn outbox_empty(agent: &Agent) -> bool {
    agent.status()["outbox"].as_array().unwrap().is_empty()
}

fn facts() {
    let secs: u64 = std::env::var("OUTPOST_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let tmp = TempDir::new();
    let base = tmp.path();
    let (c, s) = (keygen(base, "central"), keygen(base, "ship1"));
    trust(base, "ship1", "central", &c, "exec,ping");
    trust(base, "central", "ship1", &s, "");
    let dir = base.join("facts.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("site"), "site=north\nrole=gateway\n").unwrap();
    let script = dir.join("hw.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho model=rpi4\necho serial=00000000abcdef01\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let central = Agent::start_with("central", &broker.url(), base, &["--log-level", "info"]);
    // A full set every `refresh`, readings every second, keepalive off the
    // measurement's way (an hour).
    let refresh = secs + 30;
    let ship = Agent::start_with(
        "ship1",
        &proxy.url(),
        base,
        &[
            "--facts-dir",
            dir.to_str().unwrap(),
            "--facts-interval",
            "1s",
            "--facts-refresh",
            &format!("{refresh}s"),
            "--keepalive",
            "3600s",
        ],
    );
    let node = |f: &str| {
        central.call(&Request::Node {
            name: "ship1".into(),
        })["node"]["facts"][f]
            .as_str()
            .map(str::to_string)
    };
    wait_until("the first set at central", LONG, || node("model").is_some());
    wait_until("settled", LONG, || outbox_empty(&ship));
    let n_facts = central.call(&Request::Node {
        name: "ship1".into(),
    })["node"]["facts"]
        .as_object()
        .unwrap()
        .len();

    // Idle: `secs` readings, every change counted.
    proxy.reset_counters();
    let (reads0, changes0) = (
        count_log(&ship, "nothing changed enough"),
        count_log(&ship, "facts: a change of"),
    );
    let start = Instant::now();
    wait_until("the idle window", Duration::from_secs(secs + 60), || {
        count_log(&ship, "nothing changed enough") + count_log(&ship, "facts: a change of")
            >= reads0 + changes0 + secs as usize
    });
    let idle_s = start.elapsed().as_secs_f64();
    let readings = count_log(&ship, "nothing changed enough") - reads0
        + count_log(&ship, "facts: a change of")
        - changes0;
    let changes = count_log(&ship, "facts: a change of") - changes0;
    let (idle_up, idle_down) = (proxy.bytes_up(), proxy.bytes_down());

    // One full set on the wire: the refresh.
    let fulls = count_log(&ship, "facts: all ");
    wait_until("the refresh", Duration::from_secs(refresh + 60), || {
        count_log(&ship, "facts: all ") > fulls
    });
    wait_until("settled", LONG, || outbox_empty(&ship));
    // Everything after the idle window is the refresh's, unless a change was
    // sent meanwhile (counted, and said). No keepalive: an hour.
    let between = count_log(&ship, "facts: a change of") - changes0 - changes;
    let full_up = proxy.bytes_up() - idle_up;
    let full_down = proxy.bytes_down() - idle_down;
    let full = full_up + full_down;
    let per_reading = (idle_up + idle_down) as f64 / readings.max(1) as f64;
    let day = full as f64 + per_reading * 288.0;
    println!("facts: {n_facts} facts (system, agent and 4 custom from facts_dir)");
    println!(
        "facts: idle window {idle_s:.0} s, {readings} readings (1 s apart), {changes} change(s) sent, {idle_up} B up / {idle_down} B down"
    );
    println!("facts: one full set on the wire (publish, central's ack, PUBACKs): {full_up} B up + {full_down} B down = {full} B ({between} change(s) sent in that window too)");
    println!(
        "facts: an idle node at the defaults (facts_interval 5m = 288 readings, facts_refresh 24h): {day:.0} B/day"
    );
}

/// Publishes `n` retained "online" presences of other nodes; returns once the
/// broker has acknowledged every one.
fn retained_fleet(broker: &Broker, n: usize) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new("fleet-presence", "127.0.0.1", broker.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 64);
    let pump = std::thread::spawn(move || {
        let mut acked = 0;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == n {
                        return;
                    }
                }
                Err(e) => panic!("fleet client: {e}"),
                _ => {}
            }
        }
    });
    for i in 0..n {
        client
            .publish(
                format!("outpost/node-{i:04}/presence"),
                QoS::AtLeastOnce,
                true,
                b"online".to_vec(),
            )
            .unwrap();
    }
    pump.join().unwrap();
}

/// Bytes a plain client downloads connecting through a fresh proxy and
/// subscribing to `filters` until `expect` retained messages have arrived.
fn download(broker: &Broker, filters: &[String], expect: usize) -> (u64, usize) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let proxy = Proxy::start(broker.addr());
    let mut opts = MqttOptions::new(
        format!("measure-{}", filters.len()),
        "127.0.0.1",
        proxy.port(),
    );
    opts.set_clean_session(true);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut conn) = Client::new(opts, 64);
    for f in filters {
        client.subscribe(f.clone(), QoS::AtLeastOnce).unwrap();
    }
    let mut got = 0;
    let deadline = Instant::now() + LONG;
    for ev in conn.iter() {
        if let Ok(Event::Incoming(Packet::Publish(_))) = ev {
            got += 1;
            if got == expect {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {expect} retained messages"
        );
    }
    let _ = client.disconnect();
    (proxy.bytes_down(), got)
}

fn presence() {
    let tmp = TempDir::new();
    let base = tmp.path();
    let broker = Broker::start();
    retained_fleet(&broker, FLEET);
    let peers = ["node-0001", "node-0002", "node-0003"];
    let before = download(
        &broker,
        &["outpost/ship1/in".into(), "outpost/+/presence".into()],
        FLEET,
    );
    let mut after_filters = vec![
        "outpost/ship1/in".to_string(),
        "outpost/ship1/presence".into(),
    ];
    after_filters.extend(peers.iter().map(|p| format!("outpost/{p}/presence")));
    let after = download(&broker, &after_filters, peers.len());
    println!(
        "presence: {FLEET} retained presences; a plain client subscribing to outpost/+/presence (before issue 11): {} B down ({} messages)",
        before.0, before.1
    );
    println!(
        "presence: the same client subscribing per trusted peer (3 peers, and its own): {} B down ({} messages)",
        after.0, after.1
    );

    // The real agent, trusting three of the fleet, through a proxy: the bytes of
    // one reconnect.
    let me = keygen(base, "ship1");
    for p in peers {
        let k = keygen(base, p);
        trust(base, "ship1", p, &k, "");
    }
    let _ = me;
    let proxy = Proxy::start(broker.addr());
    let ship = Agent::start_with("ship1", &proxy.url(), base, &["--keepalive", "3600s"]);
    let online = |a: &Agent| {
        peers.iter().all(|p| a.sees_online(p)) && a.status()["link"]["connected"] == true
    };
    wait_until("ship1 connected, its peers seen online", LONG, || {
        online(&ship)
    });
    let first = proxy.accepted();
    proxy.reset_counters();
    proxy.cut();
    wait_until("ship1 reconnected", LONG, || {
        proxy.accepted() > first && ship.status()["link"]["connected"] == true
    });
    // Settled: nothing more arrives for a second after the reconnect.
    let mut last = proxy.bytes_down();
    wait_until("the reconnect's downloads done", LONG, || {
        std::thread::sleep(Duration::from_secs(1));
        let now = proxy.bytes_down();
        let done = now == last;
        last = now;
        done
    });
    println!(
        "presence: the real agent (trusting 3 of the {FLEET}), one reconnect: {} B down, {} B up",
        proxy.bytes_down(),
        proxy.bytes_up()
    );
}
