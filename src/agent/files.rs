//! The agent's side of file transfers: answering offers, writing chunks, pumping
//! chunks of outgoing files into the outbox, sweeping expired ones, and the
//! control requests behind `outpost files`.
//!
//! The outbox never holds more than [`CHUNKS_AHEAD`] chunks of one transfer: more
//! are read from the source file as acknowledgements drain it, so disk and memory
//! stay flat whatever the file size.

use std::path::{Path, PathBuf};

use super::Agent;
use crate::control::reply::{
    Direction, FilesGetReply, FilesListReply, FilesPutReply, FilesRmReply, HeldView, TransferReply,
    TransferStarted, TransferView,
};
use crate::files;
use crate::frame::{Body, FileOffer, FileState, Method, Name};
use crate::store::{bulk_lane, control_lane, HeldFile, Inbound, Outgoing, StoreError, Transfer};
use crate::{error, info, warn};

/// Chunks of one transfer queued in the outbox at most.
pub const CHUNKS_AHEAD: u64 = 8;

impl Agent {
    /// Handles a file frame whose turn has come. Always consumes it.
    pub(super) fn on_file_frame(&mut self, inbound: &Inbound, now: u64) -> Result<(), StoreError> {
        let peer = inbound.env.from.clone();
        match &inbound.env.body {
            Body::FileOffer(offer) => self.on_offer(inbound, offer, now)?,
            Body::FileChunk { id, index, data } => self.on_chunk(inbound, id, *index, data, now)?,
            Body::FileStatus { id, state, reason } => {
                let st = match state {
                    FileState::Have => "skipped",
                    FileState::Want => "sending",
                    FileState::Done => "done",
                    FileState::Failed => "failed",
                };
                let store = self.node.store_mut();
                if let Some(t) = store.transfer("out", &peer, id)? {
                    if !t.finished() {
                        let why = if *state == FileState::Have {
                            "the receiver already holds it"
                        } else {
                            reason
                        };
                        store.set_transfer_state(t.id, st, why, now)?;
                    }
                } else if let Some(t) = store.transfer("in", &peer, id)? {
                    // The answer to our `files get`, refused before any offer.
                    if t.state == "requested" && *state == FileState::Failed {
                        store.set_transfer_state(t.id, "failed", reason, now)?;
                    }
                }
                if *state == FileState::Failed {
                    warn!("file {id} to {peer}: {reason}");
                }
                store.consume(inbound)?;
            }
            Body::FileRequest { path } => {
                let id = files::id_for(std::path::Path::new(path));
                let offered = self
                    .trust
                    .allows(&peer, Method::Files)
                    .and_then(|_| files::resolve_shared(&self.cfg.share_dirs, path))
                    .and_then(|(root, rel)| self.offer_shared(&peer, &root, &rel, &id, now));
                match offered {
                    Ok(_) => self.node.store_mut().consume(inbound)?,
                    Err(reason) => {
                        warn!("refused files get {path:?} from {peer}: {reason}");
                        self.node.store_mut().answer_file(
                            inbound,
                            None,
                            (&id, FileState::Failed, &reason),
                            now,
                        )?;
                    }
                }
            }
            _ => {}
        }
        self.node.sync_streams()
    }

    fn on_offer(
        &mut self,
        inbound: &Inbound,
        offer: &FileOffer,
        now: u64,
    ) -> Result<(), StoreError> {
        let peer = inbound.env.from.clone();
        let refuse = |agent: &mut Agent, reason: String| -> Result<(), StoreError> {
            warn!("refused file {:?} from {peer}: {reason}", offer.id);
            let store = agent.node.store_mut();
            // A `files get` waiting for this file learns why it will not come.
            if let Some(t) = store.transfer("in", &peer, &offer.id)? {
                store.set_transfer_state(t.id, "failed", &reason, now)?;
            }
            store.answer_file(inbound, None, (&offer.id, FileState::Failed, &reason), now)?;
            Ok(())
        };
        // Pushing files here needs `files`; answering our own `files get` does not.
        let requested = self
            .node
            .store()
            .transfer("in", &peer, &offer.id)?
            .is_some_and(|t| t.state == "requested");
        if !requested {
            if let Err(reason) = self.trust.allows(&peer, Method::Files) {
                return refuse(self, reason);
            }
        }
        if offer.expires_ms.is_some_and(|e| e <= now) {
            return refuse(self, "the file expired before it arrived".into());
        }
        if offer.sha256.len() != 32 || offer.chunk_size == 0 {
            return refuse(self, "malformed offer".into());
        }
        let (target, part) = match files::landing(&self.cfg.files_dir, &peer, &offer.id) {
            Ok(v) => v,
            Err(reason) => return refuse(self, reason),
        };
        let held = self.node.store().held_file(&peer, &offer.id)?;
        if held.is_some_and(|f| f.sha256 == offer.sha256 && target.is_file()) {
            let part = part.to_string_lossy();
            self.node.store_mut().answer_file(
                inbound,
                Some((offer, &part)),
                (&offer.id, FileState::Have, ""),
                now,
            )?;
            return Ok(());
        }
        // A fresh partial file: whatever an earlier offer left is not this one.
        let _ = std::fs::remove_file(&part);
        if let Err(reason) = files::write_chunk(&part, 0, offer.chunk_size, &[]) {
            return refuse(self, reason);
        }
        let part_s = part.to_string_lossy().into_owned();
        self.node.store_mut().answer_file(
            inbound,
            Some((offer, &part_s)),
            (&offer.id, FileState::Want, ""),
            now,
        )?;
        info!("receiving {} ({} bytes) from {peer}", offer.id, offer.size);
        if offer.size == 0 {
            if let Some(t) = self.node.store().transfer("in", &peer, &offer.id)? {
                self.complete_incoming(&t, now)?;
            }
        }
        Ok(())
    }

