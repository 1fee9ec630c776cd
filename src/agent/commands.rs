//! The agent's side of every command method, one arm each: [`command_of`]
//! validates what the control socket asked for and names it, [`Agent::start`]
//! authorises and runs it, [`result_view`] shows its result. Adding a method
//! (ARCHITECTURE.md, "How to add a method") adds one arm to each, and the
//! compiler points at all three.
//!
//! Whatever runs outside the loop (an exec's process, an HTTP request) reports
//! back as [`Msg::Done`]; a command that runs longer than [`STARTED_AFTER_MS`] is
//! announced to its sender with a `Started` frame.

use std::io::Read as _;
use std::time::Duration;

use super::{now_ms, Agent, Msg, Running};
use crate::control::reply::ResultView;
use crate::control::CommandSpec;
use crate::exec;
use crate::frame::{self, CmdResult, Command, Exec, HttpGet, Lane, Method, Name, Status};
use crate::store::{Inbound, Job, StoreError};
use crate::trust::{self, ExecPolicy};
use crate::{debug, info, warn};

/// A command still running this long after it started is announced to its sender,
/// so `outpost jobs` can say `running`; quicker ones cost no extra bytes.
pub(super) const STARTED_AFTER_MS: u64 = 1_000;
/// Default command timeout when the sender gives none.
pub const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// http-get's defaults.
const HTTP_TIMEOUT_MS: u32 = 30_000;
const HTTP_MAX_BODY: u32 = 64 * 1024;

/// The command a control request describes, and its one-line summary for `jobs`.
/// Refuses what no node could run.
pub(super) fn command_of(spec: CommandSpec) -> Result<(Command, String), String> {
    Ok(match spec {
        CommandSpec::Exec {
            argv,
            env,
            cwd,
            stdin,
            timeout_ms,
            rerun,
        } => {
            if argv.is_empty() {
                return Err("exec needs a program: exec -- PROGRAM ARGS...".into());
            }
            let summary = argv.join(" ");
            let exec = Exec {
                argv,
                env,
                cwd,
                stdin: stdin.into_bytes(),
                timeout_ms: match timeout_ms {
                    None => DEFAULT_TIMEOUT_MS,
                    // 0 is "no timeout": the longest one the frame can carry.
                    Some(0) => u32::MAX,
                    Some(t) => t,
                },
                rerun,
            };
            (Command::Exec(exec), summary)
        }
        CommandSpec::Ping => (Command::Ping, "ping".into()),
        CommandSpec::HttpGet {
            url,
            timeout_ms,
            max_body,
        } => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "http-get: {url:?} is not an http:// or https:// url"
                ));
            }
            let summary = format!("http-get {url}");
            let h = HttpGet {
                url,
                timeout_ms: timeout_ms.unwrap_or(HTTP_TIMEOUT_MS),
                max_body: max_body.unwrap_or(HTTP_MAX_BODY),
            };
            (Command::HttpGet(h), summary)
        }
    })
}

/// A command's result for the control socket: what every method shows, plus what
/// its own method adds.
pub(super) fn result_view(r: &CmdResult, job: &Job, at_ms: Option<u64>) -> ResultView {
    let rtt_ms = match job.method {
        Method::Ping => at_ms.map(|a| a.saturating_sub(job.created_ms)),
        Method::Exec | Method::HttpGet | Method::Files | Method::Facts => None,
    };
    ResultView {
        status: r.status.as_str().into(),
        exit_code: r.exit_code,
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        truncated: r.truncated,
        started_ms: r.started_ms,
        duration_ms: r.duration_ms,
        reason: r.reason.clone(),
        rtt_ms,
        http_status: r.http.as_ref().map(|h| h.status),
        http_headers: r.http.as_ref().map(|h| h.headers.clone()),
    }
}

