//! Facts on the agent's side: when to read them (every `facts_interval`, and at
//! once after a connect, a peer's Sync or a trust change), reading them (the
//! system's here, `facts_dir`'s in a task that reports back as [`Msg::Facts`]),
//! and handing them to the node, which sends what changed. Also the link's
//! figures they include (bytes on the wire today and this month, reconnects).

use std::collections::BTreeSet;

use super::{Agent, Msg};
use crate::facts::collect::{self, Failure};
use crate::facts::Snapshot;
use crate::frame::Name;
use crate::{debug, info, warn};

/// Reconnects since the agent started, for its facts.
#[derive(Debug, Default)]
pub(super) struct LinkCounters {
    connects: u64,
}

impl LinkCounters {
    pub(super) fn connected(&mut self) {
        self.connects += 1;
    }
}

/// Where reading facts stands.
#[derive(Debug, Default)]
pub(super) struct FactsState {
    /// Read them at or after this time (0: as soon as the link is up).
    due_ms: u64,
    /// A `facts_dir` task is running.
    running: bool,
    /// `facts_dir` entries that failed last time, with why.
    failing: Vec<Failure>,
}

impl Agent {
    /// Read facts as soon as the link is up (a peer may be missing some).
    pub(super) fn facts_soon(&mut self) {
        self.facts.due_ms = 0;
    }

    /// When facts are next due, while they can be read.
    pub(super) fn facts_wake(&self) -> Option<u64> {
        (!self.facts.running && self.node.is_connected()).then_some(self.facts.due_ms)
    }

    /// Peers that get this node's facts: every peer whose trust line allows it
    /// anything (`allow=` not empty; `allow=facts` alone is enough). A peer
    /// trusted with nothing only exchanges results with us.
    pub(super) fn facts_peers(&self) -> BTreeSet<Name> {
        let mut peers = self.trust.report_peers();
        peers.remove(&self.cfg.name);
        peers
    }

    /// Starts reading facts when they are due and the link is up: `facts_dir`'s
    /// entries in a task (they may take up to their timeout), the rest when it
    /// reports back.
    pub(super) fn collect_facts(&mut self, now: u64) {
        if self.facts.running || now < self.facts.due_ms || !self.node.is_connected() {
            return;
        }
        self.facts.due_ms = now + self.cfg.facts_interval.as_millis() as u64;
        let Some(dir) = self.cfg.facts_dir.clone() else {
            self.report_facts(Snapshot::new(), Vec::new(), now);
            return;
        };
        self.facts.running = true;
        let tx = self.tx.clone();
        let tag = Some(self.tag.clone());
        smol::spawn(async move {
            let (custom, failures) = collect::custom(&dir, tag, collect::SCRIPT_TIMEOUT).await;
            let _ = tx.send(Msg::Facts(Box::new((custom, failures)))).await;
        })
        .detach();
    }

    /// This node's facts now (the system's, the agent's own, `custom`), handed
    /// to the node, which queues what each facts peer lacks.
    pub(super) fn report_facts(&mut self, custom: Snapshot, failures: Vec<Failure>, now: u64) {
        self.facts.running = false;
        self.note_facts_failures(failures, now);
        let mut f = collect::system(&self.cfg.state_dir, &self.cfg.files_dir);
        f.insert("outpost.version".into(), env!("CARGO_PKG_VERSION").into());
        // Bytes on the wire (TCP/IP headers included) today and this month, UTC.
        let ((day_up, day_down), (month_up, month_down)) = self.usage_totals(now);
        f.insert("link.in.today".into(), day_down.to_string());
        f.insert("link.out.today".into(), day_up.to_string());
        f.insert("link.in.month".into(), month_down.to_string());
        f.insert("link.out.month".into(), month_up.to_string());
        let l = &self.links;
        f.insert(
            "link.reconnects".into(),
            l.connects.saturating_sub(1).to_string(),
        );
        if let Some(e) = &self.last_error {
            f.insert("link.last_error".into(), e.chars().take(200).collect());
        }
        f.insert("link.mode".into(), self.cfg.link.as_str().into());
        if self.demand.on_demand() {
            let poll = crate::config::format_duration(self.cfg.poll);
            f.insert("link.poll".into(), poll);
        }
        if let Ok(c) = self.node.store().counts() {
            f.insert("queue.outbox".into(), c.outbox.to_string());
            f.insert("queue.inbox".into(), c.inbox.to_string());
            f.insert("queue.running".into(), c.running.to_string());
        }
        if !self.facts.failing.is_empty() {
            let names: Vec<&str> = self
                .facts
                .failing
                .iter()
                .map(|x| x.entry.as_str())
                .collect();
            f.insert("facts.failed".into(), names.join(","));
        }
        for (k, v) in custom {
            if f.contains_key(&k) {
                debug!("facts_dir gives {k:?}, which outpost reports itself; ignored");
                continue;
            }
            f.insert(k, v);
        }
        let refresh = self.cfg.facts_refresh.as_millis() as u64;
        match self.node.report_facts(&f, refresh, now) {
            Ok(queued) => {
                if queued.is_empty() {
                    debug!("facts: {} read, nothing changed enough to send", f.len());
                }
                for q in queued {
                    let what = if q.full { "all" } else { "a change of" };
                    debug!("facts: {what} {} fact(s) queued for {}", q.changed, q.peer);
                }
            }
            Err(e) => crate::error!("cannot queue facts: {e}"),
        }
    }

    /// Logs `facts_dir` entries that started or stopped failing (once per change,
    /// not every interval) and reports every failure to the error log, where
    /// repeats add up; the `facts.failed` fact names them too.
    fn note_facts_failures(&mut self, failures: Vec<Failure>, now: u64) {
        for f in &failures {
            if !self.facts.failing.contains(f) {
                warn!("facts_dir entry {} failed: {}", f.entry, f.reason);
            }
            // To central's error log, added up there (one report per interval).
            let text = format!("facts_dir entry {} failed: {}", f.entry, f.reason);
            self.node.report_error("facts", &text, now);
        }
        for old in &self.facts.failing {
            if !failures.iter().any(|f| f.entry == old.entry) {
                info!("facts_dir entry {} works again", old.entry);
            }
        }
        self.facts.failing = failures;
    }
}
