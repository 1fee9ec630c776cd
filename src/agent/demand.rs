//! The on-demand link (`link = "on-demand"`): when this node wants the broker,
//! and what its presence says about when it is back.
//!
//! An always-on link is never told anything here. An on-demand one is up
//! (connecting or connected) when the agent starts, when `poll` has passed since
//! it hung up (to fetch what waits in its persistent broker session, which holds
//! the QoS 1 messages published to it meanwhile), and when frames were queued for
//! a peer since it hung up (a result, an error report, a file chunk: anything in
//! the outbox that was not there then). It hangs up after `linger` of quiet:
//!
//! - nothing unsent and no acknowledgement owed to a peer that can take it now
//!   (`Node::outstanding`: those go at once, so the link waits for them);
//! - no message in or out for `linger`;
//! - no command running and nothing unacknowledged by a peer that is up, or else
//!   at most [`HOLD_LINGERS`] lingers (5 minutes at the defaults) after the last
//!   message received: a result that comes later wakes the link again (it is a
//!   new frame), and a reconnect costs about what that many keepalives do;
//! - a link that cannot connect gives up after as long, until the next poll.
//!
//! Hanging up publishes this node's presence, retained, as
//! `offline next=UNIX_SECONDS every=SECONDS` (the next poll, on this node's
//! clock, and the interval), then a clean DISCONNECT, so the broker discards the
//! last will, which is `offline every=SECONDS` (a crash: back within an interval,
//! when the restarted agent polls). Connecting publishes `online`, as every agent
//! does. Receivers that know only `online` and `offline` ignore the longer forms,
//! as they ignore anything else. To a receiver this is a hint, never trusted for
//! more than scheduling (see `Node::on_asleep`: bounded, ended by any frame).
//! An on-demand node does not subscribe to its own presence: the retained
//! farewell would come back on every poll, and the forged-offline repair it
//! serves matters less than those bytes for a node that is mostly away.
//!
//! The policy ([`Demand`]) is pure: it takes the time on a monotonic clock (ms
//! since the agent started) and what the node has ([`Work`]), and says what to do
//! ([`Decision`]); the `Agent` methods at the end are the glue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Agent;
use crate::config::{format_duration, Config, LinkMode};
use crate::delivery::Outstanding;
use crate::frame::{Lane, Name};
use crate::link::{LinkEvent, Retained};
use crate::{error, info};

/// A running command or an acknowledgement owed by a peer that is up keeps an
/// on-demand link up at most this many lingers after the last message received.
pub(super) const HOLD_LINGERS: u64 = 10;
/// Presence payloads longer than this are not read.
const MAX_PRESENCE: usize = 128;

/// What this node has that may need the link, as the agent sees it now.
#[derive(Debug, Default)]
pub(super) struct Work {
    pub(super) outstanding: Outstanding,
    pub(super) running: usize,
    /// Streams with unacknowledged frames: (peer, lane, acked, last).
    pub(super) backlog: Vec<(Name, Lane, u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    HangUp,
    Wake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Wanted since `since`; connected since `connected`. `last_in` is the last
    /// message received, `last_traffic` the last message either way.
    Up {
        since: u64,
        connected: Option<u64>,
        last_in: u64,
        last_traffic: u64,
    },
    /// Hung up; polls at `next_poll`.
    Idle { next_poll: u64 },
}

/// The policy of an on-demand link; does nothing for an always-on one.
#[derive(Debug)]
pub(super) struct Demand {
    on_demand: bool,
    poll_ms: u64,
    linger_ms: u64,
    /// The monotonic clock's zero.
    start: Instant,
    state: State,
    /// Each stream's last sequence number when the link hung up: only frames
    /// queued after that wake it (what was held then goes on the next poll).
    seen: BTreeMap<(Name, Lane), u64>,
}

impl Demand {
    pub(super) fn new(cfg: &Config) -> Demand {
        Demand {
            on_demand: cfg.link == LinkMode::OnDemand,
            poll_ms: cfg.poll.as_millis() as u64,
            linger_ms: cfg.linger.as_millis() as u64,
            start: Instant::now(),
            // Starting is a poll: the link thread connects at once.
            state: State::Up {
                since: 0,
                connected: None,
                last_in: 0,
                last_traffic: 0,
            },
            seen: BTreeMap::new(),
        }
    }

