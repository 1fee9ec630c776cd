//! The promises under attack and fault (issue 11): each test is named after the
//! behaviour it pins and injects its fault from outside, as an attacker or an
//! unlucky operator would: SIGKILL, files deleted or flipped on disk, a plain MQTT
//! client publishing what it likes, signals.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use outpost::control::{CommandSpec, Request};

use crate::agent::{introduce, outpost, Agent};
use crate::support::broker::Broker;
use crate::support::mqtt::{assert_no_nonce_reused, flood, publish, publish_retained, Capture};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// An exec request as the control socket takes it.
fn exec(argv: &[&str]) -> CommandSpec {
    CommandSpec::Exec {
        argv: argv.iter().map(std::string::ToString::to_string).collect(),
        env: vec![],
        cwd: None,
        stdin: String::new(),
        timeout_ms: Some(60_000),
        rerun: false,
    }
}

fn send(agent: &Agent, to: &str, command: CommandSpec) -> i64 {
    agent.call(&Request::Send {
        where_: vec![],
        online: false,
        to: to.into(),
        lane: None,
        ttl_s: None,
        key: None,
        output: None,
        command,
    })["job"]
        .as_i64()
        .unwrap()
}

/// The job's single target's result, once it has one.
fn result_of(agent: &Agent, job: i64) -> Value {
    wait_for(&format!("a result for job {job}"), LONG, || {
        let t = agent.job(job)["targets"][0].clone();
        (!t["result"].is_null()).then(|| t["result"].clone())
    })
}

/// Appends `word` to `file` on the node that runs it.
fn append(word: &str, file: &Path) -> CommandSpec {
    exec(&["sh", "-c", &format!("echo {word} >> {}", file.display())])
}

#[test]
fn a_path_limited_exec_runs_clean_and_refuses_bash_env_ld_preload_stdin_and_other_directories() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let ship_dir = tmp.path().join("ship1");
    let script = ship_dir.join("allowed.sh");
    std::fs::write(&script, "#!/bin/sh\nenv | sort | tr '\\n' ' '\necho\npwd\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let central_key = {
        let out = outpost(&[
            "keys",
            "show",
            "--state-dir",
            tmp.path().join("central").to_str().unwrap(),
        ]);
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    outpost(&[
        "keys",
        "trust",
        "--state-dir",
        ship_dir.to_str().unwrap(),
        "central",
        &central_key,
        "--allow",
        "exec",
        "--exec-path",
        script.to_str().unwrap(),
        "--exec-env",
        "TZ",
    ]);
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    // Whatever the agent itself was started with is not handed on.
    let ship = Agent::start_with_env(
        "ship1",
        &broker.url(),
        tmp.path(),
        &[],
        &[("OUTPOST_TEST_SECRET", "leaked")],
    );
    let prog = script.to_str().unwrap();
    let with = |f: &dyn Fn(&mut CommandSpec)| {
        let mut c = exec(&[prog]);
        f(&mut c);
        result_of(&central, send(&central, "ship1", c))
    };

    let r = with(&|c| {
        if let CommandSpec::Exec { env, .. } = c {
            env.push(("TZ".into(), "UTC".into()));
        }
    });
    assert_eq!(r["status"], "ok", "{r}");
    let out = r["stdout"].as_str().unwrap();
    let (env, pwd) = out.split_once('\n').unwrap();
    let names: Vec<&str> = env
        .split_whitespace()
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["HOME", "LANG", "OUTPOST_AGENT", "PATH", "PWD", "TZ"],
        "{env}"
    );
    assert!(env.contains("HOME=/ ") && env.contains("TZ=UTC"), "{env}");
    assert_eq!(pwd.trim(), "/");

    for (var, value) in [("BASH_ENV", "/dev/stdin"), ("LD_PRELOAD", "/tmp/evil.so")] {
        let r = with(&|c| {
            if let CommandSpec::Exec { env, .. } = c {
                env.push((var.into(), value.into()));
            }
        });
        assert_eq!(r["status"], "rejected", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("may not set {var}")),
            "{r}"
        );
    }
    let r = with(&|c| {
        if let CommandSpec::Exec { stdin, .. } = c {
            *stdin = "echo owned > /tmp/outpost-owned\n".into();
        }
    });
    assert_eq!(r["status"], "rejected", "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("may not send stdin"),
        "{r}"
    );
    let r = with(&|c| {
        if let CommandSpec::Exec { cwd, .. } = c {
            *cwd = Some("/etc".into());
        }
    });
    assert_eq!(r["status"], "rejected", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("may not run a path-limited exec in"),
        "{r}"
    );
    // Any other program, by any spelling of its path, is refused as before.
    let r = result_of(
        &central,
        send(&central, "ship1", exec(&["/bin/sh", "-c", "id"])),
    );
    assert_eq!(r["status"], "rejected", "{r}");
    drop(ship);
}

