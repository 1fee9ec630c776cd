//! The agent: one event loop that wires the store, the link, execution and the
//! control socket.
//!
//! Threads: this loop owns the [`Node`] (and so SQLite) on the thread that calls
//! [`run`]; the link runs rumqttc on its own thread; the control socket and running
//! commands are smol tasks on smol's global executor. Everything reaches the loop as
//! a [`Msg`] on one channel, and the loop sleeps until a message or the delivery
//! state machine's next deadline: no busy polling.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use smol::channel::{Receiver, Sender};
use smol::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::config::Config;
use crate::control::{self, CommandSpec, Request};
use crate::exec;
use crate::frame::{self, Body, CmdResult, Command, Exec, HttpGet, Lane, Name, Status};
use crate::link::{Link, LinkConfig, LinkError, LinkEvent, Retained, TlsFiles};
use crate::node::{Node, NodeConfig, Report};
use crate::seal;
use crate::store::{Inbound, Job, Mono, Outgoing, StoreConfig, StoreError};
use crate::trust::{self, ExecPolicy, Keys, Trust};

use crate::{debug, error, info, warn};

#[path = "agent_files.rs"]
mod agent_files;

/// A command still running this long after it started is announced to its sender,
/// so `outpost jobs` can say `running`; quicker ones cost no extra bytes.
const STARTED_AFTER_MS: u64 = 1_000;
/// Most frames taken into one store batch (one commit) by `run_ready`.
const BATCH_MAX: usize = 256;

/// Default command timeout when the sender gives none.
pub const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// Largest MQTT packet: a full payload plus headroom.
const MAX_PACKET: usize = 2 * frame::MAX_FRAME;

enum Msg {
    Link(LinkEvent),
    Control(Request, Sender<Value>),
    Done(Box<Inbound>, Box<CmdResult>),
    /// SIGTERM or SIGINT: stop children, record them, leave.
    Stop(i32),
}

/// Control clients that may wait for jobs at once; past it `wait` is refused.
pub const MAX_WAITERS: usize = 1024;

/// Which jobs changed: a few by id, or (after something that touches many, such as
/// a resynchronisation) all of them.
#[derive(Debug, Default)]
struct Changed {
    all: bool,
    ids: std::collections::BTreeSet<i64>,
}

/// How long a stopping agent waits for its commands to be killed and recorded.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A command running now.
#[derive(Debug)]
struct Running {
    method: &'static str,
    started_ms: u64,
    /// The sender has been told it is running.
    announced: bool,
    /// Kills an exec's process group; none for methods that cannot be stopped.
    cancel: Option<exec::Canceller>,
}

/// The monotonic clock: `CLOCK_BOOTTIME` (counts through suspend), in ms.
fn mono_now(boot: u64) -> Mono {
    // SAFETY: timespec is plain data; clock_gettime only writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Mono {
        ms: ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
        boot,
    }
}

/// This boot, as 64 bits of the kernel's boot id (never 0).
fn boot_id() -> u64 {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0).max(1)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the agent until the process is killed. Errors are start-up failures.
pub fn run(cfg: Config) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits it: SIGTERM and
    // SIGINT are taken by one thread that tells the loop (children start with a
    // clear mask, std resets it).
    let signals = block_stop_signals();
    prepare_state_dir(&cfg.state_dir)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    // Whatever an agent that died on this state directory left running is killed
    // before anything of its streams runs again.
    let tag = agent_tag(&cfg.state_dir);
    let left = exec::kill_tagged(&tag, Duration::from_secs(10));
    if left > 0 {
        warn!("killed {left} process(es) a previous agent on this state directory left running");
    }
    let mut node_cfg = NodeConfig {
        store: StoreConfig {
            durability: cfg.durability,
            quota_bytes: cfg.quota,
        },
        ..NodeConfig::default()
    };
    // For tests that must show something does not wait for the resend timer: a
    // timer of this length would make such a test fail rather than pass slowly.
    if let Some(ms) = std::env::var("OUTPOST_TEST_RTO_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        node_cfg.delivery.rto_min_ms = ms;
        node_cfg.delivery.rto_max_ms = node_cfg.delivery.rto_max_ms.max(ms);
        node_cfg.delivery.offline_probe_ms = ms;
    }
    let keys = load_or_create_keys(&cfg)?;
    let _ = std::fs::write(cfg.state_dir.join("name"), format!("{}\n", cfg.name));
    let db = cfg.state_dir.join("store.db");
    let node = Node::open(&db, &cfg.name, node_cfg, keys, now_ms())
        .map_err(|e| format!("{}: {e}", db.display()))?;
    if let Some(loss) = node.loss() {
        error!(
            "this node's store lost committed state: {}; it has a new epoch, resynchronises with every peer, and runs nothing that may have run before",
            loss.reason
        );
    }

    let (tx, rx) = smol::channel::unbounded::<Msg>();
    spawn_signal_thread(signals, tx.clone());
    let listener = bind_control(&cfg.state_dir)?;
    smol::spawn(serve_control(listener, tx.clone())).detach();

    let presence = cfg.presence_topic(&cfg.name);
    let link_cfg = LinkConfig {
        client_id: cfg.name.to_string(),
        broker: cfg.broker.clone(),
        tls: TlsFiles {
            ca_file: cfg.ca_file.clone(),
            client_cert: cfg.client_cert.clone(),
            client_key: cfg.client_key.clone(),
        },
        username: cfg.username.clone(),
        password: cfg.password.clone(),
        keepalive: cfg.keepalive,
        backoff_cap: cfg.backoff_cap,
        // Presence comes only from the peers in the trust file (and our own, to
        // put right a forged "offline"): see `Agent::subscribe_presence`.
        subscriptions: vec![cfg.inbox_topic(&cfg.name)],
        will: Some(Retained {
            topic: presence.clone(),
            payload: b"offline".to_vec(),
        }),
        on_connect: vec![Retained {
            topic: presence,
            payload: b"online".to_vec(),
        }],
        max_packet: MAX_PACKET,
    };
    let (link, events) = Link::start(link_cfg).map_err(|e| e.to_string())?;
    smol::spawn(forward(events, tx.clone())).detach();
    info!(
        "agent {} started: broker {}, state {}",
        cfg.name,
        cfg.broker,
        cfg.state_dir.display()
    );

    let mut agent = Agent {
        trust: Trust::default(),
        trust_stamp: None,
        rejected: BTreeMap::new(),
        files_active: false,
        cfg,
        node,
        link,
        tx,
        link_since_ms: now_ms(),
        last_error: None,
        waiters: BTreeMap::new(),
        n_waiters: 0,
        changed_jobs: Changed::default(),
        retry_at: None,
        running: BTreeMap::new(),
        boot: boot_id(),
        sources: BTreeMap::new(),
        poisoned: None,
        presence_fixed_ms: None,
        unrecorded: Vec::new(),
        store_error: None,
        store_retry_ms: 0,
        stopping: None,
        tag,
    };
    agent.refresh_trust();
    agent.drive();
    loop {
        let msg = agent.next_msg(&rx);
        if let Some(msg) = msg {
            agent.handle(msg);
        }
        agent.drive();
        if agent.stopped() {
            agent.leave();
            return Ok(());
        }
    }
}