    pub(super) fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// Milliseconds on the monotonic clock.
    pub(super) fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Notes what the link did: a connect, a drop, a message in, a publish the
    /// broker took.
    pub(super) fn saw(&mut self, event: &LinkEvent, now: u64) {
        let State::Up {
            since,
            connected,
            last_in,
            last_traffic,
        } = &mut self.state
        else {
            return;
        };
        match event {
            LinkEvent::Connected { .. } => {
                *connected = Some(now);
                *last_in = now;
                *last_traffic = now;
            }
            LinkEvent::Disconnected { .. } => {
                // Dropped mid-poll: give it as long again to come back.
                if connected.take().is_some() {
                    *since = now;
                }
            }
            LinkEvent::Message { .. } => {
                *last_in = now;
                *last_traffic = now;
            }
            LinkEvent::Published => *last_traffic = now,
            LinkEvent::Poisoned { .. } | LinkEvent::Idle => {}
        }
    }

    /// What to do now, if anything; the state moves with the decision.
    pub(super) fn decide(&mut self, work: &Work, now: u64) -> Option<Decision> {
        if !self.on_demand {
            return None;
        }
        match self.state {
            State::Idle { next_poll } => {
                let queued = work.backlog.iter().any(|(p, l, _, last)| {
                    self.seen
                        .get(&(p.clone(), l.clone()))
                        .is_none_or(|seen| last > seen)
                });
                if now < next_poll && !queued {
                    return None;
                }
                self.state = State::Up {
                    since: now,
                    connected: None,
                    last_in: now,
                    last_traffic: now,
                };
                Some(Decision::Wake)
            }
            State::Up { .. } => {
                if now < self.hang_up_at(work)? {
                    return None;
                }
                self.seen = work
                    .backlog
                    .iter()
                    .map(|(p, l, _, last)| ((p.clone(), l.clone()), *last))
                    .collect();
                self.state = State::Idle {
                    next_poll: now + self.poll_ms,
                };
                Some(Decision::HangUp)
            }
        }
    }

    /// When [`Demand::decide`] may have something to do without a new event.
    pub(super) fn deadline(&self, work: &Work) -> Option<u64> {
        if !self.on_demand {
            return None;
        }
        match self.state {
            State::Idle { next_poll } => Some(next_poll),
            State::Up { .. } => self.hang_up_at(work),
        }
    }

    /// When a link that is up should hang up, given `work`; `None` while it has
    /// something to send now (the events of sending it come back here).
    fn hang_up_at(&self, work: &Work) -> Option<u64> {
        let State::Up {
            since,
            connected,
            last_in,
            last_traffic,
        } = self.state
        else {
            return None;
        };
        let hold = HOLD_LINGERS * self.linger_ms;
        let Some(connected) = connected else {
            return Some(since + hold);
        };
        if work.outstanding.unsent {
            return None;
        }
        if work.running > 0 || work.outstanding.unacked {
            return Some(connected.max(last_in) + hold);
        }
        Some(connected.max(last_traffic) + self.linger_ms)
    }

    /// When the next poll is, while the link is idle.
    pub(super) fn next_poll(&self) -> Option<u64> {
        match self.state {
            State::Idle { next_poll } => Some(next_poll),
            State::Up { .. } => None,
        }
    }
}

/// The last will's payload: `offline`, or `offline every=SECONDS` on an
/// on-demand link.
pub(super) fn will(cfg: &Config) -> Vec<u8> {
    match cfg.link {
        LinkMode::Always => b"offline".to_vec(),
        LinkMode::OnDemand => format!("offline every={}", cfg.poll.as_secs().max(1)).into_bytes(),
    }
}

/// What a presence message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heard {
    Online,
    Offline,
    /// Away on an on-demand link: polls every `every_ms`, next at `next_ms` (the
    /// sender's clock; `None` from a last will).
    Asleep {
        next_ms: Option<u64>,
        every_ms: u64,
    },
}

