//! The node's side of facts: reporting this node's to the peers that manage it,
//! taking peers' reports into the registry, and when each peer was last heard
//! from.

use std::collections::BTreeSet;

use super::Node;
use crate::facts::{self, Snapshot};
use crate::frame::{Facts, Name};
use crate::store::{FactsSent, Inbound, StoreError};

/// `last_seen` goes to the store at most this often per peer (the exact time is
/// kept in memory): a write per payload would cost flash for nothing.
const SEEN_SAVE_MS: u64 = 60_000;

/// A Facts frame queued by [`Node::report_facts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactsQueued {
    pub peer: Name,
    pub full: bool,
    /// Facts set and unset by it.
    pub changed: usize,
}

impl Node {
    /// Peers this node reports its facts to.
    pub fn set_facts_peers(&mut self, peers: BTreeSet<Name>) {
        self.facts_peers = peers;
    }

    /// Queues for every facts peer whose streams are synchronised what it lacks of
    /// `now`: all of it on first contact, to a store of the peer (or from one of
    /// ours) that was not sent the last report, and when `refresh_ms` has passed
    /// since the last full set; otherwise the change past the thresholds of
    /// [`facts::delta`], or nothing. A peer not synchronised yet is reported to
    /// once it is (call again then).
    pub fn report_facts(
        &mut self,
        now: &Snapshot,
        refresh_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<FactsQueued>, StoreError> {
        let mine = self.store.epoch();
        let mut out = Vec::new();
        let peers: Vec<Name> = self.facts_peers.iter().cloned().collect();
        for peer in peers {
            if !self.session.is_trusted(&peer) || !self.session.synced(&peer) {
                continue;
            }
            let theirs = self.session.peer(&peer).map_or(0, |p| p.epoch);
            let prev = self.store.facts_sent(&peer)?;
            let (body, full_ms, held): (Facts, u64, Snapshot) = match prev {
                Some(s)
                    if s.peer_epoch == theirs
                        && s.my_epoch == mine
                        && now_ms < s.full_ms.saturating_add(refresh_ms) =>
                {
                    let Some(d) = facts::delta(&s.facts, now) else {
                        continue;
                    };
                    let mut held = s.facts;
                    facts::apply(&mut held, &d);
                    (d, s.full_ms, held)
                }
                _ => (facts::full(now), now_ms, now.clone()),
            };
            let sent = FactsSent {
                peer_epoch: theirs,
                my_epoch: mine,
                full_ms,
                facts: held,
            };
            let q = FactsQueued {
                peer: peer.clone(),
                full: body.full,
                changed: body.set.len() + body.unset.len(),
            };
            let queued = self.store.queue_facts(&peer, body, &sent, now_ms)?;
            self.note_queued(std::slice::from_ref(&queued), now_ms);
            out.push(q);
        }
        Ok(out)
    }

    /// A peer's report, into the registry.
    pub(super) fn take_facts(
        &mut self,
        inbound: &Inbound,
        f: &Facts,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.store.take_facts(inbound, f, now_ms)
    }

    /// `peer` sent an authentic payload now.
    pub(super) fn note_seen(&mut self, peer: &Name, now_ms: u64) -> Result<(), StoreError> {
        let e = self.seen.entry(peer.clone()).or_insert((0, 0));
        e.0 = e.0.max(now_ms);
        if now_ms >= e.1.saturating_add(SEEN_SAVE_MS) {
            e.1 = now_ms;
            self.store.note_seen(peer, now_ms)?;
        }
        Ok(())
    }

    /// When `peer` last sent an authentic payload, if ever (as far as this store
    /// remembers: to the minute across restarts).
    pub fn last_seen(&self, peer: &Name, recorded: Option<u64>) -> Option<u64> {
        let here = self.seen.get(peer).map(|s| s.0);
        here.max(recorded)
    }
}
