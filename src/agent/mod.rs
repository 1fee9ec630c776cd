//! The agent: one event loop that wires the store, the link, execution and the
//! control socket.
//!
//! One concern per file: this one is the loop ([`Msg`], what each message does,
//! `drive` after every one); [`commands`] is each method's side (validate,
//! authorise, start, result); [`requests`] answers the control socket; [`files`]
//! moves files; [`session`] keeps trust, presence and rejection counts; [`os`] is
//! clocks, signals, the state directory; [`demand`] is the on-demand link.
//!
//! Threads: this loop owns the [`Node`] (and so SQLite) on the thread that calls
//! [`run`]; the link runs rumqttc on its own thread; the control socket and running
//! commands are smol tasks on smol's global executor. Everything reaches the loop as
//! a [`Msg`] on one channel, and the loop sleeps until a message or the delivery
//! state machine's next deadline: no busy polling.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use smol::channel::{Receiver, Sender};

use crate::config::Config;
use crate::control::{self, server::Call, Reply};
use crate::exec;
use crate::frame::{self, Body, CmdResult, Lane, Method, Name, Status};
use crate::link::{Link, LinkConfig, LinkError, LinkEvent, Retained, TlsFiles};
use crate::node::{FilesConfig, Node, NodeConfig, Notice};
use crate::store::{Inbound, StoreConfig, StoreError};
use crate::trust::Trust;

use crate::{debug, error, info, warn};

mod commands;
mod demand;
mod errors;
mod facts;
mod files;
mod nodes;
mod os;
mod output;
mod requests;
mod retention;
mod session;
mod usage;

pub use commands::DEFAULT_TIMEOUT_MS;
pub use os::now_ms;
pub use requests::glob;

use commands::STARTED_AFTER_MS;
use os::{boot_id, mono_now};

/// Most frames taken into one store batch (one commit) by `run_ready`.
const BATCH_MAX: usize = 256;
/// Largest MQTT packet: a full payload plus headroom.
const MAX_PACKET: usize = 2 * frame::MAX_FRAME;

#[derive(Debug)]
enum Msg {
    Link(LinkEvent),
    Control(Box<Call>),
    Done(Box<Inbound>, Box<CmdResult>),
    /// SIGTERM or SIGINT: stop children, record them, leave.
    Stop(i32),
    /// Facts read from `facts_dir`, and its entries that failed.
    Facts(Box<(crate::facts::Snapshot, Vec<crate::facts::collect::Failure>)>),
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
    method: Method,
    started_ms: u64,
    /// The sender has been told it is running.
    announced: bool,
    /// Kills an exec's process group; none for methods that cannot be stopped.
    cancel: Option<exec::Canceller>,
    /// Why its sender cancelled it, once it did.
    cancelled: Option<String>,
}