#[test]
fn a_deleted_central_store_seals_under_a_new_key_and_its_new_commands_run_once() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/+/in");
    let mut central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let file = ship.dir.join("runs");
    for w in ["a1", "a2"] {
        assert_eq!(
            result_of(&central, send(&central, "ship1", append(w, &file)))["status"],
            "ok"
        );
    }
    central.kill9();
    for f in ["store.db", "store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(central.dir.join(f));
    }
    central.restart();
    let lost = central.status()["store"]["lost"].clone();
    assert!(
        lost["reason"].as_str().unwrap().contains("holds nothing"),
        "central did not report its lost store: {lost}"
    );
    let jobs: Vec<i64> = ["b1", "b2", "b3", "b4"]
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    for j in jobs {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    assert_eq!(lines(&file), ["a1", "a2", "b1", "b2", "b3", "b4"]);
    let n = assert_no_nonce_reused(&capture);
    assert!(n >= 12, "captured only {n} payloads");
}

#[test]
fn a_replayed_payload_never_runs_again_after_the_node_lost_its_wal_and_new_commands_run_once() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let capture = Capture::start(&broker, "outpost/+/in");
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let file = ship.dir.join("runs");
    let first: Vec<i64> = ["a1", "a2", "a3"]
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    for &j in &first {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    let captured = capture.payloads("outpost/ship1/in");
    ship.kill9();
    for f in ["store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(ship.dir.join(f));
    }
    ship.restart();
    assert!(
        !ship.status()["store"]["lost"].is_null(),
        "the node did not notice its store went back"
    );
    // Everything central ever sealed for ship1, published again by a stranger.
    for p in &captured {
        publish(&broker, "outpost/ship1/in", p, tmp.path());
    }
    let second: Vec<i64> = ["b1", "b2", "b3"]
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    for &j in &second {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    wait_until("ship1 refused every replay", LONG, || {
        let r = &ship.status()["security"]["rejected"];
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        n("sealed for an earlier store of this node") + n("bad seal") >= captured.len() as u64
    });
    assert_eq!(lines(&file), ["a1", "a2", "a3", "b1", "b2", "b3"]);
}

/// Flips one byte of the first frame of `wal`, as a failing flash cell would.
fn flip_wal(wal: &Path) {
    let mut bytes = std::fs::read(wal).unwrap();
    // 32-byte WAL header, 24-byte frame header, then the page.
    assert!(
        bytes.len() > 200,
        "no WAL to damage ({} bytes)",
        bytes.len()
    );
    bytes[32 + 24 + 100] ^= 0x40;
    std::fs::write(wal, bytes).unwrap();
}

#[test]
fn a_damaged_wal_is_noticed_nothing_runs_twice_and_the_stream_moves_on() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let file = ship.dir.join("runs");
    let words: Vec<String> = (1..=24).map(|i| format!("a{i}")).collect();
    let jobs: Vec<i64> = words
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    for &j in &jobs {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    ship.kill9();
    flip_wal(&ship.dir.join("store.db-wal"));
    ship.restart();
    let lost = ship.status()["store"]["lost"].clone();
    assert!(
        lost["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("went back"),
        "{lost}"
    );
    let more: Vec<i64> = ["b1", "b2", "b3"]
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    for &j in &more {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    let mut expected = words.clone();
    expected.extend(["b1", "b2", "b3"].map(String::from));
    assert_eq!(lines(&file), expected, "a command ran twice or not at all");
}

#[test]
fn an_emptied_store_is_reported_and_the_commands_it_held_come_back_interrupted_not_run_twice() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let file = ship.dir.join("runs");
    // Slow ordered commands: most are delivered (in the node's store) but not yet run.
    let jobs: Vec<i64> = (1..=10)
        .map(|i| {
            let cmd = format!("sleep 0.5; echo a{i} >> {}", file.display());
            send(&central, "ship1", exec(&["sh", "-c", &cmd]))
        })
        .collect();
    wait_until("all ten delivered and two run", LONG, || {
        let delivered = jobs
            .iter()
            .all(|&j| central.job(j)["targets"][0]["state"] != "queued");
        delivered && lines(&file).len() >= 2
    });
    ship.kill9();
    std::fs::File::create(ship.dir.join("store.db")).unwrap();
    for f in ["store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(ship.dir.join(f));
    }
    ship.restart();
    assert!(!ship.status()["store"]["lost"].is_null());
    let ran = lines(&file);
    let mut statuses = Vec::new();
    for (i, &j) in jobs.iter().enumerate() {
        let r = result_of(&central, j);
        let status = r["status"].as_str().unwrap().to_string();
        let word = format!("a{}", i + 1);
        match status.as_str() {
            "ok" => assert!(ran.contains(&word), "{word} reported ok but did not run"),
            "interrupted" => {}
            other => panic!("job {j}: {other}: {r}"),
        }
        statuses.push(status);
    }
    assert!(
        statuses.contains(&"interrupted".to_string()),
        "{statuses:?}"
    );
    let after = send(&central, "ship1", append("b1", &file));
    assert_eq!(result_of(&central, after)["status"], "ok");
    let all = lines(&file);
    let mut dedup = all.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), all.len(), "a command ran twice: {all:?}");
}

