//! Delivery decisions: what to send, resend and acknowledge, and when.
//!
//! A pure state machine in the style of quinn-proto: it never reads the clock and
//! does no I/O. The caller feeds it [`Event`]s with `now`, asks [`Delivery::poll`] for
//! [`Action`]s in priority order, and sleeps until [`Delivery::next_wakeup`].
//! Losing this state is harmless: it is rebuilt from the store, and the worst a
//! fresh one does is resend frames the receiver then drops as duplicates.

use std::collections::BTreeMap;

use crate::frame::{Lane, LaneClass, Name};

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Frames of one stream in flight (sent, not acknowledged) at most.
    pub window: u64,
    /// The same for bulk lanes, whose frames are file chunks: small, so that a
    /// link cut resends little and memory stays flat.
    pub bulk_window: u64,
    /// Acknowledge after this many frames received on a stream...
    pub ack_every: u32,
    /// ...or this long after the first unacknowledged one, whichever comes first.
    pub ack_delay_ms: u64,
    /// Resend unacknowledged frames after this long without progress; doubles on
    /// every resend up to `rto_max_ms`.
    pub rto_min_ms: u64,
    pub rto_max_ms: u64,
    /// When an offline peer returns, frames that were in flight get this long to be
    /// acknowledged (its broker session usually redelivers them) before we resend.
    pub online_grace_ms: u64,
    /// A held stream (more results are about to follow, see [`Event::Hold`]) waits
    /// at most this long, or until this many frames are unsent, so that they share
    /// payloads instead of each paying for a seal and an MQTT header.
    pub hold_ms: u64,
    pub hold_max: u64,
    /// A peer said to be offline still gets its unacknowledged frames this long
    /// after it went quiet, then at the resend timer's pace: presence is a hint
    /// (anyone can publish it), never a reason to hold traffic for long.
    pub offline_probe_ms: u64,
    /// A peer asleep on an on-demand link (see [`Event::Asleep`]) is expected back
    /// at its next poll plus this, or a tenth of its poll interval if that is more,
    /// before frames in flight to it are sent again.
    pub asleep_grace_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            window: 256,
            bulk_window: 4,
            ack_every: 64,
            ack_delay_ms: 50,
            rto_min_ms: 10_000,
            rto_max_ms: 600_000,
            online_grace_ms: 3_000,
            hold_ms: 100,
            hold_max: 32,
            offline_probe_ms: 30_000,
            asleep_grace_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Our link to the broker came up: everything unacknowledged goes again.
    Connected,
    Disconnected,
    /// A peer's presence changed. While a peer is known offline nothing is sent to it
    /// (the store holds it); when it comes online its streams are resent.
    Presence {
        peer: Name,
        online: bool,
    },
    /// The peer is asleep on an on-demand link: it polls every `every_ms` and is
    /// next expected at `until_ms`; its broker session holds what we publish
    /// meanwhile. New frames still go at once (they wait there for its poll), but
    /// frames already sent are not sent again before it is expected back (plus
    /// `asleep_grace_ms`), nor when our own link reconnects: each copy would be
    /// one more duplicate the peer downloads on its poll. A peer that misses its
    /// poll gets one resend per poll interval. Any frame from the peer, or its
    /// presence turning online, ends this, as it ends `offline`.
    Asleep {
        peer: Name,
        until_ms: u64,
        every_ms: u64,
    },
    /// Publishing to this peer failed: what was handed out was not sent.
    Unsent {
        peer: Name,
    },
    /// Frames `first_seq..=last_seq` are in the outbox (after an enqueue, or from
    /// the store after a restart with `first_seq` one past the acknowledged).
    Enqueued {
        peer: Name,
        lane: Lane,
        first_seq: u64,
        last_seq: u64,
    },
    /// More frames for this stream are about to be queued (the receiver's commands
    /// that produce them are waiting to run): hold what is unsent for a little while
    /// (`hold_ms`, `hold_max`). A stream already held keeps its first deadline.
    Hold {
        peer: Name,
        lane: Lane,
    },
    /// Nothing more is about to follow: send what the stream holds now.
    Release {
        peer: Name,
        lane: Lane,
    },
    /// A budget or link window stopped this stream after frame `upto` (of what
    /// `poll` handed out): nothing more of it goes before `until_ms`, when the
    /// gate is asked again.
    Gated {
        peer: Name,
        lane: Lane,
        upto: u64,
        until_ms: u64,
    },
    /// The gate changed (released by the operator, a new plan): ask it again now.
    Ungated,
    /// The peer acknowledged frames up to `upto`.
    Acked {
        peer: Name,
        lane: Lane,
        upto: u64,
    },
    /// The peer has frames up to `upto` and asks for what follows again now.
    Nacked {
        peer: Name,
        lane: Lane,
        upto: u64,
    },
    /// Whether the streams with `peer` are synchronised (see `node`): nothing is
    /// sent to a peer, acknowledgements included, until they are. Every peer starts
    /// unsynchronised; on becoming synchronised everything unacknowledged goes.
    Synced {
        peer: Name,
        synced: bool,
    },
    /// We stored (or dropped as duplicate) a frame of the peer's stream; the store's
    /// watermark is now `watermark`. Duplicates mean the sender missed our ack.
    Received {
        peer: Name,
        lane: Lane,
        watermark: u64,
        duplicate: bool,
    },
}

