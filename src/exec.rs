//! Running commands: timeouts, process groups and output caps.
//!
//! Each command runs in its own process group so that a timeout, a cancel or the
//! end of the command can kill everything it started, not just the process we
//! spawned. A dedicated thread per command waits for the group leader to exit;
//! see [`run_cancellable`] for why that is a thread and not a reaper callback.
//!
//! The group leader gets SIGKILL if the agent dies (`PR_SET_PDEATHSIG`), and every
//! process of a command carries [`TAG_VAR`] in its environment, so an agent that
//! starts after one was killed finds and kills whatever its predecessor left
//! ([`kill_tagged`]) before anything runs again.
//!
//! Known limit: a descendant that leaves the group (`setsid`, `setpgid`) is out of
//! reach of the group kill. It cannot keep [`run`] waiting past [`DRAIN_GRACE`]
//! after the main process exits, but it is left running (and one that also clears
//! its environment escapes [`kill_tagged`]).

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::pin::pin;
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smol::future;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use smol::{Async, Timer};

/// How long output is still read after the main process has exited and its group
/// was killed. Data already in the pipes is read at once; this only bounds the wait
/// for a writer that escaped the group and still holds a pipe open.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How long to wait for the group leader to be reaped after a timeout kill before
/// giving up on it. SIGKILL is not instant for a process stuck in the kernel
/// (uninterruptible I/O on a dead NFS mount, say); the command stream must move on.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// The variable every command's processes carry: the state directory of the agent
/// that started them.
pub const TAG_VAR: &str = "OUTPOST_AGENT";

/// What to run and within which limits.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `argv[0]` is the program, looked up in `PATH`; no shell is involved.
    pub argv: Vec<String>,
    /// Added to the inherited environment, or to `base` when it is set.
    pub env: Vec<(String, String)>,
    /// When set, nothing of the agent's environment is inherited: the command
    /// starts from exactly these variables (then `env`).
    pub base: Option<Vec<(String, String)>>,
    /// The value of [`TAG_VAR`] for this command's processes, if any.
    pub tag: Option<String>,
    pub cwd: Option<PathBuf>,
    /// Written to the process, then its stdin is closed; empty means stdin is
    /// `/dev/null`.
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    /// Per stream (stdout and stderr), in bytes; the tail is kept when exceeded.
    pub output_cap: usize,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signalled(i32),
    TimedOut,
    SpawnFailed(String),
    /// Killed through a [`Canceller`], or cancelled before it started.
    Cancelled,
    /// The process ran but its exit status could not be collected; only happens if
    /// something else in this process reaps our children (e.g. SIGCHLD ignored).
    WaitFailed(String),
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Either stream exceeded [`Spec::output_cap`].
    pub truncated: bool,
    /// Bytes each stream wrote in all, kept or not: (stdout, stderr).
    pub written: (u64, u64),
    /// Unix epoch milliseconds when the process was started.
    pub started_ms: u64,
    /// From start until the process was reaped and its output drained.
    pub duration_ms: u64,
}

/// Cancels one command from elsewhere, e.g. the agent's control socket.
///
/// Create one per command, pass it to [`run_cancellable`] and keep a clone; cheap
/// to clone. Cancelling before the command starts makes it not start at all.
#[derive(Debug, Clone, Default)]
pub struct Canceller {
    group: Arc<Mutex<Group>>,
}

/// Why we killed a group; decides the outcome reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Timeout,
    Cancel,
    Drop,
}

/// The process group of one command, shared by the runner, the waiter thread and
/// any [`Canceller`]. The lock orders "kill the group" against "reap the leader":
/// while `reaped` is false the leader is at worst a zombie, so its pid and hence
/// the group id cannot have been reused by an unrelated process.
#[derive(Debug, Default)]
struct Group {
    pgid: Option<libc::pid_t>,
    reaped: bool,
    cancelled: bool,
    killed: Option<Kill>,
}

impl Canceller {
    pub fn new() -> Self {
        Self::default()
    }

    /// Kill a running command's whole process group; returns whether anything was
    /// signalled. The command then ends with [`Outcome::Cancelled`].
    pub fn cancel(&self) -> bool {
        let mut group = lock(&self.group);
        group.cancelled = true;
        group.kill(Kill::Cancel)
    }
}

