//! Where the link's bytes went, in the loop: the link meters the wire (and its
//! own connects, keepalive and presence); the loop knows what each payload it
//! publishes or receives carried and shares the payload's MQTT packet out over
//! those categories; what the wire cost beyond both (TLS records, TCP/IP headers
//! of payloads) is `overhead`. Sums go to the store every [`FLUSH_EVERY`] while
//! bytes flow (and when the agent stops), with every budget's spending; the
//! gate is told at once.

use std::collections::BTreeMap;

use super::Agent;
use crate::budget::Category;
use crate::control::reply::{ReleaseReply, TrafficStatus, UsageCategory, UsageReply};
use crate::frame::Name;
use crate::link::{publish_size, LinkUsage};
use crate::store::UsageDelta;
use crate::{debug, error, info};

/// How often sums are written while bytes flow.
const FLUSH_EVERY: u64 = 10_000;
/// Bytes of an MQTT PUBACK.
const PUBACK: u64 = 4;
/// TCP/IP headers of a payload and of the ACK it gets, for per-peer estimates.
const PEER_HEADERS: u64 = 2 * 52;

#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The link's counters when last looked at.
    seen: LinkUsage,
    /// MQTT bytes of payloads since then, up and down: the rest of the wire's
    /// growth is overhead.
    payload_up: u64,
    payload_down: u64,
    /// Wire bytes not yet explained by packets (the meter reads the kernel
    /// after the loop counted the packet): carried to the next look.
    carry_up: i64,
    carry_down: i64,
    hours: BTreeMap<(u64, Category), (u64, u64)>,
    peers: BTreeMap<(u64, String), (u64, u64)>,
    flushed_ms: u64,
}

impl Ledger {
    fn add(&mut self, now_ms: u64, category: Category, up: u64, down: u64) {
        if up + down == 0 {
            return;
        }
        let e = self
            .hours
            .entry((now_ms / 3_600_000, category))
            .or_default();
        e.0 += up;
        e.1 += down;
    }

    /// Shares `n` bytes out over `by` (frame bytes per category).
    fn share(&mut self, now_ms: u64, by: &[(Category, usize)], up: u64, down: u64) {
        let total: u64 = by.iter().map(|(_, n)| *n as u64).sum();
        if total == 0 {
            self.add(now_ms, Category::Control, up, down);
            return;
        }
        let (mut left_up, mut left_down) = (up, down);
        for (i, (c, n)) in by.iter().enumerate() {
            let (u, d) = if i + 1 == by.len() {
                (left_up, left_down)
            } else {
                (up * *n as u64 / total, down * *n as u64 / total)
            };
            left_up -= u;
            left_down -= d;
            self.add(now_ms, *c, u, d);
        }
    }
}

impl Agent {
    /// A payload to `peer` of `n` bytes on `topic` was handed to the link.
    pub(super) fn count_out(
        &mut self,
        peer: &Name,
        topic: &str,
        n: usize,
        by: &[(Category, usize)],
        now: u64,
    ) {
        let (up, down) = (publish_size(topic, n) as u64, PUBACK);
        self.ledger.payload_up += up;
        self.ledger.payload_down += down;
        self.ledger.share(now, by, up, down);
        self.count_peer(peer, up + PEER_HEADERS / 2, down + PEER_HEADERS / 2, now);
    }

    /// A message of `n` bytes came in on `topic`, from `peer` if it opened.
    pub(super) fn count_in(
        &mut self,
        peer: Option<&Name>,
        topic: &str,
        n: usize,
        by: &[(Category, usize)],
        now: u64,
    ) {
        let (up, down) = (PUBACK, publish_size(topic, n) as u64);
        self.ledger.payload_up += up;
        self.ledger.payload_down += down;
        if topic.ends_with("/presence") {
            self.ledger.add(now, Category::Presence, up, down);
        } else {
            self.ledger.share(now, by, up, down);
        }
        if let Some(peer) = peer {
            self.count_peer(peer, up + PEER_HEADERS / 2, down + PEER_HEADERS / 2, now);
        }
    }

    fn count_peer(&mut self, peer: &Name, up: u64, down: u64, now: u64) {
        let e = self
            .ledger
            .peers
            .entry((now / 86_400_000, peer.to_string()))
            .or_default();
        e.0 += up;
        e.1 += down;
        self.node.gate().spend(Some(peer), up + down, now);
    }

    /// Takes what the link metered since the last look; writes the sums when due
    /// (`force`: now, as the agent stops).
    pub(super) fn meter(&mut self, now: u64, force: bool) {
        let u = self.link.usage();
        let l = &mut self.ledger;
        let s = l.seen;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (wire_up, wire_down) = (d(u.wire_up, s.wire_up), d(u.wire_down, s.wire_down));
        let connect = (
            d(u.connect_up, s.connect_up),
            d(u.connect_down, s.connect_down),
        );
        let keepalive = (
            d(u.keepalive_up, s.keepalive_up),
            d(u.keepalive_down, s.keepalive_down),
        );
        let presence = (
            d(u.presence_up, s.presence_up),
            d(u.presence_down, s.presence_down),
        );
        l.seen = u;
        l.add(now, Category::Connects, connect.0, connect.1);
        l.add(now, Category::Keepalive, keepalive.0, keepalive.1);
        l.add(now, Category::Presence, presence.0, presence.1);
        l.carry_up += wire_up as i64 - (connect.0 + keepalive.0 + presence.0 + l.payload_up) as i64;
        l.carry_down +=
            wire_down as i64 - (connect.1 + keepalive.1 + presence.1 + l.payload_down) as i64;
        l.payload_up = 0;
        l.payload_down = 0;
        let over_up = l.carry_up.max(0) as u64;
        let over_down = l.carry_down.max(0) as u64;
        l.carry_up = l.carry_up.min(0);
        l.carry_down = l.carry_down.min(0);
        l.add(now, Category::Overhead, over_up, over_down);
        if wire_up + wire_down > 0 {
            self.node.gate().spend(None, wire_up + wire_down, now);
        }
        let dirty = !self.ledger.hours.is_empty() || !self.ledger.peers.is_empty();
        if dirty && (force || now >= self.ledger.flushed_ms + FLUSH_EVERY) {
            self.flush_usage(now);
        }
    }