impl Agent {
    /// Runs a command whose turn has come: expired and unauthorised ones are
    /// answered at once; what runs outside the loop is journalled `running` and
    /// committed first, so a crash cannot run it twice.
    pub(super) fn start(
        &mut self,
        inbound: Inbound,
        cmd: Command,
        now: u64,
    ) -> Result<(), StoreError> {
        let env = &inbound.env;
        let seq = env.seq;
        if inbound.expired {
            let r = CmdResult::without_run(
                seq,
                Status::Expired,
                "the command's ttl passed before it could start",
                now,
            );
            self.node.finish(&inbound, r, now)?;
            return Ok(());
        }
        self.refresh_trust();
        let policy = match self.trust.authorise(&env.from, &cmd) {
            Ok(policy) => policy,
            Err(reason) => {
                warn!("rejected {} from {}: {reason}", cmd.method(), env.from);
                let r = CmdResult::without_run(seq, Status::Rejected, reason, now);
                self.node.finish(&inbound, r, now)?;
                return Ok(());
            }
        };
        match cmd {
            Command::Ping => {
                let mut r = CmdResult::without_run(seq, Status::Ok, "", now);
                r.stdout = b"pong\n".to_vec();
                self.node.finish(&inbound, r, now)?;
            }
            Command::Exec(e) => {
                let mut spec = exec_spec(&e, &policy, self.cfg.output_cap as usize);
                spec.tag = Some(self.tag.clone());
                let cancel = exec::Canceller::new();
                self.journal_running(&inbound, Method::Exec, Some(cancel.clone()), now)?;
                self.spawn_done(inbound, async move {
                    exec_result(seq, exec::run_cancellable(spec, &cancel).await)
                });
            }
            Command::HttpGet(h) => {
                self.journal_running(&inbound, Method::HttpGet, None, now)?;
                self.spawn_done(inbound, async move {
                    smol::unblock(move || http_get(seq, &h)).await
                });
            }
        }
        Ok(())
    }

    /// Journals the command running and commits, then notes it in the table.
    fn journal_running(
        &mut self,
        inbound: &Inbound,
        method: Method,
        cancel: Option<exec::Canceller>,
        now: u64,
    ) -> Result<(), StoreError> {
        self.node.start(inbound, now)?;
        // Journalled as running before it runs: a crash cannot run it twice.
        self.flush_batch()?;
        let key = (
            inbound.env.from.clone(),
            inbound.env.lane.clone(),
            inbound.env.seq,
        );
        self.running.insert(
            key,
            Running {
                method,
                started_ms: now,
                announced: false,
                cancel,
                cancelled: None,
            },
        );
        Ok(())
    }

    /// Stops a running command its sender cancelled; it then reports `cancelled`.
    pub(super) fn stop_cancelled(&mut self, c: crate::node::Cancel) {
        let Some(r) = self
            .running
            .get_mut(&(c.peer.clone(), c.lane.clone(), c.seq))
        else {
            return;
        };
        match &r.cancel {
            Some(canceller) => {
                info!(
                    "{} cancelled {}#{} while it ran: stopping it",
                    c.peer, c.lane, c.seq
                );
                r.cancelled = Some(c.reason);
                canceller.cancel();
            }
            None => info!(
                "{} cancelled {}#{} ({}), which cannot be stopped: it finishes by itself",
                c.peer, c.lane, c.seq, r.method
            ),
        }
    }

    /// Runs `work` as a task; its result comes back to the loop as [`Msg::Done`].
    fn spawn_done(
        &self,
        inbound: Inbound,
        work: impl std::future::Future<Output = CmdResult> + Send + 'static,
    ) {
        let tx = self.tx.clone();
        smol::spawn(async move {
            let result = work.await;
            let _ = tx
                .send(Msg::Done(Box::new(inbound), Box::new(result)))
                .await;
        })
        .detach();
    }

