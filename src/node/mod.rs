//! One node's protocol core: the store, the delivery state machine and the
//! sessions with peers, wired.
//!
//! Synchronous and clock-free (`now` is passed in), so the agent runs it on its
//! store thread and the simulation tests drive exactly the same code. It turns
//! sealed payloads from the broker into stored frames and acknowledgements, and
//! delivery decisions into sealed payloads to publish. What runs commands, and the
//! link, live elsewhere.
//!
//! # Synchronising with a peer
//!
//! Every store has an epoch (see [`crate::seal`]). Sequence numbers, watermarks
//! and replay windows mean something only between the two stores that made them,
//! so before a node takes or acknowledges a peer's sequenced frames, and before
//! it sends its own, the two exchange [`Body::Sync`]: where each stream stands on
//! each side. That happens on first contact and whenever either side meets a new
//! epoch of the other (a store that was lost or went back in time), never in
//! steady state:
//!
//! 1. a node that wants to talk to a peer it is not synchronised with sends
//!    `Sync { want: true }` (or a [`Body::Hello`], sealed without the peer's epoch,
//!    when it does not know that yet: a hello asks for a `Sync`);
//! 2. the peer applies it ([`Store::apply_sync`]: delivered frames are dropped,
//!    provisional numbers moved, losses recorded and reported) and answers with its
//!    own `Sync { want: false }`;
//! 3. each side resumes its streams to the other once it has applied the other's.
//!
//! Callers: [`Node::on_payload`] for every message on this node's inbox topic,
//! [`Node::poll_out`] after every event and at [`Node::next_wakeup`], and
//! [`Node::set_trust`] before anything else and whenever the trust file changes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

mod cancel;
mod errors;
mod facts;
mod files;
mod gate;
mod output;

pub use cancel::Cancel;
pub use errors::errors_lane;
pub use facts::FactsQueued;
pub use files::CHUNKS_AHEAD;

use crate::budget::{self, Category, Gate};
use crate::compress;
use crate::delivery::{Action, Delivery, DeliveryConfig, Event, Outstanding};
use crate::frame::{self, Body, CmdResult, Envelope, Lane, Method, Name, Status};
use crate::session::{Change, Refusal, Session};
use crate::store::{
    control_lane, Corrupt, Inbound, Loss, Mono, Outgoing, Pruned, Queued, Receipt, Retention,
    Store, StoreConfig, StoreError, SyncOutcome,
};
use crate::trust::Keys;

/// Seal counters reserved in the store at a time.
const COUNTERS_AHEAD: u64 = 1024;
/// First wait before asking an unsynchronised peer again; doubles up to the cap.
const ASK_FIRST_MS: u64 = 2_000;
const ASK_CAP_MS: u64 = 300_000;
/// A hello in answer to an unopenable payload goes to one peer at most this often:
/// the payload that triggers it can be forged.
const HELLO_EVERY_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    /// Frames are packed into payloads of at most this many bytes (a single larger
    /// frame travels alone).
    pub max_payload: usize,
    /// Commands of one parallel lane running at once.
    pub parallel: usize,
    pub files: FilesConfig,
    /// Deflate payloads when it pays (`compress::shrink`); received ones are
    /// inflated either way.
    pub compress: bool,
}

/// Where files land and what peers may fetch.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Received files land in `dir/SOURCE/ID`.
    pub dir: PathBuf,
    /// What peers trusted with `files` may fetch.
    pub share_dirs: Vec<PathBuf>,
    /// Chunk size of files this node sends.
    pub chunk_size: u32,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            dir: PathBuf::from("files"),
            share_dirs: Vec::new(),
            chunk_size: 16 * 1024,
        }
    }
}

/// Something the core did that the operator should read in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Error,
    Warn,
    Info,
}

/// What [`Node::take_ready`] leaves to the shell: commands to run, and what it
/// did with the rest.
#[derive(Debug, Default)]
pub struct Ready {
    /// Commands whose turn has come (also those already running: the shell knows
    /// which it started).
    pub commands: Vec<Inbound>,
    /// Jobs that got a result or a notice.
    pub jobs_changed: Vec<i64>,
    /// Frames taken (results, notices, file frames): call again when non-zero.
    pub taken: usize,
    pub corrupt: Vec<Corrupt>,
    /// Running commands their senders cancelled: the shell stops them.
    pub cancels: Vec<Cancel>,
    /// Commands answered while this was taken (cancelled in the inbox): not to
    /// be started.
    answered: Vec<(Lane, u64, Name)>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            store: StoreConfig::default(),
            delivery: DeliveryConfig::default(),
            max_payload: 64 * 1024,
            parallel: 8,
            files: FilesConfig::default(),
            compress: true,
        }
    }
}

/// A sealed payload for one peer's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPayload {
    pub to: Name,
    pub bytes: Vec<u8>,
    pub frames: usize,
    /// Frame bytes by category, to share the payload's cost out (`link usage`).
    pub by: Vec<(Category, usize)>,
}

/// What a received payload amounted to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Why the payload as a whole was not accepted.
    pub refused: Option<Refusal>,
    /// Who sealed it, when it was accepted.
    pub sender: Option<Name>,
    pub stored: usize,
    pub duplicates: usize,
    pub acks: usize,
    /// Dropped for now (after a gap too far ahead, no space, or a peer not yet
    /// synchronised); the sender resends.
    pub deferred: usize,
    /// Frames rejected, with why; each is also quarantined.
    pub rejected: Vec<String>,
    /// The authentic payload's frames stopped making sense here (a newer or broken
    /// peer); the frames before the fault were taken.
    pub malformed: Option<String>,
    /// The sender has a store we did not know: `Some(0)` on first contact,
    /// `Some(old epoch)` when its store was replaced.
    pub new_epoch: Option<u64>,
    /// A Sync from the sender was applied.
    pub synced: Option<SyncOutcome>,
    /// Commands to the sender answered `interrupted` here because its earlier
    /// store, which had them, was replaced.
    pub interrupted: usize,
    /// Frame bytes by category (`link usage`).
    pub by: Vec<(Category, usize)>,
}

