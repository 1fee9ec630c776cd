//! Facts and the registry through the real binary and a real mosquitto: facts
//! reach central and `nodes show` shows them; an idle node sends nothing after
//! the first set, a changed `facts_dir` file one small change; a central that lost
//! its store gets a full set; `--where` and `--online` pick the nodes `send` goes
//! to; trusted nodes never seen are listed as such; untrusted agents never are.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use outpost::control::Request;

use crate::support::broker::Broker;
use crate::support::outpost::{count_log, keygen, trust, Agent};
use crate::support::proxy::Proxy;
use crate::support::{wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

/// A facts_dir for `name` with a `KEY=VALUE` file and a script.
fn facts_dir(base: &Path, name: &str, role: &str) -> String {
    let dir = base.join(format!("{name}-facts.d"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("role"), format!("# the node's job\nrole={role}\n")).unwrap();
    let script = dir.join("hw.sh");
    std::fs::write(&script, "#!/bin/sh\necho model=pi4\necho site=north\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.to_str().unwrap().to_string()
}

fn node(central: &Agent, name: &str) -> Value {
    central.call(&Request::Node { name: name.into() })["node"].clone()
}

fn fact(central: &Agent, name: &str, key: &str) -> Option<String> {
    node(central, name)["facts"][key]
        .as_str()
        .map(str::to_string)
}

#[test]
fn facts_reach_central_and_nodes_show_shows_them() {
    let tmp = TempDir::new();
    let (c, s) = (keygen(tmp.path(), "central"), keygen(tmp.path(), "ship1"));
    trust(tmp.path(), "ship1", "central", &c, "exec");
    trust(tmp.path(), "central", "ship1", &s, "");
    let dir = facts_dir(tmp.path(), "ship1", "gateway");
    // A failing entry: its good lines count, and it is named and logged.
    let broken = Path::new(&dir).join("broken.sh");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho half=done\necho no sensor >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &["--facts-dir", &dir]);
    wait_until("ship1's custom facts at central", LONG, || {
        fact(&central, "ship1", "model").as_deref() == Some("pi4")
    });
    let n = node(&central, "ship1");
    let facts = &n["facts"];
    assert_eq!(facts["role"], "gateway", "{n}");
    assert_eq!(facts["site"], "north");
    assert_eq!(facts["facts.failed"], "broken.sh", "{n}");
    assert!(
        facts["half"].is_null(),
        "a failing program's output is not taken"
    );
    assert!(
        ship.full_log()
            .contains("facts_dir entry broken.sh failed: exit status 3: no sensor"),
        "{}",
        ship.log()
    );
    // And in central's error log.
    wait_until("the failing entry in central's error log", LONG, || {
        let out = central.cli(&["errors", "--node", "ship1", "--json"]);
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["kind"] == "facts"
                && e["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("broken.sh failed: exit status 3"))
        })
    });
    assert_eq!(facts["arch"], std::env::consts::ARCH);
    assert_eq!(facts["outpost.version"], env!("CARGO_PKG_VERSION"));
    for key in [
        "hostname",
        "kernel",
        "boot.id",
        "boot.time",
        "load.15",
        "mem.total",
    ] {
        assert!(facts[key].is_string(), "{key} missing: {n}");
    }
    assert!(facts["uptime"].is_null(), "uptime is not a fact");
    assert!(facts["disk.state.free"].is_string());
    assert_eq!(n["state"], "online");
    assert!(n["last_seen_ms"].is_u64() && n["facts_ms"].is_u64(), "{n}");

    let out = central.cli(&["nodes", "show", "ship1"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node       ship1"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("role") && l.contains("gateway")),
        "{text}"
    );
    let out = central.cli(&["nodes", "show", "ship1", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["facts"]["model"], "pi4");
    // central is trusted with nothing by... nobody: it reports to no one, and a
    // node does not list itself.
    assert!(fact(&ship, "central", "hostname").is_none());
    let out = central.cli(&["nodes", "show", "central"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn an_idle_node_sends_no_facts_after_the_first_set_and_one_small_change_per_edit() {
    let tmp = TempDir::new();
    let (c, s) = (keygen(tmp.path(), "central"), keygen(tmp.path(), "ship1"));
    trust(tmp.path(), "ship1", "central", &c, "facts");
    trust(tmp.path(), "central", "ship1", &s, "");
    let dir = facts_dir(tmp.path(), "ship1", "gateway");
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let mut central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    // Facts read every second: 300 times as often as by default.
    let ship = Agent::start_with(
        "ship1",
        &proxy.url(),
        tmp.path(),
        &["--facts-dir", &dir, "--facts-interval", "1s"],
    );
    wait_until("the first set at central", LONG, || {
        fact(&central, "ship1", "role").as_deref() == Some("gateway")
    });
    assert_eq!(count_log(&ship, "facts: all "), 1, "{}", ship.log());
    // Settled: central's ack of the set has arrived.
    wait_until("ship1's outbox empty", LONG, || {
        ship.status()["outbox"].as_array().unwrap().is_empty()
    });
    proxy.reset_counters();
    let idle = count_log(&ship, "nothing changed enough to send");
    wait_until("five more readings", LONG, || {
        count_log(&ship, "nothing changed enough to send") >= idle + 5
    });
    // Keepalive pings (2 bytes each) at most: no payload is that small.
    assert!(
        proxy.bytes_up() < 20,
        "an idle node sent {} bytes",
        proxy.bytes_up()
    );
    assert_eq!(count_log(&ship, "facts: a change of"), 0);

    std::fs::write(Path::new(&dir).join("role"), "role=spare\n").unwrap();
    wait_until("the change at central", LONG, || {
        fact(&central, "ship1", "role").as_deref() == Some("spare")
    });
    wait_until("ship1's outbox empty again", LONG, || {
        ship.status()["outbox"].as_array().unwrap().is_empty()
    });
    let after = count_log(&ship, "nothing changed enough to send");
    wait_until("two more readings", LONG, || {
        count_log(&ship, "nothing changed enough to send") >= after + 2
    });
    assert_eq!(count_log(&ship, "facts: a change of"), 1, "{}", ship.log());
    let up = proxy.bytes_up();
    assert!(up < 200, "one changed fact cost {up} bytes up");
    eprintln!("one changed custom fact: {up} bytes from the node");
    assert_eq!(fact(&central, "ship1", "model").as_deref(), Some("pi4"));

    // A central that lost its store gets everything again, unchanged facts too.
    central.kill9();
    for f in ["store.db", "store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(central.dir.join(f));
    }
    central.restart();
    wait_until("a full set at central's new store", LONG, || {
        fact(&central, "ship1", "model").as_deref() == Some("pi4")
    });
    assert_eq!(fact(&central, "ship1", "role").as_deref(), Some("spare"));
    assert_eq!(count_log(&ship, "facts: all "), 2, "{}", ship.log());
}

#[test]
fn where_and_online_pick_the_nodes_send_goes_to_and_untrusted_agents_never_appear() {
    let tmp = TempDir::new();
    let base = tmp.path();
    let c = keygen(base, "central");
    for (ship, role) in [("ship1", "gateway"), ("ship2", "spare")] {
        let k = keygen(base, ship);
        trust(base, ship, "central", &c, "exec,ping");
        trust(base, "central", ship, &k, "");
        facts_dir(base, ship, role);
    }
    // Trusted, never started.
    let k3 = keygen(base, "ship3");
    trust(base, "central", "ship3", &k3, "");
    // Runs on the same broker and trusts central, but central does not trust it.
    keygen(base, "shipx");
    trust(base, "shipx", "central", &c, "exec,ping");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), base, &[]);
    let fd = |n: &str| {
        base.join(format!("{n}-facts.d"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let _ship1 = Agent::start_with("ship1", &broker.url(), base, &["--facts-dir", &fd("ship1")]);
    let _ship2 = Agent::start_with("ship2", &broker.url(), base, &["--facts-dir", &fd("ship2")]);
    let _shipx = Agent::start_with("shipx", &broker.url(), base, &[]);
    for ship in ["ship1", "ship2"] {
        wait_until("facts at central", LONG, || {
            fact(&central, ship, "role").is_some()
        });
    }
    wait_until("both online", LONG, || {
        central.sees_online("ship1") && central.sees_online("ship2")
    });

    let nodes: Value = serde_json::from_slice(&central.cli(&["nodes", "--json"]).stdout).unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ship1", "ship2", "ship3"], "shipx is not trusted");
    assert_eq!(nodes[2]["state"], "never seen");
    assert!(nodes[2]["facts"].as_object().unwrap().is_empty());
    let out = central.cli(&["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ship3") && l.contains("never seen")),
        "{text}"
    );
    assert!(!text.contains("shipx"), "{text}");
    let arch = format!("arch={}", std::env::consts::ARCH);
    let picked = |args: &[&str]| -> Vec<String> {
        let out = central.cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        picked(&["nodes", "--where", &arch, "--json"]),
        ["ship1", "ship2"]
    );
    assert_eq!(
        picked(&["nodes", "--where", "role!=gateway", "--json"]),
        ["ship2"]
    );
    assert_eq!(
        picked(&["nodes", "--online", "--to", "ship*", "--json"]),
        ["ship1", "ship2"]
    );
    let out = central.cli(&["nodes", "--where", "role=captain"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // send: the same selectors, through the agent's one target rule.
    let out = central.cli(&[
        "send",
        "--to",
        "ship*",
        "--where",
        "role=gateway",
        "exec",
        "--",
        "echo",
        "hi",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ship1: hi\n");
    let targets = |args: &[&str]| -> Vec<String> {
        let out = central.cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        targets(&[
            "send",
            "--where",
            "role!=gateway",
            "--where",
            &arch,
            "--async",
            "--json",
            "ping"
        ]),
        ["ship2"]
    );
    assert_eq!(
        targets(&["send", "--to", "ship*", "--online", "--async", "--json", "ping"]),
        ["ship1", "ship2"]
    );
    let out = central.cli(&["send", "--to", "ship*", "--async", "--json", "ping"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ship3 has never been seen"),
        "{out:?}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["targets"].as_array().unwrap().len(),
        3,
        "globs match trusted nodes, seen or not"
    );
    let out = central.cli(&["send", "--where", "role=captain", "ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no trusted node named by \"*\" matches --where role=captain"),
        "{out:?}"
    );
    let out = central.cli(&["send", "--to", "ship3", "--online", "ping"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = central.cli(&["send", "--to", "shipx", "ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in this node's trust file"));
    let out = central.cli(&["send", "--to", "shipx*", "ping"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a glob never reaches an untrusted agent"
    );
    let out = central.cli(&["nodes", "show", "shipx"]);
    assert_eq!(out.status.code(), Some(2));
}
