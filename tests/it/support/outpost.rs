//! The real `outpost` binary as tests and benchmarks drive it: agents with their own
//! state directories, the CLI, and the key exchange that lets two agents trust
//! each other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use outpost::control::{Client, CommandSpec, Request};

use super::KillOnDrop;

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const LONG: Duration = Duration::from_secs(120);

/// One `outpost agent` process with its own state directory.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    broker_url: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    proc: Option<KillOnDrop>,
    n_starts: u32,
}

impl Agent {
    pub fn start_with(name: &str, broker_url: &str, base: &Path, extra: &[&str]) -> Agent {
        Agent::start_with_env(name, broker_url, base, extra, &[])
    }

    /// As [`Agent::start_with`], with variables added to the agent's environment.
    pub fn start_with_env(
        name: &str,
        broker_url: &str,
        base: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut a = Agent {
            name: name.into(),
            dir: base.join(name),
            broker_url: broker_url.into(),
            extra: extra.iter().map(std::string::ToString::to_string).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proc: None,
            n_starts: 0,
        };
        a.spawn();
        a
    }

    /// Starts the agent again after it was killed or stopped.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        self.n_starts += 1;
        let log = std::fs::File::create(self.log_path(self.n_starts)).unwrap();
        let child = Command::new(BIN)
            .args(["agent", "--name", &self.name, "--broker", &self.broker_url])
            .arg("--state-dir")
            .arg(&self.dir)
            .args(self.defaults())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost agent");
        self.proc = Some(KillOnDrop(child));
        let dir = self.dir.clone();
        let up = super::try_wait_for(LONG, || {
            if let Ok(Some(status)) = self.proc.as_mut().unwrap().0.try_wait() {
                panic!(
                    "agent {} exited at start ({status}):\n{}",
                    self.name,
                    self.log()
                );
            }
            Client::connect(&dir)
                .and_then(|mut c| c.call(&Request::Status, Duration::from_secs(10)))
                .ok()
        });
        if up.is_none() {
            panic!(
                "agent {} did not answer on its control socket:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// The log of start `n`, beside the state directory (not in it: a test may
    /// fill the state directory's filesystem).
    fn log_path(&self, n: u32) -> PathBuf {
        let base = self.dir.parent().unwrap_or(&self.dir);
        base.join(format!("{}.agent-{n}.log", self.name))
    }

    /// Test defaults (quick reconnects, debug log) for the flags `extra` leaves out.
    fn defaults(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        for (flag, value) in [
            ("--backoff-cap", "1s"),
            ("--keepalive", "5s"),
            ("--log-level", "debug"),
        ] {
            if !self.extra.iter().any(|e| e == flag) {
                flags.extend([flag, value]);
            }
        }
        flags
    }

    /// The last lines of this agent's current log.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path(self.n_starts)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL, then start again on the same state directory.
    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().unwrap().0.id()
    }

    /// Sends `signal` to the agent and waits for it to exit; returns its status.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> std::process::ExitStatus {
        let mut p = self.proc.take().expect("agent running");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(p.0.id() as i32, signal) };
        super::wait_exit(&mut p.0, "agent to exit after a signal", timeout)
    }

    /// Every log line of every start so far.
    pub fn full_log(&self) -> String {
        (1..=self.n_starts)
            .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// Pids of processes started by this agent's commands that are still alive
    /// (they carry `OUTPOST_AGENT=<state dir>`).
    pub fn command_pids(&self) -> Vec<u32> {
        let tag = format!(
            "OUTPOST_AGENT={}",
            self.dir.canonicalize().unwrap().display()
        );
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if !zombie && env.split(|&b| b == 0).any(|v| v == tag.as_bytes()) {
                out.push(pid);
            }
        }
        out
    }

    pub fn call(&self, req: &Request) -> Value {
        Client::connect(&self.dir)
            .and_then(|mut c| c.call(req, Duration::from_secs(60)))
            .expect("control call")
    }

    pub fn status(&self) -> Value {
        self.call(&Request::Status)
    }

    pub fn sees_online(&self, peer: &str) -> bool {
        self.status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == peer && p["online"] == true)
    }

    /// Runs the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("OUTPOST_STATE_DIR", &self.dir)
            .output()
            .expect("run outpost")
    }

    /// Queues an exec and returns the job id.
    pub fn send_exec(&self, to: &str, lane: &str, argv: &[&str], ttl_s: Option<u32>) -> i64 {
        let req = Request::Send {
            where_: vec![],
            online: false,
            to: to.into(),
            lane: Some(lane.into()),
            ttl_s,
            key: None,
            output: None,
            command: CommandSpec::Exec {
                argv: argv.iter().map(std::string::ToString::to_string).collect(),
                env: vec![],
                cwd: None,
                stdin: String::new(),
                timeout_ms: Some(60_000),
                rerun: false,
            },
        };
        self.call(&req)["job"].as_i64().unwrap()
    }

    pub fn job(&self, id: i64) -> Value {
        self.call(&Request::Job { id })["job"].clone()
    }

    /// Jobs whose single target has a result, as (job id, result id, status, stdout).
    pub fn results(&self, limit: u32) -> Vec<(i64, i64, String, String)> {
        let jobs = self.call(&Request::Jobs { limit: Some(limit) })["jobs"]
            .as_array()
            .unwrap()
            .clone();
        let mut out = Vec::new();
        for j in jobs {
            let t = &j["targets"][0];
            if !t["result"].is_null() {
                out.push((
                    j["id"].as_i64().unwrap(),
                    t["result_id"].as_i64().unwrap(),
                    t["result"]["status"].as_str().unwrap().to_string(),
                    t["result"]["stdout"].as_str().unwrap().to_string(),
                ));
            }
        }
        out.sort_by_key(|r| r.0);
        out
    }

    /// Peak resident set size so far, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