impl Group {
    /// SIGKILL the whole group unless the leader has already been reaped.
    fn kill(&mut self, why: Kill) -> bool {
        let Some(pgid) = self.pgid else { return false };
        if self.reaped {
            return false;
        }
        // SAFETY: killpg has no memory-safety preconditions.
        let signalled = unsafe { libc::killpg(pgid, libc::SIGKILL) } == 0;
        if signalled && self.killed.is_none() {
            self.killed = Some(why);
        }
        signalled
    }
}

/// A poisoned lock only means a panic elsewhere; the state is still sound.
fn lock(group: &Mutex<Group>) -> MutexGuard<'_, Group> {
    group
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills the group if the run future is dropped before the command ended, so a
/// dropped or aborted task leaves no processes behind. The waiter thread still
/// reaps the leader.
struct KillOnDrop(Arc<Mutex<Group>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        lock(&self.0).kill(Kill::Drop);
    }
}

/// Run a command to completion or timeout; see [`run_cancellable`].
pub async fn run(spec: Spec) -> Output {
    run_cancellable(spec, &Canceller::new()).await
}

/// Run a command to completion, timeout or cancel through `canceller`.
///
/// Dropping the future kills the command's process group. Blocking: spawns one
/// thread per command that waits for the leader to exit. A thread, rather than
/// async-process's reaper, because the group must be killed between the leader's
/// exit and its reaping (see [`Group`]), which needs `waitid(WNOWAIT)`.
pub async fn run_cancellable(spec: Spec, canceller: &Canceller) -> Output {
    let started_ms = unix_ms(SystemTime::now());
    let started = Instant::now();
    let finish = |outcome: Outcome| Output {
        outcome,
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
        written: (0, 0),
        started_ms,
        duration_ms: elapsed_ms(started),
    };
    if lock(&canceller.group).cancelled {
        return finish(Outcome::Cancelled);
    }
    let mut child = match spawn(&spec) {
        Ok(child) => child,
        Err(message) => return finish(Outcome::SpawnFailed(message)),
    };
    let group = canceller.group.clone();
    let pid = child.id() as libc::pid_t;
    {
        let mut g = lock(&group);
        g.pgid = Some(pid);
        g.reaped = false;
        // A cancel that raced with the spawn found no group to kill; do it now.
        if g.cancelled {
            g.kill(Kill::Cancel);
        }
    }
    let _kill_on_drop = KillOnDrop(group.clone());

    let stdin = child.stdin.take().map(Async::new).transpose();
    let stdout = child.stdout.take().map(Async::new).transpose();
    let stderr = child.stderr.take().map(Async::new).transpose();
    let (status_tx, status_rx) = smol::channel::bounded(1);
    let waiter = {
        let group = group.clone();
        std::thread::Builder::new()
            .name("outpost-exec-wait".into())
            .spawn(move || {
                let status = wait_leader(child, &group);
                // The runner may be gone (dropped future); nobody to tell then.
                let _ = status_tx.send_blocking(status);
            })
    };
    if let Err(e) = waiter {
        // The child went down with the closure, unreaped; kill and reap it here.
        lock(&group).kill(Kill::Drop);
        // SAFETY: waitpid on our own child with a null status pointer is sound.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        lock(&group).reaped = true;
        return finish(Outcome::SpawnFailed(format!(
            "cannot wait for {:?}: {}",
            spec.argv[0],
            describe(&e)
        )));
    }
    let (stdin, stdout, stderr) = match (stdin, stdout, stderr) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            // Dropping the guard kills the group; the waiter thread reaps it.
            return finish(Outcome::SpawnFailed(format!(
                "cannot watch {:?}: {}",
                spec.argv[0],
                describe(&e)
            )));
        }
    };

    let mut out = Tail::new(spec.output_cap);
    let mut err = Tail::new(spec.output_cap);
    let mut status: Option<io::Result<ExitStatus>> = None;
    let work = async {
        let mut io = pin!(async {
            future::zip(
                feed(stdin, &spec.stdin),
                future::zip(drain(stdout, &mut out), drain(stderr, &mut err)),
            )
            .await;
        });
        let mut io_done = false;
        let exited = future::or(status_rx.recv(), async {
            io.as_mut().await;
            io_done = true;
            status_rx.recv().await
        })
        .await;
        // The waiter killed the rest of the group when the leader exited, so the
        // pipes are closing; only a writer that escaped the group keeps them open.
        if !io_done {
            future::or(io, async {
                Timer::after(DRAIN_GRACE).await;
            })
            .await;
        }
        // The waiter thread never drops the sender before sending.
        status = exited.ok();
    };
    let watchdog = async {
        Timer::after(spec.timeout).await;
        lock(&group).kill(Kill::Timeout);
        Timer::after(KILL_GRACE).await;
    };
    future::or(work, watchdog).await;

    let killed = lock(&group).killed;
    let outcome = match (killed, status) {
        (Some(Kill::Cancel), _) => Outcome::Cancelled,
        (Some(Kill::Timeout), _) | (_, None) => Outcome::TimedOut,
        (_, Some(Ok(status))) => match (status.code(), status.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(signal)) => Outcome::Signalled(signal),
            (None, None) => Outcome::WaitFailed(format!("unexpected wait status {status}")),
        },
        (_, Some(Err(e))) => Outcome::WaitFailed(format!(
            "cannot collect the exit status of {:?}: {}",
            spec.argv[0],
            describe(&e)
        )),
    };
    Output {
        outcome,
        truncated: out.truncated || err.truncated,
        written: (out.written, err.written),
        stdout: out.into_vec(),
        stderr: err.into_vec(),
        started_ms,
        duration_ms: elapsed_ms(started),
    }
}

