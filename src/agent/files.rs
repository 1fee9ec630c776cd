//! The `files-*` control requests: the views `outpost files` prints, and the
//! calls into the node's file transfers ([`crate::node`] owns every change).

use std::path::PathBuf;

use super::Agent;
use crate::control::reply::{
    Direction, FilesGetReply, FilesListReply, FilesPutReply, FilesRmReply, HeldView, TransferReply,
    TransferStarted, TransferView,
};
use crate::files;
use crate::store::{bulk_lane, Transfer};

impl Agent {
    pub(super) fn files_put(
        &mut self,
        to: &str,
        path: String,
        id: Option<String>,
        ttl_s: Option<u64>,
        now: u64,
    ) -> Result<FilesPutReply, String> {
        let path = PathBuf::from(path);
        let id = id.unwrap_or_else(|| files::id_for(&path));
        let (targets, _) = self.resolve_targets(to)?;
        let mut transfers = Vec::new();
        for peer in targets {
            let transfer = self.node.offer(&peer, &path, &id, ttl_s, now)?;
            transfers.push(TransferStarted {
                node: peer.to_string(),
                transfer,
            });
        }
        Ok(FilesPutReply { id, transfers })
    }

    pub(super) fn files_get(
        &mut self,
        from: &str,
        path: String,
        now: u64,
    ) -> Result<FilesGetReply, String> {
        let peer = self.resolve_one(from)?;
        let (id, transfer) = self.node.request_file(&peer, path, now)?;
        Ok(FilesGetReply { id, transfer })
    }

    pub(super) fn files_list(&self, now: u64) -> Result<FilesListReply, String> {
        let store = self.node.store();
        let transfers = store.transfers(100).map_err(|e| e.to_string())?;
        let held = store.held_files().map_err(|e| e.to_string())?;
        Ok(FilesListReply {
            transfers: transfers
                .iter()
                .map(|t| self.transfer_view(t, now))
                .collect(),
            files: held
                .iter()
                .map(|f| HeldView {
                    source: f.source.to_string(),
                    id: f.file_id.clone(),
                    path: f.path.clone(),
                    size: f.size,
                    sha256: crate::seal::to_hex(&f.sha256),
                    received_ms: f.received_ms,
                    expires_ms: f.expires_ms,
                })
                .collect(),
        })
    }

    pub(super) fn transfer(&self, id: i64, now: u64) -> Result<TransferReply, String> {
        let t = self
            .node
            .store()
            .transfer_by_id(id)
            .map_err(|e| e.to_string())?
            .ok_or(format!("no transfer {id}"))?;
        Ok(TransferReply {
            transfer: self.transfer_view(&t, now),
        })
    }

    /// Deletes received files with this id (`SOURCE/ID` for one source).
    pub(super) fn files_rm(&mut self, id: &str) -> Result<FilesRmReply, String> {
        let (source, id) = match id.split_once('/') {
            Some((s, i)) => (Some(s), i),
            None => (None, id),
        };
        let mut removed = Vec::new();
        for f in self.node.store().held_files().map_err(|e| e.to_string())? {
            if f.file_id == id && source.is_none_or(|s| s == f.source.as_str()) {
                self.node.remove_held(&f).map_err(|e| e.to_string())?;
                removed.push(format!("{}/{}", f.source, f.file_id));
            }
        }
        if removed.is_empty() {
            return Err(format!("no file {id} held"));
        }
        Ok(FilesRmReply { removed })
    }

    fn transfer_view(&self, t: &Transfer, now: u64) -> TransferView {
        let out = t.direction == "out";
        let chunk = u64::from(t.chunk_size);
        let done_chunks = if out {
            // Enqueued minus still waiting in the outbox: what the receiver has.
            let depth = self
                .node
                .store()
                .stream_depth(&t.peer, &bulk_lane())
                .unwrap_or(0);
            u64::from(t.next_chunk).saturating_sub(depth)
        } else {
            u64::from(t.next_chunk)
        };
        let delivered = matches!(t.state.as_str(), "done" | "skipped");
        let bytes = if delivered {
            t.size
        } else {
            (done_chunks * chunk).min(t.size)
        };
        // A finished transfer's rate is over its life, not until now.
        let end = if t.finished() { t.updated_ms } else { now };
        let secs = (end.saturating_sub(t.started_ms) as f64 / 1000.0).max(0.001);
        let percent = match (bytes * 100).checked_div(t.size) {
            Some(p) => p,
            // An empty file is all there once delivered; a refused request of
            // unknown size is nowhere.
            None if delivered => 100,
            None => 0,
        };
        TransferView {
            transfer: t.id,
            direction: if out { Direction::Out } else { Direction::In },
            peer: t.peer.to_string(),
            id: t.file_id.clone(),
            size: t.size,
            bytes,
            percent,
            rate_bps: (bytes as f64 / secs) as u64,
            state: t.state.clone(),
            reason: t.reason.clone(),
            finished: t.finished(),
            path: t.path.clone(),
            expires_ms: t.expires_ms,
        }
    }
}
