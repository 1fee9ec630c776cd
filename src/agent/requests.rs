//! Control requests: every [`Request`] variant answered by name, with the typed
//! replies of [`crate::control::reply`]; `wait`'s waiters; the one rule that turns
//! `--to` into target nodes.

use std::collections::BTreeMap;

use super::commands::{command_of, result_view};
use super::{demand, now_ms, Agent, MAX_WAITERS};
use crate::control::reply::{
    BatchItem, BatchReply, CancelReply, CancelView, InboxStatus, JobReply, JobView, JobsReply,
    LinkStatus, NodeReply, OutboxStatus, PeerStatus, Poisoned, PurgeReply, QueueItem, QueueReply,
    Queued, Reply, RunningStatus, SecurityStatus, SendReply, StatusReply, StoreFailing, StoreLost,
    StoreStatus, Superseded, TargetView, TrustedStatus, WaitReply,
};
use crate::control::{CommandSpec, Request, MAX_BATCH};
use crate::frame::{self, Body, Lane, Name};
use crate::info;
use crate::seal;
use crate::store::{Cancelled, Job, Outgoing, Waiting};
use smol::channel::Sender;

impl Agent {
    /// Answers `req`, or keeps `reply` to answer later (a `wait`): then `None`.
    pub(super) fn on_request(
        &mut self,
        req: Request,
        reply: &Sender<Reply>,
        now: u64,
    ) -> Option<Reply> {
        let r = match req {
            Request::Send { .. } => self.send_request(req, now).map(Reply::Send),
            Request::Batch { requests } => self.batch(requests, now).map(Reply::Batch),
            Request::Cancel { id, node } => self.cancel(id, node.as_deref(), now).map(Reply::Cancel),
            Request::Queue { node, limit } => self.queue(&node, limit, now).map(Reply::Queue),
            Request::Purge { node, lane } => self.purge(&node, lane.as_deref(), now).map(Reply::Purge),
            Request::Jobs { limit } => self
                .node
                .store()
                .jobs(limit.unwrap_or(50))
                .map(|jobs| {
                    Reply::Jobs(JobsReply {
                        jobs: jobs.iter().map(job_view).collect(),
                    })
                })
                .map_err(|e| e.to_string()),
            Request::Job { id } => self.job(id).map(|job| Reply::Job(JobReply { job })),
            Request::Wait { id, seen, .. } => match self.node.store().job(id) {
                Ok(Some(job)) if job.done() || n_results(&job) > seen => Ok(Reply::Wait(WaitReply {
                    job: Some(job_view(&job)),
                    timeout: false,
                })),
                Ok(Some(_)) if self.n_waiters >= MAX_WAITERS => Err(format!(
                    "{MAX_WAITERS} clients are already waiting for jobs; try again when some are done (or look with `outpost jobs show {id}`)"
                )),
                Ok(Some(_)) => {
                    self.waiters.entry(id).or_default().push((seen, reply.clone()));
                    self.n_waiters += 1;
                    return None;
                }
                Ok(None) => Err(format!("no job {id}")),
                Err(e) => Err(e.to_string()),
            },
            Request::Status => Ok(Reply::Status(Box::new(self.status(now)))),
            Request::FilesPut {
                to,
                path,
                id,
                ttl_s,
            } => self.files_put(&to, path, id, ttl_s, now).map(Reply::FilesPut),
            Request::FilesGet { from, path } => self.files_get(&from, path, now).map(Reply::FilesGet),
            Request::FilesList => self.files_list(now).map(Reply::FilesList),
            Request::Transfer { id } => self.transfer(id, now).map(Reply::Transfer),
            Request::FilesRm { id } => self.files_rm(&id).map(Reply::FilesRm),
            Request::Nodes {
                pattern,
                where_,
                online,
            } => self
                .nodes(pattern.as_deref(), &where_, online, now)
                .map(Reply::Nodes),
            Request::Node { name } => self
                .node_view(&name, now)
                .map(|node| Reply::Node(NodeReply { node })),
            Request::Errors { node, after, limit } => self
                .errors(node.as_deref(), after.unwrap_or(0), limit)
                .map(Reply::Errors),
            Request::Usage => Ok(Reply::Usage(self.usage_view(now))),
            Request::Release { for_s } => Ok(Reply::Release(self.release(for_s, now))),
        };
        Some(r.unwrap_or_else(Reply::Error))
    }