/// Reads `online`, `offline` and `offline next=UNIX_SECONDS every=SECONDS`
/// (either key may be missing; unknown keys are skipped, so later versions may
/// add some). An `offline` without a valid `every` is plain offline; anything
/// else is not presence (`None`).
pub(super) fn parse_presence(payload: &[u8]) -> Option<Heard> {
    if payload.len() > MAX_PRESENCE {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.split(' ');
    match words.next()? {
        "online" => Some(Heard::Online),
        "offline" => {
            let (mut next_ms, mut every_ms) = (None, None);
            for word in words {
                let secs = |v: &str| v.parse::<u64>().ok()?.checked_mul(1000);
                match word.split_once('=') {
                    Some(("next", v)) => next_ms = secs(v),
                    Some(("every", v)) => every_ms = secs(v).filter(|&ms| ms > 0),
                    _ => {}
                }
            }
            Some(match every_ms {
                Some(every_ms) => Heard::Asleep { next_ms, every_ms },
                None => Heard::Offline,
            })
        }
        _ => None,
    }
}

/// What `send` says about an on-demand node that is away.
pub(super) fn away_note(name: &Name, polls: &crate::store::Polls, now_ms: u64) -> String {
    let every = format_duration(Duration::from_millis(polls.every_ms));
    let at = crate::config::format_utc(polls.next_ms, now_ms);
    if polls.next_ms + polls.every_ms / 10 < now_ms {
        format!("{name} polls every {every}; it was expected at {at} and has not polled since; queued until it does")
    } else {
        format!("{name} polls every {every}; next expected {at}")
    }
}

impl Agent {
    /// What the node has that may need the link.
    fn work(&self) -> Work {
        Work {
            outstanding: self.node.outstanding(),
            running: self.running.len(),
            backlog: self.node.backlog(),
        }
    }

    /// Notes a link event for the on-demand policy.
    pub(super) fn demand_saw(&mut self, event: &LinkEvent) {
        let now = self.demand.now();
        self.demand.saw(event, now);
    }

    /// Hangs the link up or wakes it, when the policy says so (after every
    /// message and deadline: `drive`).
    pub(super) fn demand_step(&mut self, now_ms: u64) {
        if !self.demand.on_demand() || self.stopping.is_some() {
            return;
        }
        let work = self.work();
        let now = self.demand.now();
        match self.demand.decide(&work, now) {
            None => {}
            Some(Decision::Wake) => {
                info!("on-demand link: connecting");
                self.link.wake();
            }
            Some(Decision::HangUp) => {
                let next_ms = now_ms + self.demand.next_poll().unwrap_or(now).saturating_sub(now);
                let payload = format!(
                    "offline next={} every={}",
                    next_ms.div_ceil(1000),
                    self.cfg.poll.as_secs().max(1)
                );
                info!(
                    "on-demand link: quiet, hanging up until {} at the latest",
                    crate::config::format_utc(next_ms, now_ms)
                );
                let topic = self.cfg.presence_topic(&self.cfg.name);
                let farewell = match self.poisoned {
                    // Presence is off after an oversized message.
                    Some(_) => Vec::new(),
                    None => vec![Retained {
                        topic,
                        payload: payload.into_bytes(),
                    }],
                };
                self.link.go_idle(farewell);
            }
        }
    }

    /// How long the loop may sleep for the on-demand policy.
    pub(super) fn demand_wake(&self) -> Option<Duration> {
        if !self.demand.on_demand() {
            return None;
        }
        let at = self.demand.deadline(&self.work())?;
        Some(Duration::from_millis(at.saturating_sub(self.demand.now())))
    }

    /// When the next poll is, on the wall clock, while the link is idle.
    pub(super) fn next_poll_ms(&self, now_ms: u64) -> Option<u64> {
        let at = self.demand.next_poll()?;
        Some(now_ms + at.saturating_sub(self.demand.now()))
    }

    /// A trusted peer's presence message: recorded and handed to delivery.
    pub(super) fn on_peer_presence(&mut self, peer: Name, payload: &[u8], now: u64) {
        let recorded = match parse_presence(payload) {
            Some(Heard::Online) => self.node.on_presence(peer.clone(), true, now),
            Some(Heard::Offline) => self.node.on_presence(peer.clone(), false, now),
            Some(Heard::Asleep { next_ms, every_ms }) => {
                self.node.on_asleep(peer.clone(), next_ms, every_ms, now)
            }
            None => return,
        };
        if let Err(e) = recorded {
            error!("cannot record presence of {peer}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: u64 = 1_000;
    const POLL: u64 = 60_000;

    fn demand() -> Demand {
        let raw = crate::config::FileConfig {
            name: Some("ship1".into()),
            broker: Some("mqtt://b:1883".into()),
            link: Some("on-demand".into()),
            poll: Some("1m".into()),
            linger: Some("1s".into()),
            ..Default::default()
        };
        Demand::new(&Config::build(raw).unwrap())
    }

    fn connected(d: &mut Demand, now: u64) {
        d.saw(
            &LinkEvent::Connected {
                session_present: true,
            },
            now,
        );
    }

    fn stream(last: u64) -> Vec<(Name, Lane, u64, u64)> {
        vec![(
            Name::new("central").unwrap(),
            crate::frame::default_lane(),
            0,
            last,
        )]
    }

    #[test]
    fn a_quiet_link_hangs_up_after_linger_and_polls_again_after_poll() {
        let mut d = demand();
        let idle = Work::default();
        connected(&mut d, 100);
        assert_eq!(d.deadline(&idle), Some(100 + LINGER));
        assert_eq!(d.decide(&idle, 100 + LINGER - 1), None);
        // Traffic pushes the hang-up back.
        d.saw(&LinkEvent::Published, 500);
        assert_eq!(d.decide(&idle, 100 + LINGER), None);
        assert_eq!(d.decide(&idle, 500 + LINGER), Some(Decision::HangUp));
        let gone = 500 + LINGER;
        assert_eq!(d.next_poll(), Some(gone + POLL));
        assert_eq!(d.deadline(&idle), Some(gone + POLL));
        assert_eq!(d.decide(&idle, gone + POLL - 1), None);
        assert_eq!(d.decide(&idle, gone + POLL), Some(Decision::Wake));
        assert_eq!(d.next_poll(), None);
    }

    #[test]
    fn something_to_send_keeps_the_link_up_and_new_frames_wake_it() {
        let mut d = demand();
        connected(&mut d, 0);
        let sending = Work {
            outstanding: Outstanding {
                unsent: true,
                unacked: false,
            },
            backlog: stream(3),
            ..Work::default()
        };
        assert_eq!(d.deadline(&sending), None);
        assert_eq!(d.decide(&sending, 10 * POLL), None);
        // Held for a peer that is away: frames 1..=3 go on the next poll.
        let held = Work {
            backlog: stream(3),
            ..Work::default()
        };
        assert_eq!(d.decide(&held, 10 * POLL), Some(Decision::HangUp));
        assert_eq!(d.decide(&held, 10 * POLL + 1), None);
        // A frame queued since: connect now, not at the poll.
        let more = Work {
            backlog: stream(4),
            ..Work::default()
        };
        assert_eq!(d.decide(&more, 10 * POLL + 2), Some(Decision::Wake));
    }

    #[test]
    fn a_running_command_or_an_owed_ack_holds_the_link_for_ten_lingers() {
        for work in [
            Work {
                running: 1,
                ..Work::default()
            },
            Work {
                outstanding: Outstanding {
                    unsent: false,
                    unacked: true,
                },
                ..Work::default()
            },
        ] {
            let mut d = demand();
            connected(&mut d, 0);
            // A message in (a LinkEvent::Message, whose ack token only the
            // link makes): the connect counts the same.
            connected(&mut d, 1_000);
            // Our own resends are not the peer answering.
            d.saw(&LinkEvent::Published, 9_000);
            let at = 1_000 + HOLD_LINGERS * LINGER;
            assert_eq!(d.deadline(&work), Some(at), "{work:?}");
            assert_eq!(d.decide(&work, at - 1), None);
            assert_eq!(d.decide(&work, at), Some(Decision::HangUp));
        }
    }

    #[test]
    fn a_link_that_cannot_connect_gives_up_until_the_next_poll() {
        let mut d = demand();
        let idle = Work::default();
        assert_eq!(d.deadline(&idle), Some(HOLD_LINGERS * LINGER));
        assert_eq!(
            d.decide(&idle, HOLD_LINGERS * LINGER),
            Some(Decision::HangUp)
        );
        assert_eq!(
            d.decide(&idle, HOLD_LINGERS * LINGER + POLL),
            Some(Decision::Wake)
        );
        // Dropped mid-poll: as long again from the drop.
        connected(&mut d, HOLD_LINGERS * LINGER + POLL + 5);
        let drop = HOLD_LINGERS * LINGER + POLL + 10;
        d.saw(
            &LinkEvent::Disconnected {
                error: "connection reset".into(),
            },
            drop,
        );
        assert_eq!(d.deadline(&idle), Some(drop + HOLD_LINGERS * LINGER));
    }

    #[test]
    fn an_always_on_link_is_never_touched() {
        let raw = crate::config::FileConfig {
            name: Some("ship1".into()),
            broker: Some("mqtt://b:1883".into()),
            ..Default::default()
        };
        let cfg = Config::build(raw).unwrap();
        let mut d = Demand::new(&cfg);
        assert_eq!(d.decide(&Work::default(), u64::MAX / 2), None);
        assert_eq!(d.deadline(&Work::default()), None);
        assert_eq!(will(&cfg), b"offline");
    }

    #[test]
    fn presence_reads_the_old_forms_and_the_on_demand_ones() {
        assert_eq!(parse_presence(b"online"), Some(Heard::Online));
        assert_eq!(parse_presence(b"offline"), Some(Heard::Offline));
        assert_eq!(
            parse_presence(b"offline next=1763800000 every=1800"),
            Some(Heard::Asleep {
                next_ms: Some(1_763_800_000_000),
                every_ms: 1_800_000
            })
        );
        assert_eq!(
            parse_presence(b"offline every=1800 later=yes"),
            Some(Heard::Asleep {
                next_ms: None,
                every_ms: 1_800_000
            })
        );
        // Without a usable interval it is only offline.
        assert_eq!(parse_presence(b"offline next=5"), Some(Heard::Offline));
        assert_eq!(parse_presence(b"offline every=0"), Some(Heard::Offline));
        assert_eq!(
            parse_presence(b"offline every=99999999999999999999"),
            Some(Heard::Offline)
        );
        for junk in [&b"onlin"[..], b"", b"\xff", b"asleep every=5", &[b'o'; 200]] {
            assert_eq!(parse_presence(junk), None, "{junk:?}");
        }
        let raw = crate::config::FileConfig {
            name: Some("ship1".into()),
            broker: Some("mqtt://b:1883".into()),
            link: Some("on-demand".into()),
            ..Default::default()
        };
        let cfg = Config::build(raw).unwrap();
        assert_eq!(will(&cfg), b"offline every=1800");
        assert_eq!(
            parse_presence(&will(&cfg)),
            Some(Heard::Asleep {
                next_ms: None,
                every_ms: 1_800_000
            })
        );
    }
}