/// A control frame owed to a peer, sent with the next payload to it: sealed for
/// the peer's store we know, or for another `epoch` of it (a challenge), which then
/// travels in a payload of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owed {
    epoch: Option<u64>,
    body: Body,
}

/// When to ask an unsynchronised peer for its Sync next.
#[derive(Debug, Clone, Copy)]
struct Ask {
    at_ms: u64,
    backoff_ms: u64,
}

#[derive(Debug)]
pub struct Node {
    store: Store,
    delivery: Delivery,
    session: Session,
    cfg: NodeConfig,
    /// Reserved, unused seal counters per peer.
    counters: BTreeMap<Name, Range<u64>>,
    owed: BTreeMap<Name, Vec<Owed>>,
    asking: BTreeMap<Name, Ask>,
    /// Other stores of a peer than the one we know, challenged until one answers.
    contenders: BTreeMap<Name, BTreeSet<u64>>,
    /// Last hello or challenge sent in answer to a payload, per peer.
    hello_at: BTreeMap<Name, u64>,
    /// Streams whose frames were dropped here for lack of space; a `Nack` tells the
    /// sender to resend once there is room.
    deferred: BTreeSet<(Name, Lane)>,
    nacks: BTreeMap<(Name, Lane), u64>,
    loss: Option<Loss>,
    /// Peers trusted with `files`.
    files_peers: BTreeSet<Name>,
    /// Open source files of transfers from share_dirs, by transfer id.
    sources: BTreeMap<i64, std::fs::File>,
    /// Transfers in progress or files with an expiry: sweep them by the clock.
    files_active: bool,
    /// Log lines for the shell, taken with [`Node::notices`].
    notices: Vec<(Notice, String)>,
    /// Peers this node reports its facts to (see `facts.rs`).
    facts_peers: BTreeSet<Name>,
    /// Per peer: when it was last heard from, and when that was last saved.
    seen: BTreeMap<Name, (u64, u64)>,
    /// Errors met here, waiting to be reported (`errors.rs`).
    errors: errors::ErrorLog,
    /// Budgets and link windows: what may go now (`budget.rs`).
    gate: Gate,
}

impl Node {
    /// Opens the store (noticing a store that lost committed state), reports
    /// commands a crash interrupted, and rebuilds delivery state from the outbox.
    /// Call [`Node::set_trust`] before anything is received or sent.
    pub fn open(
        path: &Path,
        me: &Name,
        cfg: NodeConfig,
        keys: Keys,
        now_ms: u64,
    ) -> Result<Node, StoreError> {
        let (mut store, loss) = Store::open(path, me, &cfg.store)?;
        store.recover_interrupted(now_ms)?;
        let session = Session::new(me.clone(), store.epoch(), keys, store.peer_sessions()?);
        let delivery = Delivery::new(cfg.delivery.clone());
        let mut node = Node {
            store,
            delivery,
            session,
            cfg,
            counters: BTreeMap::new(),
            owed: BTreeMap::new(),
            asking: BTreeMap::new(),
            contenders: BTreeMap::new(),
            hello_at: BTreeMap::new(),
            deferred: BTreeSet::new(),
            nacks: BTreeMap::new(),
            loss,
            files_peers: BTreeSet::new(),
            sources: BTreeMap::new(),
            files_active: true,
            notices: Vec::new(),
            facts_peers: BTreeSet::new(),
            seen: BTreeMap::new(),
            errors: errors::ErrorLog::default(),
            gate: Gate::default(),
        };
        node.sync_streams()?;
        for peer in node.store.peers_with_work()? {
            node.ask(&peer, now_ms);
        }
        Ok(node)
    }

    pub fn me(&self) -> &Name {
        self.store.me()
    }

    /// The monotonic clock now (see [`Mono`]): call before each turn of calls, as
    /// `now_ms` is passed to each. How long a frame waited here, for its ttl, is
    /// measured on it.
    pub fn tick(&mut self, mono: Mono) {
        self.store.tick(mono);
    }

    /// Withdraws unsent commands whose ttl passed (see [`Store::expire_unsent`]);
    /// returns how many.
    pub fn expire(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        self.store.expire_unsent(now_ms)
    }

    /// Prunes finished history, one bounded batch (see [`Store::prune`]). Only
    /// history goes, nothing delivery knows of.
    pub fn prune(
        &mut self,
        keep: &Retention,
        batch: u32,
        now_ms: u64,
    ) -> Result<Pruned, StoreError> {
        self.store.prune(keep, batch, now_ms)
    }

    /// This node's public key.
    pub fn public_key(&self) -> &x25519_dalek::PublicKey {
        self.session.public()
    }

    /// This store's epoch.
    pub fn epoch(&self) -> u64 {
        self.session.epoch()
    }

