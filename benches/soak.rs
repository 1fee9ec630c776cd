//! The two soaks issue 11 asks to re-run after its fixes, with the real binary and
//! a real mosquitto:
//!
//! - `kills`: 500 ordered commands while either side is SIGKILLed 30 times at
//!   seeded random moments; every command must end with one result, run at most
//!   once, and the appended numbers stay in order;
//! - `flood`: 10,000 hostile messages on the node's inbox (garbage, replays of
//!   captured payloads, flipped copies) while 20 real commands run.
//!
//!   cargo bench --bench soak              # both
//!   cargo bench --bench soak -- flood     # one
//!
//! Prints what it measured; panics (non-zero exit) if a promise broke.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use outpost::control::{CommandSpec, Request};
use support::broker::Broker;
use support::mqtt::{flood, Capture};
use support::outpost::{introduce, Agent};
use support::{wait_for, Rng, TempDir};

const LONG: Duration = Duration::from_secs(600);

fn append(n: usize, file: &Path) -> Request {
    Request::Send {
        where_: vec![],
        online: false,
        to: "node".into(),
        lane: None,
        ttl_s: None,
        key: None,
        output: None,
        command: CommandSpec::Exec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("echo {n} >> {}", file.display()),
            ],
            env: vec![],
            cwd: None,
            stdin: String::new(),
            timeout_ms: Some(60_000),
            rerun: false,
        },
    }
}

fn numbers(file: &Path) -> Vec<usize> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kills() {
    let started = Instant::now();
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "node", "exec");
    let broker = Broker::start();
    let mut central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut node = Agent::start_with("node", &broker.url(), tmp.path(), &[]);
    let file = tmp.path().join("appended");
    let n = 500;
    let jobs: Vec<i64> = (1..=n)
        .map(|i| central.call(&append(i, &file))["job"].as_i64().unwrap())
        .collect();
    let mut rng = Rng(0x5eed);
    let (mut node_kills, mut central_kills) = (0, 0);
    for _ in 0..30 {
        let before = numbers(&file).len();
        let step = 1 + (rng.next() % 20) as usize;
        // Progress, or the end (the last command has its result; an interrupted
        // command appends nothing): a kill then lands at a random point of the work.
        let last = jobs[n - 1];
        let _ = support::try_wait_for(LONG, || {
            let grew = numbers(&file).len() >= before + step;
            let done = || !central.job(last)["targets"][0]["result"].is_null();
            (grew || done()).then_some(())
        });
        if rng.next().is_multiple_of(2) {
            node.kill9_and_restart();
            node_kills += 1;
        } else {
            central.kill9_and_restart();
            central_kills += 1;
        }
    }
    let results: Vec<Value> = jobs
        .iter()
        .map(|&j| {
            wait_for(&format!("a result for job {j}"), LONG, || {
                let t = central.job(j)["targets"][0].clone();
                (!t["result"].is_null()).then(|| t["result"].clone())
            })
        })
        .collect();
    let ran = numbers(&file);
    let mut sorted = ran.clone();
    sorted.sort();
    sorted.dedup();
    let duplicates = ran.len() - sorted.len();
    let in_order = ran.windows(2).all(|w| w[0] < w[1]);
    let status = |s: &str| results.iter().filter(|r| r["status"] == s).count();
    let (ok, interrupted) = (status("ok"), status("interrupted"));
    let ok_but_not_run = (1..=n)
        .filter(|i| results[i - 1]["status"] == "ok" && !sorted.contains(i))
        .count();
    println!(
        "kills: {n} ordered commands, {} SIGKILLs ({node_kills} of the node, {central_kills} of central), {:.0} s",
        node_kills + central_kills,
        started.elapsed().as_secs_f64()
    );
    println!(
        "kills: results {} of {n} ({ok} ok, {interrupted} interrupted, {} other); ran {} (duplicates {duplicates}, in order: {in_order}); ok but not run: {ok_but_not_run}",
        results.len(),
        results.len() - ok - interrupted,
        ran.len()
    );
    assert_eq!(duplicates, 0, "a command ran twice");
    assert!(in_order, "commands ran out of order");
    assert_eq!(ok + interrupted, n, "results other than ok/interrupted");
    assert_eq!(ok_but_not_run, 0);
}

fn flood_scenario() {
    let started = Instant::now();
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "node", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/node/in");
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let node = Agent::start_with("node", &broker.url(), tmp.path(), &[]);
    let file = tmp.path().join("appended");
    // Traffic to replay and flip.
    for i in 1..=5 {
        let j = central.call(&append(i, &file))["job"].as_i64().unwrap();
        wait_for("a result", LONG, || {
            (!central.job(j)["targets"][0]["result"].is_null()).then_some(())
        });
    }
    let captured = capture.payloads("outpost/node/in");
    let rss_before = node.peak_rss_kib();
    let total = 10_000;
    let mut rng = Rng(0xf100d);
    let hostile = (0..total).map(move |i| {
        let payload = match i % 3 {
            // Garbage.
            0 => (0..(rng.next() % 200) as usize)
                .map(|_| rng.next() as u8)
                .collect(),
            // A replay.
            1 => captured[i % captured.len()].clone(),
            // A captured payload with one bit flipped.
            _ => {
                let mut p = captured[i % captured.len()].clone();
                let at = (rng.next() as usize) % p.len();
                p[at] ^= 1 << (rng.next() % 8);
                p
            }
        };
        ("outpost/node/in".to_string(), payload)
    });
    let flooding = std::thread::scope(|s| {
        let f = s.spawn(|| flood(&broker, hostile));
        let jobs: Vec<i64> = (6..=25)
            .map(|i| central.call(&append(i, &file))["job"].as_i64().unwrap())
            .collect();
        f.join().unwrap();
        jobs
    });
    let statuses: Vec<String> = flooding
        .iter()
        .map(|&j| {
            wait_for("a result", LONG, || {
                let r = central.job(j)["targets"][0]["result"].clone();
                r["status"].as_str().map(String::from)
            })
        })
        .collect();
    let rejected = wait_for("the node counted the flood", LONG, || {
        let r = node.status()["security"]["rejected"].clone();
        let sum: u64 = r
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        (sum >= total as u64 * 9 / 10).then_some(r)
    });
    let ran = numbers(&file);
    let rss_after = node.peak_rss_kib();
    println!(
        "flood: {total} hostile messages (garbage, replays, flipped copies) with 20 real commands, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "flood: real commands ok {} of 20; lines appended {} (expected 25); rejected by kind {rejected}; node peak RSS {} -> {} KiB",
        statuses.iter().filter(|s| *s == "ok").count(),
        ran.len(),
        rss_before,
        rss_after
    );
    assert!(statuses.iter().all(|s| s == "ok"));
    assert_eq!(
        ran,
        (1..=25).collect::<Vec<_>>(),
        "a command ran twice or not at all"
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if want("kills") {
        kills();
    }
    if want("flood") {
        flood_scenario();
    }
}
