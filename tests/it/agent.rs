//! The real `outpost` binary against a real mosquitto, with a fault proxy between
//! the node agent and the broker.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::broker::Broker;
pub use crate::support::outpost::{introduce, outpost, Agent, BIN};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

/// A broker, a `central` agent on it directly and a `ship1` agent behind a proxy.
struct Rig {
    _tmp: TempDir,
    broker: Broker,
    proxy: Proxy,
    central: Agent,
    ship: Agent,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(&[])
    }

    fn with(extra: &[&str]) -> Rig {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "ship1", "exec,ping,http-get");
        let broker = Broker::start();
        let proxy = Proxy::start(broker.addr());
        let central = Agent::start_with("central", &broker.url(), tmp.path(), extra);
        let ship = Agent::start_with("ship1", &proxy.url(), tmp.path(), extra);
        let rig = Rig {
            _tmp: tmp,
            broker,
            proxy,
            central,
            ship,
        };
        wait_until("central sees ship1 online", LONG, || {
            rig.central.sees_online("ship1")
        });
        rig
    }

    fn take_ship_offline(&self) {
        self.proxy.set_mode(Mode::Refuse);
        wait_until("central sees ship1 offline", LONG, || {
            !self.central.sees_online("ship1")
        });
    }

    /// Queues `n` ordered commands that each append their number to `file` on the ship.
    fn queue_appends(&self, n: usize, file: &Path) -> Vec<i64> {
        (1..=n)
            .map(|i| {
                let script = format!("echo {i} >> {}", file.display());
                self.central
                    .send_exec("ship1", "ordered", &["sh", "-c", &script], None)
            })
            .collect()
    }

    fn wait_results(&self, n: usize) -> Vec<(i64, i64, String, String)> {
        wait_for(
            &format!("{n} results at central"),
            Duration::from_secs(300),
            || {
                let r = self.central.results(n as u32 + 10);
                (r.len() >= n).then_some(r)
            },
        )
    }
}