/// Runs the agent until the process is killed. Errors are start-up failures.
pub fn run(cfg: Config) -> Result<(), String> {
    os::prepare_state_dir(&cfg.state_dir)?;
    // While it waits for the lock, SIGTERM still ends the process at once.
    let _lock = os::lock_state_dir(&cfg.state_dir)?;
    // Before any thread exists, so that every thread inherits it: SIGTERM and
    // SIGINT are taken by one thread that tells the loop (children start with a
    // clear mask, std resets it).
    let signals = os::block_stop_signals();
    // Whatever an agent that died on this state directory left running is killed
    // before anything of its streams runs again.
    let tag = os::agent_tag(&cfg.state_dir);
    let left = exec::kill_tagged(&tag, Duration::from_secs(10));
    if left > 0 {
        warn!("killed {left} process(es) a previous agent on this state directory left running");
    }
    let mut node_cfg = NodeConfig {
        store: StoreConfig {
            durability: cfg.durability,
            quota_bytes: cfg.quota,
        },
        files: FilesConfig {
            dir: cfg.files_dir.clone(),
            share_dirs: cfg.share_dirs.clone(),
            chunk_size: cfg.chunk_size,
        },
        compress: cfg.compress,
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
    let keys = os::load_or_create_keys(&cfg)?;
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
    os::spawn_signal_thread(signals, tx.clone());
    let listener = control::server::bind(&cfg.state_dir)?;
    smol::spawn(control::server::serve(listener, tx.clone(), |c| {
        Msg::Control(Box::new(c))
    }))
    .detach();

    let presence = cfg.presence_topic(&cfg.name);
    let link_cfg = LinkConfig {
        client_id: cfg.name.to_string(),
        broker: cfg.broker.clone(),
        tls: TlsFiles {
            ca_file: cfg.ca_file.clone(),
            client_cert: cfg.client_cert.clone(),
            client_key: cfg.client_key.clone(),
            versions: cfg.tls_versions,
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
            payload: demand::will(&cfg),
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

    let keep = crate::store::Retention {
        max_age_ms: cfg.retention.as_millis() as u64,
        max_rows: cfg.retention_jobs,
    };
    let mut agent = Agent {
        demand: demand::Demand::new(&cfg),
        pruning: retention::Pruning::new(keep, now_ms()),
        trust: Trust::default(),
        trust_stamp: None,
        rejected: BTreeMap::new(),
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
        poisoned: None,
        presence_fixed_ms: None,
        presence_echoed: false,
        unrecorded: Vec::new(),
        store_error: None,
        store_retry_ms: 0,
        stopping: None,
        tag,
        facts: facts::FactsState::default(),
        links: facts::LinkCounters::default(),
        ledger: usage::Ledger::default(),
    };
    agent.start_gate(now_ms());
    agent.refresh_trust();
    // Results that arrived before a restart and were not yet written to files.
    agent.write_outputs(true, &[]);
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

struct Agent {
    trust: Trust,
    /// (modified time, length) of the trust file when last read.
    trust_stamp: Option<(SystemTime, u64)>,
    /// Payloads dropped, by kind (a bounded set): counted for `status`, logged
    /// rate-limited.
    rejected: BTreeMap<&'static str, session::Rejections>,
    cfg: Config,
    node: Node,
    link: Link,
    tx: Sender<Msg>,
    link_since_ms: u64,
    last_error: Option<String>,
    /// Control clients waiting for a job to change: per job, (results seen, reply).
    waiters: BTreeMap<i64, Vec<(usize, Sender<Reply>)>>,
    n_waiters: usize,
    /// Jobs that got results since waiters were last answered.
    changed_jobs: Changed,
    /// Publishing was refused (queue full): try again at this time.
    retry_at: Option<Instant>,
    /// Which boot the monotonic clock counts from.
    boot: u64,
    /// An oversized message cut the link: (when, its size). Presence is off since.
    poisoned: Option<(u64, usize)>,
    /// When this node last put its own presence back to online.
    presence_fixed_ms: Option<u64>,
    /// Our `online` of this connection came back from the broker.
    presence_echoed: bool,
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
    /// When facts are read next (see `facts.rs`).
    facts: facts::FactsState,
    links: facts::LinkCounters,
    /// Retention: when the next prune is due, what went.
    pruning: retention::Pruning,
    /// Where the link's bytes went, not yet stored (`usage.rs`).
    ledger: usage::Ledger,
    /// When an on-demand link connects and hangs up.
    demand: demand::Demand,
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
        let d = Duration::from_millis(self.pruning.due().saturating_sub(now));
        wake = Some(wake.map_or(d, |w| w.min(d)));
        if let Some(t) = self.usage_wake() {
            let d = Duration::from_millis(t.saturating_sub(now));
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if let Some(t) = self.node.next_error_report() {
            let d = Duration::from_millis(t.saturating_sub(now));
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
        if let Some(t) = self.facts_wake() {
            let d = Duration::from_millis(t.saturating_sub(now));
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if let Some(d) = self.demand_wake() {
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        if self.node.files_active() {
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
        if let Msg::Link(event) = &msg {
            self.demand_saw(event);
        }
        match msg {
            Msg::Link(LinkEvent::Connected { .. }) => {
                self.link_since_ms = now;
                self.presence_echoed = false;
                self.node.on_connected(now);
                self.links.connected();
                self.facts_soon();
            }
            Msg::Link(LinkEvent::Disconnected { error }) => {
                if self.node.is_connected() {
                    self.link_since_ms = now;
                }
                self.last_error = Some(error);
                self.node.on_disconnected(now);
            }
            Msg::Link(LinkEvent::Published) => {}
            Msg::Link(LinkEvent::Idle) => {
                if self.node.is_connected() {
                    self.link_since_ms = now;
                }
                self.node.on_disconnected(now);
            }
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
            Msg::Control(call) => {
                let Call { req, reply } = *call;
                if let Some(r) = self.on_request(req, &reply, now) {
                    let _ = reply.try_send(r);
                }
            }
            Msg::Done(inbound, mut result) => {
                let key = (
                    inbound.env.from.clone(),
                    inbound.env.lane.clone(),
                    inbound.env.seq,
                );
                let running = self.running.remove(&key);
                if let Some((sig, _)) = self.stopping {
                    if result.status == Status::Cancelled {
                        result.status = Status::Interrupted;
                        result.reason = format!(
                            "the agent was stopped (signal {sig}) while the command ran; it was killed and is not run again"
                        );
                    }
                } else if let Some(why) = running.and_then(|r| r.cancelled) {
                    if result.status == Status::Cancelled {
                        result.reason = format!(
                            "cancelled while it ran on {}; its process group was killed: {why}",
                            self.cfg.name
                        );
                    }
                }
                if result.status == Status::Failed
                    && result.exit_code.is_none()
                    && result.reason.starts_with("cannot run")
                {
                    // exec's words for a program that could not be started.
                    self.node.report_error("spawn", &result.reason, now);
                }
                self.unrecorded.push((inbound, result));
                self.record_results(now);
            }
            Msg::Facts(b) => {
                let (custom, failures) = *b;
                self.report_facts(custom, failures, now);
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
        if let Some(e) = &failed {
            self.store_retry_ms = now + 2_000;
            self.node.report_error("store", e, now);
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
        self.meter(now_ms(), true);
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
                    let sender = report.sender.clone();
                    self.count_in(sender.as_ref(), topic, payload.len(), &report.by, now);
                    if report.synced.is_some() {
                        // A peer's new (or first) store may lack our facts.
                        self.facts_soon();
                    }
                    self.on_report(report);
                    self.note_store(None, now);
                }
                Err(e) => {
                    self.count_in(None, topic, payload.len(), &[], now);
                    error!("cannot store received payload: {e} (nothing of it kept: the sender resends)");
                    self.note_store(Some(e.to_string()), now);
                }
            }
            return;
        }
        self.count_in(None, topic, payload.len(), &[], now);
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
            // online, whatever was published there. What comes before our own
            // `online` of this connection comes back is older than it (our
            // will, queued in the session while we were away; a retained value
            // it overwrites): nothing to put right, and answering it would cost
            // two publishes on every reconnect.
            if payload == b"online" {
                self.presence_echoed = true;
                return;
            }
            if !self.presence_echoed {
                return;
            }
            let forged = true;
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
        self.on_peer_presence(peer, payload, now);
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
        if !store_waits {
            self.pruning.run(&mut self.node, now);
        }
        self.announce_running(now);
        if self.stopping.is_none() {
            self.collect_facts(now);
        }
        if let Err(e) = self.node.pump_files(now) {
            error!("cannot queue file chunks: {e}");
        }
        if let Err(e) = self.node.flush_errors(now) {
            debug!("cannot queue the error report yet: {e}");
        }
        self.log_notices();
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
                    let n = p.bytes.len();
                    let topic = self.cfg.inbox_topic(&p.to);
                    if let Err(e) = self.link.publish(&topic, p.bytes) {
                        if matches!(e, LinkError::Busy) {
                            self.retry_at = Some(Instant::now() + Duration::from_millis(20));
                        } else if !matches!(e, LinkError::NotConnected) {
                            warn!("cannot publish to {}: {e}", p.to);
                        }
                        refused.push(p.to.clone());
                    } else {
                        self.count_out(&p.to, &topic, n, &p.by, now);
                    }
                }
                for peer in refused {
                    self.node.unsent(&peer, now);
                }
            }
            Err(e) => error!("cannot read the outbox: {e}"),
        }
        self.meter(now, false);
        if self.changed_jobs.all || !self.changed_jobs.ids.is_empty() {
            let ids: Vec<i64> = self.changed_jobs.ids.iter().copied().collect();
            self.write_outputs(self.changed_jobs.all, &ids);
        }
        self.answer_waiters();
        self.demand_step(now);
    }

    /// Takes everything runnable, in one store batch (`Node::begin_batch`)
    /// committed every [`BATCH_MAX`] frames and before anything acts outside the
    /// store: a burst of pings or of received results costs a few commits, not one
    /// per frame.
    fn run_ready(&mut self, now: u64) -> Result<(), StoreError> {
        self.node.begin_batch()?;
        let taken = self.run_ready_batched(now);
        let committed = self.node.end_batch();
        taken.and(committed)
    }

    /// Commits the batch so far and opens the next one (before a command runs:
    /// it is journalled `running` first).
    fn flush_batch(&mut self) -> Result<(), StoreError> {
        self.node.flush_batch()
    }

    fn run_ready_batched(&mut self, now: u64) -> Result<(), StoreError> {
        let mut in_batch = 0;
        loop {
            if in_batch >= BATCH_MAX {
                self.flush_batch()?;
                in_batch = 0;
            }
            let ready = self.node.take_ready(now);
            self.log_notices();
            let ready = ready?;
            for c in &ready.corrupt {
                error!("{c}");
            }
            self.changed_jobs.ids.extend(ready.jobs_changed);
            in_batch += ready.taken;
            for c in ready.cancels {
                self.stop_cancelled(c);
            }
            let mut started = 0;
            for inbound in ready.commands {
                let key = (
                    inbound.env.from.clone(),
                    inbound.env.lane.clone(),
                    inbound.env.seq,
                );
                if self.running.contains_key(&key) {
                    continue;
                }
                if let Body::Command(cmd) = &inbound.env.body {
                    let cmd = cmd.clone();
                    self.start(inbound, cmd, now)?;
                    started += 1;
                }
            }
            in_batch += started;
            if ready.taken + started == 0 {
                return Ok(());
            }
        }
    }

    /// Logs what the core said happened.
    fn log_notices(&mut self) {
        for (level, text) in self.node.notices() {
            match level {
                Notice::Error => error!("{text}"),
                Notice::Warn => warn!("{text}"),
                Notice::Info => info!("{text}"),
            }
        }
    }
}

async fn forward(events: Receiver<LinkEvent>, tx: Sender<Msg>) {
    while let Ok(ev) = events.recv().await {
        if tx.send(Msg::Link(ev)).await.is_err() {
            return;
        }
    }
}