    fn flush_usage(&mut self, now: u64) {
        let delta = UsageDelta {
            hours: std::mem::take(&mut self.ledger.hours)
                .into_iter()
                .map(|((h, c), (u, d))| (h, c, u, d))
                .collect(),
            peers: std::mem::take(&mut self.ledger.peers)
                .into_iter()
                .map(|((day, p), (u, d))| (day, p, u, d))
                .collect(),
            spent: self.node.gate().spent_rows(),
        };
        self.ledger.flushed_ms = now;
        if let Err(e) = self.node.record_usage(&delta, now) {
            // Kept for the next try: sums only grow.
            error!("cannot record link usage: {e}");
            for (h, c, u, d) in delta.hours {
                let e = self.ledger.hours.entry((h, c)).or_default();
                e.0 += u;
                e.1 += d;
            }
            for (day, p, u, d) in delta.peers {
                let e = self.ledger.peers.entry((day, p)).or_default();
                e.0 += u;
                e.1 += d;
            }
        } else {
            debug!("link usage recorded");
        }
    }

    /// Takes the budgets and windows of the config, and what budgets had spent
    /// before a restart.
    pub(super) fn start_gate(&mut self, now: u64) {
        self.node.set_plan(self.cfg.plan.clone(), now);
        match self.node.store().budget_spent() {
            Ok(rows) => self.node.gate().restore(rows),
            Err(e) => error!("cannot read what budgets spent so far: {e} (counted from zero)"),
        }
        self.ledger.flushed_ms = now;
    }

    /// The operator lifts budgets and windows: for `for_s`, or until the
    /// soonest end of a budget period (an hour if there is no budget).
    pub(super) fn release(&mut self, for_s: Option<u64>, now: u64) -> ReleaseReply {
        let until_ms = match for_s {
            Some(s) => now + s * 1000,
            None => self
                .node
                .gate_ref()
                .budgets(&[], now)
                .iter()
                .map(|b| b.period_end_ms)
                .min()
                .unwrap_or(now + 3_600_000),
        };
        self.node.release_gate(until_ms, now);
        info!(
            "budgets and link windows lifted by the operator for {} s",
            until_ms.saturating_sub(now) / 1000
        );
        ReleaseReply { until_ms }
    }

    /// The `status` summary.
    pub(super) fn traffic(&self, now: u64) -> TrafficStatus {
        let ((today_up, today_down), (month_up, month_down)) = self.usage_totals(now);
        let peers: Vec<Name> = self.trust.peers.keys().cloned().collect();
        let gate = self.node.gate_ref();
        TrafficStatus {
            today_up,
            today_down,
            month_up,
            month_down,
            budgets: gate.budgets(&peers, now),
            held: gate.held(),
            released_until_ms: gate.released_until(now),
        }
    }

    /// When the loop must wake to write what waits.
    pub(super) fn usage_wake(&self) -> Option<u64> {
        (!self.ledger.hours.is_empty() || !self.ledger.peers.is_empty())
            .then_some(self.ledger.flushed_ms + FLUSH_EVERY)
    }

    /// Bytes on the wire (up, down) this UTC day and this month, stored and not.
    pub(super) fn usage_totals(&self, now: u64) -> ((u64, u64), (u64, u64)) {
        let view = self.usage_view(now);
        let sum = |rows: &[UsageCategory], pick: fn(&UsageCategory) -> (u64, u64)| {
            rows.iter()
                .map(pick)
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        (
            sum(&view.categories, |c| (c.day_up, c.day_down)),
            sum(&view.categories, |c| (c.month_up, c.month_down)),
        )
    }

    /// The `link usage` view: per category, this hour, today and this month.
    pub(super) fn usage_view(&self, now: u64) -> UsageReply {
        let hour = now / 3_600_000;
        let day_start = now / 86_400_000 * 24;
        let (month_start_ms, _) = crate::budget::Period::Month.bounds(now);
        let month_start = month_start_ms / 3_600_000;
        let stored = self
            .node
            .store()
            .usage_since(month_start)
            .unwrap_or_else(|e| {
                error!("cannot read link usage: {e}");
                Vec::new()
            });
        let pending = self
            .ledger
            .hours
            .iter()
            .map(|((h, c), (u, d))| (*h, *c, *u, *d));
        let mut categories: Vec<UsageCategory> = Category::ALL
            .into_iter()
            .map(|c| UsageCategory {
                category: c,
                ..UsageCategory::default()
            })
            .collect();
        for (h, c, up, down) in stored.into_iter().chain(pending) {
            if h < month_start {
                continue;
            }
            let row = &mut categories[Category::ALL.iter().position(|x| *x == c).unwrap_or(0)];
            row.month_up += up;
            row.month_down += down;
            if h >= day_start {
                row.day_up += up;
                row.day_down += down;
            }
            if h == hour {
                row.hour_up += up;
                row.hour_down += down;
            }
        }
        let peers: Vec<Name> = self.trust.peers.keys().cloned().collect();
        let gate = self.node.gate_ref();
        UsageReply {
            measured: self.ledger.seen.measured,
            connects: self.ledger.seen.connects,
            categories,
            budgets: gate.budgets(&peers, now),
            held: gate.held(),
            released_until_ms: gate.released_until(now),
        }
    }
}