/// What still needs the link (see [`Delivery::outstanding`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outstanding {
    /// Frames or acknowledgements that go as soon as the link can take them, to
    /// peers that can be sent to now (synchronised, not said to be offline).
    pub unsent: bool,
    /// Frames sent to a peer that is up (not offline, not asleep) and not yet
    /// acknowledged: its acknowledgement should come soon.
    pub unacked: bool,
}

/// What the caller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendAck {
        peer: Name,
        lane: Lane,
        upto: u64,
    },
    /// Send outbox frames `from..=to` of a stream, in order.
    Send {
        peer: Name,
        lane: Lane,
        from: u64,
        to: u64,
    },
}

type Key = (Name, Lane);

#[derive(Debug, Clone)]
struct Out {
    acked: u64,
    last: u64,
    /// Highest number handed out in the current round; rewinds to `acked` to resend.
    sent: u64,
    rto_ms: u64,
    /// Resend when this passes with frames still unacknowledged.
    deadline_ms: Option<u64>,
    /// Held (see [`Event::Hold`]): unsent frames wait until this time.
    hold_until_ms: Option<u64>,
    /// Stopped by the gate ([`Event::Gated`]) until this time.
    gated_until_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct PendingAck {
    upto: u64,
    n: u32,
    since_ms: u64,
    now: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Online,
    Offline,
    /// On an on-demand link, back at `until_ms` (see [`Event::Asleep`]).
    Asleep {
        until_ms: u64,
        every_ms: u64,
    },
}

#[derive(Debug)]
pub struct Delivery {
    cfg: DeliveryConfig,
    connected: bool,
    out: BTreeMap<Key, Out>,
    acks: BTreeMap<Key, PendingAck>,
    presence: BTreeMap<Name, Presence>,
    /// Peers whose streams are synchronised; everyone else is paused.
    synced: std::collections::BTreeSet<Name>,
}

impl Delivery {
    pub fn new(cfg: DeliveryConfig) -> Self {
        Delivery {
            cfg,
            connected: false,
            out: BTreeMap::new(),
            acks: BTreeMap::new(),
            presence: BTreeMap::new(),
            synced: std::collections::BTreeSet::new(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn handle(&mut self, event: Event, now_ms: u64) {
        match event {
            Event::Connected => {
                self.connected = true;
                for ((peer, _), s) in &mut self.out {
                    // What an asleep peer was sent waits in its broker session.
                    if !matches!(self.presence.get(peer), Some(Presence::Asleep { .. })) {
                        rewind(s, self.cfg.rto_min_ms);
                    }
                }
            }
            Event::Disconnected => self.connected = false,
            Event::Presence { peer, online: true } => self.heard_from(&peer, now_ms),
            Event::Unsent { peer } => {
                for ((p, _), s) in &mut self.out {
                    if *p == peer {
                        rewind(s, self.cfg.rto_min_ms);
                    }
                }
            }
            Event::Presence {
                peer,
                online: false,
            } => {
                self.presence.insert(peer, Presence::Offline);
            }
            Event::Asleep {
                peer,
                until_ms,
                every_ms,
            } => {
                let every_ms = every_ms.max(1);
                self.presence
                    .insert(peer, Presence::Asleep { until_ms, every_ms });
                self.hold_asleep();
            }
            Event::Enqueued {
                peer,
                lane,
                first_seq,
                last_seq,
            } => {
                let rto_ms = self.cfg.rto_min_ms;
                let s = self.out.entry((peer, lane)).or_insert(Out {
                    acked: first_seq.saturating_sub(1),
                    last: 0,
                    sent: first_seq.saturating_sub(1),
                    rto_ms,
                    deadline_ms: None,
                    hold_until_ms: None,
                    gated_until_ms: None,
                });
                s.last = s.last.max(last_seq);
            }
            Event::Hold { peer, lane } => {
                if let Some(s) = self.out.get_mut(&(peer, lane)) {
                    s.hold_until_ms.get_or_insert(now_ms + self.cfg.hold_ms);
                }
            }
            Event::Release { peer, lane } => {
                if let Some(s) = self.out.get_mut(&(peer, lane)) {
                    s.hold_until_ms = None;
                }
            }
            Event::Gated {
                peer,
                lane,
                upto,
                until_ms,
            } => {
                if let Some(s) = self.out.get_mut(&(peer, lane)) {
                    s.sent = upto.clamp(s.acked, s.sent);
                    s.gated_until_ms = Some(until_ms);
                    if s.sent == s.acked {
                        s.deadline_ms = None;
                    }
                }
            }
            Event::Ungated => {
                for s in self.out.values_mut() {
                    s.gated_until_ms = None;
                }
            }
            Event::Synced { peer, synced } => {
                if synced {
                    if self.synced.insert(peer.clone()) {
                        for ((p, _), s) in &mut self.out {
                            if *p == peer {
                                rewind(s, self.cfg.rto_min_ms);
                            }
                        }
                    }
                } else {
                    self.synced.remove(&peer);
                }
            }
            Event::Nacked { peer, lane, upto } => {
                let key = (peer.clone(), lane.clone());
                self.handle(Event::Acked { peer, lane, upto }, now_ms);
                if let Some(s) = self.out.get_mut(&key) {
                    rewind(s, self.cfg.rto_min_ms);
                }
            }
            Event::Acked { peer, lane, upto } => {
                self.heard_from(&peer, now_ms);
                let key = (peer, lane);
                let Some(s) = self.out.get_mut(&key) else {
                    return;
                };
                let upto = upto.min(s.last);
                if upto <= s.acked {
                    return;
                }
                s.acked = upto;
                s.sent = s.sent.max(upto);
                s.rto_ms = self.cfg.rto_min_ms;
                s.deadline_ms = (s.sent > s.acked).then_some(now_ms + s.rto_ms);
                if s.acked >= s.last {
                    self.out.remove(&key);
                }
            }
            Event::Received {
                peer,
                lane,
                watermark,
                duplicate,
            } => {
                self.heard_from(&peer, now_ms);
                let lane_class = lane.class();
                let a = self.acks.entry((peer, lane)).or_insert(PendingAck {
                    upto: 0,
                    n: 0,
                    since_ms: now_ms,
                    now: false,
                });
                if a.n == 0 && !a.now {
                    a.since_ms = now_ms;
                }
                a.upto = a.upto.max(watermark);
                a.n += 1;
                // Bulk senders keep only a few frames in flight: ack them promptly.
                a.now |= duplicate || (lane_class == LaneClass::Bulk && a.n >= 2);
            }
        }
    }

    /// What to do at `now`, most urgent first: acknowledgements, then frames of the
    /// control lane, ordered lanes, parallel lanes, and bulk lanes last.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.connected {
            return actions;
        }
        let mut sends: Vec<(LaneClass, Action)> = Vec::new();
        for ((peer, lane), s) in &mut self.out {
            if !self.synced.contains(peer) {
                continue;
            }
            match s.gated_until_ms {
                Some(t) if now_ms < t => continue,
                Some(_) => s.gated_until_ms = None,
                None => {}
            }
            let offline = self.presence.get(peer) == Some(&Presence::Offline);
            if offline && s.deadline_ms.is_none_or(|d| now_ms < d) {
                // Paused, but not for long: presence can be stale (a last will
                // that overtook the peer's reconnect) or forged, so probe soon.
                s.deadline_ms
                    .get_or_insert(now_ms + self.cfg.offline_probe_ms);
                continue;
            }
            if let Some(deadline) = s.deadline_ms {
                if now_ms >= deadline && s.sent > s.acked {
                    // No progress for a whole timeout: assume the round was lost.
                    s.sent = s.acked;
                    s.rto_ms = (s.rto_ms * 2).min(self.cfg.rto_max_ms);
                    s.deadline_ms = None;
                }
            }
            let window = if lane.class() == LaneClass::Bulk {
                self.cfg.bulk_window
            } else {
                self.cfg.window
            };
            let limit = s.last.min(s.acked + window);
            if let Some(until) = s.hold_until_ms {
                // Hold while everything queued fits the window and is too little
                // to fill a payload; a full window would only be held up.
                if now_ms < until
                    && s.last <= limit
                    && s.last - s.sent.min(limit) < self.cfg.hold_max
                {
                    continue;
                }
                s.hold_until_ms = None;
            }
            if s.sent < limit {
                sends.push((
                    lane.class(),
                    Action::Send {
                        peer: peer.clone(),
                        lane: lane.clone(),
                        from: s.sent + 1,
                        to: limit,
                    },
                ));
                s.sent = limit;
                if s.deadline_ms.is_none() {
                    s.deadline_ms = Some(now_ms + s.rto_ms);
                }
            }
        }
        // An ack that is not due yet rides along when frames go to its peer anyway:
        // the payload is being sealed and published regardless, the ack costs a few
        // bytes inside it instead of a payload of its own later.
        let sending: Vec<&Name> = sends
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Send { peer, .. } => Some(peer),
                Action::SendAck { .. } => None,
            })
            .collect();
        let due: Vec<Key> = self
            .acks
            .iter()
            .filter(|(k, a)| {
                self.synced.contains(&k.0)
                    && (a.now
                        || a.n >= self.cfg.ack_every
                        || now_ms >= a.since_ms + self.cfg.ack_delay_ms
                        || sending.contains(&&k.0))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(a) = self.acks.remove(&key) {
                actions.push(Action::SendAck {
                    peer: key.0,
                    lane: key.1,
                    upto: a.upto,
                });
            }
        }
        sends.sort_by_key(|(class, _)| *class);
        actions.extend(sends.into_iter().map(|(_, a)| a));
        // After the resends above: one that was overdue went once, and waits again.
        self.wake_overdue(now_ms);
        self.hold_asleep();
        actions
    }

