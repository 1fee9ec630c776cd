//! The on-demand link (`link = "on-demand"`) with the real binary, a real
//! mosquitto and the fault proxy between the node and the broker: commands
//! queued while the node is away arrive on its next poll, once each and in
//! order, central sends each of them once while the node sleeps, the node hangs
//! up after `linger`, a SIGKILL during a poll loses and repeats nothing, and an
//! idle poll costs a few hundred bytes.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::broker::Broker;
use crate::support::mqtt::Capture;
use crate::support::outpost::{introduce, Agent};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{scaled, wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

/// A broker, `central` on it directly (with a 1 s resend timer, so a resend
/// would show within the node's sleep) and `ship1` on an on-demand link behind
/// the proxy.
struct Rig {
    _tmp: TempDir,
    broker: Broker,
    proxy: Proxy,
    central: Agent,
    ship: Agent,
    poll: String,
}

impl Rig {
    fn new(poll: Duration) -> Rig {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "ship1", "exec");
        let broker = Broker::start();
        let proxy = Proxy::start(broker.addr());
        let central = Agent::start_with_env(
            "central",
            &broker.url(),
            tmp.path(),
            &[],
            &[("OUTPOST_TEST_RTO_MS", "1000")],
        );
        let poll = format!("{}s", poll.as_secs());
        let ship = Agent::start_with(
            "ship1",
            &proxy.url(),
            tmp.path(),
            &["--link", "on-demand", "--poll", &poll, "--linger", "1s"],
        );
        Rig {
            _tmp: tmp,
            broker,
            proxy,
            central,
            ship,
            poll,
        }
    }

    /// Waits until the node has hung up and central knows it is asleep.
    fn wait_asleep(&self) {
        wait_until("ship1 hangs up", LONG, || {
            self.proxy.connections() == 0 && self.ship.status()["link"]["connected"] == false
        });
        wait_until("central knows ship1 polls", LONG, || {
            let n = self.central.call(&outpost::control::Request::Node {
                name: "ship1".into(),
            });
            n["node"]["state"] == "offline" && !n["node"]["poll"].is_null()
        });
    }

    /// Queues a command appending `i` to `file` on the ship; its job id.
    fn append(&self, i: usize, file: &Path) -> i64 {
        let script = format!("echo {i} >> {}", file.display());
        self.central
            .send_exec("ship1", "ordered", &["sh", "-c", &script], None)
    }

    fn wait_results(&self, n: usize) -> Vec<(i64, i64, String, String)> {
        wait_for(&format!("{n} results at central"), LONG, || {
            let r = self.central.results(n as u32 + 10);
            (r.len() >= n).then_some(r)
        })
    }
}