#[test]
fn a_forged_offline_presence_does_not_hold_a_live_node_back() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    publish_retained(&broker, "outpost/ship1/presence", b"offline", tmp.path());
    let file = ship.dir.join("runs");
    let j = send(&central, "ship1", append("x", &file));
    assert_eq!(result_of(&central, j)["status"], "ok");
    wait_until("the node put its presence right", LONG, || {
        central.sees_online("ship1") && ship.full_log().contains("setting it back to online")
    });
}

#[test]
fn presence_and_payloads_from_untrusted_names_match_no_glob_and_cost_the_node_nothing() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    publish_retained(
        &broker,
        "outpost/ship1-evil/presence",
        b"online",
        tmp.path(),
    );
    let out = central.cli(&["send", "--to", "ship*", "--json", "exec", "--", "true"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().count(),
        1,
        "a name nobody trusts was a target: {text}"
    );

    let rss_before = ship.peak_rss_kib();
    let n = 20_000;
    flood(
        &broker,
        (0..n).map(|i| {
            let name = format!("forged-{i}");
            // A header naming an untrusted sender, then garbage.
            let mut p = vec![0x29, name.len() as u8];
            p.extend(name.as_bytes());
            p.extend([1u8; 20]);
            if i % 2 == 0 {
                ("outpost/ship1/in".to_string(), p)
            } else {
                (format!("outpost/{name}/presence"), b"online".to_vec())
            }
        }),
    );
    wait_until("the node counted the flood", LONG, || {
        ship.status()["security"]["rejected"]["untrusted sender"].as_u64() >= Some(n / 2)
    });
    let status = serde_json::to_string(&ship.status()).unwrap();
    assert!(
        status.len() < 16 * 1024,
        "status grew to {} bytes",
        status.len()
    );
    let grown = ship.peak_rss_kib().saturating_sub(rss_before);
    assert!(grown < 4 * 1024, "the node grew by {grown} KiB");
    let warned = ship.full_log().matches("untrusted sender").count();
    assert!(warned <= 3, "logged {warned} lines about the flood");
    // Still serving.
    let j = send(&central, "ship1", exec(&["true"]));
    assert_eq!(result_of(&central, j)["status"], "ok");
}

#[test]
fn an_oversized_message_costs_the_node_one_reconnect_not_its_link() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    // Retained on a presence topic the node subscribes to: it comes back with
    // every subscribe.
    publish_retained(
        &broker,
        "outpost/central/presence",
        &vec![b'x'; 3 << 20],
        tmp.path(),
    );
    wait_until("the node noticed", LONG, || {
        !ship.status()["link"]["poisoned"].is_null()
    });
    let file = ship.dir.join("runs");
    let j = send(&central, "ship1", append("x", &file));
    assert_eq!(result_of(&central, j)["status"], "ok");
    // And one sent to its inbox.
    publish(
        &broker,
        "outpost/ship1/in",
        &vec![b'y'; 2_200_000],
        tmp.path(),
    );
    let j = send(&central, "ship1", append("y", &file));
    assert_eq!(result_of(&central, j)["status"], "ok");
    assert_eq!(lines(&file), ["x", "y"]);
    let ups = ship.full_log().matches("link up").count();
    assert!(
        ups <= 3,
        "the link came up {ups} times:\n{}",
        ship.full_log()
    );
}

