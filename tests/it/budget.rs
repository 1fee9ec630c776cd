//! Budgets and link windows through the real binary and a real mosquitto: a
//! budget holds back a node's bulk traffic (a file it sends) while an urgent
//! command and its result still go, says so in `status`, and lets the held
//! traffic go in the next period; a link window opens and closes for bulk;
//! `link release` lifts it; `link usage` accounts for the bytes.

use std::time::Duration;

use serde_json::Value;

use outpost::control::Request;

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn files_get(central: &Agent, path: &str) -> i64 {
    let r = central.call(&Request::FilesGet {
        from: "ship1".into(),
        path: path.into(),
    });
    assert_eq!(r["ok"], true, "{r}");
    r["transfer"].as_i64().unwrap()
}

fn transfer(agent: &Agent, id: i64) -> Value {
    agent.call(&Request::Transfer { id })["transfer"].clone()
}

/// ship1's outgoing transfer of `id` as ship1 sees it.
fn outgoing(ship: &Agent, id: &str) -> Option<Value> {
    let r = ship.call(&Request::FilesList);
    r["transfers"]
        .as_array()?
        .iter()
        .find(|t| t["id"] == id && t["direction"] == "out")
        .cloned()
}

fn held(agent: &Agent) -> Vec<Value> {
    agent.status()["traffic"]["held"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The node's budget never spends past its limit by more than one payload (a
/// 4 KiB chunk and its headers); returns what it spent.
fn within_budget(ship: &Agent) -> u64 {
    let s = ship.status();
    let b = &s["traffic"]["budgets"][0];
    let (spent, limit) = (b["spent"].as_u64().unwrap(), b["limit"].as_u64().unwrap());
    assert!(spent <= limit + 5 * 1024, "overran its budget: {b}");
    spent
}

fn now_ms() -> u64 {
    outpost::agent::now_ms()
}

#[test]
fn a_budget_holds_bulk_back_lets_urgent_go_and_the_rest_goes_next_period() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec,files");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    // 24 KiB in 4 KiB chunks; ship1 may spend 80% of 12 KiB per 20 s on bulk.
    let data: Vec<u8> = (0..24 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.join("log.bin"), &data).unwrap();
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &[
            "--share-dir",
            share.to_str().unwrap(),
            "--chunk-size",
            "4KiB",
            "--budget",
            "12KiB/20s",
        ],
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let t = files_get(&central, "log.bin");

    // Bulk waits once its share of the period is spent, and status says so.
    let h = wait_for("ship1 holding its bulk traffic", LONG, || {
        within_budget(&ship);
        held(&ship).into_iter().find(|h| h["class"] == "bulk")
    });
    assert_eq!(h["peer"], "central", "{h}");
    assert!(
        h["why"]
            .as_str()
            .unwrap()
            .contains("80% of this node's budget 12KiB/20s"),
        "{h}"
    );
    let until = h["until_ms"].as_u64().unwrap();
    assert_eq!(until % 20_000, 0, "held until the period ends: {h}");
    let text = ship.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("held     bulk traffic to central"), "{text}");
    assert!(text.contains("budget   node 12KiB/20s"), "{text}");

    // Urgent traffic still goes both ways while bulk waits.
    let sent = outgoing(&ship, "log.bin").expect("ship1's transfer")["bytes"].as_u64();
    assert!(sent.unwrap() < data.len() as u64, "{sent:?}");
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--priority",
        "urgent",
        "exec",
        "--",
        "echo",
        "urgent",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("urgent"),
        "{out:?}"
    );
    if now_ms() < until {
        assert!(
            !transfer(&central, t)["finished"].as_bool().unwrap(),
            "the file is held while the urgent command ran"
        );
    }

    // The next periods let the rest go, and the file arrives whole.
    wait_until("the file after the budget periods roll", LONG, || {
        within_budget(&ship);
        transfer(&central, t)["finished"] == true
    });
    let tr = transfer(&central, t);
    assert_eq!(tr["state"], "done", "{tr}");
    let landed = tmp.path().join("central/files/ship1/log.bin");
    assert_eq!(std::fs::read(&landed).unwrap(), data, "{tr}");

    let u = ship.call(&Request::Usage);
    let files = u["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "files")
        .unwrap()
        .clone();
    assert!(files["day_up"].as_u64().unwrap() > data.len() as u64, "{u}");
    let log = ship.full_log();
    assert!(!log.contains("cannot record link usage"), "{log}");
}

#[test]
fn a_link_window_opens_and_closes_for_bulk_and_release_lifts_it() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec,files");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("a.txt"), b"first file\n").unwrap();
    std::fs::write(share.join("b.txt"), b"second file\n").unwrap();
    std::fs::write(share.join("c.txt"), b"third file\n").unwrap();
    // A one-minute window for bulk, opening at the next minute at least 20 s away.
    let now = now_ms();
    let open = (now + 20_000).div_ceil(60_000) * 60_000;
    let hhmm = |ms: u64| {
        let m = ms % 86_400_000 / 60_000;
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let window = format!("bulk {}-{}", hhmm(open), hhmm(open + 60_000));
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &[
            "--share-dir",
            share.to_str().unwrap(),
            "--link-window",
            &window,
        ],
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));

    // Closed: the file waits for the window; a normal command does not.
    let a = files_get(&central, "a.txt");
    let h = wait_for("ship1 holding bulk for its window", LONG, || {
        held(&ship).into_iter().find(|h| h["class"] == "bulk")
    });
    assert_eq!(h["until_ms"].as_u64().unwrap(), open, "{h}");
    assert!(h["why"].as_str().unwrap().contains(&window), "{h}");
    let out = central.cli(&["send", "--to", "ship1", "exec", "--", "echo", "normal"]);
    assert!(out.status.success(), "{out:?}");
    if now_ms() < open {
        assert!(!transfer(&central, a)["finished"].as_bool().unwrap());
    }

    // Open: it goes.
    wait_until("the file once the window opens", LONG, || {
        transfer(&central, a)["finished"] == true
    });
    assert!(now_ms() >= open, "not before the window opened");

    // Closed again: the next file waits until tomorrow's window...
    wait_until("the window to close", LONG, || now_ms() >= open + 60_000);
    let b = files_get(&central, "b.txt");
    let h = wait_for("ship1 holding bulk again", LONG, || {
        held(&ship).into_iter().find(|h| h["class"] == "bulk")
    });
    assert_eq!(h["until_ms"].as_u64().unwrap(), open + 86_400_000, "{h}");
    assert!(!transfer(&central, b)["finished"].as_bool().unwrap());

    // ...unless the operator lifts it.
    let out = ship.cli(&["link", "release", "--for", "10m"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lifted until"),
        "{out:?}"
    );
    wait_until("the file after release", LONG, || {
        transfer(&central, b)["finished"] == true
    });
    let c = files_get(&central, "c.txt");
    wait_until("a file while released", LONG, || {
        transfer(&central, c)["finished"] == true
    });
    let usage = ship.cli(&["link", "usage"]);
    let text = String::from_utf8_lossy(&usage.stdout);
    for row in ["files", "connects", "presence", "total"] {
        assert!(text.contains(row), "{row}: {text}");
    }
    assert!(text.contains("lifted until"), "{text}");
}