fn appended(file: &Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// One result per command, arriving in command order; each `ok` command
/// appended its number once, an `interrupted` one (killed mid-run) at most once.
fn check_in_order_once(results: &[(i64, i64, String, String)], n: usize, file: &Path) {
    assert_eq!(results.len(), n, "one result per command: {results:?}");
    let arrival: Vec<i64> = results.iter().map(|r| r.1).collect();
    let mut sorted = arrival.clone();
    sorted.sort();
    assert_eq!(arrival, sorted, "results arrived in command order");
    let lines = appended(file);
    let mut expect = Vec::new();
    for (i, (_, _, status, _)) in results.iter().enumerate() {
        let k = i as u64 + 1;
        match status.as_str() {
            "ok" => expect.push(k),
            "interrupted" if lines.contains(&k) => expect.push(k),
            "interrupted" => {}
            other => panic!("command {k} ended {other}"),
        }
    }
    assert_eq!(lines, expect, "each command ran at most once, in order");
}

#[test]
fn commands_queued_while_the_node_is_away_run_once_in_order_on_its_next_poll() {
    let rig = Rig::new(scaled(Duration::from_secs(5)));
    // Everything the broker carries to the node's inbox and presence, in the
    // one order it carried them.
    let cap = Capture::start_topics(&rig.broker, &["outpost/ship1/in", "outpost/ship1/presence"]);
    rig.wait_asleep();
    let file = rig.ship.dir.join("appended.txt");
    let polls_before = rig.proxy.accepted();
    // Should its poll come while the commands are being queued, it is refused
    // and tried again: all of them are queued while it is away.
    rig.proxy.set_mode(Mode::Refuse);

    // `send` says when the node will be back, on stderr: --json stays JSON.
    let script = format!("echo 1 >> {}", file.display());
    let out = rig.central.cli(&[
        "send", "--to", "ship1", "--async", "--json", "exec", "--", "sh", "-c", &script,
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["job"].is_i64(), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let notice = format!("ship1 polls every {}; next expected ", rig.poll);
    assert!(stderr.contains(&notice), "{stderr}");
    let n = 10;
    for i in 2..=n {
        rig.append(i, &file);
    }
    assert!(appended(&file).is_empty(), "nothing ran while away");
    rig.proxy.set_mode(Mode::Pass);

    let results = rig.wait_results(n);
    check_in_order_once(&results, n, &file);
    assert_eq!(appended(&file), (1..=n as u64).collect::<Vec<_>>());
    assert!(rig.proxy.accepted() > polls_before, "it came on a poll");

    // While it slept, central published each command once: no resend landed
    // in the broker's session for the node to download as a duplicate.
    let seen = cap.all();
    let asleep = seen
        .iter()
        .rposition(|(t, p)| t.ends_with("/presence") && p.starts_with(b"offline next="))
        .expect("the node said when it polls next");
    let woke = asleep
        + seen[asleep..]
            .iter()
            .position(|(t, p)| t.ends_with("/presence") && p == b"online")
            .expect("the node came back online");
    let sent = seen[asleep..woke]
        .iter()
        .filter(|(t, _)| t.ends_with("/in"))
        .count();
    assert_eq!(sent, n, "one payload per command while the node slept");

    // Quiet again: it hangs up, says so, and central shows how it polls.
    rig.wait_asleep();
    let link = &rig.ship.status()["link"];
    assert_eq!(link["mode"], "on-demand");
    assert!(link["next_poll_ms"].is_u64(), "{link}");
    let out = rig.central.cli(&["nodes", "show", "ship1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let says = format!("link       on-demand, every {}, next ", rig.poll);
    assert!(text.contains(&says), "{text}");
    let v: Value = serde_json::from_slice(
        &rig.central
            .cli(&["nodes", "show", "ship1", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(v["facts"]["link.mode"], "on-demand");
    assert_eq!(v["facts"]["link.poll"], rig.poll.as_str());
    assert_eq!(
        v["poll"]["every_s"].as_u64(),
        Some(scaled(Duration::from_secs(5)).as_secs())
    );
}

#[test]
fn a_node_killed_during_polls_loses_and_repeats_nothing() {
    let mut rig = Rig::new(Duration::from_secs(3));
    rig.wait_asleep();
    let file = rig.ship.dir.join("appended.txt");
    let n = 30;
    for i in 1..=n {
        // Slow enough that the kills land while commands run and results flow.
        let script = format!("echo {i} >> {}; sleep 0.2", file.display());
        rig.central
            .send_exec("ship1", "ordered", &["sh", "-c", &script], None);
    }
    for step in [4, 12, 20] {
        wait_until("the node makes progress on a poll", LONG, || {
            appended(&rig.ship.dir.join("appended.txt")).len() >= step
        });
        rig.ship.kill9_and_restart();
    }
    let results = rig.wait_results(n);
    check_in_order_once(&results, n, &file);
    let interrupted = results.iter().filter(|r| r.2 == "interrupted").count();
    eprintln!("{n} commands through 3 kills: {interrupted} interrupted");
    assert!(interrupted <= 3, "only what ran at a kill: {results:?}");
    rig.wait_asleep();
}

#[test]
fn an_idle_poll_is_one_short_connection() {
    let rig = Rig::new(Duration::from_secs(2));
    rig.wait_asleep();
    // The first poll after start synchronised and sent facts; later ones fetch
    // nothing. Three cycles, the smallest counted (a fact may change in one).
    let mut cycles = Vec::new();
    for _ in 0..3 {
        rig.proxy.reset_counters();
        let before = rig.proxy.accepted();
        wait_until("the node polls", LONG, || rig.proxy.accepted() > before);
        wait_until("and hangs up", LONG, || rig.proxy.connections() == 0);
        assert_eq!(rig.proxy.accepted(), before + 1, "one connection per poll");
        cycles.push((rig.proxy.bytes_up(), rig.proxy.bytes_down()));
    }
    let (up, down) = *cycles.iter().min_by_key(|(u, d)| u + d).unwrap();
    eprintln!(
        "idle poll, plain MQTT through the proxy: {up} B up + {down} B down = {} B (cycles {cycles:?})",
        up + down
    );
    assert!(up + down < 600, "{up} + {down} bytes");
}

#[test]
fn a_command_that_outlives_the_hold_sends_its_result_on_a_connect_of_its_own() {
    // Polls far apart: a connect before the next poll is the result's.
    let mut rig = Rig::new(Duration::from_secs(300));
    rig.wait_asleep();
    let job = rig.central.send_exec(
        "ship1",
        "ordered",
        &["sh", "-c", "sleep 20; echo done"],
        None,
    );
    // A start is a poll: the node fetches the command now, not in 5 minutes.
    rig.ship.kill9_and_restart();
    wait_until("ship1 runs the command", LONG, || {
        rig.central.job(job)["targets"][0]["state"] == "running"
    });
    // Ten lingers of quiet after its `Started` notice, it hangs up while the
    // command still runs.
    wait_until("ship1 hangs up while it runs", LONG, || {
        rig.proxy.connections() == 0 && rig.ship.status()["link"]["connected"] == false
    });
    assert!(rig.central.job(job)["targets"][0]["result"].is_null());
    let next_poll = rig.ship.status()["link"]["next_poll_ms"].as_u64().unwrap();
    let connects = rig.proxy.accepted();
    let j = wait_for("the result", LONG, || {
        let j = rig.central.job(job);
        (!j["targets"][0]["result"].is_null()).then_some(j)
    });
    assert_eq!(j["targets"][0]["result"]["stdout"], "done\n");
    assert!(
        outpost::agent::now_ms() < next_poll,
        "the result came before the next poll"
    );
    assert_eq!(
        rig.proxy.accepted(),
        connects + 1,
        "one connect for the result"
    );
}