#[test]
fn no_process_of_a_killed_agents_command_runs_when_its_stream_moves_on() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let file = ship.dir.join("runs");
    let started = ship.dir.join("started");
    // A child that outlives its shell (the parent-death signal reaches only the
    // shell): only the restart's sweep can stop it.
    let a = format!(
        "(touch {}; sleep 3; echo A-first >> {}) & wait",
        started.display(),
        file.display()
    );
    let ja = send(&central, "ship1", exec(&["sh", "-c", &a]));
    let jb = send(&central, "ship1", append("B-second", &file));
    wait_until("A started", LONG, || started.exists());
    ship.kill9();
    ship.restart();
    assert_eq!(result_of(&central, ja)["status"], "interrupted");
    assert_eq!(result_of(&central, jb)["status"], "ok");
    assert!(ship.command_pids().is_empty(), "{:?}", ship.command_pids());
    assert!(ship
        .full_log()
        .contains("process(es) a previous agent on this state directory left running"));
    assert_eq!(lines(&file), ["B-second"]);
}

#[test]
fn a_killed_agent_takes_its_commands_with_it_and_sigterm_stops_them_within_seconds() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let timeout_3s = CommandSpec::Exec {
        argv: vec!["sleep".into(), "100".into()],
        env: vec![],
        cwd: None,
        stdin: String::new(),
        timeout_ms: Some(3_000),
        rerun: false,
    };
    let j = send(&central, "ship1", timeout_3s);
    wait_until("the command runs", LONG, || !ship.command_pids().is_empty());
    ship.kill9();
    // Not restarted: the command dies with its agent.
    wait_until(
        "the command died with its agent",
        Duration::from_secs(10),
        || ship.command_pids().is_empty(),
    );
    ship.restart();
    assert_eq!(result_of(&central, j)["status"], "interrupted");

    let j = send(&central, "ship1", exec(&["sleep", "100"]));
    wait_until("the command runs", LONG, || !ship.command_pids().is_empty());
    let status = ship.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(ship.command_pids().is_empty());
    ship.restart();
    let r = result_of(&central, j);
    assert_eq!(r["status"], "interrupted", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("signal 15"), "{r}");
}

