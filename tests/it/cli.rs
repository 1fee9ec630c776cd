//! The command line as an operator meets it: the real binary, a real broker, and
//! the rough edges issue 12 found by using it (each test names the behaviour).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, outpost, Agent, BIN};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{wait_for, wait_until, KillOnDrop, TempDir};

const LONG: Duration = Duration::from_secs(120);

/// central and ship1 on one broker, ship1 behind a proxy; ship1 lets central use
/// `allow`.
struct Rig {
    tmp: TempDir,
    broker: Broker,
    proxy: Proxy,
    central: Agent,
    ship: Agent,
}

impl Rig {
    fn new(allow: &str) -> Rig {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "ship1", allow);
        let broker = Broker::start();
        let proxy = Proxy::start(broker.addr());
        let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
        let ship = Agent::start_with("ship1", &proxy.url(), tmp.path(), &[]);
        wait_until("central sees ship1 online", LONG, || {
            central.sees_online("ship1")
        });
        Rig {
            tmp,
            broker,
            proxy,
            central,
            ship,
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The CLI against `agent` with `stdin` as its standard input.
fn cli_with_stdin(agent: &Agent, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("OUTPOST_STATE_DIR", &agent.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outpost");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn usage_errors_exit_2_and_help_and_version_work_as_everywhere() {
    let bad = Command::new(BIN)
        .args(["send", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(text(&bad.stderr).contains("--bogus"), "{bad:?}");
    let none = Command::new(BIN).output().unwrap();
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    for help in [
        &["-h"][..],
        &["--help"],
        &["jobs", "show", "-h"],
        &["files", "put", "-h"],
    ] {
        let out = outpost(help);
        assert!(
            text(&out.stdout).contains("Usage: outpost"),
            "{help:?}: {out:?}"
        );
    }
    for v in ["--version", "-V", "version"] {
        let out = outpost(&[v]);
        assert!(text(&out.stdout).starts_with("outpost "), "{v}: {out:?}");
    }
}

#[test]
fn a_closed_output_ends_a_command_quietly_instead_of_a_panic() {
    let rig = Rig::new("exec,ping");
    for _ in 0..3 {
        rig.central.send_exec("ship1", "ordered", &["true"], None);
    }
    for args in [&["jobs"][..], &["status"], &["status", "--json"]] {
        let mut child = Command::new(BIN)
            .args(args)
            .env("OUTPOST_STATE_DIR", &rig.central.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // As `| head -0`: the reader is gone before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn output_cut_at_the_cap_says_how_much_was_kept() {
    let rig = Rig::new("exec");
    let out = rig
        .central
        .cli(&["send", "--to", "ship1", "exec", "--", "seq", "1", "100000"]);
    assert!(out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("ship1: [truncated: kept the last 65536 of 588895 bytes of stdout]"),
        "{err}"
    );
    assert!(text(&out.stdout).ends_with("ship1: 100000\n"));
}

#[test]
fn piped_stdin_is_the_commands_stdin_and_minus_n_sends_none() {
    let rig = Rig::new("exec");
    let out = cli_with_stdin(
        &rig.central,
        &["send", "--to", "ship1", "exec", "--", "cat"],
        b"piped\nlines\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "ship1: piped\nship1: lines\n");
    let out = cli_with_stdin(
        &rig.central,
        &["send", "--to", "ship1", "exec", "-n", "--", "cat"],
        b"not sent\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "");
    let big = vec![b'x'; 300 * 1024];
    let out = cli_with_stdin(
        &rig.central,
        &["send", "--to", "ship1", "exec", "--", "cat"],
        &big,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("larger than 256 KiB"), "{out:?}");
}

#[test]
fn a_rejected_ping_prints_no_round_trip() {
    let rig = Rig::new("exec");
    let out = rig.central.cli(&["send", "--to", "ship1", "ping"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("ship1: [rejected]"), "{out:?}");
    assert!(!text(&out.stdout).contains("round trip"), "{out:?}");
    let mut json = rig
        .central
        .cli(&["send", "--to", "ship1", "--json", "ping"]);
    json.stdout.truncate(json.stdout.len().saturating_sub(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["status"], "rejected");
}

#[test]
fn send_prints_the_job_first_and_says_when_this_agent_has_no_broker() {
    let mut rig = Rig::new("exec");
    rig.proxy.set_mode(Mode::Refuse);
    wait_until("central sees ship1 offline", LONG, || {
        !rig.central.sees_online("ship1")
    });
    // A synchronous send to an offline node: the job id comes first, so that an
    // operator who gives up waiting still has it.
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["send", "--to", "ship1", "exec", "--", "echo", "later"])
            .env("OUTPOST_STATE_DIR", &rig.central.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let job = wait_for("the job id on stderr", LONG, || {
        let mut line = String::new();
        err.read_line(&mut line).ok()?;
        line.trim()
            .strip_prefix("outpost: job ")
            .map(|id| id.parse::<i64>().unwrap())
    });
    drop(child);
    let shown = rig.central.cli(&["jobs", "show", &job.to_string()]);
    assert!(text(&shown.stdout).contains("ship1: queued"), "{shown:?}");

    rig.broker.stop();
    wait_until("central sees its link down", LONG, || {
        rig.central.status()["link"]["connected"] == false
    });
    let out = rig
        .central
        .cli(&["send", "--to", "ship1", "--async", "exec", "--", "true"]);
    assert!(out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("this agent is not connected to the broker"),
        "{err}"
    );
    assert!(!err.contains("is offline"), "{err}");
}

#[test]
fn common_flags_go_on_every_subcommand_and_the_state_directory_follows_one_rule() {
    let rig = Rig::new("exec,files");
    let dir = rig.central.dir.to_str().unwrap();
    let job = rig.central.send_exec("ship1", "ordered", &["true"], None);
    wait_until("the result", LONG, || {
        !rig.central.job(job)["targets"][0]["result"].is_null()
    });
    let job_s = job.to_string();
    // Leaf and parent spellings, without OUTPOST_STATE_DIR.
    for args in [
        vec!["jobs", "show", &job_s, "--state-dir", dir],
        vec!["jobs", "--state-dir", dir, "show", &job_s],
        vec!["jobs", "show", &job_s, "--json", "--state-dir", dir],
        vec!["status", "--state-dir", dir],
        vec!["files", "list", "--state-dir", dir],
        vec!["files", "--state-dir", dir, "list", "--json"],
        vec!["keys", "show", "--state-dir", dir],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("OUTPOST_STATE_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let src = rig.tmp.path().join("f.txt");
    std::fs::write(&src, b"hello").unwrap();
    let put = Command::new(BIN)
        .args([
            "files",
            "put",
            "--to",
            "ship1",
            "--async",
            "--state-dir",
            dir,
        ])
        .arg(&src)
        .env_remove("OUTPOST_STATE_DIR")
        .output()
        .unwrap();
    assert!(put.status.success(), "{put:?}");
    // As `send --async`: a bare id.
    assert!(text(&put.stdout).trim().parse::<i64>().is_ok(), "{put:?}");

    // `jobs --limit` and its age column.
    let out = rig.central.cli(&["jobs", "--limit", "1"]);
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("age"), "{lines:?}");

    // The agent honours OUTPOST_STATE_DIR as the CLI does; config check shows it.
    let other = rig.tmp.path().join("by-env");
    let cfg = rig.tmp.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        "name = \"envnode\"\nbroker = \"mqtt://127.0.0.1:1\"\n",
    )
    .unwrap();
    let check = Command::new(BIN)
        .args(["config", "check", "--json", "--config"])
        .arg(&cfg)
        .env("OUTPOST_STATE_DIR", &other)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(v["state_dir"], other.to_str().unwrap());
    let agent = KillOnDrop(
        Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&cfg)
            .env("OUTPOST_STATE_DIR", &other)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the agent's socket in OUTPOST_STATE_DIR", LONG, || {
        other.join("control.sock").exists()
    });
    drop(agent);
}

#[test]
fn files_put_to_this_node_and_brackets_are_refused_as_send_refuses_them() {
    let rig = Rig::new("exec,files");
    let src = rig.tmp.path().join("f.txt");
    std::fs::write(&src, b"hello").unwrap();
    let src = src.to_str().unwrap();
    for to in ["central", "ship[1]"] {
        let send = rig
            .central
            .cli(&["send", "--to", to, "--async", "exec", "--", "true"]);
        let put = rig
            .central
            .cli(&["files", "put", "--to", to, "--async", src]);
        assert_eq!(send.status.code(), Some(2), "{send:?}");
        assert_eq!(put.status.code(), Some(2), "{put:?}");
        assert_eq!(text(&send.stderr), text(&put.stderr), "{to}");
    }
    let get = rig.central.cli(&["files", "get", "--from", "ghost", "x"]);
    assert_eq!(get.status.code(), Some(2), "{get:?}");
    assert!(
        text(&get.stderr).contains("not in this node's trust file"),
        "{get:?}"
    );
}

#[test]
fn finished_transfers_keep_their_rate_and_failed_ones_show_no_progress() {
    let rig = Rig::new("exec,files");
    let src = rig.tmp.path().join("big.bin");
    std::fs::write(&src, vec![7u8; 200_000]).unwrap();
    let put = rig
        .central
        .cli(&["files", "put", "--to", "ship1", src.to_str().unwrap()]);
    assert!(put.status.success(), "{put:?}");
    let rate = || {
        let v: serde_json::Value =
            serde_json::from_slice(&rig.central.cli(&["files", "list", "--json"]).stdout).unwrap();
        v["transfers"][0]["rate_bps"].as_u64().unwrap()
    };
    let first = rate();
    // Time passes (a measurement, not a synchronisation): the rate must not decay.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rate(), first);

    let get = rig
        .central
        .cli(&["files", "get", "--from", "ship1", "/nope"]);
    assert_eq!(get.status.code(), Some(2), "{get:?}");
    let list = text(&rig.central.cli(&["files", "list"]).stdout);
    let failed = list.lines().find(|l| l.contains("failed")).unwrap();
    assert!(!failed.contains("100%"), "{list}");
}

#[test]
fn timeout_zero_means_no_timeout() {
    let rig = Rig::new("exec");
    let out = rig.central.cli(&[
        "send",
        "--to",
        "ship1",
        "--timeout",
        "0",
        "exec",
        "--",
        "sh",
        "-c",
        "sleep 0.3; echo done",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "ship1: done\n");
}

#[test]
fn keys_gen_name_is_the_agents_default_and_a_conflict_is_refused() {
    let tmp = TempDir::new();
    let dir = tmp.path().join("n");
    let d = dir.to_str().unwrap();
    outpost(&["keys", "gen", "--state-dir", d, "--name", "alpha"]);
    let again = Command::new(BIN)
        .args(["keys", "gen", "--state-dir", d, "--name", "beta"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(text(&again.stderr).contains("--force"), "{again:?}");
    let broker = Broker::start();
    let _agent = KillOnDrop(
        Command::new(BIN)
            .args(["agent", "--broker", &broker.url(), "--state-dir", d])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = wait_for("the agent answers", LONG, || {
        outpost::control::Client::connect(&dir)
            .and_then(|mut c| c.status())
            .ok()
    });
    assert_eq!(status.node, "alpha");
}

#[test]
fn a_second_agent_on_one_state_directory_says_at_once_whose_lock_it_waits_for() {
    let rig = Rig::new("exec");
    let mut second = KillOnDrop(
        Command::new(BIN)
            .args([
                "agent",
                "--name",
                "central",
                "--broker",
                &rig.broker.url(),
                "--state-dir",
            ])
            .arg(&rig.central.dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(second.0.stderr.take().unwrap());
    let want = format!("held by pid {}", rig.central.pid());
    let mut line = String::new();
    // The first line it writes, long before its 10 s are up.
    err.read_line(&mut line).unwrap();
    assert!(line.contains(&want), "{line}");
    let status = second.0.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    // While it waits, SIGTERM stops it at once (it owns nothing yet).
    let mut third = KillOnDrop(
        Command::new(BIN)
            .args([
                "agent",
                "--name",
                "central",
                "--broker",
                &rig.broker.url(),
                "--state-dir",
            ])
            .arg(&rig.central.dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut third_err = BufReader::new(third.0.stderr.take().unwrap());
    let mut waiting = String::new();
    third_err.read_line(&mut waiting).unwrap();
    assert!(waiting.contains("waiting"), "{waiting}");
    let asked = std::time::Instant::now();
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(third.0.id() as i32, libc::SIGTERM) };
    let ended = third.0.wait().unwrap();
    assert_eq!(ended.signal(), Some(libc::SIGTERM));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(
        rest.contains(&format!("another agent (pid {})", rig.central.pid())),
        "{rest}"
    );
    assert!(rig.ship.sees_online("central"));
}

#[test]
fn status_says_sizes_in_units_and_shows_rejections() {
    let rig = Rig::new("exec");
    let out = text(&rig.central.cli(&["status"]).stdout);
    assert!(out.contains("MiB"), "{out}");
    // A forged payload on central's inbox is counted and shown without --json.
    let pubbed = Command::new("mosquitto_pub")
        .args([
            "-p",
            &rig.broker.port().to_string(),
            "-t",
            "outpost/central/in",
            "-m",
            "garbage",
        ])
        .status()
        .unwrap();
    assert!(pubbed.success());
    wait_until("central counts the rejection", LONG, || {
        text(&rig.central.cli(&["status"]).stdout).contains("rejected 1 payload")
    });
}

#[test]
fn a_toml_syntax_error_names_the_line() {
    let tmp = TempDir::new();
    let cfg = tmp.path().join("outpost.toml");
    std::fs::write(&cfg, "name = \"a\"\nbroker = \"mqtt://x\"\nquota = = 3\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains(&format!("{}:3:", cfg.display())),
        "{out:?}"
    );
}

#[test]
fn two_agents_with_one_name_are_told_another_client_uses_the_name() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let first = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    // A second state directory, the same name: a copied image, a typo.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let twin = Agent::start_with("ship1", &broker.url(), &other, &[]);
    for agent in [&first, &twin] {
        wait_until("the link names the takeover", LONG, || {
            agent.status()["link"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("another client is using this node's name (ship1)"))
        });
    }
    assert!(first
        .log()
        .contains("another client is using this node's name"));
}

#[test]
fn batch_queues_every_line_in_order_and_names_the_lines_it_refused() {
    let rig = Rig::new("exec");
    rig.proxy.set_mode(Mode::Refuse);
    wait_until("central sees ship1 offline", LONG, || {
        !rig.central.sees_online("ship1")
    });
    // A mistake anywhere queues nothing.
    let out = cli_with_stdin(
        &rig.central,
        &["batch"],
        b"{\"to\":\"ship1\",\"command\":\"ping\"}\n{\"to\":\"ship1\"}\n",
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("line 2: not a send request"),
        "{out:?}"
    );
    assert_eq!(rig.central.status()["outbox"].as_array().unwrap().len(), 0);

    // 200 commands while ship1 is away, one of them to a node nobody trusts.
    let mut lines = String::from("# queued while ship1 is offline\n");
    for i in 0..200 {
        let to = if i == 100 { "stranger" } else { "ship1" };
        lines.push_str(&format!(
            "{{\"to\":\"{to}\",\"command\":{{\"exec\":{{\"argv\":[\"echo\",\"{i}\"]}}}}}}\n"
        ));
    }
    let file = rig.tmp.path().join("requests.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let out = rig
        .central
        .cli(&["batch", file.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let replies: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), 200);
    assert_eq!(replies[100]["line"], 102);
    assert!(
        replies[100]["error"].as_str().unwrap().contains("stranger"),
        "{:?}",
        replies[100]
    );
    let jobs: Vec<i64> = replies.iter().filter_map(|r| r["job"].as_i64()).collect();
    assert_eq!(jobs.len(), 199);
    assert!(jobs.windows(2).all(|w| w[0] < w[1]), "{jobs:?}");
    assert!(
        text(&out.stderr).contains("1 of 200 requests refused"),
        "{out:?}"
    );

    // They arrive once each and in order when ship1 comes back.
    rig.proxy.set_mode(Mode::Pass);
    let last = *jobs.last().unwrap();
    wait_until("the last batched job is done", LONG, || {
        rig.central.job(last)["targets"][0]["state"] == "ok"
    });
    let results = rig.central.results(300);
    let outputs: Vec<String> = results
        .iter()
        .filter(|r| jobs.contains(&r.0))
        .map(|r| r.3.trim().to_string())
        .collect();
    let expected: Vec<String> = (0..200)
        .filter(|&i| i != 100)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(outputs, expected);

    // Text output: one job id per line.
    let out = cli_with_stdin(
        &rig.central,
        &["batch"],
        b"{\"to\":\"ship1\",\"command\":\"ping\"}\n",
    );
    assert!(out.status.success(), "{out:?}");
    let id: i64 = text(&out.stdout).trim().parse().unwrap();
    assert!(id > last);
}
