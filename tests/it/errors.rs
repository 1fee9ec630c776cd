//! The central error log through the real binary: a node meets errors (forged
//! payloads on its inbox) while central is down; once central is back,
//! `outpost errors` shows each once with the count the node saw, and
//! `--follow` prints a change as it arrives.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::broker::Broker;
use crate::support::mqtt::publish;
use crate::support::outpost::{introduce, Agent, BIN};
use crate::support::{scaled, wait_for, wait_until, KillOnDrop, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn rejected(agent: &Agent) -> BTreeMap<String, u64> {
    serde_json::from_value(agent.status()["security"]["rejected"].clone()).unwrap()
}

/// `outpost errors --json` on `agent`: one object per line.
fn errors(agent: &Agent) -> Vec<Value> {
    let out = agent.cli(&["errors", "--json"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// ship1's rejections as central's log has them: (kind "rejected", text the
/// kind of rejection) -> count.
fn logged(entries: &[Value]) -> BTreeMap<String, u64> {
    entries
        .iter()
        .filter(|e| e["node"] == "ship1" && e["kind"] == "rejected")
        .map(|e| {
            (
                e["text"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn errors_met_while_central_is_down_reach_it_once_with_their_counts_and_follow_prints_changes() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let mut central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    central.kill9();
    // Garbage and a payload that claims central but carries no seal.
    let garbage: Vec<Vec<u8>> = vec![
        b"not a payload".to_vec(),
        vec![0u8; 40],
        b"not a payload either".to_vec(),
        vec![0x31, 7, b'c', b'e', b'n', b't', b'r', b'a', b'l', 1, 2, 3],
        vec![0xff; 64],
    ];
    for p in &garbage {
        publish(&broker, "outpost/ship1/in", p, tmp.path());
    }
    let seen = wait_for("ship1 counted every forged payload", LONG, || {
        let r = rejected(&ship);
        (r.values().sum::<u64>() == garbage.len() as u64).then_some(r)
    });
    central.restart();
    // The first report goes at once, the rest at most 10 s later: both arrive,
    // each kind once, counts added up.
    wait_until("central logged every rejection", LONG, || {
        logged(&errors(&central)) == seen
    });
    let entries = errors(&central);
    assert_eq!(entries.len(), seen.len(), "one entry per kind: {entries:?}");
    for e in &entries {
        assert!(e["first_ms"].as_u64() <= e["last_ms"].as_u64(), "{e}");
    }
    let text = central.cli(&["errors", "--node", "ship1"]);
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(table.starts_with("node "), "{table}");
    assert_eq!(table.lines().count(), 1 + seen.len(), "{table}");
    assert_eq!(
        central
            .cli(&["errors", "--node", "nobody", "--json"])
            .stdout,
        b""
    );

    // --follow: what is there first, then a change as it arrives.
    let mut follow = KillOnDrop(
        Command::new(BIN)
            .args(["errors", "--follow", "--json"])
            .env("OUTPOST_STATE_DIR", &central.dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<Value>();
    let stdout = follow.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(scaled(LONG))
            .unwrap_or_else(|_| panic!("--follow printed no {what}"))
    };
    let first: Vec<Value> = (0..entries.len()).map(|_| next("existing entry")).collect();
    assert_eq!(logged(&first), seen);
    publish(&broker, "outpost/ship1/in", b"one more", tmp.path());
    let deadline = Instant::now() + scaled(LONG);
    let (kind, total) = loop {
        assert!(Instant::now() < deadline, "no change followed");
        let e = next("change");
        let text = e["text"].as_str().unwrap().to_string();
        if e["count"].as_u64() > seen.get(&text).copied().or(Some(0)) {
            break (text, e["count"].as_u64().unwrap());
        }
    };
    assert_eq!(rejected(&ship)[&kind], total, "the count the node has");
}