#[test]
fn targets_nobody_trusts_this_node_and_unknown_patterns_are_refused_at_send() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let src = tmp.path().join("f");
    std::fs::write(&src, "x").unwrap();
    for (args, want) in [
        (
            vec!["send", "--to", "ghost", "exec", "--", "true"],
            "not in this node's trust file",
        ),
        (
            vec!["send", "--to", "central", "exec", "--", "true"],
            "is this node",
        ),
        (
            vec!["send", "--to", "sh[i]p1", "exec", "--", "true"],
            "only * and ?",
        ),
        (
            vec!["files", "put", "--to", "ghost", src.to_str().unwrap()],
            "not in this node's trust file",
        ),
        (
            vec!["files", "put", "--to", "central", src.to_str().unwrap()],
            "is this node",
        ),
    ] {
        let out = central.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(central.call(&Request::Jobs { limit: None })["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_shared_file_swapped_for_a_symlink_mid_transfer_sends_nothing_from_outside_the_share() {
    use crate::support::proxy::Proxy;
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "files");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    let shared = share.join("big.log");
    std::fs::write(&shared, vec![b'A'; 2 << 20]).unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, vec![b'S'; 2 << 20]).unwrap();
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    // Slow enough that the swap lands mid-transfer.
    proxy.set_rate(Some(256 * 1024));
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with(
        "ship1",
        &proxy.url(),
        tmp.path(),
        &["--share-dir", share.to_str().unwrap()],
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let id = central.call(&Request::FilesGet {
        from: "ship1".into(),
        path: "big.log".into(),
    })["transfer"]
        .as_i64()
        .unwrap();
    let transfer = || central.call(&Request::Transfer { id })["transfer"].clone();
    wait_until("the first chunks arrived", LONG, || {
        transfer()["bytes"].as_u64().unwrap_or(0) > 0
    });
    // The file the offer was hashed from moves away; a link to a secret takes its name.
    std::fs::rename(&shared, share.join("big.log.old")).unwrap();
    std::os::unix::fs::symlink(&secret, &shared).unwrap();
    let t = wait_for("the transfer ended", LONG, || {
        let t = transfer();
        (t["finished"] == true).then_some(t)
    });
    assert_eq!(t["state"], "done", "{t}");
    let got = std::fs::read(t["path"].as_str().map(Path::new).unwrap_or(Path::new("")))
        .or_else(|_| std::fs::read(central.dir.join("files/ship1/big.log")))
        .unwrap();
    assert_eq!(got.len(), 2 << 20);
    assert!(
        got.iter().all(|&b| b == b'A'),
        "bytes from outside the share were sent"
    );
    drop(ship);
}

#[test]
fn a_broker_password_from_a_file_or_the_environment_never_shows_in_ps() {
    let tmp = TempDir::new();
    let pw_db = tmp.path().join("mosquitto.passwd");
    let st = std::process::Command::new(
        crate::support::find_program("mosquitto_passwd").expect("mosquitto_passwd"),
    )
    .args([
        "-c",
        "-b",
        pw_db.to_str().unwrap(),
        "ship1",
        "hunter2-secret",
    ])
    .status()
    .unwrap();
    assert!(st.success());
    let broker = Broker::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\n",
        pw_db.display()
    ));
    let file = tmp.path().join("pw");
    std::fs::write(&file, "hunter2-secret\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ps = |agent: &Agent| {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    };
    let connected = |agent: &Agent| agent.status()["link"]["connected"] == true;
    let by_file = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &[
            "--username",
            "ship1",
            "--password-file",
            file.to_str().unwrap(),
        ],
    );
    wait_until("connected with the password from a file", LONG, || {
        connected(&by_file)
    });
    assert!(!ps(&by_file).contains("hunter2"), "{}", ps(&by_file));
    drop(by_file);
    let by_env = Agent::start_with_env(
        "ship1",
        &broker.url(),
        tmp.path(),
        &["--username", "ship1"],
        &[("OUTPOST_PASSWORD", "hunter2-secret")],
    );
    wait_until(
        "connected with the password from the environment",
        LONG,
        || connected(&by_env),
    );
    assert!(!ps(&by_env).contains("hunter2"));
    drop(by_env);
    // A password file others can read is refused, with the fix.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(crate::agent::BIN)
        .args([
            "agent",
            "--name",
            "ship1",
            "--broker",
            &broker.url(),
            "--state-dir",
        ])
        .arg(tmp.path().join("ship1"))
        .args(["--password-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod o-r"),
        "{out:?}"
    );
    let help = std::process::Command::new(crate::agent::BIN)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--password-file") && help.contains("OUTPOST_PASSWORD"),
        "{help}"
    );
}

/// libfaketime, with a clock offset read from `file` on every call; the monotonic
/// clock left alone.
fn faketime_env(file: &Path) -> Vec<(&'static str, String)> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime (apt-get install faketime)");
    std::fs::write(file, "+0\n").unwrap();
    vec![
        ("LD_PRELOAD", lib.to_string()),
        ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

fn exec_ttl(argv: &[&str], agent: &Agent, to: &str, ttl_s: u32) -> i64 {
    agent.call(&Request::Send {
        where_: vec![],
        online: false,
        to: to.into(),
        lane: None,
        ttl_s: Some(ttl_s),
        key: None,
        output: None,
        command: exec(argv),
    })["job"]
        .as_i64()
        .unwrap()
}

#[test]
fn a_ttl_counts_the_time_a_command_waited_however_the_nodes_wall_clock_is_set() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let clock = tmp.path().join("ship-clock");
    let env = faketime_env(&clock);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ship = Agent::start_with_env("ship1", &broker.url(), tmp.path(), &[], &env);
    let file = ship.dir.join("runs");
    let gate = tmp.path().join("gate");
    let hold = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());

    // Forward 3 hours while a 1 h command waits behind another: it still runs.
    let a = send(&central, "ship1", exec(&["sh", "-c", &hold]));
    let b = exec_ttl(
        &["sh", "-c", &format!("echo b >> {}", file.display())],
        &central,
        "ship1",
        3600,
    );
    wait_until("both delivered", LONG, || {
        central.job(b)["targets"][0]["state"] != "queued"
            && central.job(a)["targets"][0]["state"] != "queued"
    });
    std::fs::write(&clock, "+3h\n").unwrap();
    std::fs::write(&gate, "").unwrap();
    assert_eq!(result_of(&central, a)["status"], "ok");
    let r = result_of(&central, b);
    assert_eq!(
        r["status"], "ok",
        "a 1 h ttl expired when the clock moved: {r}"
    );

    // Back a day while a 1 s command waits 3 s behind another: it expires.
    std::fs::remove_file(&gate).unwrap();
    std::fs::write(&clock, "+0\n").unwrap();
    let a = send(
        &central,
        "ship1",
        exec(&["sh", "-c", &format!("{hold}; sleep 3")]),
    );
    let c = exec_ttl(
        &["sh", "-c", &format!("echo c >> {}", file.display())],
        &central,
        "ship1",
        1,
    );
    wait_until("both delivered", LONG, || {
        central.job(c)["targets"][0]["state"] != "queued"
    });
    std::fs::write(&clock, "-1d\n").unwrap();
    std::fs::write(&gate, "").unwrap();
    assert_eq!(result_of(&central, a)["status"], "ok");
    let r = result_of(&central, c);
    assert_eq!(r["status"], "expired", "{r}");
    assert_eq!(lines(&file), ["b"]);
}

