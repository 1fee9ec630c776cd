//! One node's protocol core: the store and the delivery state machine, wired.
//!
//! Synchronous and clock-free (`now` is passed in), so the agent runs it on its
//! store thread and the simulation tests drive exactly the same code. It turns
//! received payloads into stored frames and acknowledgements, and delivery decisions
//! into payloads to publish. What runs commands, and the link, live elsewhere.

use std::collections::BTreeMap;
use std::path::Path;

use crate::delivery::{Action, Delivery, DeliveryConfig, Event};
use crate::frame::{self, Body, CmdResult, Envelope, Lane, Name};
use crate::store::{Corrupt, Inbound, Outgoing, Queued, Receipt, Store, StoreConfig, StoreError};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    /// Frames are packed into payloads of at most this many bytes (a single larger
    /// frame travels alone).
    pub max_payload: usize,
    /// Commands of one parallel lane running at once.
    pub parallel: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            store: StoreConfig::default(),
            delivery: DeliveryConfig::default(),
            max_payload: 64 * 1024,
            parallel: 8,
        }
    }
}

/// A payload for one peer's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPayload {
    pub to: Name,
    pub bytes: Vec<u8>,
    pub frames: usize,
}

/// What a received payload amounted to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub stored: usize,
    pub duplicates: usize,
    pub acks: usize,
    /// Dropped for now (after a gap too far ahead, or no space); the sender resends.
    pub deferred: usize,
    /// Frames rejected, with why; each is also quarantined.
    pub rejected: Vec<String>,
}

pub struct Node {
    store: Store,
    delivery: Delivery,
    cfg: NodeConfig,
}

impl Node {
    /// Opens the store, reports commands a crash interrupted, and rebuilds delivery
    /// state from the outbox.
    pub fn open(path: &Path, me: &Name, cfg: NodeConfig, now_ms: u64) -> Result<Node, StoreError> {
        let mut store = Store::open(path, me, &cfg.store)?;
        store.recover_interrupted(now_ms)?;
        let delivery = Delivery::new(cfg.delivery.clone());
        let mut node = Node {
            store,
            delivery,
            cfg,
        };
        node.sync_streams()?;
        Ok(node)
    }

    pub fn me(&self) -> &Name {
        self.store.me()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Queues one command per target as one job; one transaction.
    pub fn submit_job(
        &mut self,
        method: &str,
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
    }

    pub fn on_disconnected(&mut self, now_ms: u64) {
        self.delivery.handle(Event::Disconnected, now_ms);
    }

    pub fn on_presence(&mut self, peer: Name, online: bool, now_ms: u64) {
        self.delivery
            .handle(Event::Presence { peer, online }, now_ms);
    }

    pub fn is_connected(&self) -> bool {
        self.delivery.is_connected()
    }

    /// Takes in one payload from this node's inbox topic. Acks are applied, sequenced
    /// frames stored in one transaction; bad frames are quarantined and reported. An
    /// `Err` means the store failed (e.g. disk full) and nothing of the payload that
    /// is not acknowledged was kept: the senders will resend.
    /// `sender` is who sealed the payload: a frame claiming another origin is rejected.
    pub fn on_payload(
        &mut self,
        sender: &Name,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Report, StoreError> {
        let mut report = Report::default();
        let mut batch: Vec<(Envelope, &[u8])> = Vec::new();
        for item in frame::unpack(payload) {
            let bytes = match item {
                Ok(b) => b,
                Err(e) => {
                    self.store
                        .quarantine_received(payload, &e.to_string(), now_ms)?;
                    report.rejected.push(format!("payload: {e}"));
                    break;
                }
            };
            let env = match frame::decode(bytes) {
                Ok(env) => env,
                Err(e) => {
                    self.store
                        .quarantine_received(bytes, &e.to_string(), now_ms)?;
                    report.rejected.push(e.to_string());
                    continue;
                }
            };
            if &env.from != sender {
                let why = format!(
                    "frame claiming to be from {} in a payload sealed by {sender}",
                    env.from
                );
                self.store.quarantine_received(bytes, &why, now_ms)?;
                report.rejected.push(why);
                continue;
            }
            if &env.to != self.me() || &env.from == self.me() {
                let why = format!("frame from {} addressed to {}", env.from, env.to);
                self.store.quarantine_received(bytes, &why, now_ms)?;
                report.rejected.push(why);
                continue;
            }
            match env.body {
                Body::Ack { upto } => {
                    self.store.apply_ack(&env.from, &env.lane, upto)?;
                    self.delivery.handle(
                        Event::Acked {
                            peer: env.from,
                            lane: env.lane,
                            upto,
                        },
                        now_ms,
                    );
                    report.acks += 1;
                }
                _ if env.seq == 0 => {
                    let why = format!("unsequenced frame from {}", env.from);
                    self.store.quarantine_received(bytes, &why, now_ms)?;
                    report.rejected.push(why);
                }
                _ => batch.push((env, bytes)),
            }
        }
        if batch.is_empty() {
            return Ok(report);
        }
        let receipts = self.store.receive(&batch)?;
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
                Receipt::Ahead { .. } | Receipt::NoSpace { .. } => report.deferred += 1,
            }
        }
        Ok(report)
    }