/// The [`exec::TAG_VAR`] value for this state directory's commands.
fn agent_tag(state_dir: &Path) -> String {
    state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .display()
        .to_string()
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts).
fn block_stop_signals() -> libc::sigset_t {
    let set = stop_signals();
    // SAFETY: a valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// A thread that waits for SIGTERM or SIGINT and tells the loop.
fn spawn_signal_thread(set: libc::sigset_t, tx: Sender<Msg>) {
    let _ = std::thread::Builder::new()
        .name("outpost-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: a valid set and a place for the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0
                && tx.send_blocking(Msg::Stop(sig)).is_err()
            {
                return;
            }
        });
}

struct Agent {
    trust: Trust,
    /// (modified time, length) of the trust file when last read.
    trust_stamp: Option<(SystemTime, u64)>,
    /// Payloads dropped, by kind (a bounded set): counted for `status`, logged
    /// rate-limited.
    rejected: BTreeMap<&'static str, Rejections>,
    /// Transfers in progress or files with an expiry: wake up to sweep them.
    files_active: bool,
    cfg: Config,
    node: Node,
    link: Link,
    tx: Sender<Msg>,
    link_since_ms: u64,
    last_error: Option<String>,
    /// Control clients waiting for a job to change.
    /// Control clients waiting for a job to change: per job, (results seen, reply).
    waiters: BTreeMap<i64, Vec<(usize, Sender<Value>)>>,
    n_waiters: usize,
    /// Jobs that got results since waiters were last answered.
    changed_jobs: Changed,
    /// Publishing was refused (queue full): try again at this time.
    retry_at: Option<Instant>,
    /// Which boot the monotonic clock counts from.
    boot: u64,
    /// Open source files of transfers from share_dirs, by transfer id.
    sources: BTreeMap<i64, std::fs::File>,
    /// An oversized message cut the link: (when, its size). Presence is off since.
    poisoned: Option<(u64, usize)>,
    /// When this node last put its own presence back to online.
    presence_fixed_ms: Option<u64>,
    /// Commands running now, by (peer, lane, seq).
    running: BTreeMap<(Name, Lane, u64), Running>,
    /// Results the store could not take (a full disk): retried until it does,
    /// their streams held meanwhile (the journal still says running).
    unrecorded: Vec<(Box<Inbound>, Box<CmdResult>)>,
    /// Since when, and why, the store refuses writes.
    store_error: Option<(u64, String)>,
    /// When to try taking work again while it does.
    store_retry_ms: u64,
    /// A stop signal arrived: (signal, deadline for the children).
    stopping: Option<(i32, Instant)>,
    /// [`exec::TAG_VAR`] for this agent's commands.
    tag: String,
}