#[test]
fn a_ttl_passes_at_the_sender_too_and_the_withdrawn_command_never_runs() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let marker = tmp.path().join("ran");
    let j = exec_ttl(&["touch", marker.to_str().unwrap()], &central, "ship1", 2);
    let r = result_of(&central, j);
    assert_eq!(r["status"], "expired", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("withdrawn by the sender"),
        "{r}"
    );
    // The node comes up afterwards: what it is given instead of the command is a
    // stand-in that runs nothing.
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    let after = send(&central, "ship1", exec(&["true"]));
    assert_eq!(result_of(&central, after)["status"], "ok");
    assert!(!marker.exists(), "a withdrawn command ran");
    assert_eq!(central.job(j)["targets"][0]["state"], "expired");
    drop(ship);
}

#[test]
fn commands_for_a_node_never_seen_go_at_once_when_it_first_connects() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    // A resend timer of an hour: nothing here may wait for it.
    let central = Agent::start_with_env(
        "central",
        &broker.url(),
        tmp.path(),
        &[],
        &[("OUTPOST_TEST_RTO_MS", "3600000")],
    );
    let file = tmp.path().join("runs");
    let queued: Vec<i64> = ["a", "b", "c"]
        .iter()
        .map(|w| send(&central, "ship1", append(w, &file)))
        .collect();
    let ship = Agent::start_with_env(
        "ship1",
        &broker.url(),
        tmp.path(),
        &[],
        &[("OUTPOST_TEST_RTO_MS", "3600000")],
    );
    let online = send(&central, "ship1", append("d", &file));
    for j in queued.into_iter().chain([online]) {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    assert_eq!(lines(&file), ["a", "b", "c", "d"]);
    drop(ship);
}

#[test]
fn many_waiting_clients_cost_nothing_while_they_wait_and_past_the_bound_get_a_clear_error() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    // Room for a thousand sockets here and in the agent started after this.
    // SAFETY: plain data in and out of getrlimit/setrlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    // ship1 never comes: the job waits.
    let job = send(&central, "ship1", exec(&["true"]));
    let rss = central.peak_rss_kib();
    let sock = central.dir.join("control.sock");
    let wait = format!("{{\"op\":\"wait\",\"id\":{job},\"seen\":0,\"timeout_ms\":600000}}\n");
    let mut clients = Vec::new();
    for _ in 0..outpost::agent::MAX_WAITERS {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(wait.as_bytes()).unwrap();
        clients.push(s);
    }
    // Status still answers at once.
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(central.status()["ok"], true);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "20 status calls took {took:?}"
    );
    // One more is told why.
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra.write_all(wait.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(extra).read_line(&mut reply).unwrap();
    assert!(reply.contains("already waiting"), "{reply}");
    let grown = central.peak_rss_kib().saturating_sub(rss);
    assert!(
        grown < 32 * 1024,
        "{} waiters grew the agent by {grown} KiB",
        clients.len()
    );
}