    /// What the store found missing when it opened, if anything.
    pub fn loss(&self) -> Option<&Loss> {
        self.loss.as_ref()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Still asking some trusted peer for a handshake (a new store announcing
    /// itself, a peer not yet synchronised with).
    pub fn is_handshaking(&self) -> bool {
        !self.asking.is_empty()
    }

    /// Peers trusted with `files` (pushing files here, fetching shared ones).
    pub fn set_files_peers(&mut self, peers: BTreeSet<Name>) {
        self.files_peers = peers;
    }

    fn may_use_files(&self, peer: &Name) -> Result<(), String> {
        if self.files_peers.contains(peer) {
            Ok(())
        } else {
            Err(format!("{peer} is not allowed to use files"))
        }
    }

    fn notice(&mut self, level: Notice, text: String) {
        // Bounded: a shell that never reads them loses the oldest.
        if self.notices.len() >= 1024 {
            self.notices.remove(0);
        }
        self.notices.push((level, text));
    }

    /// What happened since the last call that the log should say.
    pub fn notices(&mut self) -> Vec<(Notice, String)> {
        std::mem::take(&mut self.notices)
    }

    /// Transfers in progress or files that expire: [`Node::pump_files`] then wants
    /// calling every few seconds.
    pub fn files_active(&self) -> bool {
        self.files_active
    }

    /// Groups the next changes into one commit (see `Store::begin_batch`).
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.store.begin_batch()
    }

    /// Commits the open batch. If that fails (a full disk), the store rolled it
    /// back and delivery learns the streams again from the store. Sequence numbers
    /// handed out in the lost batch are handed out again to the next frames, which
    /// then go after a resend timeout rather than at once: late, never lost.
    pub fn end_batch(&mut self) -> Result<(), StoreError> {
        let r = self.store.end_batch();
        if r.is_err() {
            self.sync_streams()?;
        }
        r
    }

    /// Commits what is pending: the batch so far, then opens the next one if a
    /// batch was open (outside a batch every change is already committed).
    pub fn flush_batch(&mut self) -> Result<(), StoreError> {
        if !self.store.in_batch() {
            return Ok(());
        }
        self.end_batch()?;
        self.store.begin_batch()
    }

    /// Takes what is runnable: results, notices and file frames are handled here;
    /// commands are left to the shell, which starts each (once) and finishes it.
    pub fn take_ready(&mut self, now_ms: u64) -> Result<Ready, StoreError> {
        let (ready, corrupt) = self.runnable(now_ms)?;
        let mut out = Ready {
            corrupt,
            ..Ready::default()
        };
        for inbound in ready {
            let (peer, lane, seq) = (&inbound.env.from, &inbound.env.lane, inbound.env.seq);
            match &inbound.env.body {
                Body::Command(_) => out.commands.push(inbound),
                Body::Result(_) | Body::Discarded { .. } => {
                    if self.store.record_result(&inbound, now_ms)?.is_none() {
                        self.notice(
                            Notice::Warn,
                            format!("second result from {peer} for {lane}#{seq} ignored"),
                        );
                    }
                    let cmd = match &inbound.env.body {
                        Body::Result(r) => r.seq,
                        Body::Discarded { seq, .. } => *seq,
                        _ => unreachable!("matched above"),
                    };
                    if let Some(job) = self.store.job_of(peer, lane, cmd)? {
                        out.jobs_changed.push(job);
                    }
                    out.taken += 1;
                }
                Body::Lost { reason } => {
                    let text = format!("frame {lane}#{seq} from {peer} was lost: {reason}");
                    self.notice(Notice::Error, text.clone());
                    self.store.record_event(&inbound, &text, now_ms)?;
                    out.taken += 1;
                }
                Body::FileOffer(_)
                | Body::FileChunk { .. }
                | Body::FileStatus { .. }
                | Body::FileRequest { .. } => {
                    self.on_file_frame(&inbound, now_ms)?;
                    // A finished file is already moved into place: commit now.
                    self.flush_batch()?;
                    out.taken += 1;
                }
                Body::Started { seq: cmd } => {
                    self.store.record_started(&inbound, *cmd)?;
                    if let Some(job) = self.store.job_of(peer, lane, *cmd)? {
                        out.jobs_changed.push(job);
                    }
                    out.taken += 1;
                }
                Body::Withdrawn { .. } => {
                    self.store.drop_cancel(peer, lane, seq)?;
                    self.store.consume(&inbound)?;
                    out.taken += 1;
                }
                Body::Cancel { .. } => {
                    self.on_cancel(&inbound, &mut out, now_ms)?;
                    out.taken += 1;
                }
                Body::Facts(f) => {
                    self.take_facts(&inbound, f, now_ms)?;
                    out.taken += 1;
                }
                Body::Errors(_) => {
                    self.on_errors(&inbound)?;
                    out.taken += 1;
                }
                // Unsequenced: never stored in the inbox.
                Body::Ack { .. } | Body::Hello { .. } | Body::Sync(_) | Body::Nack { .. } => {}
            }
        }
        if !out.answered.is_empty() {
            let answered = std::mem::take(&mut out.answered);
            out.commands.retain(|c| {
                !answered
                    .iter()
                    .any(|(l, s, p)| (l, *s, p) == (&c.env.lane, c.env.seq, &c.env.from))
            });
        }
        Ok(out)
    }

    /// Tells `peer` that its command `seq` on `lane` has been running a while.
    pub fn announce_started(
        &mut self,
        peer: &Name,
        lane: &Lane,
        seq: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let item = Outgoing {
            to: peer.clone(),
            lane: lane.clone(),
            ttl_s: None,
            body: Body::Started { seq },
        };
        self.submit(vec![item], now_ms).map(|_| ())
    }

    /// The peers this node trusts, with their public keys. Streams to a peer that
    /// is not trusted are held (nothing can be sealed for it); a newly trusted
    /// peer with work waiting is asked for its Sync at once.
    pub fn set_trust(&mut self, trusted: BTreeMap<Name, [u8; 32]>, now_ms: u64) {
        self.session.set_trust(trusted);
        let peers: Vec<Name> = self
            .session
            .peers()
            .map(|(n, _)| n.clone())
            .chain(self.session.trusted().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for peer in peers {
            self.refresh_pause(&peer);
            if self.session.is_trusted(&peer) && !self.session.synced(&peer) {
                self.ask(&peer, now_ms);
            }
        }
    }

    /// Whether `peer` is in the trust file.
    pub fn trusts(&self, peer: &Name) -> bool {
        self.session.is_trusted(peer)
    }

    /// Peers whose store this node has met, and whether the streams with each are
    /// synchronised.
    pub fn sessions(&self) -> Vec<(Name, bool)> {
        self.session
            .peers()
            .filter(|(_, p)| p.epoch != 0)
            .map(|(n, p)| (n.clone(), p.synced))
            .collect()
    }

    /// Whether the streams with `peer` are synchronised.
    pub fn synced(&self, peer: &Name) -> bool {
        self.session.synced(peer)
    }

    /// Delivery runs for a peer that is trusted and synchronised; otherwise it waits.
    fn refresh_pause(&mut self, peer: &Name) {
        let synced = self.session.is_trusted(peer) && self.session.synced(peer);
        self.delivery.handle(
            Event::Synced {
                peer: peer.clone(),
                synced,
            },
            0,
        );
    }

    /// Starts (or keeps) asking `peer` for its Sync, at once.
    fn ask(&mut self, peer: &Name, now_ms: u64) {
        if peer == self.me() || !self.session.is_trusted(peer) || self.session.synced(peer) {
            return;
        }
        let a = self.asking.entry(peer.clone()).or_insert(Ask {
            at_ms: now_ms,
            backoff_ms: ASK_FIRST_MS,
        });
        a.at_ms = a.at_ms.min(now_ms);
    }

    /// Queues one command per target as one job; one transaction.
    pub fn submit_job(
        &mut self,
        method: Method,
        summary: &str,
        items: Vec<Outgoing>,
        now_ms: u64,
    ) -> Result<(i64, Vec<Queued>), StoreError> {
        let (job, queued) = self.store.submit_job(method, summary, items, now_ms)?;
        self.note_queued(&queued, now_ms);
        Ok((job, queued))
    }

    /// Queues frames for sending; one transaction.
    pub fn submit(&mut self, items: Vec<Outgoing>, now_ms: u64) -> Result<Vec<Queued>, StoreError> {
        let queued = self.store.enqueue(items, now_ms)?;
        self.note_queued(&queued, now_ms);
        Ok(queued)
    }

    pub fn on_connected(&mut self, now_ms: u64) {
        self.delivery.handle(Event::Connected, now_ms);
        // Whoever we were asking gets asked again now, not at the backoff.
        for a in self.asking.values_mut() {
            a.at_ms = now_ms;
            a.backoff_ms = ASK_FIRST_MS;
        }
    }

    pub fn on_disconnected(&mut self, now_ms: u64) {
        self.delivery.handle(Event::Disconnected, now_ms);
    }

    /// A peer's presence message: a hint for delivery, and recorded for `status`.
    pub fn on_presence(&mut self, peer: Name, online: bool, now_ms: u64) -> Result<(), StoreError> {
        if online {
            if let Some(a) = self.asking.get_mut(&peer) {
                a.at_ms = now_ms;
                a.backoff_ms = ASK_FIRST_MS;
            }
        }
        self.store.set_presence(&peer, online, now_ms)?;
        self.delivery
            .handle(Event::Presence { peer, online }, now_ms);
        Ok(())
    }

    /// A peer's presence said it sleeps on an on-demand link until `next_ms` (its
    /// clock; `None`: its last will, which knows only its interval) and polls
    /// every `every_ms`. A hint anyone can forge, so it is bounded here: an
    /// interval of at most a week, expected back at most one interval from now.
    /// Delivery then holds resends for it until then (see `Event::Asleep`);
    /// any frame from it ends that.
    pub fn on_asleep(
        &mut self,
        peer: Name,
        next_ms: Option<u64>,
        every_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let every_ms = every_ms.clamp(1_000, 7 * 86_400_000);
        let until_ms = next_ms.map_or(now_ms + every_ms, |t| t.min(now_ms + every_ms));
        let polls = crate::store::Polls {
            every_ms,
            next_ms: until_ms,
        };
        self.store.set_asleep(&peer, polls, now_ms)?;
        self.delivery.handle(
            Event::Asleep {
                peer,
                until_ms,
                every_ms,
            },
            now_ms,
        );
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.delivery.is_connected()
    }

    /// What still needs the link (an on-demand link hangs up only without it):
    /// delivery's view, with hellos, Syncs and nacks owed counted as unsent.
    pub fn outstanding(&self) -> Outstanding {
        let mut o = self.delivery.outstanding();
        o.unsent |= !self.owed.is_empty() || !self.nacks.is_empty();
        o
    }

    /// Takes in one payload from this node's inbox topic: opens it (a payload that
    /// does not open is refused, see [`Report::refused`]), then applies its acks
    /// and control frames and stores its sequenced frames, all in one commit with
    /// the spent seal counter. An `Err` means the store failed (e.g. disk full) and
    /// nothing of the payload was kept: the sender will resend.
    pub fn on_payload(&mut self, payload: &[u8], now_ms: u64) -> Result<Report, StoreError> {
        let mut report = Report::default();
        let opened = match self.session.open(payload) {
            Ok(o) => o,
            Err(refusal) => {
                if let Some((peer, claims)) = refusal.wants_hello() {
                    let peer = peer.clone();
                    if self.due_hello(&peer, now_ms) {
                        // It does not know our epoch: say it until it shows it does,
                        // and ask the store it claims to be (if it says one).
                        self.session.peer_mut(&peer).knows_mine = false;
                        let known = self.session.peer(&peer).map_or(0, |p| p.epoch);
                        // Unauthenticated, so nothing is held for it: only asked.
                        match claims {
                            Some(epoch) if epoch != known => {
                                let nonce = self.session.challenge(&peer, epoch);
                                self.owe(&peer, Some(epoch), Body::Hello { nonce });
                            }
                            _ => self.hello(&peer),
                        }
                    }
                }
                report.refused = Some(refusal);
                return Ok(report);
            }
        };
        let sender = opened.sender.clone();
        // A payload that does not inflate is quarantined whole, like a frame that
        // does not decode, and nothing of it is taken.
        let (packed, bad) = match compress::restore(&opened.plain) {
            Ok(plain) => {
                let (packed, bad) = frame::expand(&plain, &sender, self.me(), now_ms);
                (packed, bad.map(|e| e.to_string()))
            }
            Err(e) => {
                let why = format!("{e} from {sender}");
                self.store
                    .quarantine_received(&opened.plain, &why, now_ms)?;
                (Vec::new(), Some(format!("{e}; quarantined")))
            }
        };
        report.malformed = bad;
        let mut frames = Vec::new();
        for item in frame::unpack(&packed) {
            // `expand` only makes frames that unpack and decode.
            let Ok(bytes) = item else { break };
            let Ok(env) = frame::decode(bytes) else { break };
            let (_, category) = budget::classify(&env.lane, frame::body_index(bytes));
            add_to(&mut report.by, category, bytes.len());
            frames.push((env, bytes));
        }
        if opened.probe
            && frames
                .iter()
                .any(|(e, _)| !matches!(e.body, Body::Hello { .. }))
        {
            report.refused = Some(Refusal::BadProbe(sender));
            return Ok(report);
        }
        if opened.unconfirmed {
            let answered = frames.iter().any(|(e, _)| {
                matches!(&e.body, Body::Sync(s) if self.session.answers(&sender, opened.sender_epoch, s.echo))
            });
            if !answered {
                // Another store of this peer: its streams wait until one of the
                // two stores answers a challenge. Its own hello is answered, with
                // everything we ever sent marked as possibly taken by the store it
                // replaces.
                let theirs = frames.iter().find_map(|(e, _)| match e.body {
                    Body::Hello { nonce } => Some(nonce),
                    _ => None,
                });
                if self.due_hello(&sender, now_ms) || theirs.is_some() {
                    let answer = match theirs {
                        Some(nonce) => {
                            let mut view = self.store.sync_view(&sender, true)?;
                            view.echo = nonce;
                            for s in &mut view.sent {
                                s.doubt = s.doubt.max(s.last);
                            }
                            Some(view)
                        }
                        None => None,
                    };
                    self.contest(&sender, opened.sender_epoch, answer, now_ms)?;
                }
                report.refused = Some(Refusal::Unconfirmed(sender));
                return Ok(report);
            }
        }
        report.sender = Some(sender);
        self.store.begin_batch()?;
        let taken = self.take(&opened, &frames, now_ms, &mut report);
        let committed = self.store.end_batch();
        if let Err(e) = taken.and(committed) {
            // The store rolled back what this payload did; forget it here too, and
            // have its streams resent as soon as the store takes writes again.
            for (env, _) in &frames {
                if env.seq != 0 {
                    self.deferred.insert((env.from.clone(), env.lane.clone()));
                }
            }
            self.session.reload(self.store.peer_sessions()?);
            self.sync_streams()?;
            let peers: Vec<Name> = self.session.peers().map(|(n, _)| n.clone()).collect();
            for p in peers {
                self.refresh_pause(&p);
            }
            return Err(e);
        }
        Ok(report)
    }

    /// Asks `peer`'s store we know (or whichever it is, by a probe) for its Sync.
    fn hello(&mut self, peer: &Name) {
        let known = self.session.peer(peer).map_or(0, |p| p.epoch);
        let nonce = self.session.challenge(peer, known);
        self.owe(peer, None, Body::Hello { nonce });
    }

    fn owe(&mut self, peer: &Name, epoch: Option<u64>, body: Body) {
        let list = self.owed.entry(peer.clone()).or_default();
        // One hello per store is enough; a newer Sync replaces an older one.
        list.retain(|o| {
            o.epoch != epoch || std::mem::discriminant(&o.body) != std::mem::discriminant(&body)
        });
        list.push(Owed { epoch, body });
    }

    /// `peer` has another store than the one we know (`epoch`): hold its streams
    /// and challenge both; whichever answers is the live one. `answer` is our Sync
    /// for a hello that store sent.
    fn contest(
        &mut self,
        peer: &Name,
        epoch: u64,
        answer: Option<frame::Sync>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if self.session.synced(peer) {
            let p = self.session.peer_mut(peer);
            p.synced = false;
            let p = p.clone();
            self.store.save_peer_session(peer, &p)?;
            self.refresh_pause(peer);
        }
        if let Some(sync) = answer {
            self.owe(peer, Some(epoch), Body::Sync(sync));
        }
        let nonce = self.session.challenge(peer, epoch);
        self.owe(peer, Some(epoch), Body::Hello { nonce });
        if self.session.knows_epoch_of(peer) {
            self.hello(peer);
        }
        // Asked again at the asking pace until one of them answers.
        self.contenders
            .entry(peer.clone())
            .or_default()
            .insert(epoch);
        self.asking.entry(peer.clone()).or_insert(Ask {
            at_ms: now_ms + ASK_FIRST_MS,
            backoff_ms: ASK_FIRST_MS,
        });
        Ok(())
    }

    /// Rate limit for hellos and challenges sent in answer to a payload, which
    /// anyone can forge: one per peer per [`HELLO_EVERY_MS`].
    fn due_hello(&mut self, peer: &Name, now_ms: u64) -> bool {
        let due = self
            .hello_at
            .get(peer)
            .is_none_or(|t| now_ms >= t + HELLO_EVERY_MS);
        if due {
            self.hello_at.insert(peer.clone(), now_ms);
        }
        due
    }

    fn take(
        &mut self,
        opened: &crate::session::Opened,
        frames: &[(Envelope, &[u8])],
        now_ms: u64,
        report: &mut Report,
    ) -> Result<(), StoreError> {
        let sender = &opened.sender;
        self.note_seen(sender, now_ms)?;
        let has_hello = frames
            .iter()
            .any(|(e, _)| matches!(e.body, Body::Hello { .. }));
        if let Change::NewEpoch { old } = self.session.accept(opened, has_hello) {
            report.interrupted = self.store.peer_replaced(sender, old, now_ms)?;
            self.owed.remove(sender);
            self.refresh_pause(sender);
            report.new_epoch = Some(old);
            self.ask(sender, now_ms);
        }
        let mut batch: Vec<(Envelope, &[u8])> = Vec::new();
        for (env, bytes) in frames {
            if &env.from != sender {
                let why = format!(
                    "frame claiming to be from {} in a payload sealed by {sender}",
                    env.from
                );
                self.store.quarantine_received(bytes, &why, now_ms)?;
                report.rejected.push(why);
                continue;
            }
            let synced = self.session.synced(sender);
            match &env.body {
                Body::Hello { nonce } => {
                    let mut view = self.store.sync_view(sender, !synced)?;
                    view.echo = *nonce;
                    self.owe(sender, None, Body::Sync(view));
                    if !synced {
                        self.hello(sender);
                    }
                }
                // Applied only when it answers a hello of ours to this store: a
                // Sync delayed from before, or from a store since replaced, is not.
                Body::Sync(s)
                    if !synced && self.session.answers(sender, opened.sender_epoch, s.echo) =>
                {
                    let losses = self.store.losses()?;
                    let doubt_all = self
                        .session
                        .peer(sender)
                        .is_none_or(|p| p.synced_after < losses);
                    let outcome = self.store.apply_sync(sender, s, doubt_all, now_ms)?;
                    self.contenders.remove(sender);
                    self.session.settle(sender);
                    let p = self.session.peer_mut(sender);
                    p.synced = true;
                    p.we_lost = false;
                    p.synced_after = losses;
                    self.asking.remove(sender);
                    self.sync_streams()?;
                    self.refresh_pause(sender);
                    report.synced = Some(outcome);
                }
                Body::Sync(_) => {}
                Body::Ack { upto } | Body::Nack { upto } => {
                    if !synced {
                        continue;
                    }
                    self.store.apply_ack(&env.from, &env.lane, *upto)?;
                    let (peer, lane, upto) = (env.from.clone(), env.lane.clone(), *upto);
                    let event = if matches!(env.body, Body::Nack { .. }) {
                        Event::Nacked { peer, lane, upto }
                    } else {
                        Event::Acked { peer, lane, upto }
                    };
                    self.delivery.handle(event, now_ms);
                    report.acks += 1;
                }
                _ if env.seq == 0 => {
                    let why = format!("unsequenced frame from {}", env.from);
                    self.store.quarantine_received(bytes, &why, now_ms)?;
                    report.rejected.push(why);
                }
                _ if !synced => {
                    report.deferred += 1;
                    self.ask(sender, now_ms);
                }
                _ => batch.push((env.clone(), bytes)),
            }
        }
        let p = self.session.peer(sender).cloned().unwrap_or_default();
        self.store.save_peer_session(sender, &p)?;
        if batch.is_empty() {
            return Ok(());
        }
        let receipts = self.store.receive(&batch, now_ms)?;
        for ((env, _), receipt) in batch.into_iter().zip(receipts) {
            let (peer, lane) = (env.from, env.lane);
            match receipt {
                Receipt::Accepted { watermark } | Receipt::Held { watermark } => {
                    report.stored += 1;
                    self.delivery.handle(
                        Event::Received {
                            peer,
                            lane,
                            watermark,
                            duplicate: false,
                        },
                        now_ms,
                    );
                }
                Receipt::Duplicate { watermark } => {
                    report.duplicates += 1;
                    self.delivery.handle(
                        Event::Received {
                            peer,
                            lane,
                            watermark,
                            duplicate: true,
                        },
                        now_ms,
                    );
                }
                Receipt::NoSpace { .. } => {
                    report.deferred += 1;
                    self.deferred.insert((peer, lane));
                }
                Receipt::Ahead { .. } => report.deferred += 1,
            }
        }
        Ok(())
    }

    /// There is room in the store again: streams whose frames were dropped for lack
    /// of it are told to resend now rather than at their backoff.
    pub fn room_again(&mut self) -> Result<(), StoreError> {
        for (peer, lane) in std::mem::take(&mut self.deferred) {
            let wm = self.store.watermark(&peer, &lane)?;
            self.nacks.insert((peer, lane), wm);
        }
        Ok(())
    }

    /// Sealed payloads to publish now, most urgent first, and any outbox frames
    /// found corrupt (already quarantined and replaced).
    pub fn poll_out(&mut self, now_ms: u64) -> Result<(Vec<OutPayload>, Vec<Corrupt>), StoreError> {
        let me = self.me().clone();
        let max = self.cfg.max_payload;
        let mut packer = Packer::new(max);
        let mut corrupt = Vec::new();
        let mut out = Vec::new();
        if self.delivery.is_connected() {
            self.control_frames(now_ms, &mut packer, &mut out)?;
        }
        for action in self.delivery.poll(now_ms) {
            match action {
                Action::SendAck { peer, lane, upto } => {
                    let ack = self.control(&peer, lane, Body::Ack { upto }, now_ms);
                    packer.push(&peer, &frame::encode(&ack)?, Category::Acks);
                }
                Action::Send {
                    peer,
                    lane,
                    from,
                    to,
                } => {
                    let (frames, bad) = self.store.outbox_frames(&peer, &lane, from, to, now_ms)?;
                    corrupt.extend(bad);
                    self.gate.unhold(&peer, &lane);
                    for (seq, bytes) in frames {
                        let (class, category) = budget::classify(&lane, frame::body_index(&bytes));
                        if self.gate.is_active() {
                            // About what it costs on the wire: its share of a
                            // payload's seal, MQTT and TCP/IP headers.
                            let cost = bytes.len() as u64 * 21 / 20 + 64;
                            if let Err(wait) = self.gate.admit(&peer, class, cost, now_ms) {
                                self.gate.hold(&peer, &lane, class, &wait);
                                let gated = Event::Gated {
                                    peer: peer.clone(),
                                    lane: lane.clone(),
                                    upto: seq - 1,
                                    until_ms: wait.until_ms,
                                };
                                self.delivery.handle(gated, now_ms);
                                break;
                            }
                        }
                        packer.push(&peer, &bytes, category);
                    }
                }
            }
        }
        for p in packer.finish() {
            let mut wire = frame::compact(&p.bytes, &me, &p.to, now_ms)?;
            if self.cfg.compress {
                wire = compress::shrink(wire);
            }
            let counter = self.next_counter(&p.to)?;
            match self.session.seal(&p.to, &wire, counter) {
                Ok(bytes) => out.push(OutPayload {
                    to: p.to,
                    bytes,
                    frames: p.frames,
                    by: p.by,
                }),
                // Not trusted (any more): nothing goes; delivery holds its streams.
                Err(_) => {
                    self.delivery
                        .handle(Event::Unsent { peer: p.to.clone() }, now_ms);
                    self.refresh_pause(&p.to);
                }
            }
        }
        Ok((out, corrupt))
    }

    /// Owed hellos and Syncs, asks that are due, and nacks: they go before
    /// anything else to their peer. A challenge is sealed for another store of the
    /// peer, so it travels alone, straight into `out`.
    fn control_frames(
        &mut self,
        now_ms: u64,
        packer: &mut Packer,
        out: &mut Vec<OutPayload>,
    ) -> Result<(), StoreError> {
        let mut asks = Vec::new();
        for (peer, a) in &mut self.asking {
            if a.at_ms <= now_ms && !self.owed.contains_key(peer) {
                asks.push(peer.clone());
                a.at_ms = now_ms + a.backoff_ms;
                a.backoff_ms = (a.backoff_ms * 2).min(ASK_CAP_MS);
            }
        }
        for peer in asks {
            self.hello(&peer);
            for epoch in self.contenders.get(&peer).cloned().unwrap_or_default() {
                let nonce = self.session.challenge(&peer, epoch);
                self.owe(&peer, Some(epoch), Body::Hello { nonce });
            }
        }
        for (peer, owed) in std::mem::take(&mut self.owed) {
            if !self.session.is_trusted(&peer) {
                continue;
            }
            let mut challenges: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
            for o in owed {
                // Without the peer's epoch only a hello can be sealed for it.
                if o.epoch.is_none()
                    && !self.session.knows_epoch_of(&peer)
                    && !matches!(o.body, Body::Hello { .. })
                {
                    continue;
                }
                let env = self.control(&peer, control_lane(), o.body, now_ms);
                let bytes = frame::encode(&env)?;
                match o.epoch {
                    None => packer.push(&peer, &bytes, Category::Control),
                    Some(epoch) => challenges.entry(epoch).or_default().push(bytes),
                }
            }
            for (epoch, frames) in challenges {
                let packed = frame::pack(frames.iter().map(Vec::as_slice));
                let wire = frame::compact(&packed, self.me(), &peer, now_ms)?;
                let counter = self.next_counter(&peer)?;
                if let Ok(bytes) = self.session.seal_for(&peer, epoch, true, &wire, counter) {
                    out.push(OutPayload {
                        to: peer.clone(),
                        by: vec![(Category::Control, bytes.len())],
                        bytes,
                        frames: frames.len(),
                    });
                }
            }
        }
        for ((peer, lane), upto) in std::mem::take(&mut self.nacks) {
            if self.session.synced(&peer) && self.session.is_trusted(&peer) {
                let env = self.control(&peer, lane, Body::Nack { upto }, now_ms);
                packer.push(&peer, &frame::encode(&env)?, Category::Acks);
            }
        }
        Ok(())
    }

    fn control(&self, peer: &Name, lane: Lane, body: Body, now_ms: u64) -> Envelope {
        Envelope {
            from: self.me().clone(),
            to: peer.clone(),
            lane,
            seq: 0,
            created_ms: now_ms,
            ttl_s: None,
            body,
        }
    }

    /// The next seal counter for `peer`, reserving a block in the store (one
    /// commit) when the reserved ones run out.
    fn next_counter(&mut self, peer: &Name) -> Result<u64, StoreError> {
        let range = self.counters.entry(peer.clone()).or_insert(0..0);
        if range.is_empty() {
            *range = self.store.reserve_counters(peer, COUNTERS_AHEAD)?;
        }
        let c = range.start;
        range.start += 1;
        Ok(c)
    }

    /// A publish to `peer` failed: send its unacknowledged frames again next time.
    pub fn unsent(&mut self, peer: &Name, now_ms: u64) {
        self.delivery
            .handle(Event::Unsent { peer: peer.clone() }, now_ms);
    }

    /// When [`Node::poll_out`] or [`Node::expire`] next has work without a new
    /// event, on the wall clock (`now_ms` is the time now).
    pub fn next_wakeup(&self, now_ms: u64) -> Option<u64> {
        let expiry = self.store.next_expiry(now_ms).ok().flatten();
        let delivery = self.delivery.next_wakeup();
        if !self.delivery.is_connected() {
            return [delivery, expiry].into_iter().flatten().min();
        }
        let owed = (!self.owed.is_empty() || !self.nacks.is_empty()).then_some(0);
        let asks = self
            .asking
            .iter()
            .filter(|(p, _)| self.session.is_trusted(p))
            .map(|(_, a)| a.at_ms)
            .min();
        [delivery, owed, asks, expiry].into_iter().flatten().min()
    }

    /// Received frames whose turn has come (see [`Store::runnable`]), from peers
    /// the streams are synchronised with. Commands that may have reached an earlier
    /// store of this node are answered `interrupted` here and not returned. Corrupt
    /// frames are quarantined and their senders told.
    fn runnable(&mut self, now_ms: u64) -> Result<(Vec<Inbound>, Vec<Corrupt>), StoreError> {
        let mut all_corrupt = Vec::new();
        loop {
            let (ready, corrupt) = self.store.runnable(self.cfg.parallel, now_ms)?;
            all_corrupt.extend(corrupt);
            let mut out = Vec::new();
            let mut answered = false;
            for inbound in ready {
                if !self.session.synced(inbound.peer()) {
                    continue;
                }
                if inbound.doubtful && matches!(inbound.env.body, Body::Withdrawn { .. }) {
                    // Its sender answered it itself; that answer is only sure if
                    // the command never reached us.
                    let r = CmdResult::without_run(
                        inbound.env.seq,
                        Status::Interrupted,
                        "withdrawn by its sender, but it may have reached an earlier store of this node (lost, or gone back in time) and run there",
                        now_ms,
                    );
                    self.finish(&inbound, r, now_ms)?;
                    answered = true;
                    continue;
                }
                if inbound.doubtful {
                    let r = CmdResult::without_run(
                        inbound.env.seq,
                        Status::Interrupted,
                        "this command may have reached an earlier store of this node (lost, or gone back in time) and run there; it is not run again",
                        now_ms,
                    );
                    self.finish(&inbound, r, now_ms)?;
                    answered = true;
                    continue;
                }
                if matches!(inbound.env.body, Body::Command(_))
                    && self.cancelled_on_arrival(&inbound, now_ms)?
                {
                    answered = true;
                    continue;
                }
                out.push(inbound);
            }
            if !all_corrupt.is_empty() {
                self.sync_streams()?;
            }
            if !answered || !out.is_empty() {
                return Ok((out, all_corrupt));
            }
        }
    }

    /// Journals a command as running; call before starting it.
    pub fn start(&mut self, cmd: &Inbound, now_ms: u64) -> Result<(), StoreError> {
        self.store.start(cmd, method_of(cmd), now_ms)
    }

    /// Journals a command done and queues its result for the sender.
    pub fn finish(
        &mut self,
        cmd: &Inbound,
        result: CmdResult,
        now_ms: u64,
    ) -> Result<Queued, StoreError> {
        let queued = self.store.finish(cmd, method_of(cmd), result, now_ms)?;
        self.note_queued(std::slice::from_ref(&queued), now_ms);
        // More commands of this stream waiting means more results shortly: let
        // them share a payload (bounded by the delivery's hold limits).
        let (peer, lane) = (queued.to.clone(), queued.lane.clone());
        let event = if self.store.waiting(&peer, &lane)? {
            Event::Hold { peer, lane }
        } else {
            Event::Release { peer, lane }
        };
        self.delivery.handle(event, now_ms);
        Ok(queued)
    }

    /// Streams with unacknowledged frames: (peer, lane, acked, last).
    pub fn backlog(&self) -> Vec<(Name, Lane, u64, u64)> {
        self.delivery
            .backlog()
            .map(|(p, l, a, s)| (p.clone(), l.clone(), a, s))
            .collect()
    }

    fn note_queued(&mut self, queued: &[Queued], now_ms: u64) {
        for q in queued {
            let event = Event::Enqueued {
                peer: q.to.clone(),
                lane: q.lane.clone(),
                first_seq: q.seq,
                last_seq: q.seq,
            };
            self.delivery.handle(event, now_ms);
            if !self.session.synced(&q.to) && !self.asking.contains_key(&q.to) {
                self.ask(&q.to, now_ms);
            }
        }
    }

    /// Gives delivery the store's view of the streams again (after frames were
    /// enqueued directly through the store, or a Sync moved them).
    fn sync_streams(&mut self) -> Result<(), StoreError> {
        let streams = self.store.out_streams()?;
        self.delivery.reconcile(
            streams
                .into_iter()
                .map(|s| (s.peer, s.lane, s.acked, s.last_seq))
                .collect(),
        );
        Ok(())
    }
}

/// Packs frames into payloads per peer, at most `max` bytes each (a single larger
/// frame travels alone), in the order they were pushed.
struct Packer {
    max: usize,
    open: BTreeMap<Name, OutPayload>,
    done: Vec<OutPayload>,
}

impl Packer {
    fn new(max: usize) -> Packer {
        Packer {
            max,
            open: BTreeMap::new(),
            done: Vec::new(),
        }
    }

    fn push(&mut self, to: &Name, bytes: &[u8], category: Category) {
        let need = frame::packed_len(bytes.len());
        let empty = || OutPayload {
            to: to.clone(),
            bytes: Vec::new(),
            frames: 0,
            by: Vec::new(),
        };
        let p = self.open.entry(to.clone()).or_insert_with(empty);
        if p.frames > 0 && p.bytes.len() + need > self.max {
            let full = std::mem::replace(p, empty());
            self.done.push(full);
        }
        p.bytes.extend_from_slice(&frame::pack([bytes]));
        p.frames += 1;
        add_to(&mut p.by, category, bytes.len());
    }

    fn finish(mut self) -> Vec<OutPayload> {
        self.done
            .extend(self.open.into_values().filter(|p| p.frames > 0));
        self.done
    }
}

/// Adds `n` bytes to `category` in a short list of sums.
fn add_to(by: &mut Vec<(Category, usize)>, category: Category, n: usize) {
    match by.iter_mut().find(|(c, _)| *c == category) {
        Some((_, sum)) => *sum += n,
        None => by.push((category, n)),
    }
}

fn method_of(cmd: &Inbound) -> &'static str {
    match &cmd.env.body {
        Body::Command(c) => c.method().as_str(),
        _ => "none",
    }
}
