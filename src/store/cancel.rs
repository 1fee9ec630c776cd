//! Cancelling commands, on both sides.
//!
//! The sender withdraws a command still in its outbox (the frame becomes a
//! [`Body::Withdrawn`] with the same number, so the stream keeps its numbering)
//! and, wherever the command may be, sends a [`Body::Cancel`] on the control lane.
//! The receiver answers a cancel for a command in its inbox at once, keeps one for
//! a command not here yet (it overtook the command, or the command waits behind a
//! gap) until the command comes, and leaves a running one to the shell to stop.

use super::sql::Cached;
use rusqlite::{params, OptionalExtension};

use super::{
    commit, consume_in, control_lane, enqueue_in, fits, lane_of, watermark, withdraw, Inbound,
    Outgoing, Queued, Store, StoreError,
};
use crate::frame::{self, Body, CmdResult, Lane, Name, Status};

/// What cancelling one target of a job did, at the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Still in the outbox: withdrawn, answered `cancelled` here; a cancel follows
    /// it in case the node got the command before the withdrawal.
    Withdrawn,
    /// Delivered (or running): a cancel is on its way to the node.
    Sent,
    /// A cancel was sent before; its answer has not come.
    Pending,
    /// Running, and only a not-started command was to be cancelled (supersede).
    Started,
    /// Already finished with this status: nothing changed.
    Finished(String),
}

impl Cancelled {
    /// The word the control socket uses.
    pub fn as_str(&self) -> &str {
        match self {
            Cancelled::Withdrawn => "withdrawn",
            Cancelled::Sent => "cancel-sent",
            Cancelled::Pending => "cancelling",
            Cancelled::Started => "started",
            Cancelled::Finished(_) => "finished",
        }
    }
}

/// Where a cancel found a command, at the receiver.
#[derive(Debug)]
pub enum CancelAt {
    /// In the inbox, its turn come or not: answer it cancelled (the frame to finish).
    Inbox(Box<Inbound>),
    /// Running: the shell stops it if `stop`.
    Running,
    /// Not here yet, or held behind a gap: kept until it comes.
    Kept,
    /// Finished, withdrawn, or never to come: nothing to do.
    Gone,
}

/// One item of what waits between this node and a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job: Option<i64>,
    pub lane: Lane,
    pub seq: u64,
    /// The job target's state, or `queued` / `received` for frames of no job.
    pub state: String,
    /// A job's summary, else the kind of frame.
    pub what: String,
    /// When it was queued (a job's creation) or received, unix milliseconds.
    pub since_ms: u64,
}