    /// One `send` request: resolves its targets and queues its job.
    fn send_request(&mut self, req: Request, now: u64) -> Result<SendReply, String> {
        let Request::Send {
            to,
            lane,
            ttl_s,
            key,
            command,
            where_,
            online,
            output,
        } = req
        else {
            return Err(format!("{} cannot be batched; only send can", req.op()));
        };
        let sel = super::nodes::selectors(&where_)?;
        let targets = self.resolve_selected(&to, &sel, online)?;
        let lane = lane.as_deref();
        self.send_with_output(targets, lane, ttl_s, key.as_deref(), command, output, now)
    }

    /// `batch`: every request in one store batch, so one commit for all. Each
    /// is atomic on its own (a refused one leaves the others); if the commit
    /// fails, none was queued and every one is answered with the error.
    fn batch(&mut self, requests: Vec<Request>, now: u64) -> Result<BatchReply, String> {
        if requests.len() > MAX_BATCH {
            return Err(format!(
                "a batch holds at most {MAX_BATCH} requests, not {}",
                requests.len()
            ));
        }
        self.node.begin_batch().map_err(|e| e.to_string())?;
        let replies: Vec<Result<SendReply, String>> = requests
            .into_iter()
            .map(|req| self.send_request(req, now))
            .collect();
        let committed = self.node.end_batch();
        let replies = replies
            .into_iter()
            .map(|r| match (&committed, r) {
                (Ok(()), Ok(sent)) => BatchItem {
                    sent: Some(sent),
                    error: None,
                },
                (Err(e), Ok(_)) => BatchItem {
                    sent: None,
                    error: Some(format!("cannot queue the command: {e}")),
                },
                (_, Err(e)) => BatchItem {
                    sent: None,
                    error: Some(e),
                },
            })
            .collect();
        Ok(BatchReply { replies })
    }

