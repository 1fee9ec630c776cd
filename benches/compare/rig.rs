//! What every scenario needs: a broker, a central and a node agent that trust each
//! other (sealing on), the node behind a proxy that counts its link's bytes, and
//! readings of processes from /proc.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use outpost::control::{Client, CommandSpec, Request};

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{wait_for, wait_until, TempDir};

/// What the node lets the central use in most scenarios.
pub const ALLOW: &str = "exec,ping,http-get";

/// Deadline for anything a scenario waits on; generous, the machine is shared.
pub const LONG: Duration = Duration::from_secs(1800);

/// A stock mosquitto, `central` on it directly and `node` behind a proxy.
pub struct Pair {
    pub tmp: TempDir,
    /// Held so the broker lives as long as the pair; scenarios rarely touch it.
    #[allow(dead_code)]
    pub broker: Broker,
    pub proxy: Proxy,
    pub central: Agent,
    pub node: Agent,
}

impl Pair {
    /// Starts both agents with `--log-level info` and `extra` flags (for example
    /// `--durability normal`) and waits until the central sees the node online.
    pub fn start(extra: &[&str]) -> Pair {
        let broker = Broker::start_stock("");
        Pair::start_on(broker, extra)
    }

    /// As [`Pair::start`], on a broker the caller configured.
    pub fn start_on(broker: Broker, extra: &[&str]) -> Pair {
        Pair::start_inner(broker, extra, true)
    }

    /// As [`Pair::start`] with the node connected to the broker directly: the proxy
    /// exists but carries nothing (for latency without the proxy's extra hop).
    pub fn start_direct(extra: &[&str]) -> Pair {
        Pair::start_inner(Broker::start_stock(""), extra, false)
    }

    fn start_inner(broker: Broker, extra: &[&str], behind_proxy: bool) -> Pair {
        let proxy = Proxy::start(broker.addr());
        let node_url = if behind_proxy {
            proxy.url()
        } else {
            broker.url()
        };
        Pair::assemble(broker, proxy, ALLOW, extra, &node_url, &[])
    }

    /// The general form the others use: `proxy` set up by the caller (its
    /// upstream, delay, rate), the node lets the central use `allow`, both agents
    /// get `--log-level info` and `extra`, the node also `node_extra` and reaches
    /// the broker at `node_url`. Returns once the central sees the node online.
    pub fn assemble(
        broker: Broker,
        proxy: Proxy,
        allow: &str,
        extra: &[&str],
        node_url: &str,
        node_extra: &[&str],
    ) -> Pair {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "node", allow);
        let mut flags = vec!["--log-level", "info"];
        flags.extend_from_slice(extra);
        let central = Agent::start_with("central", &broker.url(), tmp.path(), &flags);
        flags.extend_from_slice(node_extra);
        let node = Agent::start_with("node", node_url, tmp.path(), &flags);
        let pair = Pair {
            tmp,
            broker,
            proxy,
            central,
            node,
        };
        pair.wait_online();
        pair
    }

    pub fn wait_online(&self) {
        wait_until("central sees the node online", LONG, || {
            self.central.sees_online("node")
        });
    }

    /// Cuts the node's link and keeps it down until [`Pair::link_up`].
    pub fn link_down(&self) {
        self.proxy.set_mode(Mode::Refuse);
        wait_until("central sees the node offline", LONG, || {
            !self.central.sees_online("node")
        });
    }

    pub fn link_up(&self) {
        self.proxy.set_mode(Mode::Pass);
    }

    /// Queues one command on `lane` and returns its job id.
    pub fn send(&self, lane: &str, command: CommandSpec) -> i64 {
        let req = Request::Send {
            where_: vec![],
            online: false,
            to: "node".into(),
            lane: Some(lane.into()),
            ttl_s: None,
            key: None,
            output: None,
            command,
        };
        self.central.call(&req)["job"].as_i64().expect("job id")
    }

    /// Queues one command on `lane` through an open control connection.
    pub fn send_on(&self, client: &mut Client, lane: &str, command: CommandSpec) -> i64 {
        let req = Request::Send {
            where_: vec![],
            online: false,
            to: "node".into(),
            lane: Some(lane.into()),
            ttl_s: None,
            key: None,
            output: None,
            command,
        };
        let v = client.call(&req, Duration::from_secs(60)).expect("send");
        v["job"].as_i64().expect("job id")
    }

    /// Frames still unacknowledged in `agent`'s outbox, over every peer and lane.
    pub fn outbox(agent: &Agent) -> u64 {
        frames(&agent.status()["outbox"])
    }

    /// Frames received but not yet consumed in `agent`'s inbox.
    pub fn inbox(agent: &Agent) -> u64 {
        frames(&agent.status()["inbox"])
    }

    /// Waits until every command the central queued has reached the node.
    pub fn wait_delivered(&self) {
        wait_until("the node has every command", LONG, || {
            Pair::outbox(&self.central) == 0
        });
    }
}

fn frames(v: &Value) -> u64 {
    v.as_array()
        .map(|a| a.iter().map(|e| e["frames"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

pub fn exec(argv: &[&str]) -> CommandSpec {
    CommandSpec::Exec {
        argv: argv.iter().map(std::string::ToString::to_string).collect(),
        env: vec![],
        cwd: None,
        stdin: String::new(),
        timeout_ms: None,
        rerun: false,
    }
}

/// `command` for the rig's node on lane `ordered`, nothing else set.
pub fn to_node(command: CommandSpec) -> Request {
    Request::Send {
        where_: vec![],
        online: false,
        to: "node".into(),
        lane: Some("ordered".into()),
        ttl_s: None,
        key: None,
        output: None,
        command,
    }
}

/// A FIFO that holds an ordered lane: a command `cat FIFO` blocks (and every
/// command behind it waits) until [`Gate::open`].
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    pub fn new(dir: &Path) -> Gate {
        let path = dir.join("gate.fifo");
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
        Gate { path }
    }

    /// The command that blocks its lane until the gate opens. Its timeout is an
    /// hour: queueing 100,000 commands behind it takes minutes, and the default
    /// 60 s would let it end early and the lane run while the link is up.
    pub fn command(&self) -> CommandSpec {
        CommandSpec::Exec {
            argv: vec!["cat".into(), self.path.to_str().unwrap().into()],
            env: vec![],
            cwd: None,
            stdin: String::new(),
            timeout_ms: Some(3_600_000),
            rerun: false,
        }
    }

    /// Lets the blocked `cat` finish: opens the FIFO for writing (once `cat` has
    /// it open for reading) and closes it, so `cat` reads end of file.
    pub fn open(&self) {
        wait_for(
            "the gate command reads its FIFO",
            Duration::from_secs(120),
            || {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&self.path)
                    .ok()
            },
        );
    }
}

/// Counters of one process from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// Bytes the process caused to be written to storage (`write_bytes`).
    pub write_bytes: u64,
    /// Bytes passed to write(2) and friends (`wchar`).
    pub wchar: u64,
    /// User plus system CPU time, seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak RSS so far (`VmHWM`).
    pub hwm_kib: u64,
}

pub fn sample(pid: u32) -> ProcSample {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ProcSample {
        write_bytes: field(&io, "write_bytes:"),
        wchar: field(&io, "wchar:"),
        cpu_s: (ticks(14) + ticks(15)) as f64 / hz,
        rss_kib: field(&status, "VmRSS:"),
        hwm_kib: field(&status, "VmHWM:"),
    }
}