    /// When `poll` next has something to do without a new event, if ever.
    pub fn next_wakeup(&self) -> Option<u64> {
        if !self.connected {
            return None;
        }
        let acks = self
            .acks
            .iter()
            .filter(|(k, _)| self.synced.contains(&k.0))
            .map(|(_, a)| {
                if a.now {
                    a.since_ms
                } else {
                    a.since_ms + self.cfg.ack_delay_ms
                }
            });
        let resends = self.out.iter().filter_map(|((peer, _), s)| {
            if !self.synced.contains(peer) {
                return None;
            }
            if let Some(t) = s.gated_until_ms {
                // Nothing of it goes, resends included, until the gate is asked again.
                return Some(t);
            }
            let offline = self.presence.get(peer) == Some(&Presence::Offline);
            match s.deadline_ms {
                // The next poll arms the slow probe timer.
                None if offline => Some(0),
                Some(d) if offline || s.sent > s.acked => Some(d),
                _ => None,
            }
        });
        // Held frames go when the hold ends.
        let holds = self
            .out
            .iter()
            .filter(|((peer, _), s)| {
                s.sent < s.last
                    && s.gated_until_ms.is_none()
                    && self.synced.contains(peer)
                    && self.presence.get(peer) != Some(&Presence::Offline)
            })
            .filter_map(|(_, s)| s.hold_until_ms);
        acks.chain(resends).chain(holds).min()
    }

