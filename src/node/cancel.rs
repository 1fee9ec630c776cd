//! Cancels: the sender's side (withdraw, send a cancel, supersede) and the
//! receiver's (answer it where the command is). The store does the bookkeeping
//! (`store/cancel.rs`); this wires it to delivery and the shell.

use super::{Node, Ready};
use crate::frame::{Body, CmdResult, Lane, Name, Status};
use crate::store::{CancelAt, Cancelled, Inbound, StoreError};

impl Node {
    /// Cancels job `job`'s command to `node` (see [`crate::store::Store::cancel_target`]);
    /// `None` when the job has no such target.
    pub fn cancel(
        &mut self,
        job: i64,
        node: &Name,
        stop: bool,
        reason: &str,
        now_ms: u64,
    ) -> Result<Option<Cancelled>, StoreError> {
        let Some((outcome, queued)) = self.store.cancel_target(job, node, stop, reason, now_ms)?
        else {
            return Ok(None);
        };
        if let Some(q) = queued {
            self.note_queued(std::slice::from_ref(&q), now_ms);
        }
        Ok(Some(outcome))
    }

    /// Marks job `job` with a supersede key.
    pub fn set_job_key(&mut self, job: i64, key: &str) -> Result<(), StoreError> {
        self.store.set_job_key(job, key)
    }

    /// A cancel from a peer, taken from the inbox: a command in the inbox is
    /// answered `cancelled` now, a running one is handed to the shell to stop (if
    /// the cancel says so), one not here yet is cancelled when it comes.
    pub(super) fn on_cancel(
        &mut self,
        inbound: &Inbound,
        out: &mut Ready,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let Body::Cancel {
            lane,
            seq,
            stop,
            reason,
            ..
        } = &inbound.env.body
        else {
            return Ok(());
        };
        match self.store.locate_cancel(inbound, lane, *seq, now_ms)? {
            CancelAt::Inbox(cmd) => {
                let me = self.me().clone();
                let text = format!("cancelled in {me}'s inbox before it started: {reason}");
                let r = CmdResult::without_run(*seq, Status::Cancelled, text, now_ms);
                self.finish(&cmd, r, now_ms)?;
                self.store.consume(inbound)?;
                // It may be in this very call's list of commands to start.
                out.answered
                    .push((cmd.env.lane.clone(), cmd.env.seq, cmd.env.from.clone()));
            }
            CancelAt::Running => {
                if *stop {
                    out.cancels.push(Cancel {
                        peer: inbound.env.from.clone(),
                        lane: lane.clone(),
                        seq: *seq,
                        reason: reason.clone(),
                    });
                }
                self.store.consume(inbound)?;
            }
            CancelAt::Kept => {}
            CancelAt::Gone => self.store.consume(inbound)?,
        }
        Ok(())
    }

    /// A command whose turn came with a cancel kept for it: answered `cancelled`
    /// instead of run. Whether it was.
    pub(super) fn cancelled_on_arrival(
        &mut self,
        cmd: &Inbound,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let Some(text) = self.store.take_cancel(cmd)? else {
            return Ok(false);
        };
        let r = CmdResult::without_run(cmd.env.seq, Status::Cancelled, text, now_ms);
        self.finish(cmd, r, now_ms)?;
        Ok(true)
    }
}

/// A running command a peer asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    pub peer: Name,
    pub lane: Lane,
    pub seq: u64,
    pub reason: String,
}
