//! The node's side of the central error log: errors met here are added up per
//! (kind, text) and sent, at most every [`FLUSH_MS`], as a `Body::Errors` frame
//! on the `errors` lane to the peers that receive this node's reports
//! ([`crate::trust::Trust::report_peers`]). On a stream, so a report survives
//! link outages and restarts of the receiver like any frame, and arrives once.
//!
//! What is not yet flushed lives in memory: an agent killed within
//! [`FLUSH_MS`] of an error loses that count (its log line still says it). At
//! most [`MAX_ENTRIES`] distinct errors are held between flushes; more are
//! counted in one `errors` entry that says how many were dropped.

use std::collections::{BTreeMap, BTreeSet};

use super::{Node, Notice};
use crate::frame::{Body, ErrorEntry, Lane, Name};
use crate::store::{Outgoing, StoreError};

/// Shortest time between two reports.
pub(super) const FLUSH_MS: u64 = 10_000;
/// Distinct (kind, text) held between two reports.
pub(super) const MAX_ENTRIES: usize = 64;
/// Longest text kept of an error.
const MAX_TEXT: usize = 300;

/// Errors waiting to be reported.
#[derive(Debug, Default)]
pub(super) struct ErrorLog {
    pending: BTreeMap<(String, String), ErrorEntry>,
    /// Errors not held for want of room since the last report.
    dropped: u32,
    /// When the last report went out.
    last_flush_ms: Option<u64>,
    /// Who gets the reports.
    peers: BTreeSet<Name>,
}

/// The lane reports travel on: an ordered stream of their own, so that they
/// never wait behind commands.
pub fn errors_lane() -> Lane {
    Lane::new("errors").expect("a valid lane name")
}

impl Node {
    /// Notes an error to report: `kind` is a short word (`store`, `disk`,
    /// `rejected`, `spawn`, `facts`, ...), `text` says what happened and should
    /// not vary from one occurrence to the next, or deduplication cannot add them
    /// up.
    pub fn report_error(&mut self, kind: &str, text: &str, now_ms: u64) {
        let log = &mut self.errors;
        let text: String = text.chars().take(MAX_TEXT).collect();
        let key = (kind.to_string(), text);
        if let Some(e) = log.pending.get_mut(&key) {
            e.count = e.count.saturating_add(1);
            e.last_ms = now_ms;
            return;
        }
        if log.pending.len() >= MAX_ENTRIES {
            log.dropped = log.dropped.saturating_add(1);
            return;
        }
        let entry = ErrorEntry {
            kind: key.0.clone(),
            text: key.1.clone(),
            count: 1,
            first_ms: now_ms,
            last_ms: now_ms,
        };
        log.pending.insert(key, entry);
    }

    /// The peers this node's error reports go to.
    pub fn set_report_peers(&mut self, peers: BTreeSet<Name>) {
        self.errors.peers = peers;
    }

    /// When the next report is due, if one waits.
    pub fn next_error_report(&self) -> Option<u64> {
        let log = &self.errors;
        if (log.pending.is_empty() && log.dropped == 0) || log.peers.is_empty() {
            return None;
        }
        Some(log.last_flush_ms.map_or(0, |t| t + FLUSH_MS))
    }

    /// Queues the errors noted since the last report, if one is due. What the
    /// store refuses stays for the next try. Returns how many entries went.
    pub fn flush_errors(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        if self.next_error_report().is_none_or(|t| now_ms < t) {
            return Ok(0);
        }
        let log = &mut self.errors;
        let mut entries: Vec<ErrorEntry> = log.pending.values().cloned().collect();
        if log.dropped > 0 {
            entries.push(ErrorEntry {
                kind: "errors".into(),
                text: format!(
                    "more than {MAX_ENTRIES} different errors between two reports; the rest were counted, not kept"
                ),
                count: log.dropped,
                first_ms: now_ms,
                last_ms: now_ms,
            });
        }
        let items: Vec<Outgoing> = log
            .peers
            .iter()
            .map(|p| Outgoing {
                to: p.clone(),
                lane: errors_lane(),
                ttl_s: None,
                body: Body::Errors(entries.clone()),
            })
            .collect();
        self.submit(items, now_ms)?;
        let log = &mut self.errors;
        log.pending.clear();
        log.dropped = 0;
        log.last_flush_ms = Some(now_ms);
        Ok(entries.len())
    }

    /// Records a peer's report in the error log (taken by `take_ready`).
    pub(super) fn on_errors(&mut self, inbound: &crate::store::Inbound) -> Result<(), StoreError> {
        let n = self.store.record_errors(inbound)?;
        self.notice(
            Notice::Info,
            format!(
                "{} reported {n} error(s) (see `outpost errors`)",
                inbound.env.from
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeConfig;
    use crate::trust::Keys;

    fn node(tag: &str) -> (Node, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("outpost-errors-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = x25519_dalek::StaticSecret::from([3u8; 32]);
        let keys = Keys {
            public: x25519_dalek::PublicKey::from(&secret),
            secret,
        };
        let me = Name::new("ship1").unwrap();
        let n = Node::open(&dir.join("store.db"), &me, NodeConfig::default(), keys, 0).unwrap();
        (n, dir)
    }

    /// The error reports queued in the outbox, oldest first.
    fn reports(n: &Node) -> Vec<Vec<ErrorEntry>> {
        let mut stmt = n
            .store
            .raw()
            .prepare("SELECT frame FROM outbox WHERE lane = 'errors' ORDER BY seq")
            .unwrap();
        let frames: Vec<Vec<u8>> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        frames
            .iter()
            .map(|f| match crate::frame::decode(f).unwrap().body {
                Body::Errors(e) => e,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn errors_are_added_up_sent_at_most_every_flush_interval_and_bounded() {
        let (mut n, dir) = node("flush");
        n.report_error("rejected", "replay", 100);
        assert_eq!(n.next_error_report(), None, "nobody to report to yet");
        n.set_report_peers([Name::new("central").unwrap()].into());
        assert_eq!(n.flush_errors(100).unwrap(), 1, "the first goes at once");
        n.report_error("rejected", "replay", 200);
        n.report_error("rejected", "replay", 300);
        n.report_error("spawn", "cannot run \"x\"", 400);
        assert_eq!(n.flush_errors(5_000).unwrap(), 0, "too soon after the last");
        assert_eq!(n.next_error_report(), Some(100 + FLUSH_MS));
        assert_eq!(n.flush_errors(100 + FLUSH_MS).unwrap(), 2);
        for i in 0..MAX_ENTRIES + 5 {
            n.report_error("store", &format!("error {i}"), 20_000);
        }
        assert_eq!(n.flush_errors(100 + 2 * FLUSH_MS).unwrap(), MAX_ENTRIES + 1);
        let r = reports(&n);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0][0].count, r[0][0].first_ms), (1, 100));
        let replay = r[1].iter().find(|e| e.text == "replay").unwrap();
        assert_eq!(
            (replay.count, replay.first_ms, replay.last_ms),
            (2, 200, 300)
        );
        let dropped = r[2].iter().find(|e| e.kind == "errors").unwrap();
        assert_eq!(dropped.count, 5);
        assert_eq!(n.next_error_report(), None, "nothing left");
        drop(n);
        let _ = std::fs::remove_dir_all(dir);
    }
}