    /// Any frame from a peer proves it is online. Frames it has not been sent go
    /// at once; frames in flight when it left get a grace period first, because
    /// its broker session usually redelivers them and resending would double them.
    fn heard_from(&mut self, peer: &Name, now_ms: u64) {
        let before = self.presence.insert(peer.clone(), Presence::Online);
        if matches!(before, Some(Presence::Offline | Presence::Asleep { .. })) {
            for ((p, _), s) in &mut self.out {
                if p == peer {
                    s.rto_ms = self.cfg.rto_min_ms;
                    s.deadline_ms = (s.sent > s.acked).then_some(now_ms + self.cfg.online_grace_ms);
                }
            }
        }
    }

    /// Frames in flight to an asleep peer wait until it is expected back (see
    /// [`Event::Asleep`]).
    fn hold_asleep(&mut self) {
        for ((peer, _), s) in &mut self.out {
            let Some(&Presence::Asleep { until_ms, every_ms }) = self.presence.get(peer) else {
                continue;
            };
            if s.sent > s.acked {
                let back = until_ms + asleep_grace(&self.cfg, every_ms);
                s.deadline_ms = Some(s.deadline_ms.map_or(back, |d| d.max(back)));
            }
        }
    }

    /// An asleep peer that missed its poll (and grace) is expected at the next
    /// one: what was in flight to it went once more (the caller's poll), and
    /// waits again.
    fn wake_overdue(&mut self, now_ms: u64) {
        for p in self.presence.values_mut() {
            if let Presence::Asleep { until_ms, every_ms } = p {
                let grace = asleep_grace(&self.cfg, *every_ms);
                if now_ms >= *until_ms + grace {
                    let missed = (now_ms - *until_ms - grace) / *every_ms + 1;
                    *until_ms += missed * *every_ms;
                }
            }
        }
    }