    fn on_chunk(
        &mut self,
        inbound: &Inbound,
        id: &str,
        index: u32,
        data: &[u8],
        now: u64,
    ) -> Result<(), StoreError> {
        let peer = inbound.env.from.clone();
        let t = match self.node.store().transfer("in", &peer, id)? {
            Some(t) if t.state == "receiving" => t,
            _ => {
                // A chunk of a transfer we refused, finished or swept: nothing to keep.
                return self.node.store_mut().consume(inbound);
            }
        };
        if index != t.next_chunk || index >= t.n_chunks {
            let reason = format!("chunk {index} out of place (expected {})", t.next_chunk);
            self.node.store_mut().consume(inbound)?;
            return self.fail_incoming(&t, &reason, now);
        }
        if let Err(e) = files::write_chunk_io(&t.path, index, t.chunk_size, data) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // The chunk stays in the inbox and is written when there is room:
                // the transfer waits, it does not fail.
                return Err(StoreError::Invalid(format!(
                    "no room for chunk {index} of {} from {peer}: {e}",
                    t.file_id
                )));
            }
            let reason = format!("cannot write {}: {e}", t.path.display());
            self.node.store_mut().consume(inbound)?;
            return self.fail_incoming(&t, &reason, now);
        }
        self.node
            .store_mut()
            .chunk_received(inbound, t.id, index, now)?;
        if index + 1 == t.n_chunks {
            self.complete_incoming(&t, now)?;
        }
        Ok(())
    }

    fn complete_incoming(&mut self, t: &Transfer, now: u64) -> Result<(), StoreError> {
        let target = match files::landing(&self.cfg.files_dir, &t.peer, &t.file_id) {
            Ok((target, _)) => target,
            Err(reason) => return self.fail_incoming(t, &reason, now),
        };
        match files::complete(&t.path, &target, &t.sha256, t.size) {
            Ok(()) => {
                let held = HeldFile {
                    source: t.peer.clone(),
                    file_id: t.file_id.clone(),
                    path: target.clone(),
                    size: t.size,
                    sha256: t.sha256.clone(),
                    received_ms: now,
                    expires_ms: t.expires_ms,
                };
                self.node
                    .store_mut()
                    .finish_incoming(t, Some(&held), FileState::Done, "", now)?;
                info!(
                    "received {} from {} into {}",
                    t.file_id,
                    t.peer,
                    target.display()
                );
                self.node.sync_streams()
            }
            Err(reason) => self.fail_incoming(t, &reason, now),
        }
    }

    fn fail_incoming(&mut self, t: &Transfer, reason: &str, now: u64) -> Result<(), StoreError> {
        error!("file {} from {}: {reason}", t.file_id, t.peer);
        let _ = std::fs::remove_file(&t.path);
        self.node
            .store_mut()
            .finish_incoming(t, None, FileState::Failed, reason, now)?;
        self.node.sync_streams()
    }

    /// Offers a file from a share directory: opened once without following
    /// symlinks, hashed from that descriptor, and its chunks read from it (see
    /// [`files::open_confined`]); the transfer keeps `root` and the path below it.
    fn offer_shared(
        &mut self,
        peer: &Name,
        root: &std::path::Path,
        rel: &std::path::Path,
        id: &str,
        now: u64,
    ) -> Result<i64, String> {
        files::validate_id(id)?;
        let mut f = files::open_confined(root, rel)?;
        let (sha256, size) = files::sha256_open(&mut f)?;
        let offer = FileOffer {
            id: id.to_string(),
            size,
            sha256,
            chunk_size: self.cfg.chunk_size,
            expires_ms: None,
        };
        let root_s = root.to_string_lossy();
        let t = self
            .node
            .store_mut()
            .start_outgoing(peer, &offer, (Some(&root_s), &rel.to_string_lossy()), now)
            .map_err(|e| e.to_string())?;
        self.sources.insert(t, f);
        self.node.sync_streams().map_err(|e| e.to_string())?;
        Ok(t)
    }

    /// Hashes `path` and offers it to `peer` as `id`.
    fn offer(
        &mut self,
        peer: &Name,
        path: &std::path::Path,
        id: &str,
        ttl_s: Option<u64>,
        now: u64,
    ) -> Result<i64, String> {
        files::validate_id(id)?;
        let (sha256, size) = files::sha256_file(path)?;
        let offer = FileOffer {
            id: id.to_string(),
            size,
            sha256,
            chunk_size: self.cfg.chunk_size,
            expires_ms: ttl_s.map(|t| now + t * 1000),
        };
        let path = path
            .canonicalize()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let t = self
            .node
            .store_mut()
            .start_outgoing(peer, &offer, (None, &path.to_string_lossy()), now)
            .map_err(|e| e.to_string())?;
        self.node.sync_streams().map_err(|e| e.to_string())?;
        Ok(t)
    }

    /// Tops up the outbox with chunks of transfers being sent, and sweeps expired
    /// transfers and files. Called on every turn of the loop.
    pub(super) fn pump_files(&mut self, now: u64) -> Result<(), StoreError> {
        let transfers = self.node.store().transfers(500)?;
        self.sources
            .retain(|id, _| transfers.iter().any(|t| t.id == *id && !t.finished()));
        let mut active = false;
        for t in transfers.iter().filter(|t| !t.finished()) {
            active = true;
            if t.expires_ms.is_some_and(|e| e <= now) {
                warn!(
                    "file {} {} {}: its ttl passed; swept",
                    t.file_id,
                    if t.direction == "out" { "to" } else { "from" },
                    t.peer
                );
                if t.direction == "in" {
                    let _ = std::fs::remove_file(&t.path);
                }
                self.node.store_mut().set_transfer_state(
                    t.id,
                    "expired",
                    "the ttl passed before the transfer finished",
                    now,
                )?;
                continue;
            }
            if t.direction != "out" || t.state != "sending" || t.next_chunk >= t.n_chunks {
                continue;
            }
            let depth = self.node.store().stream_depth(&t.peer, &bulk_lane())?;
            let room = CHUNKS_AHEAD
                .saturating_sub(depth)
                .min(u64::from(t.n_chunks - t.next_chunk)) as u32;
            if room == 0 {
                continue;
            }
            let mut chunks = Vec::with_capacity(room as usize);
            for i in 0..room {
                let index = t.next_chunk + i;
                let read = match &t.root {
                    // Read only from the file opened when it was offered (opened
                    // again, the same way, after a restart).
                    Some(root) => match self.sources.entry(t.id) {
                        std::collections::btree_map::Entry::Occupied(mut f) => {
                            files::read_chunk_open(f.get_mut(), index, t.chunk_size)
                        }
                        std::collections::btree_map::Entry::Vacant(v) => {
                            files::open_confined(root, &t.path).and_then(|f| {
                                files::read_chunk_open(v.insert(f), index, t.chunk_size)
                            })
                        }
                    },
                    None => files::read_chunk(&t.path, index, t.chunk_size),
                };
                match read {
                    Ok(c) => chunks.push(c),
                    Err(reason) => {
                        error!("file {} to {}: {reason}", t.file_id, t.peer);
                        self.node
                            .store_mut()
                            .set_transfer_state(t.id, "failed", &reason, now)?;
                        chunks.clear();
                        break;
                    }
                }
            }
            if chunks.is_empty() {
                continue;
            }
            match self.node.store_mut().enqueue_chunks(t, chunks, now) {
                Ok(_) => self.node.sync_streams()?,
                Err(StoreError::Full { .. }) => {} // acks will free room
                Err(e) => return Err(e),
            }
        }
        for f in self.node.store().held_files()? {
            if f.expires_ms.is_some_and(|e| e <= now) {
                info!(
                    "file {} from {} expired; removing {}",
                    f.file_id,
                    f.source,
                    f.path.display()
                );
                let _ = std::fs::remove_file(&f.path);
                self.node.store_mut().forget_file(&f.source, &f.file_id)?;
            } else if f.expires_ms.is_some() {
                active = true;
            }
        }
        self.files_active = active;
        Ok(())
    }

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
            let transfer = self.offer(&peer, &path, &id, ttl_s, now)?;
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
        let id = files::id_for(Path::new(&path));
        let item = Outgoing {
            to: peer.clone(),
            lane: control_lane(),
            ttl_s: None,
            body: Body::FileRequest { path },
        };
        let transfer = self
            .node
            .store_mut()
            .request_incoming(&peer, &id, now)
            .map_err(|e| e.to_string())?;
        self.node
            .submit(vec![item], now)
            .map_err(|e| e.to_string())?;
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
                let _ = std::fs::remove_file(&f.path);
                self.node
                    .store_mut()
                    .forget_file(&f.source, &f.file_id)
                    .map_err(|e| e.to_string())?;
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