fn appended(file: &Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Results arrive once each, in the order the commands were sent (result ids are
/// numbered in arrival order), and every `ok` command appended exactly its number.
fn check_in_order_once(results: &[(i64, i64, String, String)], n: usize, file: &Path) {
    assert_eq!(results.len(), n, "one result per command");
    let arrival: Vec<i64> = results.iter().map(|r| r.1).collect();
    let mut sorted = arrival.clone();
    sorted.sort();
    assert_eq!(arrival, sorted, "results arrived in command order");
    let lines = appended(file);
    let mut expect = Vec::new();
    for (i, (_, _, status, _)) in results.iter().enumerate() {
        match status.as_str() {
            "ok" => expect.push(i as u64 + 1),
            // Killed mid-run: it may or may not have appended, but never twice.
            "interrupted" => {
                if lines.contains(&(i as u64 + 1)) {
                    expect.push(i as u64 + 1);
                }
            }
            other => panic!("command {} ended {other}", i + 1),
        }
    }
    assert_eq!(lines, expect, "each command ran at most once, in order");
}

#[test]
fn exec_online_returns_output_and_exit_code_in_text_and_json() {
    let rig = Rig::new();
    let out = rig.central.cli(&[
        "send", "--to", "ship1", "exec", "--", "echo", "hello", "world",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ship1: hello world\n");

    let out = rig.central.cli(&[
        "send",
        "--to",
        "ship1",
        "--json",
        "exec",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed target makes the exit status non-zero"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "ship1");
    assert_eq!(v["status"], "failed");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "out\n");
    assert_eq!(v["stderr"], "err\n");
    assert_eq!(v["truncated"], false);
    assert!(v["job"].is_i64() && v["duration_ms"].is_u64());

    let out = rig
        .central
        .cli(&["send", "--to", "nomatch-*", "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no trusted node matches"),
        "{out:?}"
    );
    let out = rig.central.cli(&["send", "--to", "ship*", "ping"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ship1: round trip"));
}

#[test]
fn commands_queued_offline_run_once_in_order_when_the_link_returns() {
    let rig = Rig::new();
    let file = rig.ship.dir.join("appended.txt");
    rig.take_ship_offline();
    let jobs = rig.queue_appends(200, &file);
    assert_eq!(jobs.len(), 200);
    assert!(appended(&file).is_empty(), "nothing ran while offline");
    rig.proxy.set_mode(Mode::Pass);
    let results = rig.wait_results(200);
    check_in_order_once(&results, 200, &file);
    assert_eq!(appended(&file), (1..=200).collect::<Vec<_>>());
}

#[test]
fn node_killed_at_random_moments_reports_interrupted_and_never_reruns() {
    let mut rig = Rig::new();
    let file = rig.ship.dir.join("appended.txt");
    rig.take_ship_offline();
    rig.queue_appends(200, &file);
    rig.proxy.set_mode(Mode::Pass);
    // Kill the node whenever it has made some progress, a few times over.
    let mut seed = 0x5eed_u64;
    for _ in 0..4 {
        let before = appended(&file).len();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let step = 10 + (seed >> 33) as usize % 30;
        wait_until("node makes progress", LONG, || {
            appended(&file).len() >= (before + step).min(200)
        });
        rig.ship.kill9_and_restart();
    }
    let results = rig.wait_results(200);
    check_in_order_once(&results, 200, &file);
}

#[test]
fn central_killed_and_restarted_receives_every_result_once() {
    let mut rig = Rig::new();
    let file = rig.ship.dir.join("appended.txt");
    rig.take_ship_offline();
    rig.queue_appends(200, &file);
    rig.proxy.set_mode(Mode::Pass);
    for step in [40, 120] {
        wait_until("node makes progress", LONG, || {
            appended(&file).len() >= step
        });
        rig.central.kill9_and_restart();
    }
    let results = rig.wait_results(200);
    check_in_order_once(&results, 200, &file);
    assert_eq!(appended(&file), (1..=200).collect::<Vec<_>>());
}

#[test]
fn broker_restart_without_persistence_loses_and_duplicates_nothing() {
    let mut rig = Rig::new();
    let file = rig.ship.dir.join("appended.txt");
    rig.take_ship_offline();
    rig.queue_appends(200, &file);
    rig.proxy.set_mode(Mode::Pass);
    wait_until("node makes progress", LONG, || appended(&file).len() >= 50);
    rig.broker.restart();
    let results = rig.wait_results(200);
    check_in_order_once(&results, 200, &file);
    assert_eq!(appended(&file), (1..=200).collect::<Vec<_>>());
}

#[test]
fn flapping_link_loses_duplicates_and_reorders_nothing() {
    let rig = Rig::new();
    // Enough commands (each a shell) that the run spans several flaps.
    let n = 2000;
    let file = rig.ship.dir.join("appended.txt");
    rig.queue_appends(n, &file);
    let mut flips = 0;
    while rig.central.results(n as u32 + 50).len() < n {
        // Down and up every few hundred milliseconds, measured by the proxy's own
        // connection count rather than by sleeping blindly.
        rig.proxy.set_mode(Mode::Refuse);
        std::thread::sleep(Duration::from_millis(200));
        rig.proxy.set_mode(Mode::Pass);
        let accepted = rig.proxy.accepted();
        wait_until("the node reconnects", LONG, || {
            rig.proxy.accepted() > accepted
        });
        std::thread::sleep(Duration::from_millis(300));
        flips += 1;
        assert!(flips < 400, "no completion after {flips} flaps");
    }
    let results = rig.wait_results(n);
    check_in_order_once(&results, n, &file);
    assert_eq!(appended(&file), (1..=n as u64).collect::<Vec<_>>());
    eprintln!("{n} commands over {flips} flaps");
    assert!(flips >= 2, "the link flapped during the run ({flips})");
}

#[test]
fn ttl_expired_while_offline_is_not_run_and_reports_expired() {
    let rig = Rig::new();
    let marker = rig.ship.dir.join("must-not-exist");
    rig.take_ship_offline();
    let job = rig.central.send_exec(
        "ship1",
        "ordered",
        &["touch", marker.to_str().unwrap()],
        Some(1),
    );
    // The TTL is measured against the sender's clock in the frame: wait it out.
    let created = rig.central.job(job)["created_ms"].as_u64().unwrap();
    wait_until("the ttl passes", LONG, || {
        outpost::agent::now_ms() > created + 1_500
    });
    rig.proxy.set_mode(Mode::Pass);
    let j = wait_for("the expired result", LONG, || {
        let j = rig.central.job(job);
        (!j["targets"][0]["result"].is_null()).then_some(j)
    });
    assert_eq!(j["targets"][0]["result"]["status"], "expired");
    assert!(!marker.exists());
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let rig = Rig::new();
    let pidfile = rig.ship.dir.join("pids");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", pidfile.display());
    let out = rig.central.cli(&[
        "send",
        "--to",
        "ship1",
        "--timeout",
        "1s",
        "--json",
        "exec",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!({}));
    assert_eq!(v["status"], "timeout", "{out:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the backgrounded child is gone", LONG, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it: nothing runs.
        stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z")
    });
}

#[test]
fn parallel_lane_does_not_hold_back_the_ordered_lane() {
    let rig = Rig::new();
    let gate = rig.ship.dir.join("gate");
    let wait_gate = format!("while [ ! -e {} ]; do sleep 0.1; done", gate.display());
    let slow: Vec<i64> = (0..2)
        .map(|_| {
            rig.central
                .send_exec("ship1", "parallel", &["sh", "-c", &wait_gate], None)
        })
        .collect();
    let quick = rig
        .central
        .send_exec("ship1", "ordered", &["echo", "quick"], None);
    let j = wait_for(
        "the ordered command finishes while the parallel ones wait",
        LONG,
        || {
            let j = rig.central.job(quick);
            (!j["targets"][0]["result"].is_null()).then_some(j)
        },
    );
    assert_eq!(j["targets"][0]["result"]["stdout"], "quick\n");
    for id in &slow {
        assert!(
            rig.central.job(*id)["targets"][0]["result"].is_null(),
            "parallel commands still running"
        );
        wait_until("central's jobs say running", LONG, || {
            rig.central.job(*id)["targets"][0]["state"] == "running"
        });
    }
    let out = rig.central.cli(&["jobs"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ship1=running"),
        "{out:?}"
    );
    std::fs::write(&gate, b"").unwrap();
    for id in slow {
        wait_until("the parallel commands finish", LONG, || {
            !rig.central.job(id)["targets"][0]["result"].is_null()
        });
    }
}

#[test]
fn restart_with_ten_thousand_queued_results_replays_them_in_order_with_flat_memory() {
    // Durability normal: this is about replay and memory, not fsync speed.
    let mut rig = Rig::with(&["--durability", "normal"]);
    let n = 10_000;
    // Queue the commands while the node is offline, let it run them with its
    // results unable to leave, then restart it with the whole backlog.
    rig.take_ship_offline();
    let items: Vec<i64> = (0..n)
        .map(|i| {
            rig.central
                .send_exec("ship1", "ordered", &["echo", &i.to_string()], None)
        })
        .collect();
    assert_eq!(items.len(), n);
    rig.proxy.set_mode(Mode::Pass);
    wait_until(
        "the node has every command",
        Duration::from_secs(600),
        || {
            let s = rig.central.status();
            s["outbox"].as_array().unwrap().is_empty()
        },
    );
    rig.proxy.set_mode(Mode::Blackhole);
    wait_until("the node ran everything", Duration::from_secs(600), || {
        let s = rig.ship.status();
        s["inbox"].as_array().unwrap().is_empty() && s["running"].as_array().unwrap().is_empty()
    });
    rig.ship.kill9();
    rig.proxy.set_mode(Mode::Pass);
    rig.proxy.cut();
    rig.ship.kill9_and_restart();
    let rss_start = rig.ship.peak_rss_kib();
    let results = wait_for("every result at central", Duration::from_secs(600), || {
        let r = rig.central.results(n as u32 + 10);
        (r.len() >= n).then_some(r)
    });
    let peak = rig.ship.peak_rss_kib();
    eprintln!("replay of {n} results: node peak RSS {peak} KiB (at start {rss_start} KiB)");
    let arrival: Vec<i64> = results.iter().map(|r| r.1).collect();
    let mut sorted = arrival.clone();
    sorted.sort();
    assert_eq!(arrival, sorted, "results arrived in order");
    for (i, r) in results.iter().enumerate() {
        assert_eq!((r.2.as_str(), r.3.trim()), ("ok", i.to_string().as_str()));
    }
    assert!(
        peak < rss_start + 32 * 1024,
        "memory stays flat while replaying: {rss_start} -> {peak} KiB"
    );
}

#[test]
fn demo_runs_the_whole_system_and_cleans_up() {
    let out = Command::new(BIN)
        .arg("demo")
        .output()
        .expect("run outpost demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 1..=5 {
        assert!(text.contains(&format!("node-b: step {i} on")), "{text}");
    }
    let b_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("node-b: step"))
        .collect();
    assert!(
        b_lines.windows(2).all(|w| w[0] < w[1]),
        "node-b ran in order: {b_lines:?}"
    );
}

#[test]
fn http_get_fetches_from_the_nodes_network_with_status_headers_and_body() {
    use std::io::{Read, Write};
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/status", server.local_addr().unwrap());
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = server.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Outpost-Test: yes\r\nConnection: close\r\n\r\nhello");
        }
    });
    let rig = Rig::new();
    let out = rig
        .central
        .cli(&["send", "--to", "ship1", "--json", "http-get", &url]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["stdout"], "hello");
    assert_eq!(v["http_status"], 200);
    // `send --json` carries the headers as `jobs show --json` does.
    let sent = v["http_headers"].as_array().unwrap();
    assert!(
        sent.iter()
            .any(|h| h[0] == "x-outpost-test" && h[1] == "yes"),
        "{v}"
    );
    let job = rig.central.job(v["job"].as_i64().unwrap());
    let headers = job["targets"][0]["result"]["http_headers"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "x-outpost-test" && h[1] == "yes"),
        "{headers:?}"
    );
}

#[test]
fn cli_errors_are_one_clear_line() {
    let tmp = TempDir::new();
    let out = Command::new(BIN)
        .args(["send", "--to", "ship1", "exec", "--", "true"])
        .env("OUTPOST_STATE_DIR", tmp.path().join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no agent running for state directory"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["send", "--bogus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn config_check_prints_the_effective_config_and_names_bad_keys() {
    let tmp = TempDir::new();
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "name = \"ship1\"\nbroker = \"mqtt://10.0.0.1\"\nbackoff_cap = \"5m\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--json", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "ship1");
    assert_eq!(v["broker"], "mqtt://10.0.0.1:1883");
    assert_eq!(v["backoff_cap"], "5m");
    assert_eq!(v["durability"], "full");

    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"ship1\"\nbroker = \"mqtt://10.0.0.1\"\nquota = \"lots\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("quota:"),
        "{out:?}"
    );
}
