//! Results to files for `send --output-dir --async`: when results arrive, the
//! agent writes each target's `NODE.out`, `NODE.err` and `NODE.json` into the
//! job's directory (see [`crate::control::output`]), once per target, also for
//! results that arrived before a restart.

use std::path::Path;

use super::requests::job_view;
use super::Agent;
use crate::control::output::{write_result, OutputSpec};
use crate::control::reply::SendReply;
use crate::control::CommandSpec;
use crate::frame::Name;
use crate::{debug, error};

impl Agent {
    /// `send`, and with `output` the job's output directory recorded in the same
    /// commit.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_with_output(
        &mut self,
        targets: (Vec<Name>, Vec<String>),
        lane: Option<&str>,
        ttl_s: Option<u32>,
        key: Option<&str>,
        command: CommandSpec,
        output: Option<OutputSpec>,
        now: u64,
    ) -> Result<SendReply, String> {
        let Some(spec) = output else {
            return self.send(targets, lane, ttl_s, key, command, now);
        };
        Agent::check_output(&spec)?;
        // Inside a `batch` request the job and its output directory share the
        // batch's commit.
        let outer = self.node.store().in_batch();
        self.node.begin_batch().map_err(|e| e.to_string())?;
        let sent = self
            .send(targets, lane, ttl_s, key, command, now)
            .and_then(|r| {
                self.node
                    .set_job_output(r.job, &spec.dir, spec.append)
                    .map(|()| r)
                    .map_err(|e| e.to_string())
            });
        if outer {
            return sent;
        }
        match (sent, self.node.end_batch()) {
            (Ok(r), Ok(())) => Ok(r),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(format!("cannot queue the command: {e}")),
        }
    }

    /// Checks an `--async` send's output directory before the job exists: it
    /// must be absolute, and is created if missing.
    pub(super) fn check_output(spec: &OutputSpec) -> Result<(), String> {
        let dir = Path::new(&spec.dir);
        if !dir.is_absolute() {
            return Err(format!(
                "output directory {:?} is relative; the agent needs an absolute path",
                spec.dir
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("output directory {}: {e}", spec.dir))
    }

    /// Writes the result files of every job with an output directory among
    /// `ids` (every pending one when `all`) whose results are not yet written.
    pub(super) fn write_outputs(&mut self, all: bool, ids: &[i64]) {
        let pending = match self.node.store().pending_outputs() {
            Ok(p) => p,
            Err(e) => {
                error!("cannot read the jobs that write results to files: {e}");
                return;
            }
        };
        for id in pending.into_iter().filter(|id| all || ids.contains(id)) {
            let store = self.node.store();
            let (Ok(Some(out)), Ok(Some(job))) = (store.job_output(id), store.job(id)) else {
                continue;
            };
            let view = job_view(&job);
            for t in &view.targets {
                let Some(r) = &t.result else { continue };
                if out.written.iter().any(|n| n.as_str() == t.node) {
                    continue;
                }
                let failed = write_result(&out.dir, out.append, &view, &t.node, r).err();
                match &failed {
                    None => debug!(
                        "job {id}: wrote {}'s result to {}",
                        t.node,
                        out.dir.display()
                    ),
                    Some(e) => error!("job {id}: cannot write {}'s result to files: {e}", t.node),
                }
                let Ok(node) = crate::frame::Name::new(&t.node) else {
                    continue;
                };
                if let Err(e) = self.node.output_written(id, &node, failed.as_deref()) {
                    error!("job {id}: cannot record {}'s result files: {e}", t.node);
                }
            }
        }
    }
}