/// Start the process in a new process group, or say in lower case why not.
fn spawn(spec: &Spec) -> Result<Child, String> {
    let Some(program) = spec.argv.first() else {
        return Err("cannot run an empty command".into());
    };
    let mut cmd = std::process::Command::new(program);
    if let Some(base) = &spec.base {
        cmd.env_clear().envs(base.iter().map(|(k, v)| (k, v)));
    }
    if let Some(tag) = &spec.tag {
        cmd.env(TAG_VAR, tag);
    }
    // SAFETY: the hook runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            // Dies with the agent rather than outliving it; if the agent is already
            // gone (it died between fork and here), do not start at all.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(if spec.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &spec.cwd {
        // std reports a bad cwd as the program not being found; check it first so
        // the message points at the right thing.
        let problem = match std::fs::metadata(cwd) {
            Ok(meta) if meta.is_dir() => None,
            Ok(_) => Some("not a directory".to_string()),
            Err(e) => Some(describe(&e)),
        };
        if let Some(problem) = problem {
            return Err(format!(
                "cannot run {program:?} in {:?}: {problem}",
                cwd.display().to_string()
            ));
        }
        cmd.current_dir(cwd);
    }
    cmd.spawn()
        .map_err(|e| format!("cannot run {program:?}: {}", describe(&e)))
}