impl Agent {
    /// Blocks until a message arrives or the next deadline passes (then `None`).
    fn next_msg(&self, rx: &Receiver<Msg>) -> Option<Msg> {
        let now = now_ms();
        let mut wake = self
            .node
            .next_wakeup(now)
            .map(|t| Duration::from_millis(t.saturating_sub(now)));
        if let Some(at) = self.retry_at {
            let d = at.saturating_duration_since(Instant::now());
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if !self.unrecorded.is_empty() || self.stopping.is_some() {
            // Retry what the store refused; a stopping agent checks its deadline.
            let d = Duration::from_millis(if self.stopping.is_some() { 100 } else { 2_000 });
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if let Some(t) = self
            .running
            .values()
            .filter(|r| !r.announced)
            .map(|r| r.started_ms + STARTED_AFTER_MS)
            .min()
        {
            let d = Duration::from_millis(t.saturating_sub(now));
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if self.files_active {
            // Transfers and expiring files are swept by the clock, not by events.
            let d = Duration::from_secs(2);
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        smol::block_on(async {
            match wake {
                Some(d) => {
                    smol::future::or(async { rx.recv().await.ok() }, async {
                        smol::Timer::after(d).await;
                        None
                    })
                    .await
                }
                None => rx.recv().await.ok(),
            }
        })
    }

    fn handle(&mut self, msg: Msg) {
        let now = now_ms();
        self.node.tick(mono_now(self.boot));
        match msg {
            Msg::Link(LinkEvent::Connected { .. }) => {
                self.link_since_ms = now;
                self.node.on_connected(now);
            }
            Msg::Link(LinkEvent::Disconnected { error }) => {
                if self.node.is_connected() {
                    self.link_since_ms = now;
                }
                self.last_error = Some(error);
                self.node.on_disconnected(now);
            }
            Msg::Link(LinkEvent::Published) => {}
            Msg::Link(LinkEvent::Poisoned { size }) => {
                self.poisoned = Some((now, size));
            }
            Msg::Link(LinkEvent::Message {
                topic,
                payload,
                ack,
            }) => {
                self.on_message(&topic, &payload, now);
                // PUBACK only now: whatever we keep of it is committed.
                self.link.ack(ack);
            }
            Msg::Control(req, reply) => {
                let v = self.on_request(req, &reply, now);
                if let Some(v) = v {
                    let _ = reply.try_send(v);
                }
            }
            Msg::Done(inbound, mut result) => {
                let key = (
                    inbound.env.from.clone(),
                    inbound.env.lane.clone(),
                    inbound.env.seq,
                );
                self.running.remove(&key);
                if let Some((sig, _)) = self.stopping {
                    if result.status == Status::Cancelled {
                        result.status = Status::Interrupted;
                        result.reason = format!(
                            "the agent was stopped (signal {sig}) while the command ran; it was killed and is not run again"
                        );
                    }
                }
                self.unrecorded.push((inbound, result));
                self.record_results(now);
            }
            Msg::Stop(sig) => {
                if self.stopping.is_none() {
                    info!(
                        "stopping (signal {sig}): killing {} running command(s)",
                        self.running.len()
                    );
                    self.stopping = Some((sig, Instant::now() + STOP_GRACE));
                    for r in self.running.values() {
                        if let Some(c) = &r.cancel {
                            c.cancel();
                        }
                    }
                }
            }
        }
    }

    /// Records results that wait for the store, oldest first; what the store still
    /// refuses (a full disk) stays for the next try. While one waits, its stream
    /// waits too: the journal says the command is still running.
    fn record_results(&mut self, now: u64) {
        let waiting = std::mem::take(&mut self.unrecorded);
        let mut failed: Option<String> = None;
        for (inbound, result) in waiting {
            if failed.is_some() {
                self.unrecorded.push((inbound, result));
                continue;
            }
            match self.node.finish(&inbound, (*result).clone(), now) {
                Ok(_) => {}
                Err(e) => {
                    let env = &inbound.env;
                    error!(
                        "cannot record the result of {}#{} from {}: {e} (kept, retried while the agent runs)",
                        env.lane, env.seq, env.from
                    );
                    failed = Some(e.to_string());
                    self.unrecorded.push((inbound, result));
                }
            }
        }
        self.note_store(failed, now);
    }

    /// Notes whether the last store write failed, for `status` and the log.
    fn note_store(&mut self, failed: Option<String>, now: u64) {
        if failed.is_some() {
            self.store_retry_ms = now + 2_000;
        }
        match (failed, &self.store_error) {
            (Some(e), None) => self.store_error = Some((now, e)),
            (Some(e), Some((since, _))) => self.store_error = Some((*since, e)),
            (None, Some((since, e))) => {
                info!(
                    "the store takes writes again after {} s ({e})",
                    now.saturating_sub(*since) / 1000
                );
                self.store_error = None;
                if let Err(e) = self.node.room_again() {
                    debug!("{e}");
                }
            }
            (None, None) => {}
        }
    }

    /// A stopping agent is done when its commands are recorded or its grace ran out.
    fn stopped(&self) -> bool {
        match self.stopping {
            None => false,
            Some((_, deadline)) => {
                let execs = self.running.values().filter(|r| r.cancel.is_some()).count();
                (execs == 0 && self.unrecorded.is_empty()) || Instant::now() >= deadline
            }
        }
    }

    /// Says offline and disconnects cleanly; the process then exits.
    fn leave(&mut self) {
        let presence = self.cfg.presence_topic(&self.cfg.name);
        let _ = self.link.publish_retained(&presence, b"offline".to_vec());
        self.link.stop();
        info!(
            "stopped; {} command(s) still running will be reported interrupted at the next start",
            self.running.len()
        );
    }

    fn on_message(&mut self, topic: &str, payload: &[u8], now: u64) {
        if topic == self.cfg.inbox_topic(&self.cfg.name) {
            self.refresh_trust();
            match self.node.on_payload(payload, now) {
                Ok(report) => {
                    self.on_report(report);
                    self.note_store(None, now);
                }
                Err(e) => {
                    error!("cannot store received payload: {e} (nothing of it kept: the sender resends)");
                    self.note_store(Some(e.to_string()), now);
                }
            }
            return;
        }
        let Some(peer) = topic
            .strip_prefix(&format!("{}/", self.cfg.prefix))
            .and_then(|t| t.strip_suffix("/presence"))
            .and_then(|n| Name::new(n).ok())
        else {
            return;
        };
        // Presence of names nobody trusts is noise (or an attack): not recorded.
        if peer == self.cfg.name {
            // Anyone may publish on our presence topic; while we are up, we are
            // online, whatever was published there.
            let forged = payload != b"online";
            let due = self.presence_fixed_ms.is_none_or(|t| now >= t + 10_000);
            if forged && due && self.link.is_connected() {
                warn!(
                    "this node's presence topic said {:?}; setting it back to online",
                    String::from_utf8_lossy(&payload[..payload.len().min(32)])
                );
                self.presence_fixed_ms = Some(now);
                let topic = self.cfg.presence_topic(&self.cfg.name);
                let _ = self.link.publish_retained(&topic, b"online".to_vec());
            }
            return;
        }
        if !self.node.trusts(&peer) {
            return;
        }
        let online = match payload {
            b"online" => true,
            b"offline" => false,
            _ => return,
        };
        self.node.on_presence(peer.clone(), online, now);
        if let Err(e) = self.node.store_mut().set_presence(&peer, online, now) {
            error!("cannot record presence of {peer}: {e}");
        }
    }

    /// Publishes what delivery wants sent, starts what is runnable, answers waiters.
    fn drive(&mut self) {
        let now = now_ms();
        self.node.tick(mono_now(self.boot));
        self.retry_at = None;
        match self.node.expire(now) {
            Ok(0) => {}
            Ok(n) => {
                info!("{n} command(s) withdrawn: their ttl passed before their node took them");
                self.changed_jobs.all = true;
            }
            Err(e) => error!("cannot withdraw expired commands: {e}"),
        }
        // Before sealing anything: a peer trusted a moment ago is sealable now.
        self.refresh_trust();
        if !self.unrecorded.is_empty() {
            self.record_results(now);
        }
        // A stopping agent starts nothing new; a store that refuses writes is
        // tried again every few seconds, not on every message.
        let store_waits = self.store_error.is_some() && now < self.store_retry_ms;
        if self.stopping.is_none() && !store_waits {
            let taken = self.run_ready(now);
            if let Err(e) = &taken {
                error!("cannot take runnable work: {e}");
            }
            self.note_store(taken.err().map(|e| e.to_string()), now);
        }
        self.announce_running(now);
        if let Err(e) = self.pump_files(now) {
            error!("cannot queue file chunks: {e}");
        }
        match self.node.poll_out(now) {
            Ok((payloads, corrupt)) => {
                for c in corrupt {
                    error!("{c}");
                }
                let mut refused: Vec<Name> = Vec::new();
                for p in payloads {
                    if refused.contains(&p.to) {
                        continue;
                    }
                    if let Err(e) = self.link.publish(&self.cfg.inbox_topic(&p.to), p.bytes) {
                        if matches!(e, LinkError::Busy) {
                            self.retry_at = Some(Instant::now() + Duration::from_millis(20));
                        } else if !matches!(e, LinkError::NotConnected) {
                            warn!("cannot publish to {}: {e}", p.to);
                        }
                        refused.push(p.to.clone());
                    }
                }
                for peer in refused {
                    self.node.unsent(&peer, now);
                }
            }
            Err(e) => error!("cannot read the outbox: {e}"),
        }
        self.answer_waiters();
    }

    /// Takes everything runnable, in one store batch (`Store::begin_batch`)
    /// committed every [`BATCH_MAX`] frames and before anything acts outside the
    /// store: a burst of pings or of received results costs a few commits, not one
    /// per frame.
    fn run_ready(&mut self, now: u64) -> Result<(), StoreError> {
        self.node.store_mut().begin_batch()?;
        let taken = self.run_ready_batched(now);
        let committed = self.end_batch();
        taken.and(committed)
    }

    /// Commits the open batch. If that fails (a full disk), the store rolled it
    /// back and delivery learns the streams again from the store. Sequence numbers
    /// handed out in the lost batch are handed out again to the next frames, which
    /// then go after a resend timeout rather than at once: late, never lost.
    fn end_batch(&mut self) -> Result<(), StoreError> {
        let r = self.node.store_mut().end_batch();
        if r.is_err() {
            if let Err(e) = self.node.sync_streams() {
                error!("cannot reload delivery state: {e}");
            }
        }
        r
    }

    /// Commits the batch so far and opens the next one.
    fn flush_batch(&mut self) -> Result<(), StoreError> {
        self.end_batch()?;
        self.node.store_mut().begin_batch()
    }

    fn run_ready_batched(&mut self, now: u64) -> Result<(), StoreError> {
        let mut in_batch = 0;
        loop {
            if in_batch >= BATCH_MAX {
                self.flush_batch()?;
                in_batch = 0;
            }
            let (ready, corrupt) = self.node.runnable(now)?;
            for c in corrupt {
                error!("{c}");
            }
            let mut consumed = false;
            for inbound in ready {
                let key = (
                    inbound.env.from.clone(),
                    inbound.env.lane.clone(),
                    inbound.env.seq,
                );
                if self.running.contains_key(&key) {
                    continue;
                }
                in_batch += 1;
                match &inbound.env.body {
                    Body::Command(cmd) => {
                        let cmd = cmd.clone();
                        self.start(inbound, cmd, now)?;
                        consumed = true;
                    }
                    Body::Result(_) | Body::Discarded { .. } => {
                        if self.node.record_result(&inbound, now)?.is_none() {
                            warn!(
                                "second result from {} for {}#{} ignored",
                                key.0, key.1, key.2
                            );
                        }
                        let cmd = match &inbound.env.body {
                            Body::Result(r) => r.seq,
                            Body::Discarded { seq, .. } => *seq,
                            _ => unreachable!("matched above"),
                        };
                        if let Some(job) = self.node.store().job_of(&key.0, &key.1, cmd)? {
                            self.changed_jobs.ids.insert(job);
                        }
                        consumed = true;
                    }
                    Body::Lost { reason } => {
                        let text = format!(
                            "frame {}#{} from {} was lost: {reason}",
                            key.1, key.2, key.0
                        );
                        error!("{text}");
                        self.node.record_event(&inbound, &text, now)?;
                        consumed = true;
                    }
                    Body::FileOffer(_)
                    | Body::FileChunk { .. }
                    | Body::FileStatus { .. }
                    | Body::FileRequest { .. } => {
                        self.on_file_frame(&inbound, now)?;
                        // A finished file is already moved into place: commit now.
                        self.flush_batch()?;
                        consumed = true;
                    }
                    Body::Started { seq } => {
                        self.node.store_mut().record_started(&inbound, *seq)?;
                        consumed = true;
                    }
                    Body::Withdrawn { .. } => {
                        self.node.store_mut().consume(&inbound)?;
                        consumed = true;
                    }
                    // Unsequenced: never stored in the inbox.
                    Body::Ack { .. } | Body::Hello { .. } | Body::Sync(_) | Body::Nack { .. } => {}
                }
            }
            if !consumed {
                return Ok(());
            }
        }
    }

    fn start(&mut self, inbound: Inbound, cmd: Command, now: u64) -> Result<(), StoreError> {
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
        let key = (env.from.clone(), env.lane.clone(), seq);
        match cmd {
            Command::Ping => {
                let mut r = CmdResult::without_run(seq, Status::Ok, "", now);
                r.stdout = b"pong\n".to_vec();
                self.node.finish(&inbound, r, now)?;
            }
            Command::Exec(e) => {
                self.node.start(&inbound, now)?;
                // Journalled as running before it runs: a crash cannot run it twice.
                self.flush_batch()?;
                let mut spec = exec_spec(&e, &policy, self.cfg.output_cap as usize);
                spec.tag = Some(self.tag.clone());
                let cancel = exec::Canceller::new();
                self.running.insert(
                    key,
                    Running {
                        method: "exec",
                        started_ms: now,
                        announced: false,
                        cancel: Some(cancel.clone()),
                    },
                );
                let tx = self.tx.clone();
                smol::spawn(async move {
                    let out = exec::run_cancellable(spec, &cancel).await;
                    let result = exec_result(seq, out);
                    let _ = tx
                        .send(Msg::Done(Box::new(inbound), Box::new(result)))
                        .await;
                })
                .detach();
            }
            Command::HttpGet(h) => {
                self.node.start(&inbound, now)?;
                self.flush_batch()?;
                self.running.insert(
                    key,
                    Running {
                        method: "http-get",
                        started_ms: now,
                        announced: false,
                        cancel: None,
                    },
                );
                let tx = self.tx.clone();
                smol::spawn(async move {
                    let result = smol::unblock(move || http_get(seq, &h)).await;
                    let _ = tx
                        .send(Msg::Done(Box::new(inbound), Box::new(result)))
                        .await;
                })
                .detach();
            }
        }
        Ok(())
    }

    fn on_request(&mut self, req: Request, reply: &Sender<Value>, now: u64) -> Option<Value> {
        let v = match req {
            Request::Send { to, lane, ttl_s, command } => self.send(&to, lane.as_deref(), ttl_s, command, now),
            Request::Jobs { limit } => self
                .node
                .store()
                .jobs(limit.unwrap_or(50))
                .map(|jobs| json!({ "ok": true, "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() }))
                .map_err(|e| e.to_string()),
            Request::Job { id } => self.job_reply(id),
            Request::Wait { id, seen, .. } => match self.node.store().job(id) {
                Ok(Some(job)) if job.done() || n_results(&job) > seen => Ok(json!({ "ok": true, "job": job_json(&job) })),
                Ok(Some(_)) if self.n_waiters >= MAX_WAITERS => Err(format!(
                    "{MAX_WAITERS} clients are already waiting for jobs; try again when some are done (or look with `outpost jobs show {id}`)"
                )),
                Ok(Some(_)) => {
                    self.waiters.entry(id).or_default().push((seen, reply.clone()));
                    self.n_waiters += 1;
                    return None;
                }
                Ok(None) => Err(format!("no job {id}")),
                Err(e) => Err(e.to_string()),
            },
            Request::Status => self.status(now),
            req @ (Request::FilesPut { .. }
            | Request::FilesGet { .. }
            | Request::FilesList
            | Request::Transfer { .. }
            | Request::FilesRm { .. }) => self.files_request(req, now),
        };
        Some(v.unwrap_or_else(control::error_reply))
    }

    fn job_reply(&self, id: i64) -> Result<Value, String> {
        match self.node.store().job(id) {
            Ok(Some(job)) => Ok(json!({ "ok": true, "job": job_json(&job) })),
            Ok(None) => Err(format!("no job {id}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Answers the clients waiting for jobs that changed: one store read per
    /// changed job, nothing for the others, however many wait.
    fn answer_waiters(&mut self) {
        let changed = std::mem::take(&mut self.changed_jobs);
        if self.waiters.is_empty() {
            return;
        }
        let ids: Vec<i64> = if changed.all {
            self.waiters.keys().copied().collect()
        } else {
            changed
                .ids
                .into_iter()
                .filter(|id| self.waiters.contains_key(id))
                .collect()
        };
        for id in ids {
            let Some(list) = self.waiters.remove(&id) else {
                continue;
            };
            self.n_waiters -= list.len();
            let job = self.node.store().job(id);
            let mut keep = Vec::new();
            for (seen, reply) in list {
                if reply.is_closed() {
                    continue;
                }
                match &job {
                    Ok(Some(job)) if job.done() || n_results(job) > seen => {
                        let _ = reply.try_send(json!({ "ok": true, "job": job_json(job) }));
                    }
                    Ok(Some(_)) => keep.push((seen, reply)),
                    _ => {
                        let _ = reply.try_send(control::error_reply(format!("no job {id}")));
                    }
                }
            }
            if !keep.is_empty() {
                self.n_waiters += keep.len();
                self.waiters.insert(id, keep);
            }
        }
    }

    fn send(
        &mut self,
        to: &str,
        lane: Option<&str>,
        ttl_s: Option<u32>,
        spec: CommandSpec,
        now: u64,
    ) -> Result<Value, String> {
        let lane = match lane {
            Some(l) => Lane::new(l).map_err(|e| format!("lane: {e}"))?,
            None => frame::default_lane(),
        };
        let (command, summary) = command_of(spec)?;
        let (targets, notes) = self.resolve_targets(to)?;
        let method = command.method();
        let items = targets
            .iter()
            .map(|t| Outgoing {
                to: t.clone(),
                lane: lane.clone(),
                ttl_s,
                body: Body::Command(command.clone()),
            })
            .collect();
        let (job, queued) = self
            .node
            .submit_job(method, &summary, items, now)
            .map_err(|e| e.to_string())?;
        Ok(json!({
            "ok": true,
            "job": job,
            "targets": queued.iter().map(|q| json!({ "node": q.to.as_str(), "lane": q.lane.as_str(), "seq": q.seq })).collect::<Vec<_>>(),
            "notes": notes,
        }))
    }

    /// The nodes `to` names: comma-separated names and glob patterns (`*`, `?`).
    /// Patterns match trusted peers seen online; plain names must be trusted (a
    /// peer that is not could never open what is sealed for it here) and not this
    /// node. Notes say which targets are not online. One rule for every request
    /// that takes `to`.
    pub(crate) fn resolve_targets(&self, to: &str) -> Result<(Vec<Name>, Vec<String>), String> {
        let peers = self.node.store().peers().map_err(|e| e.to_string())?;
        let mut targets: Vec<Name> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        for part in to.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.contains(['[', ']', '{', '}']) {
                return Err(format!(
                    "{part:?}: only * and ? are pattern characters (use a comma-separated list)"
                ));
            }
            if part.contains(['*', '?']) {
                let matched: Vec<&Name> = peers
                    .iter()
                    .filter(|(n, online, _)| {
                        *online && self.node.trusts(n) && glob(part, n.as_str())
                    })
                    .map(|(n, _, _)| n)
                    .collect();
                if matched.is_empty() {
                    return Err(format!("no trusted node seen online matches {part:?}"));
                }
                targets.extend(matched.into_iter().cloned());
                continue;
            }
            let name = Name::new(part).map_err(|e| e.to_string())?;
            if name == self.cfg.name {
                return Err(format!("{name} is this node; send to other nodes"));
            }
            if !self.node.trusts(&name) {
                return Err(format!(
                    "{name} is not in this node's trust file, so nothing sent to it could be sealed; trust it first: outpost keys trust {name} PUBLIC-KEY"
                ));
            }
            match peers.iter().find(|(n, _, _)| *n == name) {
                None => notes.push(format!(
                    "{name} has never been seen; queued until it connects"
                )),
                Some((_, false, _)) => {
                    notes.push(format!("{name} is offline; queued until it returns"))
                }
                Some(_) => {}
            }
            targets.push(name);
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err("no target nodes given (--to)".into());
        }
        Ok((targets, notes))
    }

    fn status(&self, now: u64) -> Result<Value, String> {
        let store = self.node.store();
        let (used, quota) = store.usage();
        let counts = store.counts().map_err(|e| e.to_string())?;
        let outbox = store.outbox_depths().map_err(|e| e.to_string())?;
        let inbox = store.inbox_depths().map_err(|e| e.to_string())?;
        let peers = store.peers().map_err(|e| e.to_string())?;
        let oldest = store.oldest_unacked().map_err(|e| e.to_string())?;
        let lost = store.lost().map_err(|e| e.to_string())?;
        let store_error = self.store_error.as_ref().map(|(since, e)| {
            json!({ "since_ms": since, "for_s": now.saturating_sub(*since) / 1000, "error": e,
                    "unrecorded_results": self.unrecorded.len() })
        });
        Ok(json!({
            "ok": true,
            "node": self.cfg.name.as_str(),
            "version": env!("CARGO_PKG_VERSION"),
            "broker": self.cfg.broker.to_string(),
            "link": {
                "connected": self.node.is_connected(),
                "since_ms": self.link_since_ms,
                "for_s": now.saturating_sub(self.link_since_ms) / 1000,
                "last_error": self.last_error,
                "presence": if self.poisoned.is_some() { "off" } else { "on" },
                "poisoned": self.poisoned.map(|(at, size)| json!({
                    "at_ms": at, "size": size,
                    "what": "the broker sent a message larger than max_packet; the link reconnected with a clean session and presence is off until the agent restarts",
                })),
            },
            "store": {
                "used": used, "quota": quota, "quarantined": counts.quarantined, "events": counts.events,
                "epoch": format!("{:016x}", self.node.epoch()),
                "lost": lost.map(|(at_ms, reason)| json!({ "at_ms": at_ms, "reason": reason })),
                "failing": store_error,
            },
            "outbox": outbox.iter().map(|(p, l, n)| {
                let age = oldest.iter().find(|(op, ol, _)| op == p && ol == l).map(|(_, _, c)| now.saturating_sub(*c) / 1000);
                json!({ "peer": p.as_str(), "lane": l.as_str(), "frames": n, "oldest_unacked_s": age })
            }).collect::<Vec<_>>(),
            "inbox": inbox.iter().map(|(p, l, n)| json!({ "peer": p.as_str(), "lane": l.as_str(), "frames": n })).collect::<Vec<_>>(),
            "running": self.running.iter().map(|((p, l, s), r)| json!({
                "peer": p.as_str(), "lane": l.as_str(), "seq": s, "method": r.method, "for_s": now.saturating_sub(r.started_ms) / 1000
            })).collect::<Vec<_>>(),
            "peers": peers.iter().map(|(n, online, since)| json!({ "name": n.as_str(), "online": online, "since_ms": since })).collect::<Vec<_>>(),
            "security": {
                "public_key": seal::to_hex(self.node.public_key().as_bytes()),
                "trusted": self.trust.peers.values().map(|p| json!({ "name": p.name.as_str(), "allow": p.allow })).collect::<Vec<_>>(),
                "rejected": self.rejected.iter().map(|(k, r)| (*k, r.count)).collect::<BTreeMap<_, _>>(),
                "last_rejected": self.rejected.iter().map(|(k, r)| (*k, r.last.clone())).collect::<BTreeMap<_, _>>(),
            },
        }))
    }
}

impl Agent {
    /// Re-reads the trust file when it changed; a broken file keeps the trust the
    /// agent had (none, at start).
    fn refresh_trust(&mut self) {
        let path = trust::trust_path(&self.cfg.state_dir);
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == self.trust_stamp {
            return;
        }
        let first = self.trust_stamp.is_none();
        self.trust_stamp = stamp;
        match trust::read(&self.cfg.state_dir) {
            Ok(t) => {
                let names: Vec<&str> = t.peers.keys().map(Name::as_str).collect();
                info!("trust: {} peer(s): {}", names.len(), names.join(", "));
                self.trust = t;
                let keys = self
                    .trust
                    .peers
                    .values()
                    .map(|p| (p.name.clone(), p.public))
                    .collect();
                self.node.set_trust(keys, now_ms());
                self.subscribe_presence();
            }
            Err(e) if first && self.trust.peers.is_empty() => error!(
                "{e} (running with no trusted peers until it is fixed: nothing is accepted or sent)"
            ),
            Err(e) => error!(
                "{e} (keeping the previous trust: {} peer(s))",
                self.trust.peers.len()
            ),
        }
    }

    /// Presence of this node and of every trusted peer: nothing of the rest of the
    /// fleet is downloaded.
    fn subscribe_presence(&self) {
        let topics = std::iter::once(&self.cfg.name)
            .chain(self.trust.peers.keys())
            .map(|n| self.cfg.presence_topic(n))
            .collect();
        self.link.set_extra_subscriptions(topics);
    }

    /// Logs and counts what a received payload amounted to.
    fn on_report(&mut self, report: Report) {
        if let Some(refusal) = &report.refused {
            self.reject(refusal.kind().as_str(), &refusal.to_string());
            return;
        }
        let sender = report
            .sender
            .clone()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if let Some(e) = &report.malformed {
            // Authentic but not understood (a newer or broken peer): the whole
            // frames before the fault were kept; the sender resends the rest.
            self.reject("bad payload", &format!("from {sender}: {e}"));
        }
        if let Some(old) = report.new_epoch {
            if old == 0 {
                info!("first contact with {sender}'s store; synchronising streams");
            } else {
                warn!(
                    "{sender} has a new store (its earlier one was lost or went back in time); synchronising streams"
                );
            }
        }
        if report.interrupted > 0 || report.synced.as_ref().is_some_and(|o| o.interrupted > 0) {
            self.changed_jobs.all = true;
        }
        if let Some(outcome) = &report.synced {
            info!("streams with {sender} synchronised");
            for (lane, from, to) in &outcome.lost_out {
                error!(
                    "{sender} lost frames {from}..={to} on {lane} with its earlier store; {} command(s) reported interrupted",
                    outcome.interrupted
                );
            }
            for (lane, from, to) in &outcome.lost_in {
                error!("frames {from}..={to} from {sender} on {lane} were taken by an earlier store of this node and are lost");
            }
        }
        for why in &report.rejected {
            warn!("rejected frame: {why}");
        }
        if report.deferred > 0 {
            debug!(
                "{} frames from {sender} deferred (gap, quota, or not yet synchronised); it will resend",
                report.deferred
            );
        }
    }

    /// Counts a dropped payload by kind; logs the first of each kind, then at most
    /// one line a minute per kind with how many more there were.
    fn reject(&mut self, kind: &'static str, detail: &str) {
        let now = now_ms();
        let r = self.rejected.entry(kind).or_default();
        r.count += 1;
        r.last = detail.chars().take(200).collect();
        let quiet = r.logged_ms.is_some_and(|t| now < t + 60_000);
        if !quiet {
            let more = r.count - r.count_logged;
            let tail = if more > 1 {
                format!(" ({} in all since the last report)", more)
            } else {
                String::new()
            };
            warn!("dropped payload: {kind}: {detail}{tail} (counted in `outpost status`)");
            r.logged_ms = Some(now);
            r.count_logged = r.count;
        }
    }
}

/// Payloads dropped for one reason.
#[derive(Debug, Default)]
struct Rejections {
    count: u64,
    /// The latest one, in words.
    last: String,
    logged_ms: Option<u64>,
    count_logged: u64,
}

fn load_or_create_keys(cfg: &Config) -> Result<Keys, String> {
    if !trust::key_path(&cfg.state_dir).exists() {
        let public = trust::generate(&cfg.state_dir, false)?;
        info!(
            "generated this node's key pair; public key {}",
            seal::to_hex(public.as_bytes())
        );
    }
    trust::load(&cfg.state_dir)
}

impl Agent {
    /// Tells senders about commands that have been running a while.
    fn announce_running(&mut self, now: u64) {
        let due: Vec<(Name, Lane, u64)> = self
            .running
            .iter()
            .filter(|(_, r)| !r.announced && now >= r.started_ms + STARTED_AFTER_MS)
            .map(|(k, _)| k.clone())
            .collect();
        for (peer, lane, seq) in due {
            let item = Outgoing {
                to: peer.clone(),
                lane: lane.clone(),
                ttl_s: None,
                body: Body::Started { seq },
            };
            if let Err(e) = self.node.submit(vec![item], now) {
                debug!("cannot announce {lane}#{seq} running to {peer}: {e}");
            }
            if let Some(r) = self.running.get_mut(&(peer, lane, seq)) {
                r.announced = true;
            }
        }
    }
}

fn n_results(job: &Job) -> usize {
    job.targets.iter().filter(|t| t.result.is_some()).count()
}

/// `*` any run, `?` one character; enough for node names.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn rec(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), name.as_bytes())
}

fn command_of(spec: CommandSpec) -> Result<(Command, String), String> {
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
                timeout_ms: timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
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
                timeout_ms: timeout_ms.unwrap_or(30_000),
                max_body: max_body.unwrap_or(64 * 1024),
            };
            (Command::HttpGet(h), summary)
        }
    })
}

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

use std::io::Read as _;

/// A job as JSON for the control socket and `--json`.
pub fn job_json(job: &Job) -> Value {
    json!({
        "id": job.id,
        "created_ms": job.created_ms,
        "method": job.method,
        "summary": job.summary,
        "targets": job.targets.iter().map(|t| {
            let mut v = json!({ "node": t.node.as_str(), "lane": t.lane.as_str(), "seq": t.seq, "state": t.state });
            if let Some(r) = &t.result {
                v["result"] = result_json(r, job, t.at_ms);
                v["result_id"] = json!(t.result_id);
            }
            v
        }).collect::<Vec<_>>(),
    })
}

fn result_json(r: &CmdResult, job: &Job, at_ms: Option<u64>) -> Value {
    let mut v = json!({
        "status": r.status.as_str(),
        "exit_code": r.exit_code,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "truncated": r.truncated,
        "started_ms": r.started_ms,
        "duration_ms": r.duration_ms,
        "reason": r.reason,
    });
    if job.method == "ping" {
        v["rtt_ms"] = json!(at_ms.map(|a| a.saturating_sub(job.created_ms)));
    }
    if let Some(h) = &r.http {
        v["http_status"] = json!(h.status);
        v["http_headers"] = json!(h.headers);
    }
    v
}

fn prepare_state_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create state directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}

/// One agent per state directory: an exclusive `flock` held for the process's life.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // A predecessor killed a moment ago can hold the lock a little longer: a child
    // it was forking keeps the descriptor until its exec closes it. Wait a few
    // seconds for that before concluding another agent is alive.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "another agent is already running with state directory {}",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bind_control(dir: &Path) -> Result<smol::net::unix::UnixListener, String> {
    let path = control::socket_path(dir);
    // We hold the state directory lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = smol::net::unix::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

async fn forward(events: Receiver<LinkEvent>, tx: Sender<Msg>) {
    while let Ok(ev) = events.recv().await {
        if tx.send(Msg::Link(ev)).await.is_err() {
            return;
        }
    }
}

async fn serve_control(listener: smol::net::unix::UnixListener, tx: Sender<Msg>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                smol::spawn(serve_client(stream, tx.clone())).detach();
            }
            Err(e) => {
                warn!("control socket accept: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(stream: smol::net::unix::UnixStream, tx: Sender<Msg>) {
    let mut reader = BufReader::new(stream.clone());
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(control::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let oversized = line.len() > control::MAX_REQUEST;
        let reply = match control::parse_request(&line) {
            Ok(req) => {
                let timeout = match &req {
                    Request::Wait { timeout_ms, .. } => {
                        Duration::from_millis((*timeout_ms).min(600_000))
                    }
                    _ => Duration::from_secs(60),
                };
                let (rtx, rrx) = smol::channel::bounded(1);
                if tx.send(Msg::Control(req, rtx)).await.is_err() {
                    return;
                }
                smol::future::or(
                    async {
                        rrx.recv()
                            .await
                            .unwrap_or_else(|_| control::error_reply("agent stopping"))
                    },
                    async {
                        smol::Timer::after(timeout).await;
                        json!({ "ok": true, "timeout": true })
                    },
                )
                .await
            }
            Err(e) => control::error_reply(e),
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if writer.write_all(&out).await.is_err() {
            return;
        }
        if oversized {
            // The rest of an oversized line is not worth reading: hang up.
            return;
        }
    }
}

/// For `--json` consumers that want one object per target result.
pub fn target_result_json(job: &Value, target: &Value) -> Value {
    let r = &target["result"];
    json!({
        "node": target["node"],
        "job": job["id"],
        "status": r["status"],
        "exit_code": r["exit_code"],
        "stdout": r["stdout"],
        "stderr": r["stderr"],
        "truncated": r["truncated"],
        "duration_ms": r["duration_ms"],
        "reason": r["reason"],
        "rtt_ms": r.get("rtt_ms").cloned().unwrap_or(Value::Null),
        "http_status": r.get("http_status").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Envelope;

    #[test]
    fn globs_match_node_names() {
        assert!(glob("ship*", "ship12"));
        assert!(glob("*", "a"));
        assert!(glob("wind-?", "wind-7"));
        assert!(!glob("wind-?", "wind-77"));
        assert!(!glob("ship*", "boat1"));
    }

    #[test]
    fn envelopes_carry_ttl_checks() {
        let env = Envelope {
            from: Name::new("a").unwrap(),
            to: Name::new("b").unwrap(),
            lane: frame::default_lane(),
            seq: 1,
            created_ms: 1_000,
            ttl_s: Some(1),
            body: Body::Ack { upto: 0 },
        };
        assert!(!env.expired(2_000));
        assert!(env.expired(2_001));
    }
}