    /// Takes the store's view of every stream with unacknowledged frames, as
    /// `(peer, lane, acked, last)`: new streams are added, known ones set to it
    /// (timers kept when it only moved forward), and streams the store no longer
    /// lists are dropped.
    pub fn reconcile(&mut self, streams: Vec<(Name, Lane, u64, u64)>) {
        let listed: std::collections::BTreeSet<Key> = streams
            .iter()
            .map(|(p, l, _, _)| (p.clone(), l.clone()))
            .collect();
        self.out.retain(|k, _| listed.contains(k));
        let rto_ms = self.cfg.rto_min_ms;
        for (peer, lane, acked, last) in streams {
            let s = self.out.entry((peer, lane)).or_insert(Out {
                acked,
                last,
                sent: acked,
                rto_ms,
                deadline_ms: None,
                hold_until_ms: None,
                gated_until_ms: None,
            });
            s.last = s.last.max(last);
            if acked > s.acked {
                s.acked = acked;
                s.sent = s.sent.max(acked);
            } else if acked < s.acked {
                // The store is the truth: what it still holds goes again.
                s.acked = acked;
                rewind(s, rto_ms);
            }
        }
    }

    /// Whether frames wait to go to `peer` (sent or not).
    pub fn has_work_for(&self, peer: &Name) -> bool {
        self.out.keys().any(|(p, _)| p == peer) || self.acks.keys().any(|(p, _)| p == peer)
    }

    /// What still needs the link, for an on-demand link deciding whether it may
    /// hang up: see [`Outstanding`].
    pub fn outstanding(&self) -> Outstanding {
        let mut o = Outstanding::default();
        for ((peer, lane), s) in &self.out {
            if !self.synced.contains(peer) {
                continue;
            }
            let window = if lane.class() == LaneClass::Bulk {
                self.cfg.bulk_window
            } else {
                self.cfg.window
            };
            // A full window waits for acknowledgements, not for the link; a
            // stream the gate stopped waits for its time (or the next poll).
            let limit = if s.gated_until_ms.is_some() {
                s.sent
            } else {
                s.last.min(s.acked + window)
            };
            match self.presence.get(peer) {
                // Held until the probe: nothing goes now.
                Some(Presence::Offline) => {}
                // New frames go at once; nothing comes back before its poll.
                Some(Presence::Asleep { .. }) => o.unsent |= s.sent < limit,
                Some(Presence::Online) | None => {
                    o.unsent |= s.sent < limit;
                    o.unacked |= s.sent > s.acked;
                }
            }
        }
        o.unsent |= self.acks.keys().any(|(p, _)| self.synced.contains(p));
        o
    }

    /// Streams with unacknowledged frames: (peer, lane, acked, last).
    pub fn backlog(&self) -> impl Iterator<Item = (&Name, &Lane, u64, u64)> {
        self.out.iter().map(|((p, l), s)| (p, l, s.acked, s.last))
    }
}

fn asleep_grace(cfg: &DeliveryConfig, every_ms: u64) -> u64 {
    cfg.asleep_grace_ms.max(every_ms / 10)
}

fn rewind(s: &mut Out, rto_min_ms: u64) {
    s.sent = s.acked;
    s.rto_ms = rto_min_ms;
    s.deadline_ms = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }
    fn l(s: &str) -> Lane {
        Lane::new(s).unwrap()
    }

    fn connected() -> Delivery {
        let mut d = Delivery::new(DeliveryConfig {
            window: 10,
            ..DeliveryConfig::default()
        });
        d.handle(Event::Connected, 0);
        synced(&mut d);
        d
    }

    fn synced(d: &mut Delivery) {
        for p in ["a", "b"] {
            d.handle(
                Event::Synced {
                    peer: n(p),
                    synced: true,
                },
                0,
            );
        }
    }

    fn send(peer: &str, lane: &str, from: u64, to: u64) -> Action {
        Action::Send {
            peer: n(peer),
            lane: l(lane),
            from,
            to,
        }
    }

