//! Who this agent talks to: the trust file (re-read when it changes, before
//! anything is sealed or authorised), presence subscriptions for trusted peers
//! only, and what the core reports about received payloads: logged, and refusals
//! counted by kind (a bounded set) and logged at most once a minute per kind.

use super::{now_ms, Agent};
use crate::frame::{Method, Name};
use crate::node::Report;
use crate::trust;
use crate::{debug, error, info, warn};

impl Agent {
    /// Re-reads the trust file when it changed; a broken file keeps the trust the
    /// agent had (none, at start).
    pub(super) fn refresh_trust(&mut self) {
        let path = trust::trust_path(&self.cfg.state_dir);
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == self.trust_stamp {
            return;
        }
        let first = self.trust_stamp.is_none();
        self.trust_stamp = stamp;
        match trust::read(&self.cfg.state_dir) {
            Ok(t) => {
                let names: Vec<&str> = t.peers.keys().map(Name::as_str).collect();
                info!("trust: {} peer(s): {}", names.len(), names.join(", "));
                self.trust = t;
                let keys = self
                    .trust
                    .peers
                    .values()
                    .map(|p| (p.name.clone(), p.public))
                    .collect();
                self.node.set_trust(keys, now_ms());
                let files = self
                    .trust
                    .peers
                    .values()
                    .filter(|p| p.allow.contains(&Method::Files))
                    .map(|p| p.name.clone())
                    .collect();
                self.node.set_files_peers(files);
                self.node.set_facts_peers(self.facts_peers());
                self.facts_soon();
                self.node.set_report_peers(self.trust.report_peers());
                self.subscribe_presence();
            }
            Err(e) if first && self.trust.peers.is_empty() => error!(
                "{e} (running with no trusted peers until it is fixed: nothing is accepted or sent)"
            ),
            Err(e) => error!(
                "{e} (keeping the previous trust: {} peer(s))",
                self.trust.peers.len()
            ),
        }
    }

    /// Presence of this node and of every trusted peer: nothing of the rest of the
    /// fleet is downloaded. An on-demand node skips its own (see `demand.rs`).
    pub(super) fn subscribe_presence(&self) {
        let own = (!self.demand.on_demand()).then_some(&self.cfg.name);
        let topics = own
            .into_iter()
            .chain(self.trust.peers.keys())
            .map(|n| self.cfg.presence_topic(n))
            .collect();
        self.link.set_extra_subscriptions(topics);
    }

    /// Logs and counts what a received payload amounted to.
    pub(super) fn on_report(&mut self, report: Report) {
        if let Some(refusal) = &report.refused {
            self.reject(refusal.kind().as_str(), &refusal.to_string());
            return;
        }
        let sender = report
            .sender
            .clone()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if let Some(e) = &report.malformed {
            // Authentic but not understood (a newer or broken peer): the whole
            // frames before the fault were kept; the sender resends the rest.
            self.reject("bad payload", &format!("from {sender}: {e}"));
        }
        if let Some(old) = report.new_epoch {
            if old == 0 {
                info!("first contact with {sender}'s store; synchronising streams");
            } else {
                warn!(
                    "{sender} has a new store (its earlier one was lost or went back in time); synchronising streams"
                );
            }
        }
        if report.interrupted > 0 || report.synced.as_ref().is_some_and(|o| o.interrupted > 0) {
            self.changed_jobs.all = true;
        }
        if let Some(outcome) = &report.synced {
            info!("streams with {sender} synchronised");
            for (lane, from, to) in &outcome.lost_out {
                error!(
                    "{sender} lost frames {from}..={to} on {lane} with its earlier store; {} command(s) reported interrupted",
                    outcome.interrupted
                );
            }
            for (lane, from, to) in &outcome.lost_in {
                error!("frames {from}..={to} from {sender} on {lane} were taken by an earlier store of this node and are lost");
            }
        }
        for why in &report.rejected {
            warn!("rejected frame: {why}");
        }
        if report.deferred > 0 {
            debug!(
                "{} frames from {sender} deferred (gap, quota, or not yet synchronised); it will resend",
                report.deferred
            );
        }
    }

    /// Counts a dropped payload by kind; logs the first of each kind, then at most
    /// one line a minute per kind with how many more there were.
    fn reject(&mut self, kind: &'static str, detail: &str) {
        let now = now_ms();
        // To central, by kind: the detail varies (names, counters) and would
        // defeat deduplication.
        self.node.report_error("rejected", kind, now);
        let r = self.rejected.entry(kind).or_default();
        r.count += 1;
        r.last = detail.chars().take(200).collect();
        let quiet = r.logged_ms.is_some_and(|t| now < t + 60_000);
        if !quiet {
            let more = r.count - r.count_logged;
            let tail = if more > 1 {
                format!(" ({more} in all since the last report)")
            } else {
                String::new()
            };
            warn!("dropped payload: {kind}: {detail}{tail} (counted in `outpost status`)");
            r.logged_ms = Some(now);
            r.count_logged = r.count;
        }
    }
}

/// Payloads dropped for one reason.
#[derive(Debug, Default)]
pub(super) struct Rejections {
    pub(super) count: u64,
    /// The latest one, in words.
    pub(super) last: String,
    logged_ms: Option<u64>,
    count_logged: u64,
}
