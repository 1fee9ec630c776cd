//! The registry of trusted nodes (`nodes`, `node` requests): presence, last seen,
//! facts, what waits for each, what runs there, the latest error; and the fact
//! selectors `--where` that `send` shares through `resolve_selected`.

use std::collections::BTreeMap;

use super::requests::glob;
use super::Agent;
use crate::control::reply::{LaneQueue, NodeError, NodeState, NodeView, NodesReply, PollView};
use crate::facts::Selector;
use crate::frame::Name;

/// `--where` selectors, checked.
pub(super) fn selectors(where_: &[String]) -> Result<Vec<Selector>, String> {
    where_
        .iter()
        .map(|w| w.parse().map_err(|e| format!("--where {e}")))
        .collect()
}

impl Agent {
    /// Every trusted node (never this one), by name, as the registry knows it.
    /// Nodes not in the trust file are never listed, whatever the store has
    /// seen of them.
    pub(super) fn registry(&self, now: u64) -> Result<Vec<NodeView>, String> {
        let store = self.node.store();
        let e = |e: crate::store::StoreError| e.to_string();
        let presence: BTreeMap<Name, (bool, u64)> = store
            .peers()
            .map_err(e)?
            .into_iter()
            .map(|(n, online, since)| (n, (online, since)))
            .collect();
        let records = store.nodes().map_err(e)?;
        let outbox = store.outbox_depths().map_err(e)?;
        let oldest = store.oldest_unacked().map_err(e)?;
        let events = store.last_events().map_err(e)?;
        let running = store.running_targets().map_err(e)?;
        let polls = store.polls().map_err(e)?;
        let mut out = Vec::new();
        for name in self.trust.peers.keys().filter(|n| **n != self.cfg.name) {
            let rec = records.get(name);
            let seen = self.node.last_seen(name, rec.and_then(|r| r.last_seen_ms));
            let facts_ms = rec.and_then(|r| r.facts_ms);
            let (state, since_ms) = match presence.get(name) {
                Some((true, s)) => (NodeState::Online, Some(*s)),
                Some((false, s)) => (NodeState::Offline, Some(*s)),
                None if seen.is_some() || facts_ms.is_some() => (NodeState::Offline, None),
                None => (NodeState::NeverSeen, None),
            };
            out.push(NodeView {
                name: name.to_string(),
                state,
                since_ms,
                last_seen_ms: seen,
                facts_ms,
                outbox: outbox
                    .iter()
                    .filter(|(p, _, _)| p == name)
                    .map(|(_, lane, frames)| LaneQueue {
                        lane: lane.to_string(),
                        frames: *frames,
                        oldest_unacked_s: oldest
                            .iter()
                            .find(|(p, l, _)| p == name && l == lane)
                            .map(|(_, _, c)| now.saturating_sub(*c) / 1000),
                    })
                    .collect(),
                running: running.get(name).copied().unwrap_or(0),
                last_error: events.get(name).map(|(at_ms, text)| NodeError {
                    at_ms: *at_ms,
                    text: text.clone(),
                }),
                poll: polls.get(name).map(|p| PollView {
                    every_s: p.every_ms / 1000,
                    next_ms: p.next_ms,
                }),
                facts: rec.map(|r| r.facts.clone()).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// The `nodes` request: trusted nodes `pattern` names (all without one) whose
    /// facts match every selector, online ones only with `online`.
    pub(super) fn nodes(
        &self,
        pattern: Option<&str>,
        where_: &[String],
        online: bool,
        now: u64,
    ) -> Result<NodesReply, String> {
        let select = selectors(where_)?;
        let nodes = self
            .registry(now)?
            .into_iter()
            .filter(|v| pattern.is_none_or(|p| p.split(',').any(|p| glob(p.trim(), &v.name))))
            .filter(|v| !online || v.state == NodeState::Online)
            .filter(|v| select.iter().all(|s| s.matches(&v.facts)))
            .collect();
        Ok(NodesReply { nodes })
    }

    /// The `node` request: one trusted node.
    pub(super) fn node_view(&self, name: &str, now: u64) -> Result<NodeView, String> {
        let n = Name::new(name).map_err(|e| e.to_string())?;
        self.registry(now)?
            .into_iter()
            .find(|v| v.name == n.as_str())
            .ok_or_else(|| {
                if n == self.cfg.name {
                    format!("{n} is this node; `outpost status` shows it")
                } else {
                    format!("{n} is not in this node's trust file")
                }
            })
    }

    /// Whether `name` passes `select` and `online`: the filter `send` applies to
    /// its targets (see `resolve_selected`).
    pub(super) fn selected(
        &self,
        targets: &mut Vec<Name>,
        select: &[Selector],
        online: bool,
    ) -> Result<(), String> {
        if select.is_empty() && !online {
            return Ok(());
        }
        let store = self.node.store();
        let presence = store.peers().map_err(|e| e.to_string())?;
        let records = store.nodes().map_err(|e| e.to_string())?;
        let empty = Default::default();
        targets.retain(|t| {
            let up = presence.iter().any(|(n, on, _)| n == t && *on);
            let facts = records.get(t).map_or(&empty, |r| &r.facts);
            (!online || up) && select.iter().all(|s| s.matches(facts))
        });
        Ok(())
    }
}