    #[test]
    fn a_gated_stream_waits_for_its_time_and_sleeps_meanwhile() {
        let mut d = connected();
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("bulk"),
                first_seq: 1,
                last_seq: 3,
            },
            0,
        );
        assert_eq!(d.poll(0), vec![send("a", "bulk", 1, 3)]);
        // The gate let frame 1 go, not 2 and 3.
        d.handle(
            Event::Gated {
                peer: n("a"),
                lane: l("bulk"),
                upto: 1,
                until_ms: 60_000,
            },
            0,
        );
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("bulk"),
                upto: 1,
            },
            5,
        );
        assert_eq!(d.poll(10), vec![]);
        assert_eq!(d.next_wakeup(), Some(60_000), "no resend timer while gated");
        assert_eq!(d.poll(60_000), vec![send("a", "bulk", 2, 3)]);
        // Released by the operator: at once.
        d.handle(
            Event::Gated {
                peer: n("a"),
                lane: l("bulk"),
                upto: 1,
                until_ms: 120_000,
            },
            60_000,
        );
        d.handle(Event::Ungated, 60_001);
        assert_eq!(d.poll(60_001), vec![send("a", "bulk", 2, 3)]);
    }

    #[test]
    fn sends_up_to_the_window_then_more_as_acks_arrive() {
        let mut d = connected();
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 25,
            },
            0,
        );
        assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 10)]);
        assert_eq!(d.poll(1), vec![]);
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("ordered"),
                upto: 4,
            },
            2,
        );
        assert_eq!(d.poll(2), vec![send("a", "ordered", 11, 14)]);
    }

    #[test]
    fn nothing_is_sent_while_disconnected_and_all_unacked_goes_on_reconnect() {
        let mut d = connected();
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 3,
            },
            0,
        );
        assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 3)]);
        d.handle(Event::Disconnected, 1);
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 4,
                last_seq: 5,
            },
            1,
        );
        assert_eq!(d.poll(2), vec![]);
        assert_eq!(d.next_wakeup(), None);
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("ordered"),
                upto: 1,
            },
            3,
        );
        d.handle(Event::Connected, 4);
        assert_eq!(d.poll(4), vec![send("a", "ordered", 2, 5)]);
    }

    #[test]
    fn resends_after_timeout_with_doubling_backoff() {
        let mut d = connected();
        let rto = DeliveryConfig::default().rto_min_ms;
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 2,
            },
            0,
        );
        assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 2)]);
        assert_eq!(d.next_wakeup(), Some(rto));
        assert_eq!(d.poll(rto - 1), vec![]);
        assert_eq!(d.poll(rto), vec![send("a", "ordered", 1, 2)]);
        assert_eq!(d.next_wakeup(), Some(rto + 2 * rto));
        // Progress resets the timer to the minimum.
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("ordered"),
                upto: 1,
            },
            rto + 5,
        );
        assert_eq!(d.next_wakeup(), Some(rto + 5 + rto));
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("ordered"),
                upto: 2,
            },
            rto + 6,
        );
        assert_eq!(d.next_wakeup(), None);
        assert_eq!(d.backlog().count(), 0);
    }

    #[test]
    fn offline_peers_wait_and_are_resent_when_they_come_online() {
        let mut d = connected();
        d.handle(
            Event::Presence {
                peer: n("a"),
                online: false,
            },
            0,
        );
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 2,
            },
            0,
        );
        d.handle(
            Event::Enqueued {
                peer: n("b"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 1,
            },
            0,
        );
        assert_eq!(d.poll(0), vec![send("b", "ordered", 1, 1)]);
        d.handle(
            Event::Presence {
                peer: n("a"),
                online: true,
            },
            1,
        );
        assert_eq!(d.poll(1), vec![send("a", "ordered", 1, 2)]);
        // Online again while already online: no duplicate round.
        d.handle(
            Event::Presence {
                peer: n("a"),
                online: true,
            },
            2,
        );
        assert_eq!(d.poll(2), vec![]);
    }

    #[test]
    fn a_held_stream_waits_for_more_frames_until_its_limits_or_a_release() {
        let cfg = DeliveryConfig::default();
        let mut d = Delivery::new(cfg.clone());
        d.handle(Event::Connected, 0);
        synced(&mut d);
        let queue = |d: &mut Delivery, seq: u64, now: u64| {
            d.handle(
                Event::Enqueued {
                    peer: n("a"),
                    lane: l("ordered"),
                    first_seq: seq,
                    last_seq: seq,
                },
                now,
            );
            d.handle(
                Event::Hold {
                    peer: n("a"),
                    lane: l("ordered"),
                },
                now,
            );
        };
        queue(&mut d, 1, 0);
        queue(&mut d, 2, 10);
        assert_eq!(d.poll(10), vec![]);
        // The first hold's deadline stands; later holds do not push it out.
        assert_eq!(d.next_wakeup(), Some(cfg.hold_ms));
        assert_eq!(d.poll(cfg.hold_ms), vec![send("a", "ordered", 1, 2)]);
        // Held again, until enough frames are waiting to fill a payload.
        for seq in 3..3 + cfg.hold_max {
            queue(&mut d, seq, 200);
        }
        assert_eq!(d.poll(200), vec![send("a", "ordered", 3, 2 + cfg.hold_max)]);
        // A release sends at once.
        let next = 3 + cfg.hold_max;
        queue(&mut d, next, 300);
        assert_eq!(d.poll(300), vec![]);
        d.handle(
            Event::Release {
                peer: n("a"),
                lane: l("ordered"),
            },
            301,
        );
        assert_eq!(d.poll(301), vec![send("a", "ordered", next, next)]);
    }

    #[test]
    fn an_ack_not_yet_due_rides_with_frames_to_the_same_peer_only() {
        let mut d = connected();
        for peer in ["a", "b"] {
            d.handle(
                Event::Received {
                    peer: n(peer),
                    lane: l("ordered"),
                    watermark: 1,
                    duplicate: false,
                },
                0,
            );
        }
        assert_eq!(d.poll(1), vec![], "neither ack is due yet");
        // A result for `a` is queued: its ack goes in the same poll, `b`'s waits.
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 1,
            },
            2,
        );
        assert_eq!(
            d.poll(2),
            vec![
                Action::SendAck {
                    peer: n("a"),
                    lane: l("ordered"),
                    upto: 1
                },
                send("a", "ordered", 1, 1)
            ]
        );
        assert_eq!(
            d.next_wakeup(),
            Some(DeliveryConfig::default().ack_delay_ms)
        );
    }

    #[test]
    fn acks_are_batched_by_count_or_delay_and_duplicates_reack_at_once() {
        let mut d = connected();
        let cfg = DeliveryConfig::default();
        for i in 1..cfg.ack_every as u64 {
            d.handle(
                Event::Received {
                    peer: n("a"),
                    lane: l("ordered"),
                    watermark: i,
                    duplicate: false,
                },
                0,
            );
        }
        assert_eq!(d.poll(0), vec![]);
        assert_eq!(d.next_wakeup(), Some(cfg.ack_delay_ms));
        assert_eq!(
            d.poll(cfg.ack_delay_ms),
            vec![Action::SendAck {
                peer: n("a"),
                lane: l("ordered"),
                upto: 63
            }]
        );
        for i in 64..64 + cfg.ack_every as u64 {
            d.handle(
                Event::Received {
                    peer: n("a"),
                    lane: l("ordered"),
                    watermark: i,
                    duplicate: false,
                },
                100,
            );
        }
        assert_eq!(
            d.poll(100),
            vec![Action::SendAck {
                peer: n("a"),
                lane: l("ordered"),
                upto: 127
            }]
        );
        d.handle(
            Event::Received {
                peer: n("a"),
                lane: l("ordered"),
                watermark: 127,
                duplicate: true,
            },
            200,
        );
        assert_eq!(
            d.poll(200),
            vec![Action::SendAck {
                peer: n("a"),
                lane: l("ordered"),
                upto: 127
            }]
        );
    }

    #[test]
    fn acks_go_first_and_bulk_goes_last() {
        let mut d = connected();
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("bulk"),
                first_seq: 1,
                last_seq: 1,
            },
            0,
        );
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("parallel"),
                first_seq: 1,
                last_seq: 1,
            },
            0,
        );
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 1,
            },
            0,
        );
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("control"),
                first_seq: 1,
                last_seq: 1,
            },
            0,
        );
        d.handle(
            Event::Received {
                peer: n("b"),
                lane: l("ordered"),
                watermark: 1,
                duplicate: true,
            },
            0,
        );
        assert_eq!(
            d.poll(0),
            vec![
                Action::SendAck {
                    peer: n("b"),
                    lane: l("ordered"),
                    upto: 1
                },
                send("a", "control", 1, 1),
                send("a", "ordered", 1, 1),
                send("a", "parallel", 1, 1),
                send("a", "bulk", 1, 1),
            ]
        );
    }

    fn asleep(d: &mut Delivery, peer: &str, until_ms: u64, every_ms: u64, now: u64) {
        d.handle(
            Event::Asleep {
                peer: n(peer),
                until_ms,
                every_ms,
            },
            now,
        );
    }

    fn enqueue(d: &mut Delivery, peer: &str, first_seq: u64, last_seq: u64, now: u64) {
        d.handle(
            Event::Enqueued {
                peer: n(peer),
                lane: l("ordered"),
                first_seq,
                last_seq,
            },
            now,
        );
    }

    const POLL: u64 = 1_800_000;

    #[test]
    fn an_asleep_peer_gets_new_frames_at_once_and_no_resend_before_its_poll() {
        let mut d = connected();
        let until = 600_000;
        // Its grace is a tenth of its poll interval, three minutes here.
        let back = until + POLL / 10;
        asleep(&mut d, "a", until, POLL, 0);
        enqueue(&mut d, "a", 1, 2, 0);
        // The first copy goes: the peer's broker session holds it for the poll.
        assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 2)]);
        assert_eq!(d.next_wakeup(), Some(back));
        // Not at the resend timer's pace, nor at the offline probe's.
        for t in [10_000, 30_000, 599_999, back - 1] {
            assert_eq!(d.poll(t), vec![], "at {t}");
        }
        // Our own reconnect sends nothing again either: it waits in the session.
        d.handle(Event::Disconnected, 100_000);
        d.handle(Event::Connected, 100_001);
        assert_eq!(d.poll(100_001), vec![]);
        // More frames queued meanwhile go, once.
        enqueue(&mut d, "a", 3, 3, 200_000);
        assert_eq!(d.poll(200_000), vec![send("a", "ordered", 3, 3)]);
        assert_eq!(d.poll(200_001), vec![]);
        assert_eq!(
            d.outstanding(),
            Outstanding {
                unsent: false,
                unacked: false
            },
            "nothing that an asleep peer answers holds our link"
        );
    }

    #[test]
    fn an_asleep_peer_that_misses_its_poll_gets_one_resend_per_interval() {
        let mut d = connected();
        let until = 600_000;
        let back = until + POLL / 10;
        asleep(&mut d, "a", until, POLL, 0);
        enqueue(&mut d, "a", 1, 1, 0);
        assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 1)]);
        assert_eq!(d.poll(back), vec![send("a", "ordered", 1, 1)]);
        // Expected at its next poll now: nothing more until then.
        assert_eq!(d.next_wakeup(), Some(back + POLL));
        assert_eq!(d.poll(back + 60_000), vec![]);
        assert_eq!(d.poll(back + POLL - 1), vec![]);
        assert_eq!(d.poll(back + POLL), vec![send("a", "ordered", 1, 1)]);
    }

    #[test]
    fn an_asleep_peer_is_awake_again_when_it_is_heard_from() {
        for wake in ["presence", "frame"] {
            let mut d = connected();
            asleep(&mut d, "a", 600_000, POLL, 0);
            enqueue(&mut d, "a", 1, 2, 0);
            assert_eq!(d.poll(0), vec![send("a", "ordered", 1, 2)]);
            let t = 5_000;
            match wake {
                "presence" => d.handle(
                    Event::Presence {
                        peer: n("a"),
                        online: true,
                    },
                    t,
                ),
                _ => d.handle(
                    Event::Received {
                        peer: n("a"),
                        lane: l("ordered"),
                        watermark: 1,
                        duplicate: false,
                    },
                    t,
                ),
            }
            // Its session usually redelivers: the grace first, then a resend.
            let grace = DeliveryConfig::default().online_grace_ms;
            let out = d.poll(t + grace);
            assert!(out.contains(&send("a", "ordered", 1, 2)), "{wake}: {out:?}");
            assert_eq!(
                d.outstanding(),
                Outstanding {
                    unsent: false,
                    unacked: true
                },
                "{wake}"
            );
        }
    }

    #[test]
    fn outstanding_counts_what_the_link_still_has_to_carry() {
        let mut d = connected();
        assert_eq!(d.outstanding(), Outstanding::default());
        enqueue(&mut d, "a", 1, 1, 0);
        assert!(d.outstanding().unsent);
        d.poll(0);
        assert_eq!(
            d.outstanding(),
            Outstanding {
                unsent: false,
                unacked: true
            }
        );
        // A peer said to be offline holds nothing up: its frames wait for the probe.
        d.handle(
            Event::Presence {
                peer: n("a"),
                online: false,
            },
            1,
        );
        enqueue(&mut d, "a", 2, 2, 1);
        assert_eq!(d.outstanding(), Outstanding::default());
        // An acknowledgement owed goes as soon as it can.
        d.handle(
            Event::Received {
                peer: n("b"),
                lane: l("ordered"),
                watermark: 1,
                duplicate: false,
            },
            2,
        );
        assert!(d.outstanding().unsent);
    }

    #[test]
    fn forged_ack_past_the_end_is_clamped() {
        let mut d = connected();
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 1,
                last_seq: 2,
            },
            0,
        );
        d.poll(0);
        d.handle(
            Event::Acked {
                peer: n("a"),
                lane: l("ordered"),
                upto: 1_000,
            },
            1,
        );
        assert_eq!(d.backlog().count(), 0);
        d.handle(
            Event::Enqueued {
                peer: n("a"),
                lane: l("ordered"),
                first_seq: 3,
                last_seq: 3,
            },
            2,
        );
        assert_eq!(d.poll(2), vec![send("a", "ordered", 3, 3)]);
    }
}