    fn job(&self, id: i64) -> Result<JobView, String> {
        match self.node.store().job(id) {
            Ok(Some(job)) => Ok(job_view(&job)),
            Ok(None) => Err(format!("no job {id}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Answers the clients waiting for jobs that changed: one store read per
    /// changed job, nothing for the others, however many wait.
    pub(super) fn answer_waiters(&mut self) {
        let changed = std::mem::take(&mut self.changed_jobs);
        if self.waiters.is_empty() {
            return;
        }
        let ids: Vec<i64> = if changed.all {
            self.waiters.keys().copied().collect()
        } else {
            changed
                .ids
                .into_iter()
                .filter(|id| self.waiters.contains_key(id))
                .collect()
        };
        for id in ids {
            let Some(list) = self.waiters.remove(&id) else {
                continue;
            };
            self.n_waiters -= list.len();
            let job = self.node.store().job(id);
            let mut keep = Vec::new();
            for (seen, reply) in list {
                if reply.is_closed() {
                    continue;
                }
                match &job {
                    Ok(Some(job)) if job.done() || n_results(job) > seen => {
                        let _ = reply.try_send(Reply::Wait(WaitReply {
                            job: Some(job_view(job)),
                            timeout: false,
                        }));
                    }
                    Ok(Some(_)) => keep.push((seen, reply)),
                    _ => {
                        let _ = reply.try_send(Reply::error(format!("no job {id}")));
                    }
                }
            }
            if !keep.is_empty() {
                self.n_waiters += keep.len();
                self.waiters.insert(id, keep);
            }
        }
    }

    pub(super) fn send(
        &mut self,
        (targets, notes): (Vec<Name>, Vec<String>),
        lane: Option<&str>,
        ttl_s: Option<u32>,
        key: Option<&str>,
        spec: CommandSpec,
        now: u64,
    ) -> Result<SendReply, String> {
        if let Some(k) = key {
            if k.is_empty() || k.len() > 200 {
                return Err("key: 1 to 200 characters".into());
            }
        }
        let lane = match lane {
            Some(l) => Lane::new(l).map_err(|e| format!("lane: {e}"))?,
            None => frame::default_lane(),
        };
        let (command, summary) = command_of(spec)?;
        let method = command.method();
        let items = targets
            .iter()
            .map(|t| Outgoing {
                to: t.clone(),
                lane: lane.clone(),
                ttl_s,
                body: Body::Command(command.clone()),
            })
            .collect();
        let (job, queued) = self
            .node
            .submit_job(method, &summary, items, now)
            .map_err(|e| e.to_string())?;
        let superseded = match key {
            Some(k) => self.supersede(job, k, &targets, now)?,
            None => Vec::new(),
        };
        Ok(SendReply {
            superseded,
            job,
            targets: queued
                .iter()
                .map(|q| Queued {
                    node: q.to.to_string(),
                    lane: q.lane.to_string(),
                    seq: q.seq,
                })
                .collect(),
            notes,
        })
    }

    /// Cancels what earlier jobs with `key` still have queued for `targets` and
    /// has not started; marks job `job` with the key.
    fn supersede(
        &mut self,
        job: i64,
        key: &str,
        targets: &[Name],
        now: u64,
    ) -> Result<Vec<Superseded>, String> {
        let err = |e: crate::store::StoreError| e.to_string();
        self.node.set_job_key(job, key).map_err(err)?;
        let mut out = Vec::new();
        for node in targets {
            for old in self.node.store().superseded(node, key, job).map_err(err)? {
                let reason = format!("superseded by job {job} (key {key})");
                let outcome = self.node.cancel(old, node, false, &reason, now);
                if let Some(Cancelled::Withdrawn | Cancelled::Sent) = outcome.map_err(err)? {
                    info!("job {old} to {node}: {reason}");
                    self.changed_jobs.ids.insert(old);
                    out.push(Superseded {
                        node: node.to_string(),
                        job: old,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Cancels job `id` for each of its targets (or `node`'s only).
    fn cancel(&mut self, id: i64, node: Option<&str>, now: u64) -> Result<CancelReply, String> {
        let err = |e: crate::store::StoreError| e.to_string();
        let job = self
            .node
            .store()
            .job(id)
            .map_err(err)?
            .ok_or(format!("no job {id}"))?;
        let nodes: Vec<Name> = match node {
            Some(n) => {
                let n = Name::new(n).map_err(|e| format!("node: {e}"))?;
                if !job.targets.iter().any(|t| t.node == n) {
                    return Err(format!("job {id} has no target {n}"));
                }
                vec![n]
            }
            None => job.targets.iter().map(|t| t.node.clone()).collect(),
        };
        let reason = format!("cancelled by {}", self.cfg.name);
        let mut targets = Vec::new();
        for n in nodes {
            let outcome = self.node.cancel(id, &n, true, &reason, now).map_err(err)?;
            let Some(outcome) = outcome else { continue };
            if !matches!(outcome, Cancelled::Finished(_)) {
                info!("job {id} to {n}: {} ({reason})", outcome.as_str());
            }
            targets.push((n, outcome));
        }
        self.changed_jobs.ids.insert(id);
        let job = self
            .node
            .store()
            .job(id)
            .map_err(err)?
            .ok_or(format!("no job {id}"))?;
        Ok(CancelReply {
            job: id,
            targets: targets
                .into_iter()
                .map(|(n, outcome)| CancelView {
                    state: job
                        .targets
                        .iter()
                        .find(|t| t.node == n)
                        .map(|t| t.state.clone())
                        .unwrap_or_default(),
                    node: n.to_string(),
                    outcome: outcome.as_str().into(),
                })
                .collect(),
        })
    }

    /// What waits between this agent and `node`.
    fn queue(&self, node: &str, limit: Option<u32>, now: u64) -> Result<QueueReply, String> {
        let node = Name::new(node).map_err(|e| format!("node: {e}"))?;
        let (to, from) = self
            .node
            .store()
            .waiting_for(&node, limit.unwrap_or(1000))
            .map_err(|e| e.to_string())?;
        let view = |w: Waiting| QueueItem {
            job: w.job,
            lane: w.lane.to_string(),
            seq: w.seq,
            state: w.state,
            what: w.what,
            age_ms: now.saturating_sub(w.since_ms),
        };
        Ok(QueueReply {
            node: node.to_string(),
            to: to.into_iter().map(view).collect(),
            from: from.into_iter().map(view).collect(),
        })
    }

    /// Cancels every unfinished job for `node` (on `lane`).
    fn purge(&mut self, node: &str, lane: Option<&str>, now: u64) -> Result<PurgeReply, String> {
        let err = |e: crate::store::StoreError| e.to_string();
        let node = Name::new(node).map_err(|e| format!("node: {e}"))?;
        let lane = lane
            .map(|l| Lane::new(l).map_err(|e| format!("lane: {e}")))
            .transpose()?;
        let reason = format!("purged by {}", self.cfg.name);
        let mut jobs = Vec::new();
        for id in self
            .node
            .store()
            .unfinished_jobs(&node, lane.as_ref())
            .map_err(err)?
        {
            if let Some(Cancelled::Withdrawn | Cancelled::Sent) = self
                .node
                .cancel(id, &node, true, &reason, now)
                .map_err(err)?
            {
                self.changed_jobs.ids.insert(id);
                jobs.push(id);
            }
        }
        info!("purged {} job(s) for {node}", jobs.len());
        Ok(PurgeReply {
            node: node.to_string(),
            cancelled: jobs.len(),
            jobs,
        })
    }

    /// The nodes `to` names: comma-separated names and glob patterns (`*`, `?`).
    /// Patterns match trusted nodes, online or not; plain names must be trusted
    /// (a peer that is not could never open what is sealed for it here) and not
    /// this node. Notes say which targets are not online. One rule for every
    /// request that takes `to`.
    pub(crate) fn resolve_targets(&self, to: &str) -> Result<(Vec<Name>, Vec<String>), String> {
        self.resolve_selected(to, &[], false)
    }

    /// As [`Agent::resolve_targets`], keeping only the nodes whose facts match
    /// every selector (a node that never reported a key matches neither
    /// `KEY=VALUE` nor `KEY!=VALUE`), and with `online` only those whose presence
    /// says online. Selecting nothing is an error that says what matched nothing.
    pub(crate) fn resolve_selected(
        &self,
        to: &str,
        select: &[crate::facts::Selector],
        online: bool,
    ) -> Result<(Vec<Name>, Vec<String>), String> {
        let peers = self.node.store().peers().map_err(|e| e.to_string())?;
        let mut targets: Vec<Name> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        for part in to.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.contains(['[', ']', '{', '}']) {
                return Err(format!(
                    "{part:?}: only * and ? are pattern characters (use a comma-separated list)"
                ));
            }
            if part.contains(['*', '?']) {
                let matched: Vec<&Name> = self
                    .trust
                    .peers
                    .keys()
                    .filter(|n| **n != self.cfg.name && glob(part, n.as_str()))
                    .collect();
                if matched.is_empty() {
                    return Err(format!("no trusted node matches {part:?}"));
                }
                targets.extend(matched.into_iter().cloned());
                continue;
            }
            let name = Name::new(part).map_err(|e| e.to_string())?;
            if name == self.cfg.name {
                return Err(format!("{name} is this node; send to other nodes"));
            }
            if !self.node.trusts(&name) {
                return Err(format!(
                    "{name} is not in this node's trust file, so nothing sent to it could be sealed; trust it first: outpost keys trust {name} PUBLIC-KEY"
                ));
            }
            targets.push(name);
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err("no target nodes given (--to)".into());
        }
        self.selected(&mut targets, select, online)?;
        if targets.is_empty() {
            let mut what: Vec<String> = select.iter().map(|s| format!("--where {s}")).collect();
            if online {
                what.push("--online".into());
            }
            return Err(format!(
                "no trusted node named by {to:?} matches {}",
                what.join(" ")
            ));
        }
        let polls = self.node.store().polls().map_err(|e| e.to_string())?;
        for name in &targets {
            match peers.iter().find(|(n, _, _)| n == name) {
                None => notes.push(format!(
                    "{name} has never been seen; queued until it connects"
                )),
                Some((_, false, _)) => match polls.get(name) {
                    Some(p) => notes.push(demand::away_note(name, p, now_ms())),
                    None => notes.push(format!("{name} is offline; queued until it returns")),
                },
                Some(_) => {}
            }
        }
        if !self.node.is_connected() {
            // What a peer looks like says nothing while this agent cannot reach
            // the broker: say that instead.
            let why = self
                .last_error
                .as_deref()
                .map_or(String::new(), |e| format!(" ({e})"));
            notes = vec![format!(
                "this agent is not connected to the broker{why}; queued until it is"
            )];
        }
        Ok((targets, notes))
    }

    /// One node by name, by the same rule as [`Agent::resolve_targets`].
    pub(super) fn resolve_one(&self, name: &str) -> Result<Name, String> {
        if name.contains([',', '*', '?']) {
            return Err(format!("{name:?}: give one node by name"));
        }
        let (mut targets, _) = self.resolve_targets(name)?;
        Ok(targets.remove(0))
    }

    fn status(&self, now: u64) -> StatusReply {
        let store = self.node.store();
        let (used, quota) = store.usage();
        // A store that cannot be read still gets a status: what is known, and why
        // the rest is missing, in `failing`.
        let mut unreadable: Option<String> = None;
        let mut read = |e: crate::store::StoreError| {
            unreadable.get_or_insert_with(|| e.to_string());
        };
        let counts = store.counts().unwrap_or_else(|e| {
            read(e);
            Default::default()
        });
        let outbox = store.outbox_depths().unwrap_or_else(|e| {
            read(e);
            Vec::new()
        });
        let inbox = store.inbox_depths().unwrap_or_else(|e| {
            read(e);
            Vec::new()
        });
        let peers = store.peers().unwrap_or_else(|e| {
            read(e);
            Vec::new()
        });
        let oldest = store.oldest_unacked().unwrap_or_else(|e| {
            read(e);
            Vec::new()
        });
        let lost = store.lost().unwrap_or_else(|e| {
            read(e);
            None
        });
        let failing = match (&self.store_error, unreadable) {
            (Some((since, e)), _) => Some(StoreFailing {
                since_ms: *since,
                for_s: now.saturating_sub(*since) / 1000,
                error: e.clone(),
                unrecorded_results: self.unrecorded.len(),
            }),
            (None, Some(e)) => Some(StoreFailing {
                since_ms: now,
                for_s: 0,
                error: format!("cannot read the store: {e}"),
                unrecorded_results: self.unrecorded.len(),
            }),
            (None, None) => None,
        };
        StatusReply {
            node: self.cfg.name.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            broker: self.cfg.broker.to_string(),
            link: LinkStatus {
                connected: self.node.is_connected(),
                since_ms: self.link_since_ms,
                for_s: now.saturating_sub(self.link_since_ms) / 1000,
                last_error: self.last_error.clone(),
                presence: if self.poisoned.is_some() { "off" } else { "on" }.into(),
                poisoned: self.poisoned.map(|(at_ms, size)| Poisoned {
                    at_ms,
                    size,
                    what: "the broker sent a message larger than max_packet; the link reconnected with a clean session and presence is off until the agent restarts".into(),
                }),
                mode: self.cfg.link.as_str().into(),
                next_poll_ms: self.next_poll_ms(now),
            },
            store: StoreStatus {
                used,
                quota,
                quarantined: counts.quarantined,
                events: counts.events,
                epoch: format!("{:016x}", self.node.epoch()),
                lost: lost.map(|(at_ms, reason)| StoreLost { at_ms, reason }),
                failing,
                retention: self.pruning.status(store),
            },
            outbox: outbox
                .iter()
                .map(|(p, l, n)| OutboxStatus {
                    peer: p.to_string(),
                    lane: l.to_string(),
                    frames: *n,
                    oldest_unacked_s: oldest
                        .iter()
                        .find(|(op, ol, _)| op == p && ol == l)
                        .map(|(_, _, c)| now.saturating_sub(*c) / 1000),
                })
                .collect(),
            inbox: inbox
                .iter()
                .map(|(p, l, n)| InboxStatus {
                    peer: p.to_string(),
                    lane: l.to_string(),
                    frames: *n,
                })
                .collect(),
            running: self
                .running
                .iter()
                .map(|((p, l, s), r)| RunningStatus {
                    peer: p.to_string(),
                    lane: l.to_string(),
                    seq: *s,
                    method: r.method,
                    for_s: now.saturating_sub(r.started_ms) / 1000,
                })
                .collect(),
            // Presence is recorded for trusted peers only; one since dropped from
            // the trust file is not listed either.
            peers: peers
                .iter()
                .filter(|(n, _, _)| self.node.trusts(n))
                .map(|(n, online, since)| PeerStatus {
                    name: n.to_string(),
                    online: *online,
                    since_ms: *since,
                })
                .collect(),
            security: SecurityStatus {
                public_key: seal::to_hex(self.node.public_key().as_bytes()),
                trusted: self
                    .trust
                    .peers
                    .values()
                    .map(|p| TrustedStatus {
                        name: p.name.to_string(),
                        allow: p.allow.clone(),
                    })
                    .collect(),
                rejected: self
                    .rejected
                    .iter()
                    .map(|(k, r)| (k.to_string(), r.count))
                    .collect::<BTreeMap<_, _>>(),
                last_rejected: self
                    .rejected
                    .iter()
                    .map(|(k, r)| (k.to_string(), r.last.clone()))
                    .collect::<BTreeMap<_, _>>(),
            },
            traffic: self.traffic(now),
        }
    }
}

fn n_results(job: &Job) -> usize {
    job.targets.iter().filter(|t| t.result.is_some()).count()
}

/// `*` any run, `?` one character; enough for node names.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn rec(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), name.as_bytes())
}

/// A job as the control socket shows it (the README's JOB).
pub(super) fn job_view(job: &Job) -> JobView {
    JobView {
        id: job.id,
        created_ms: job.created_ms,
        method: job.method,
        summary: job.summary.clone(),
        targets: job
            .targets
            .iter()
            .map(|t| TargetView {
                node: t.node.to_string(),
                lane: t.lane.to_string(),
                seq: t.seq,
                state: t.state.clone(),
                result: t.result.as_ref().map(|r| result_view(r, job, t.at_ms)),
                result_id: t.result.as_ref().and(t.result_id),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_node_names() {
        assert!(glob("ship*", "ship12"));
        assert!(glob("*", "a"));
        assert!(glob("wind-?", "wind-7"));
        assert!(!glob("wind-?", "wind-77"));
        assert!(!glob("ship*", "boat1"));
    }
}
