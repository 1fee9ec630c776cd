//! Core throughput: durable enqueue (full and normal durability, one frame per
//! transaction and 100 per transaction) and receive+ack, on a real SQLite file.
//!
//! Run with `cargo bench --bench core`. Prints frames per second; asserts nothing.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

use std::path::PathBuf;
use std::time::Instant;

use outpost::delivery::DeliveryConfig;
use outpost::frame::{self, Body, Command, Exec, Name};
use outpost::node::{Node, NodeConfig};
use outpost::store::{Durability, Outgoing, StoreConfig};
use outpost::trust::Keys;
use x25519_dalek::{PublicKey, StaticSecret};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("outpost-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn uptime(to: &Name) -> Outgoing {
    Outgoing {
        to: to.clone(),
        lane: frame::default_lane(),
        ttl_s: None,
        body: Body::Command(Command::Exec(Exec {
            argv: vec!["uptime".into()],
            timeout_ms: 60_000,
            ..Exec::default()
        })),
    }
}

fn secret(name: &str) -> StaticSecret {
    StaticSecret::from([name.len() as u8; 32])
}

/// A node that trusts the other one of "central" and "ship1". Its delivery window
/// is wide enough that a sender hands out every queued frame without waiting for
/// acknowledgements, so the receiving side alone is timed.
fn node(tag: &str, me: &str, durability: Durability) -> (Node, PathBuf) {
    let d = dir(tag);
    let cfg = NodeConfig {
        store: StoreConfig {
            durability,
            quota_bytes: u64::MAX,
        },
        delivery: DeliveryConfig {
            window: 1_000_000,
            ..DeliveryConfig::default()
        },
        ..NodeConfig::default()
    };
    let keys = Keys {
        secret: secret(me),
        public: PublicKey::from(&secret(me)),
    };
    let mut n = Node::open(&d.join("store.db"), &Name::new(me).unwrap(), cfg, keys, 0).unwrap();
    let peer = if me == "central" { "ship1" } else { "central" };
    let trust = [(
        Name::new(peer).unwrap(),
        *PublicKey::from(&secret(peer)).as_bytes(),
    )]
    .into_iter()
    .collect();
    n.set_trust(trust, 0);
    (n, d)
}

/// Passes payloads both ways until neither side has more to say (the handshake).
fn converse(a: &mut Node, b: &mut Node, now: u64) {
    for _ in 0..10 {
        let (to_b, _) = a.poll_out(now).unwrap();
        let (to_a, _) = b.poll_out(now).unwrap();
        if to_a.is_empty() && to_b.is_empty() {
            return;
        }
        for p in to_b {
            b.on_payload(&p.bytes, now).unwrap();
        }
        for p in to_a {
            a.on_payload(&p.bytes, now).unwrap();
        }
    }
}

fn main() {
    let ship = Name::new("ship1").unwrap();
    for durability in [Durability::Full, Durability::Normal] {
        for batch in [1usize, 100] {
            let (mut n, d) = node("enqueue", "central", durability);
            let total = if batch == 1 && durability == Durability::Full {
                500
            } else {
                20_000
            };
            let start = Instant::now();
            for _ in 0..total / batch {
                n.submit((0..batch).map(|_| uptime(&ship)).collect(), 1)
                    .unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "enqueue  durability={durability:?} batch={batch:>3}: {:>9.0} frames/s",
                total as f64 / secs
            );
            drop(n);
            let _ = std::fs::remove_dir_all(d);
        }
    }

    // Receive + ack: payloads of 64 frames, as a replay delivers them.
    for durability in [Durability::Full, Durability::Normal] {
        let (mut central, d1) = node("recv-src", "central", Durability::Normal);
        let (mut ship_node, d2) = node("recv-dst", "ship1", durability);
        central.on_connected(1);
        ship_node.on_connected(1);
        converse(&mut central, &mut ship_node, 1);
        assert!(central.synced(&ship) && ship_node.synced(&Name::new("central").unwrap()));
        let total = 20_000;
        for _ in 0..total / 100 {
            central
                .submit((0..100).map(|_| uptime(&ship)).collect(), 1)
                .unwrap();
        }
        let (payloads, _) = central.poll_out(2).unwrap();
        assert_eq!(payloads.iter().map(|p| p.frames).sum::<usize>(), total);
        let now = 3;
        let start = Instant::now();
        let mut n_acks = 0;
        for p in &payloads {
            ship_node.on_payload(&p.bytes, now).unwrap();
            let (acks, _) = ship_node.poll_out(now + 1_000).unwrap();
            n_acks += acks.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "receive+ack durability={durability:?}: {:>9.0} frames/s ({} payloads, {n_acks} ack payloads)",
            total as f64 / secs,
            payloads.len()
        );
        drop((central, ship_node));
        let _ = std::fs::remove_dir_all(d1);
        let _ = std::fs::remove_dir_all(d2);
    }

    let cmd = frame::encode(&frame::Envelope {
        from: Name::new("central").unwrap(),
        to: ship.clone(),
        lane: frame::default_lane(),
        seq: 1,
        created_ms: 1_763_800_000_000,
        ttl_s: None,
        body: uptime(&ship).body,
    })
    .unwrap();
    println!("encoded exec uptime command: {} bytes", cmd.len());
}