#[test]
fn small_things_say_what_is_true_a_broken_trust_file_a_changed_link_error_a_denied_socket() {
    use crate::support::proxy::{Mode, Proxy};
    let tmp = TempDir::new();
    let dir = tmp.path().join("n1");
    outpost(&[
        "keys",
        "gen",
        "--state-dir",
        dir.to_str().unwrap(),
        "--name",
        "n1",
    ]);
    std::fs::write(dir.join("trust"), "this is not a trust line\n").unwrap();
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    proxy.set_mode(Mode::Refuse);
    let n1 = Agent::start_with("n1", &proxy.url(), tmp.path(), &[]);
    assert!(
        n1.log()
            .contains("running with no trusted peers until it is fixed"),
        "{}",
        n1.log()
    );
    let first = wait_for("a link error", LONG, || {
        n1.status()["link"]["last_error"].as_str().map(String::from)
    });
    drop(proxy);
    wait_until("the link error says what is wrong now", LONG, || {
        let now = n1.status()["link"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        now != first && now.contains("refused")
    });
    // Another user is told it lacks permission, not that no agent runs.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            crate::agent::BIN,
            "status",
        ])
        .args(["--state-dir", dir.to_str().unwrap()])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("no agent running"), "{err}");
}

/// A tmpfs of `size` mounted at `dir` for the life of the value (root only: the
/// test says so if it cannot mount).
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and needs to mount one (run as root): {out:?}"
        );
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if std::env::var_os("OUTPOST_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {} mounted", self.dir.display());
            return;
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn a_full_disk_holds_a_result_until_there_is_room_and_status_says_so_on_the_node() {
    let tmp = TempDir::new();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "8m");
    // ship1's whole state directory lives on the small disk.
    std::fs::create_dir_all(disk.dir.join("ship1")).unwrap();
    std::os::unix::fs::symlink(disk.dir.join("ship1"), tmp.path().join("ship1")).unwrap();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    // Enough work that an unbounded WAL would have grown past a megabyte.
    let out = tmp.path().join("runs");
    let jobs: Vec<i64> = (0..300)
        .map(|i| send(&central, "ship1", append(&format!("w{i}"), &out)))
        .collect();
    for j in jobs {
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    let wal = std::fs::metadata(ship.dir.join("store.db-wal")).map_or(0, |m| m.len());
    assert!(wal <= 1_300_000, "the WAL grew to {wal} bytes");

    let gate = tmp.path().join("gate");
    let started = tmp.path().join("started");
    let slow = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done; echo done-late",
        started.display(),
        gate.display()
    );
    let a = send(&central, "ship1", exec(&["sh", "-c", &slow]));
    wait_until("the command runs", LONG, || started.exists());
    disk.fill();
    std::fs::write(&gate, "").unwrap();
    // What the store cannot take waits (SQLite may still fit some commits in the
    // WAL it has), and the node says why.
    let b = send(&central, "ship1", append("after", &out));
    wait_until(
        "the node's status says its store refuses writes",
        LONG,
        || {
            let f = &ship.status()["store"]["failing"];
            f["error"].as_str().is_some_and(|e| e.contains("full"))
        },
    );
    disk.free();
    // The command that ran through it keeps its result (not `interrupted`), and
    // the lane moves on without a restart.
    let r = result_of(&central, a);
    assert_eq!(r["status"], "ok", "the result was lost: {r}");
    assert_eq!(r["stdout"], "done-late\n");
    assert_eq!(result_of(&central, b)["status"], "ok");
    wait_until("status says the store takes writes again", LONG, || {
        ship.status()["store"]["failing"].is_null()
    });
}

#[test]
fn the_agent_keeps_serving_when_its_log_cannot_be_written() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    // A log on a full disk: every write fails with ENOSPC.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut ship = crate::support::KillOnDrop(
        std::process::Command::new(crate::agent::BIN)
            .args(["agent", "--name", "ship1", "--broker", &broker.url()])
            .arg("--state-dir")
            .arg(tmp.path().join("ship1"))
            .args(["--log-level", "debug", "--backoff-cap", "1s"])
            .stdout(std::process::Stdio::null())
            .stderr(full)
            .spawn()
            .unwrap(),
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    for _ in 0..3 {
        let j = send(&central, "ship1", exec(&["true"]));
        assert_eq!(result_of(&central, j)["status"], "ok");
    }
    assert!(ship.try_wait().unwrap().is_none(), "the agent died");
}