/// Block until the leader exits, kill what is left of its group, then reap it.
///
/// Killing the rest of the group after a normal exit matters: a backgrounded
/// grandchild (`sleep 100 &`) inherits stdout and stderr and would keep the pipes
/// open, and so the command "running", long after the command proper finished. It
/// would also be left behind. The leader stays a zombie until the kill is done, so
/// the group id cannot be reused meanwhile.
fn wait_leader(mut child: Child, group: &Mutex<Group>) -> io::Result<ExitStatus> {
    let pid = child.id();
    loop {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a siginfo_t owned by this frame.
        let rc =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    let mut g = lock(group);
    if let Some(pgid) = g.pgid {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
    // Mark reaped even if wait fails: then someone else reaped it and the pid may
    // be reused, so the group must not be signalled again.
    g.reaped = true;
    child.wait()
}

/// Kills every process whose environment has [`TAG_VAR`] set to `tag` (what an
/// earlier agent on the same state directory left running), with its process
/// group, and waits up to `patience` for them to be gone. Returns how many were
/// found. Processes of other users are not readable and not touched.
pub fn kill_tagged(tag: &str, patience: Duration) -> usize {
    let needle = format!("{TAG_VAR}={tag}");
    let me = std::process::id();
    let found: Vec<libc::pid_t> = tagged(&needle, me);
    for &pid in &found {
        // SAFETY: kill/killpg/getpgid have no memory-safety preconditions.
        unsafe {
            let pgid = libc::getpgid(pid);
            if pgid > 1 && pgid != libc::getpgrp() {
                libc::killpg(pgid, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + patience;
    while !tagged(&needle, me).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    found.len()
}

/// Live (not zombie) processes other than `me` whose environment holds `needle`.
fn tagged(needle: &str, me: u32) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            out.push(pid as libc::pid_t);
        }
    }
    out
}

/// Write all of `input` to the child's stdin, then close it.
async fn feed(stdin: Option<Async<ChildStdin>>, input: &[u8]) {
    if let Some(mut stdin) = stdin {
        // A child that exits or closes stdin without reading it all is its own
        // business, not an error of ours (EPIPE; std restores SIGPIPE in the child,
        // and Rust binaries ignore it in the parent).
        let _ = stdin.write_all(input).await;
    }
}

/// Read a stream to its end into `tail`.
async fn drain<R: AsyncRead + Unpin>(stream: Option<R>, tail: &mut Tail) {
    let Some(mut stream) = stream else { return };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => tail.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The last `cap` bytes of a stream; memory stays bounded by `cap` whatever the
/// volume written.
#[derive(Debug)]
struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    truncated: bool,
    written: u64,
}

impl Tail {
    fn new(cap: usize) -> Self {
        // Grow on demand: most commands print far less than the cap.
        Self {
            buf: VecDeque::new(),
            cap,
            truncated: false,
            written: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.written += data.len() as u64;
        let data = if data.len() > self.cap {
            self.truncated = true;
            self.buf.clear();
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.truncated = true;
            self.buf.drain(..overflow);
        }
        self.buf.extend(data);
    }

    fn into_vec(self) -> Vec<u8> {
        self.buf.into()
    }
}

/// An io::Error as a lower-case message without std's "(os error N)" suffix.
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// Generous: the tests share two cores with builds.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn spec(argv: &[&str]) -> Spec {
        Spec {
            argv: argv.iter().map(std::string::ToString::to_string).collect(),
            env: Vec::new(),
            base: None,
            tag: None,
            cwd: None,
            stdin: Vec::new(),
            timeout: PATIENCE,
            output_cap: 1 << 20,
        }
    }

    fn sh(script: &str) -> Spec {
        spec(&["sh", "-c", script])
    }

    /// A directory removed on drop, unique per test.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("outpost-exec-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Gone means no such process, or a zombie: a zombie runs nothing and holds no
    /// files, and reaping an orphan is its new parent's job (init here may not).
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    /// Poll `cond` until it holds; panic naming `what` past the deadline.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_all_gone(pids: &[i32]) {
        for &pid in pids {
            wait_until(&format!("pid {pid} to be gone"), || is_gone(pid));
        }
    }

    /// Wait, without blocking the executor, for a file the command writes
    /// atomically (via rename) and return the pids in it.
    async fn pids_from(path: &Path) -> Vec<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Written by one `echo`: complete once its newline is there.
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.ends_with('\n') {
                    return parse_pids(&text);
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {path:?}");
            Timer::after(Duration::from_millis(10)).await;
        }
    }

    fn parse_pids(text: &str) -> Vec<i32> {
        text.split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    /// Starts a background sleeper and records "grandchild_pid child_pid" in `f`.
    // Only builtins after the fork of `sleep`: an `mv` still exiting would be a
    // third process of the group when a test counts them.
    const SPAWN_AND_RECORD: &str = r#"sleep 100 & echo "$! $$" > "$F"; wait"#;

    #[test]
    fn exit_code_is_returned() {
        let out = smol::block_on(run(sh("exit 3")));
        assert_eq!(out.outcome, Outcome::Exited(3));
    }

    #[test]
    fn death_by_signal_is_reported() {
        let out = smol::block_on(run(sh("kill -TERM $$")));
        assert_eq!(out.outcome, Outcome::Signalled(libc::SIGTERM));
    }

    #[test]
    fn stdout_and_stderr_are_captured_separately() {
        let out = smol::block_on(run(sh("echo out; echo err >&2")));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.truncated);
    }

    #[test]
    fn stdin_is_delivered_then_closed() {
        let mut s = spec(&["cat"]);
        s.stdin = b"hello\n".to_vec();
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert_eq!(out.stdout, b"hello\n");
    }

    #[test]
    fn empty_stdin_reads_as_end_of_file() {
        let out = smol::block_on(run(spec(&["cat"])));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert_eq!(out.stdout, b"");
    }

    #[test]
    fn env_and_cwd_are_applied() {
        let dir = TempDir::new("env_and_cwd");
        let mut s = sh(r#"echo "$OUTPOST_TEST_VAR"; pwd -P; echo "${PATH:+path inherited}""#);
        s.env = vec![("OUTPOST_TEST_VAR".into(), "forty two".into())];
        s.cwd = Some(dir.0.clone());
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::Exited(0));
        let expected = format!(
            "forty two\n{}\npath inherited\n",
            dir.0.canonicalize().unwrap().display()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }

    #[test]
    fn tagged_processes_are_found_and_killed_with_their_group() {
        let dir = TempDir::new("tagged");
        let pidfile = dir.0.join("pids");
        let tag = format!("test-{}", std::process::id());
        let mut s = sh(SPAWN_AND_RECORD);
        s.env = vec![("F".into(), pidfile.display().to_string())];
        s.tag = Some(tag.clone());
        // Started and abandoned, as by an agent that died: a detached runner thread.
        let runner = std::thread::spawn(move || smol::block_on(run(s)));
        let pids = smol::block_on(pids_from(&pidfile));
        assert_eq!(
            kill_tagged(&tag, PATIENCE),
            2,
            "both processes carry the tag"
        );
        assert_all_gone(&pids);
        assert_eq!(
            runner.join().unwrap().outcome,
            Outcome::Signalled(libc::SIGKILL)
        );
        assert_eq!(kill_tagged(&tag, PATIENCE), 0);
    }

    #[test]
    fn a_base_environment_replaces_the_inherited_one() {
        // Cargo sets it for this process: a command with a base must not see it.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let mut s = sh(r#"echo "${HOME:-unset} ${CARGO_PKG_NAME:-unset} ${X:-unset}""#);
        s.base = Some(vec![("HOME".into(), "/".into())]);
        s.env = vec![("X".into(), "1".into())];
        let out = smol::block_on(run(s));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/ unset 1\n");
    }

    #[test]
    fn cap_keeps_the_tail_and_marks_truncation() {
        let mut s = spec(&["seq", "1", "100000"]);
        s.output_cap = 100;
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert_eq!(out.stdout.len(), 100);
        assert!(out.stdout.ends_with(b"99999\n100000\n"), "{:?}", out.stdout);
        assert!(out.truncated);
    }

    #[test]
    fn output_exactly_at_cap_is_not_truncated() {
        let mut s = sh("printf abcd; printf efgh >&2");
        s.output_cap = 4;
        let out = smol::block_on(run(s));
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"abcd"[..], &b"efgh"[..])
        );
        assert!(!out.truncated);
    }

    #[test]
    fn truncation_of_stderr_alone_is_reported() {
        let mut s = sh("echo ok; seq 1 1000 >&2");
        s.output_cap = 10;
        let out = smol::block_on(run(s));
        assert_eq!(out.stdout, b"ok\n");
        assert!(out.stderr.ends_with(b"1000\n"));
        assert!(out.truncated);
    }

    #[test]
    fn large_stdin_and_output_on_both_streams_do_not_deadlock() {
        // Far beyond the pipe buffers on every side, so a runner that writes stdin
        // before reading, or reads one stream at a time, would hang here.
        let input: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let mut s = sh("tee /dev/stderr");
        s.stdin = input.clone();
        s.output_cap = 8 << 20;
        s.timeout = Duration::from_secs(300);
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert!(out.stdout == input && out.stderr == input);
        assert!(!out.truncated);
    }

    #[test]
    fn child_that_ignores_stdin_does_not_hang_or_fail() {
        let mut s = sh("exit 0");
        s.stdin = vec![b'x'; 4 << 20];
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::Exited(0));
    }

    #[test]
    fn timeout_kills_a_sleeping_process_promptly() {
        let mut s = spec(&["sleep", "100"]);
        s.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let out = smol::block_on(run(s));
        assert_eq!(out.outcome, Outcome::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
        assert!(out.duration_ms >= 300);
    }

    #[test]
    fn timeout_kills_child_and_grandchild() {
        // The pids are only known once the shell has printed them; on a loaded
        // machine 300 ms may not be enough for that, so lengthen the timeout until
        // they were printed before the kill.
        for timeout_ms in [300, 3_000, 30_000] {
            let mut s = sh(r#"sleep 100 & echo "$! $$"; wait"#);
            s.timeout = Duration::from_millis(timeout_ms);
            let out = smol::block_on(run(s));
            assert_eq!(out.outcome, Outcome::TimedOut);
            let pids = parse_pids(&String::from_utf8_lossy(&out.stdout));
            if pids.len() == 2 {
                assert_all_gone(&pids);
                return;
            }
        }
        panic!("the shell never got to print its pids");
    }

    #[test]
    fn backgrounded_grandchild_does_not_keep_run_waiting() {
        // The grandchild inherits stdout; without the group kill on exit the pipe
        // would stay open for 100 s (or until the timeout).
        let started = Instant::now();
        let out = smol::block_on(run(sh(r#"sleep 100 & echo "$!""#)));
        assert_eq!(out.outcome, Outcome::Exited(0));
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "took {:?}",
            started.elapsed()
        );
        assert_all_gone(&parse_pids(&String::from_utf8_lossy(&out.stdout)));
    }

    #[test]
    fn dropping_run_kills_the_process_group() {
        let dir = TempDir::new("dropping_run");
        let pidfile = dir.0.join("pids");
        let mut s = sh(SPAWN_AND_RECORD);
        s.env = vec![("F".into(), pidfile.display().to_string())];
        let pids = smol::block_on(future::or(
            async {
                let out = run(s).await;
                panic!("run returned before being dropped: {out:?}");
            },
            pids_from(&pidfile),
        ));
        assert_eq!(pids.len(), 2);
        assert_all_gone(&pids);
    }

    #[test]
    fn cancel_kills_the_group_and_reports_cancelled() {
        let dir = TempDir::new("cancel_kills");
        let pidfile = dir.0.join("pids");
        let mut s = sh(SPAWN_AND_RECORD);
        s.env = vec![("F".into(), pidfile.display().to_string())];
        let canceller = Canceller::new();
        let (out, pids) = smol::block_on(future::zip(run_cancellable(s, &canceller), async {
            let pids = pids_from(&pidfile).await;
            assert!(canceller.cancel(), "nothing was signalled");
            pids
        }));
        assert_eq!(out.outcome, Outcome::Cancelled);
        assert_all_gone(&pids);
        assert!(!canceller.cancel(), "signalled after the command ended");
    }

    #[test]
    fn cancel_before_start_runs_nothing() {
        let dir = TempDir::new("cancel_before");
        let marker = dir.0.join("ran");
        let canceller = Canceller::new();
        assert!(!canceller.cancel());
        let mut s = spec(&["touch"]);
        s.argv.push(marker.display().to_string());
        let out = smol::block_on(run_cancellable(s, &canceller));
        assert_eq!(out.outcome, Outcome::Cancelled);
        assert!(!marker.exists());
    }

    #[test]
    fn missing_program_is_a_spawn_failure() {
        let out = smol::block_on(run(spec(&["nosuchprog"])));
        assert_eq!(
            out.outcome,
            Outcome::SpawnFailed(r#"cannot run "nosuchprog": no such file or directory"#.into())
        );
    }

    #[test]
    fn non_executable_program_is_a_spawn_failure() {
        let dir = TempDir::new("non_executable");
        let program = dir.0.join("script");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).unwrap();
        let program = program.display().to_string();
        let out = smol::block_on(run(spec(&[&program])));
        assert_eq!(
            out.outcome,
            Outcome::SpawnFailed(format!("cannot run {program:?}: permission denied"))
        );
    }

    #[test]
    fn missing_cwd_is_a_spawn_failure_naming_the_directory() {
        let mut s = spec(&["true"]);
        s.cwd = Some("/nonexistent/outpost".into());
        let out = smol::block_on(run(s));
        assert_eq!(
            out.outcome,
            Outcome::SpawnFailed(
                r#"cannot run "true" in "/nonexistent/outpost": no such file or directory"#.into()
            )
        );
    }

    #[test]
    fn empty_argv_is_a_spawn_failure() {
        let out = smol::block_on(run(spec(&[])));
        assert_eq!(
            out.outcome,
            Outcome::SpawnFailed("cannot run an empty command".into())
        );
    }

    #[test]
    fn start_time_is_wall_clock_milliseconds() {
        let before = unix_ms(SystemTime::now());
        let out = smol::block_on(run(spec(&["true"])));
        let after = unix_ms(SystemTime::now());
        assert!((before..=after).contains(&out.started_ms));
        assert!(out.duration_ms <= after - before);
    }

    #[test]
    fn tail_keeps_last_bytes_across_pushes() {
        let mut tail = Tail::new(5);
        tail.push(b"abc");
        assert!(!tail.truncated);
        tail.push(b"defg");
        tail.push(b"h");
        assert!(tail.truncated);
        assert_eq!(tail.into_vec(), b"defgh");

        let mut tail = Tail::new(3);
        tail.push(b"abcdefgh");
        assert_eq!(tail.into_vec(), b"fgh");
    }

    #[test]
    fn zero_cap_keeps_nothing_but_reports_truncation() {
        let mut tail = Tail::new(0);
        tail.push(b"x");
        assert!(tail.truncated);
        assert!(tail.into_vec().is_empty());
    }
}