    /// Payloads to publish now, most urgent first, and any outbox frames found corrupt
    /// (already quarantined and replaced).
    pub fn poll_out(&mut self, now_ms: u64) -> Result<(Vec<OutPayload>, Vec<Corrupt>), StoreError> {
        let me = self.me().clone();
        let max = self.cfg.max_payload;
        let mut open: BTreeMap<Name, OutPayload> = BTreeMap::new();
        let mut done = Vec::new();
        let mut corrupt = Vec::new();
        let mut push = |to: &Name, bytes: &[u8], done: &mut Vec<OutPayload>| {
            let need = frame::packed_len(bytes.len());
            let p = open.entry(to.clone()).or_insert_with(|| OutPayload {
                to: to.clone(),
                bytes: Vec::new(),
                frames: 0,
            });
            if p.frames > 0 && p.bytes.len() + need > max {
                done.push(std::mem::replace(
                    p,
                    OutPayload {
                        to: to.clone(),
                        bytes: Vec::new(),
                        frames: 0,
                    },
                ));
            }
            p.bytes.extend_from_slice(&frame::pack([bytes]));
            p.frames += 1;
        };
        for action in self.delivery.poll(now_ms) {
            match action {
                Action::SendAck { peer, lane, upto } => {
                    let ack = Envelope {
                        from: me.clone(),
                        to: peer.clone(),
                        lane,
                        seq: 0,
                        created_ms: now_ms,
                        ttl_s: None,
                        body: Body::Ack { upto },
                    };
                    push(&peer, &frame::encode(&ack)?, &mut done);
                }
                Action::Send {
                    peer,
                    lane,
                    from,
                    to,
                } => {
                    let (frames, bad) = self.store.outbox_frames(&peer, &lane, from, to, now_ms)?;
                    corrupt.extend(bad);
                    for (_, bytes) in frames {
                        push(&peer, &bytes, &mut done);
                    }
                }
            }
        }
        done.extend(open.into_values().filter(|p| p.frames > 0));
        Ok((done, corrupt))
    }

    /// A publish to `peer` failed: send its unacknowledged frames again next time.
    pub fn unsent(&mut self, peer: &Name, now_ms: u64) {
        self.delivery
            .handle(Event::Unsent { peer: peer.clone() }, now_ms);
    }

    /// When [`Node::poll_out`] next has work without a new event.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.delivery.next_wakeup()
    }

    /// Received frames whose turn has come (see [`Store::runnable`]). Corrupt ones are
    /// quarantined and their senders told.
    pub fn runnable(&mut self, now_ms: u64) -> Result<(Vec<Inbound>, Vec<Corrupt>), StoreError> {
        let (ready, corrupt) = self.store.runnable(self.cfg.parallel, now_ms)?;
        if !corrupt.is_empty() {
            self.sync_streams()?;
        }
        Ok((ready, corrupt))
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

    /// Records a received result (or discard notice) and consumes its frame.
    pub fn record_result(
        &mut self,
        inbound: &Inbound,
        now_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        self.store.record_result(inbound, now_ms)
    }

    /// Records a report-only frame (e.g. a lost frame notice) and consumes it.
    pub fn record_event(
        &mut self,
        inbound: &Inbound,
        text: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.store.record_event(inbound, text, now_ms)
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
        }
    }

    /// Tells delivery about frames enqueued directly through the store.
    pub fn sync_streams(&mut self) -> Result<(), StoreError> {
        for s in self.store.out_streams()? {
            let event = Event::Enqueued {
                peer: s.peer,
                lane: s.lane,
                first_seq: s.acked + 1,
                last_seq: s.last_seq,
            };
            self.delivery.handle(event, 0);
        }
        Ok(())
    }
}

fn method_of(cmd: &Inbound) -> &'static str {
    match &cmd.env.body {
        Body::Command(c) => c.method(),
        _ => "none",
    }
}