impl Store {
    /// Cancels job `job`'s command to `node`. `stop` also stops it if it runs;
    /// without it (a superseded command) a started command is left alone. The
    /// cancel frame to send, if any, is returned with the outcome.
    pub fn cancel_target(
        &mut self,
        job: i64,
        node: &Name,
        stop: bool,
        reason: &str,
        now_ms: u64,
    ) -> Result<Option<(Cancelled, Option<Queued>)>, StoreError> {
        #[allow(clippy::type_complexity)]
        let target: Option<(String, i64, String, Option<i64>, Option<u32>)> = self
            .conn
            .row(
                "SELECT lane, seq, state, result, fp FROM job_targets WHERE job = ?1 AND node = ?2",
                params![job, node.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((lane, seq, state, result, fp)) = target else {
            return Ok(None);
        };
        let lane = lane_of(&lane)?;
        let outcome = match (result, state.as_str()) {
            (Some(_), _) => Cancelled::Finished(state),
            (None, "cancelling") => Cancelled::Pending,
            (None, "running") if !stop => Cancelled::Started,
            _ => {
                let me = self.me.clone();
                let tx = self.conn.savepoint()?;
                let key = params![node.as_str(), lane.as_str(), seq];
                let in_outbox: Option<Vec<u8>> = tx
                    .row(
                        "SELECT frame FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                        key,
                        |r| r.get(0),
                    )
                    .optional()?;
                let outcome = match in_outbox.map(|b| frame::decode(&b)) {
                    Some(Ok(env)) if matches!(env.body, Body::Command(_)) => {
                        let text =
                            format!("cancelled in {me}'s outbox before {node} took it: {reason}");
                        let r = CmdResult::without_run(seq as u64, Status::Cancelled, text, now_ms);
                        withdraw(&tx, &me, env, reason, r, now_ms)?;
                        Cancelled::Withdrawn
                    }
                    _ => {
                        tx.run(
"UPDATE job_targets SET state = 'cancelling' WHERE job = ?1 AND node = ?2",
                            params![job, node.as_str()],
                        )?;
                        Cancelled::Sent
                    }
                };
                let cancel = Outgoing {
                    to: node.clone(),
                    lane: control_lane(),
                    ttl_s: None,
                    body: Body::Cancel {
                        lane: lane.clone(),
                        seq: seq as u64,
                        check: fp.unwrap_or(0),
                        stop,
                        reason: reason.into(),
                    },
                };
                let (mut queued, added) = enqueue_in(
                    &tx,
                    (&self.me, self.mono),
                    std::slice::from_ref(&cancel),
                    now_ms,
                )?;
                // Cancels are small and free what they cancel: refused only when
                // the store is full already.
                if let Err(full) = fits((self.used, self.quota), added, vec![cancel]) {
                    drop(tx);
                    return Err(full);
                }
                commit(tx, self.batch)?;
                self.committed();
                self.used = super::bytes_held(&self.conn)?;
                return Ok(Some((outcome, Some(queued.remove(0)))));
            }
        };
        Ok(Some((outcome, None)))
    }

    /// Targets of earlier jobs for `node` with `key` that have not started (nor
    /// finished, nor are being cancelled): what a new command with the key
    /// supersedes. Job ids.
    pub fn superseded(&self, node: &Name, key: &str, newer: i64) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT job FROM job_targets WHERE node = ?1 AND key = ?2 AND job < ?3
             AND result IS NULL AND state IN ('queued', 'delivered') ORDER BY job",
        )?;
        let rows = stmt.query_map(params![node.as_str(), key, newer], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks job `job`'s targets with `key` (see [`Store::superseded`]).
    pub fn set_job_key(&mut self, job: i64, key: &str) -> Result<(), StoreError> {
        self.change(
            "UPDATE job_targets SET key = ?2 WHERE job = ?1",
            params![job, key],
        )?;
        Ok(())
    }

    /// Unfinished jobs with a target `node`, on `lane` if given, oldest first.
    pub fn unfinished_jobs(
        &self,
        node: &Name,
        lane: Option<&Lane>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT job FROM job_targets WHERE node = ?1 AND result IS NULL
             AND (?2 IS NULL OR lane = ?2) ORDER BY job",
        )?;
        let rows = stmt.query_map(params![node.as_str(), lane.map(Lane::as_str)], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What waits to go to `peer` (unfinished jobs first, then other frames of the
    /// outbox), and what waits here from it (the inbox), at most `limit` of each.
    pub fn waiting_for(
        &self,
        peer: &Name,
        limit: u32,
    ) -> Result<(Vec<Waiting>, Vec<Waiting>), StoreError> {
        let mut to = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT t.job, t.lane, t.seq, t.state, j.summary, j.method, j.created_ms
                 FROM job_targets t JOIN jobs j ON j.id = t.job
                 WHERE t.node = ?1 AND t.result IS NULL ORDER BY t.job LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![peer.as_str(), limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })?;
            for row in rows {
                let (job, lane, seq, state, summary, method, created) = row?;
                to.push(Waiting {
                    job: Some(job),
                    lane: lane_of(&lane)?,
                    seq: seq as u64,
                    state,
                    what: format!("{method} {summary}"),
                    since_ms: created as u64,
                });
            }
        }
        let left = limit.saturating_sub(to.len() as u32);
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.lane, o.seq, o.frame FROM outbox o WHERE o.peer = ?1
             AND NOT EXISTS (SELECT 1 FROM job_targets t
                             WHERE t.node = o.peer AND t.lane = o.lane AND t.seq = o.seq)
             ORDER BY o.lane, o.seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![peer.as_str(), left], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        for row in rows {
            let (lane, seq, bytes) = row?;
            let (what, since) = describe(&bytes);
            to.push(Waiting {
                job: None,
                lane: lane_of(&lane)?,
                seq: seq as u64,
                state: "queued".into(),
                what,
                since_ms: since,
            });
        }
        let mut from = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT i.lane, i.seq, i.frame, i.recv_ms,
                    EXISTS (SELECT 1 FROM journal j WHERE j.peer = i.peer AND j.lane = i.lane
                            AND j.seq = i.seq AND j.state = 'running')
             FROM inbox i WHERE i.peer = ?1 ORDER BY i.lane, i.seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![peer.as_str(), limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?;
        for row in rows {
            let (lane, seq, bytes, recv, running) = row?;
            let (what, created) = describe(&bytes);
            from.push(Waiting {
                job: None,
                lane: lane_of(&lane)?,
                seq: seq as u64,
                state: if running { "running" } else { "received" }.into(),
                what,
                since_ms: recv.map_or(created, |r| r as u64),
            });
        }
        Ok((to, from))
    }

    /// Where a cancel from `inbound.env.from` finds its command `seq` on `lane`;
    /// a cancel for a command not here yet is kept (and the cancel frame consumed
    /// with it), any other is consumed by [`Store::consume`] after it is acted on.
    pub fn locate_cancel(
        &mut self,
        inbound: &Inbound,
        lane: &Lane,
        seq: u64,
        now_ms: u64,
    ) -> Result<CancelAt, StoreError> {
        let env = &inbound.env;
        let (
            Body::Cancel {
                stop,
                reason,
                check,
                ..
            },
            peer,
        ) = (&env.body, &env.from)
        else {
            return Err(StoreError::Invalid("locate_cancel takes cancels".into()));
        };
        let names =
            |cmd: &[u8]| -> Result<bool, StoreError> {
                let cmd = frame::decode(cmd)?;
                Ok(matches!(cmd.body, Body::Command(_))
                    && (*check == 0 || cmd.fingerprint() == *check))
            };
        let key = params![peer.as_str(), lane.as_str(), seq as i64];
        let journal: Option<String> = self
            .conn
            .row(
                "SELECT state FROM journal WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                key,
                |r| r.get(0),
            )
            .optional()?;
        // A running command's frame stays in the inbox until it finishes.
        let held: Option<Vec<u8>> = self
            .conn
            .row(
                "SELECT frame FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                key,
                |r| r.get(0),
            )
            .optional()?;
        if let Some(bytes) = &held {
            if !names(bytes)? {
                return Ok(CancelAt::Gone);
            }
        }
        match journal.as_deref() {
            Some("running") if held.is_some() => return Ok(CancelAt::Running),
            Some(_) => return Ok(CancelAt::Gone),
            None => {}
        }
        let wm = watermark(&self.conn, peer, lane)?;
        match held {
            Some(bytes) if seq <= wm => Ok(CancelAt::Inbox(Box::new(Inbound {
                env: frame::decode(&bytes)?,
                doubtful: false,
                expired: false,
            }))),
            None if seq <= wm => Ok(CancelAt::Gone),
            held => {
                let place = if held.is_some() { "inbox" } else { "flight" };
                let tx = self.conn.savepoint()?;
                tx.run(
                    "INSERT INTO cancels (peer, lane, seq, stop, reason, place, fp, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                    params![
                        peer.as_str(),
                        lane.as_str(),
                        seq as i64,
                        stop,
                        reason,
                        place,
                        check,
                        now_ms as i64
                    ],
                )?;
                let freed = consume_in(&tx, env)?;
                commit(tx, self.batch)?;
                self.committed();
                self.used -= freed;
                Ok(CancelAt::Kept)
            }
        }
    }

    /// A kept cancel for the command `cmd` that has now come: removed, and
    /// returned as the result text to answer it with.
    pub fn take_cancel(&mut self, cmd: &Inbound) -> Result<Option<String>, StoreError> {
        let env = &cmd.env;
        let key = params![env.from.as_str(), env.lane.as_str(), env.seq as i64];
        let kept: Option<(String, String, u32)> = self
            .conn
            .prepare_cached(
                "SELECT reason, place, fp FROM cancels WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            )?
            .query_row(key, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((reason, place, fp)) = kept else {
            return Ok(None);
        };
        self.change(
            "DELETE FROM cancels WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            key,
        )?;
        if fp != 0 && fp != env.fingerprint() {
            return Ok(None);
        }
        let me = &self.me;
        Ok(Some(match place.as_str() {
            "inbox" => format!("cancelled in {me}'s inbox before it started: {reason}"),
            _ => {
                format!("cancelled in flight: the cancel reached {me} before the command: {reason}")
            }
        }))
    }

    /// Forgets a kept cancel whose command was withdrawn by its sender.
    pub fn drop_cancel(&mut self, peer: &Name, lane: &Lane, seq: u64) -> Result<(), StoreError> {
        self.change(
            "DELETE FROM cancels WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            params![peer.as_str(), lane.as_str(), seq as i64],
        )?;
        Ok(())
    }
}

/// A stored frame's kind in a few words, and when it was made.
fn describe(bytes: &[u8]) -> (String, u64) {
    let Ok(env) = frame::decode(bytes) else {
        return ("corrupt frame".into(), 0);
    };
    let what = match &env.body {
        Body::Command(c) => format!("{} command", c.method()),
        Body::Result(r) => format!("result for #{} ({})", r.seq, r.status.as_str()),
        Body::FileOffer(o) => format!("file offer {}", o.id),
        Body::FileChunk { id, index, .. } => format!("file chunk {id}#{index}"),
        Body::FileStatus { id, state, .. } => format!("file status {id} ({state:?})"),
        Body::FileRequest { path } => format!("file request {path}"),
        Body::Started { seq } => format!("started #{seq}"),
        Body::Cancel { lane, seq, .. } => format!("cancel {lane}#{seq}"),
        Body::Withdrawn { .. } => "withdrawn command".into(),
        Body::Lost { .. } => "lost frame".into(),
        Body::Discarded { seq, .. } => format!("discarded #{seq}"),
        Body::Facts(_) => "facts".into(),
        Body::Errors(_) => "error report".into(),
        Body::Ack { .. } | Body::Hello { .. } | Body::Sync(_) | Body::Nack { .. } => {
            "control frame".into()
        }
    };
    (what, env.created_ms)
}
