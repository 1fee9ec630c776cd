//! Taking work back (issue 13): `jobs cancel` catches a command in each place it
//! can be (the sender's outbox, in flight, the node's inbox, running), `send
//! --key` supersedes, `queue` lists and `queue purge` cancels. The real binary,
//! a real broker; a command that must not run appends to a file that the test
//! checks afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

struct Rig {
    tmp: TempDir,
    _broker: Broker,
    central: Agent,
    ship: Agent,
}

impl Rig {
    fn new() -> Rig {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "ship1", "exec");
        let broker = Broker::start();
        let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
        let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
        wait_until("central sees ship1 online", LONG, || {
            central.sees_online("ship1")
        });
        Rig {
            tmp,
            _broker: broker,
            central,
            ship,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Queues `sh -c script` for ship1 and returns the job id.
    fn sh(&self, script: &str) -> i64 {
        self.central
            .send_exec("ship1", "ordered", &["sh", "-c", script], None)
    }

    /// A command that holds ship1's ordered lane until `release` is called.
    fn blocker(&self) -> i64 {
        let go = self.path("go");
        let job = self.sh(&format!(
            "while [ ! -e {} ]; do sleep 0.05; done; echo released",
            go.display()
        ));
        wait_until("the blocker runs on ship1", LONG, || {
            !self.ship.command_pids().is_empty()
        });
        job
    }

    fn release(&self) {
        std::fs::write(self.path("go"), b"").unwrap();
    }

    /// The one target of job `id`.
    fn target(&self, id: i64) -> Value {
        self.central.job(id)["targets"][0].clone()
    }

    fn final_result(&self, id: i64) -> Value {
        wait_for("a result", LONG, || {
            let t = self.target(id);
            (!t["result"].is_null() && t["state"] != "cancelling").then_some(t)
        })
    }

    /// Runs `jobs cancel` through the CLI and returns its JSON.
    fn cancel(&self, id: i64) -> Value {
        let out = self
            .central
            .cli(&["jobs", "cancel", &id.to_string(), "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }
}

/// A marker command's script: appends `word` to `file`.
fn append(file: &Path, word: &str) -> String {
    format!("echo {word} >> {}", file.display())
}

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_command_for_an_offline_node_is_withdrawn_and_never_runs_when_it_returns() {
    let mut rig = Rig::new();
    let marks = rig.path("marks");
    rig.ship.kill9();
    wait_until("central sees ship1 offline", LONG, || {
        !rig.central.sees_online("ship1")
    });
    let doomed = rig.sh(&append(&marks, "doomed"));
    let reply = rig.cancel(doomed);
    assert_eq!(reply["targets"][0]["outcome"], "withdrawn", "{reply}");
    assert_eq!(reply["targets"][0]["state"], "cancelled", "{reply}");
    let t = rig.target(doomed);
    assert_eq!(t["result"]["status"], "cancelled");
    let reason = t["result"]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("outbox"), "{reason}");

    rig.ship.restart();
    let after = rig.sh(&append(&marks, "after"));
    assert_eq!(rig.final_result(after)["result"]["status"], "ok");
    assert_eq!(lines(&marks), ["after"]);
    // The node's stream went past the withdrawn number without a hole, and the
    // sender's answer stands (nothing came back to replace it).
    let t = rig.target(doomed);
    assert_eq!(t["result"]["status"], "cancelled");
    assert_eq!(t["result"]["reason"], reason.as_str());
    let log = rig.ship.full_log();
    assert!(!log.contains("lost"), "{log}");
}

#[test]
fn a_command_waiting_in_the_nodes_inbox_is_cancelled_there() {
    let rig = Rig::new();
    let marks = rig.path("marks");
    let blocker = rig.blocker();
    let doomed = rig.sh(&append(&marks, "doomed"));
    wait_until("ship1 has stored the command", LONG, || {
        rig.target(doomed)["state"] == "delivered"
    });
    let reply = rig.cancel(doomed);
    assert_eq!(reply["targets"][0]["outcome"], "cancel-sent", "{reply}");
    let t = rig.final_result(doomed);
    assert_eq!(t["result"]["status"], "cancelled", "{t}");
    let reason = t["result"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("ship1's inbox before it started"),
        "{reason}"
    );
    rig.release();
    assert_eq!(rig.final_result(blocker)["result"]["status"], "ok");
    let after = rig.sh(&append(&marks, "after"));
    assert_eq!(rig.final_result(after)["result"]["status"], "ok");
    assert_eq!(lines(&marks), ["after"]);
}

#[test]
fn a_command_in_flight_when_cancelled_does_not_run_at_the_node() {
    // ship1 is frozen (SIGSTOP) while central sends: the command is on its way,
    // in the broker or ship1's socket, and central's outbox still holds it. The
    // cancel withdraws it there, and the cancel frame that follows catches the
    // copy that did reach ship1.
    let rig = Rig::new();
    let marks = rig.path("marks");
    let blocker = rig.blocker();
    let pid = rig.ship.pid() as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let doomed = rig.sh(&append(&marks, "doomed"));
    let reply = rig.cancel(doomed);
    assert_eq!(reply["targets"][0]["outcome"], "withdrawn", "{reply}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let t = wait_for("ship1's own answer", LONG, || {
        let t = rig.target(doomed);
        let r = t["result"]["reason"].as_str().unwrap_or("").to_string();
        r.contains("ship1's inbox").then_some(t)
    });
    assert_eq!(t["result"]["status"], "cancelled", "{t}");
    rig.release();
    assert_eq!(rig.final_result(blocker)["result"]["status"], "ok");
    let after = rig.sh(&append(&marks, "after"));
    assert_eq!(rig.final_result(after)["result"]["status"], "ok");
    assert_eq!(lines(&marks), ["after"]);
}

#[test]
fn a_running_command_is_stopped_with_its_process_group() {
    let rig = Rig::new();
    let job = rig.sh("sleep 600 & sleep 600");
    wait_until("both sleeps run", LONG, || {
        rig.ship.command_pids().len() >= 2
    });
    wait_until("central knows ship1 has it", LONG, || {
        rig.target(job)["state"] != "queued"
    });
    let reply = rig.cancel(job);
    assert_eq!(reply["targets"][0]["outcome"], "cancel-sent", "{reply}");
    let t = rig.final_result(job);
    assert_eq!(t["result"]["status"], "cancelled", "{t}");
    let reason = t["result"]["reason"].as_str().unwrap();
    assert!(reason.contains("while it ran on ship1"), "{reason}");
    wait_until("no process of the command is left", LONG, || {
        rig.ship.command_pids().is_empty()
    });
}

#[test]
fn cancelling_a_finished_job_says_so_and_changes_nothing() {
    let rig = Rig::new();
    let job = rig.sh("echo done");
    let before = rig.final_result(job);
    assert_eq!(before["result"]["status"], "ok");
    let out = rig.central.cli(&["jobs", "cancel", &job.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ship1: already finished (ok): nothing changed"),
        "{text}"
    );
    assert_eq!(rig.target(job), before);
    let out = rig.central.cli(&["jobs", "cancel", "999"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job 999"));
}

#[test]
fn a_keyed_command_supersedes_the_one_not_started_yet() {
    let rig = Rig::new();
    let marks = rig.path("marks");
    let blocker = rig.blocker();
    let send = |word: &str| -> Value {
        let out = rig.central.cli(&[
            "send",
            "--to",
            "ship1",
            "--key",
            "config",
            "--async",
            "--json",
            "exec",
            "-n",
            "--",
            "sh",
            "-c",
            &append(&marks, word),
        ]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = send("v1")["job"].as_i64().unwrap();
    wait_until("ship1 has stored v1", LONG, || {
        rig.target(first)["state"] == "delivered"
    });
    let second = send("v2");
    assert_eq!(second["superseded"][0]["job"], first, "{second}");
    let third = send("v3");
    let third_job = third["job"].as_i64().unwrap();
    assert_eq!(third["superseded"][0]["job"], second["job"], "{third}");
    for old in [first, second["job"].as_i64().unwrap()] {
        let t = rig.final_result(old);
        assert_eq!(t["result"]["status"], "cancelled", "{t}");
        let reason = t["result"]["reason"].as_str().unwrap();
        assert!(reason.contains("superseded by job"), "{reason}");
    }
    rig.release();
    assert_eq!(rig.final_result(blocker)["result"]["status"], "ok");
    assert_eq!(rig.final_result(third_job)["result"]["status"], "ok");
    assert_eq!(lines(&marks), ["v3"]);
}

#[test]
fn queue_lists_what_waits_and_purge_cancels_all_of_it() {
    let mut rig = Rig::new();
    let marks = rig.path("marks");
    rig.ship.kill9();
    wait_until("central sees ship1 offline", LONG, || {
        !rig.central.sees_online("ship1")
    });
    let jobs: Vec<i64> = (0..3)
        .map(|i| rig.sh(&append(&marks, &format!("w{i}"))))
        .collect();
    let out = rig.central.cli(&["queue", "ship1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let q: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<i64> = q["to"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["job"].as_i64())
        .collect();
    assert_eq!(listed, jobs, "{q}");
    assert_eq!(q["to"][0]["state"], "queued");
    let text = rig.central.cli(&["queue", "ship1"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("to ship1: 3 waiting"), "{text}");
    assert!(text.contains("exec sh -c"), "{text}");

    let out = rig.central.cli(&["queue", "purge", "ship1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cancelled 3 job(s) for ship1"
    );
    let q: Value =
        serde_json::from_slice(&rig.central.cli(&["queue", "ship1", "--json"]).stdout).unwrap();
    assert!(
        q["to"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["job"].is_null()),
        "{q}"
    );
    rig.ship.restart();
    wait_until("nothing waits for ship1", LONG, || {
        let q: Value =
            serde_json::from_slice(&rig.central.cli(&["queue", "ship1", "--json"]).stdout).unwrap();
        q["to"].as_array().unwrap().is_empty()
    });
    let after = rig.sh(&append(&marks, "after"));
    assert_eq!(rig.final_result(after)["result"]["status"], "ok");
    assert_eq!(lines(&marks), ["after"]);
    for j in jobs {
        assert_eq!(rig.target(j)["result"]["status"], "cancelled");
    }
}
