//! Retention in the loop: prune finished history in bounded batches, log what
//! went, keep the counts for `status`.
//!
//! A pass is a run of [`Node::prune`] batches (each one savepoint of at most
//! [`BATCH`] rows per kind); while a batch comes back full, the loop runs the
//! next one on its next turn, so messages keep being handled between batches.
//! Passes start every quarter of the retention period, at least every 10
//! minutes, at most every second.

use std::time::Duration;

use crate::control::reply::{PrunedCounts, RetentionStatus};
use crate::node::Node;
use crate::store::{Pruned, Retention, Store};
use crate::{error, info};

/// Rows of each kind one batch may prune.
const BATCH: u32 = 1000;

/// Where pruning stands.
#[derive(Debug)]
pub(super) struct Pruning {
    keep: Retention,
    /// When the next batch is due.
    next_ms: u64,
    /// The pass under way: when it started, and what it pruned so far.
    pass: Option<(u64, Pruned)>,
    /// The last finished pass: when it ended, and what it pruned.
    last: Option<(u64, Pruned)>,
    /// Everything pruned since the agent started.
    total: Pruned,
}

impl Pruning {
    pub(super) fn new(keep: Retention, now_ms: u64) -> Pruning {
        Pruning {
            keep,
            // The first pass soon after start, not in the middle of it.
            next_ms: now_ms + 1_000,
            pass: None,
            last: None,
            total: Pruned::default(),
        }
    }

    /// How often a pass starts.
    fn every(&self) -> Duration {
        Duration::from_millis(self.keep.max_age_ms / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(600))
    }

    /// When the loop must wake for the next batch.
    pub(super) fn due(&self) -> u64 {
        self.next_ms
    }

    /// Runs one batch if one is due.
    pub(super) fn run(&mut self, node: &mut Node, now_ms: u64) {
        if now_ms < self.next_ms {
            return;
        }
        let (started, mut so_far) = self.pass.take().unwrap_or((now_ms, Pruned::default()));
        match node.prune(&self.keep, BATCH, now_ms) {
            Ok(p) => {
                so_far.add(&p);
                self.total.add(&p);
                if p.full {
                    self.pass = Some((started, so_far));
                    self.next_ms = now_ms;
                    return;
                }
            }
            Err(e) => error!("cannot prune old history: {e}"),
        }
        so_far.full = false;
        if so_far.total() > 0 {
            info!(
                "pruned finished history in {} ms: {} job(s), {} result(s), {} journal row(s), {} event(s), {} quarantined frame(s), {} transfer(s), {} error log entries",
                now_ms.saturating_sub(started),
                so_far.jobs,
                so_far.results,
                so_far.journal,
                so_far.events,
                so_far.quarantine,
                so_far.transfers,
                so_far.errors
            );
        }
        self.last = Some((now_ms, so_far));
        self.next_ms = now_ms + self.every().as_millis() as u64;
    }
}

impl Pruning {
    /// For `status`: what is kept, what the last pass and all since start pruned.
    pub(super) fn status(&self, store: &Store) -> RetentionStatus {
        let (pages_used, pages_free) = store.pages().unwrap_or_default();
        RetentionStatus {
            keep_s: self.keep.max_age_ms / 1000,
            keep_rows: self.keep.max_rows,
            last_pass_ms: self.last.map(|(at, _)| at),
            last: self
                .last
                .map(|(_, p)| PrunedCounts::from(&p))
                .unwrap_or_default(),
            since_start: PrunedCounts::from(&self.total),
            pages_used,
            pages_free,
        }
    }
}