    /// Tells senders about commands that have been running a while.
    pub(super) fn announce_running(&mut self, now: u64) {
        let due: Vec<(Name, Lane, u64)> = self
            .running
            .iter()
            .filter(|(_, r)| !r.announced && now >= r.started_ms + STARTED_AFTER_MS)
            .map(|(k, _)| k.clone())
            .collect();
        for (peer, lane, seq) in due {
            if let Err(e) = self.node.announce_started(&peer, &lane, seq, now) {
                debug!("cannot announce {lane}#{seq} running to {peer}: {e}");
            }
            if let Some(r) = self.running.get_mut(&(peer, lane, seq)) {
                r.announced = true;
            }
        }
    }
}

/// How an authorised exec runs: a path-limited one gets the clean environment and
/// its checked working directory, nothing of the agent's.
fn exec_spec(e: &Exec, policy: &ExecPolicy, output_cap: usize) -> exec::Spec {
    let (base, cwd) = match policy {
        ExecPolicy::Unrestricted => (None, e.cwd.as_ref().map(Into::into)),
        ExecPolicy::Limited { cwd } => {
            let base = trust::CLEAN_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (Some(base), Some(cwd.into()))
        }
    };
    exec::Spec {
        argv: e.argv.clone(),
        env: e.env.clone(),
        base,
        tag: None,
        cwd,
        stdin: e.stdin.clone(),
        timeout: Duration::from_millis(u64::from(e.timeout_ms.max(1))),
        output_cap,
    }
}

fn exec_result(seq: u64, out: exec::Output) -> CmdResult {
    let (status, exit_code, reason) = match &out.outcome {
        exec::Outcome::Exited(0) => (Status::Ok, Some(0), String::new()),
        exec::Outcome::Exited(c) => (Status::Failed, Some(*c), format!("exit code {c}")),
        exec::Outcome::Signalled(s) => (Status::Failed, None, format!("killed by signal {s}")),
        exec::Outcome::TimedOut => (
            Status::Timeout,
            None,
            "timed out; its process group was killed".into(),
        ),
        exec::Outcome::Cancelled => (Status::Cancelled, None, "cancelled".into()),
        exec::Outcome::SpawnFailed(e) | exec::Outcome::WaitFailed(e) => {
            (Status::Failed, None, e.clone())
        }
    };
    // Which stream was cut and by how much, in the words the CLI prints.
    let mut cut = Vec::new();
    for (name, kept, written) in [
        ("stdout", out.stdout.len(), out.written.0),
        ("stderr", out.stderr.len(), out.written.1),
    ] {
        if written > kept as u64 {
            cut.push(format!("kept the last {kept} of {written} bytes of {name}"));
        }
    }
    let reason = match (reason.is_empty(), cut.is_empty()) {
        (_, true) => reason,
        (true, false) => format!("output over the cap: {}", cut.join(", ")),
        (false, false) => format!("{reason}; output over the cap: {}", cut.join(", ")),
    };
    CmdResult {
        seq,
        status,
        exit_code,
        stdout: out.stdout,
        stderr: out.stderr,
        truncated: out.truncated,
        started_ms: out.started_ms,
        duration_ms: out.duration_ms,
        reason,
        http: None,
    }
}

fn http_get(seq: u64, h: &HttpGet) -> CmdResult {
    let started = now_ms();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(u64::from(h.timeout_ms.max(1)))))
        .http_status_as_error(false)
        .build()
        .into();
    let mut result = CmdResult::without_run(seq, Status::Ok, "", started);
    match agent.get(&h.url).call() {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            let max = u64::from(h.max_body);
            let read = resp
                .body_mut()
                .as_reader()
                .take(max + 1)
                .read_to_end(&mut body);
            if let Err(e) = read {
                result.status = Status::Failed;
                result.reason = format!("reading the body: {e}");
            }
            if body.len() as u64 > max {
                body.truncate(max as usize);
                result.truncated = true;
            }
            if status >= 400 {
                result.status = Status::Failed;
                result.reason = format!("http status {status}");
            }
            result.stdout = body;
            result.http = Some(frame::HttpReply { status, headers });
        }
        Err(e) => {
            result.status = Status::Failed;
            result.reason = format!("http-get {}: {e}", h.url);
        }
    }
    result.duration_ms = now_ms().saturating_sub(started);
    result
}
