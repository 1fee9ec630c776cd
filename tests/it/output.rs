//! Results to files (`send --output-dir`): written by the CLI while it waits,
//! by the agent for `--async` (also across a restart of the agent), appended
//! with `--append`; a relative directory over the control socket is refused.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use outpost::control::output::OutputSpec;
use outpost::control::{Client, CommandSpec, Request};

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json_lines(p: &Path) -> Vec<Value> {
    read(p)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn rig(tmp: &TempDir) -> (Broker, Agent, Agent) {
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    (broker, central, ship)
}

#[test]
fn output_dir_writes_out_err_and_the_json_send_prints_and_append_keeps_both() {
    let tmp = TempDir::new();
    let (_broker, central, _ship) = rig(&tmp);
    let dir = tmp.path().join("results/new");
    let d = dir.to_str().unwrap();
    let script = "echo hi; echo oops >&2";
    let json = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--json",
        "--output-dir",
        d,
        "exec",
        "-n",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(json.status.success(), "{json:?}");
    assert_eq!(read(&dir.join("ship1.out")), "hi\n");
    assert_eq!(read(&dir.join("ship1.err")), "oops\n");
    let printed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json_lines(&dir.join("ship1.json")), vec![printed.clone()]);
    assert_eq!(printed["node"], "ship1");
    assert_eq!(printed["status"], "ok");
    // Replacing: a second run leaves one result; appending adds to it.
    let again = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--output-dir",
        d,
        "exec",
        "-n",
        "--",
        "echo",
        "two",
    ]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(read(&dir.join("ship1.out")), "two\n");
    assert_eq!(read(&dir.join("ship1.err")), "");
    for word in ["three", "four"] {
        let out = central.cli(&[
            "send",
            "--to",
            "ship1",
            "--output-dir",
            d,
            "--append",
            "exec",
            "-n",
            "--",
            "echo",
            word,
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(read(&dir.join("ship1.out")), "two\nthree\nfour\n");
    let lines = json_lines(&dir.join("ship1.json"));
    let outs: Vec<&str> = lines
        .iter()
        .map(|v| v["stdout"].as_str().unwrap())
        .collect();
    assert_eq!(outs, ["two\n", "three\n", "four\n"]);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    // A directory that cannot be made is reported: the result is printed, the
    // exit code says it was not written.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let blocked = file.join("sub");
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--output-dir",
        blocked.to_str().unwrap(),
        "exec",
        "-n",
        "--",
        "echo",
        "five",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ship1: five\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write ship1's result"),
        "{out:?}"
    );
    // --append alone is a usage error.
    let bad = central.cli(&[
        "send", "--to", "ship1", "--append", "exec", "-n", "--", "true",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn async_output_dir_is_written_by_the_agent_also_after_it_restarts() {
    let tmp = TempDir::new();
    let (_broker, mut central, mut ship) = rig(&tmp);
    let dir = tmp.path().join("async");
    let d = dir.to_str().unwrap();
    // ship1 is down: the result arrives only after central restarted.
    ship.kill9();
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--async",
        "--output-dir",
        d,
        "--append",
        "exec",
        "-n",
        "--",
        "echo",
        "later",
    ]);
    assert!(out.status.success(), "{out:?}");
    let job: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    central.kill9_and_restart();
    ship.restart();
    let lines = wait_for("the agent wrote the result", LONG, || {
        let p = dir.join("ship1.json");
        let text = std::fs::read_to_string(&p).ok()?;
        text.ends_with('\n').then(|| json_lines(&p))
    });
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["job"], job);
    assert_eq!(lines[0]["stdout"], "later\n");
    assert_eq!(read(&dir.join("ship1.out")), "later\n");
    // A second async send appends; each result is written once.
    let out = central.cli(&[
        "send",
        "--to",
        "ship1",
        "--async",
        "--output-dir",
        d,
        "--append",
        "exec",
        "-n",
        "--",
        "echo",
        "again",
    ]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the second result written", LONG, || {
        std::fs::read_to_string(dir.join("ship1.out")).is_ok_and(|t| t == "later\nagain\n")
    });
    central.kill9_and_restart();
    assert_eq!(json_lines(&dir.join("ship1.json")).len(), 2);
    // Over the socket, a relative directory is refused.
    let refused = Client::connect(&central.dir)
        .and_then(|mut c| {
            c.call(
                &Request::Send {
                    to: "ship1".into(),
                    key: None,
                    where_: vec![],
                    online: false,
                    lane: None,
                    ttl_s: None,
                    output: Some(OutputSpec {
                        dir: "relative/dir".into(),
                        append: false,
                    }),
                    command: CommandSpec::Ping,
                },
                Duration::from_secs(60),
            )
        })
        .expect_err("a relative directory is refused");
    assert!(refused.contains("is relative"), "{refused}");
}