/// Runs the CLI with no agent behind it (keys, config).
pub fn outpost(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("run outpost");
    assert!(out.status.success(), "outpost {args:?}: {out:?}");
    out
}

/// Gives `operator` and `node` key pairs and makes each trust the other: the node
/// lets the operator use `allow`, the operator accepts the node's results.
pub fn introduce(base: &Path, operator: &str, node: &str, allow: &str) {
    let mut lines = Vec::new();
    for name in [operator, node] {
        let dir = base.join(name);
        let dir = dir.to_str().unwrap();
        let out = outpost(&["keys", "gen", "--state-dir", dir, "--name", name]);
        lines.push(String::from_utf8(out.stdout).unwrap());
    }
    let key = |line: &str| line.split_whitespace().nth(1).unwrap().to_string();
    let (op_key, node_key) = (key(&lines[0]), key(&lines[1]));
    let node_dir = base.join(node);
    let op_dir = base.join(operator);
    outpost(&[
        "keys",
        "trust",
        "--state-dir",
        node_dir.to_str().unwrap(),
        operator,
        &op_key,
        "--allow",
        allow,
    ]);
    outpost(&[
        "keys",
        "trust",
        "--state-dir",
        op_dir.to_str().unwrap(),
        node,
        &node_key,
    ]);
}

/// A key pair for `name` under `base`; its public key.
pub fn keygen(base: &Path, name: &str) -> String {
    let dir = base.join(name);
    let out = outpost(&[
        "keys",
        "gen",
        "--state-dir",
        dir.to_str().unwrap(),
        "--name",
        name,
    ]);
    let line = String::from_utf8(out.stdout).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

/// `on` trusts `peer` (with `key`), allowing it `allow` (empty: nothing).
pub fn trust(base: &Path, on: &str, peer: &str, key: &str, allow: &str) {
    let dir = base.join(on);
    let mut args = vec![
        "keys",
        "trust",
        "--state-dir",
        dir.to_str().unwrap(),
        peer,
        key,
    ];
    if !allow.is_empty() {
        args.extend(["--allow", allow]);
    }
    outpost(&args);
}

/// Lines of the agent's log (all starts) containing `needle`.
pub fn count_log(agent: &Agent, needle: &str) -> usize {
    agent
        .full_log()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}
