//! File transfers, the node's side: answering offers, writing chunks, pumping
//! chunks of outgoing files into the outbox, sweeping expired ones. Part of the
//! core the simulation drives: every state change goes through the store and keeps
//! delivery in step, here, not in the shell.
//!
//! The outbox never holds more than [`CHUNKS_AHEAD`] chunks of one transfer: more
//! are read from the source file as acknowledgements drain it, so disk and memory
//! stay flat whatever the file size.

use std::path::Path;

use super::{Node, Notice};
use crate::files;
use crate::frame::{Body, FileOffer, FileState, Name};
use crate::store::{bulk_lane, control_lane, HeldFile, Inbound, Outgoing, StoreError, Transfer};

/// Chunks of one transfer queued in the outbox at most.
pub const CHUNKS_AHEAD: u64 = 8;

impl Node {
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
                let store = &mut self.store;
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
                store.consume(inbound)?;
                if *state == FileState::Failed {
                    self.notice(Notice::Warn, format!("file {id} to {peer}: {reason}"));
                }
            }
            Body::FileRequest { path } => {
                let id = files::id_for(std::path::Path::new(path));
                let offered = self
                    .may_use_files(&peer)
                    .and_then(|_| files::resolve_shared(&self.cfg.files.share_dirs, path))
                    .and_then(|(root, rel)| self.offer_shared(&peer, &root, &rel, &id, now));
                match offered {
                    Ok(_) => self.store.consume(inbound)?,
                    Err(reason) => {
                        self.notice(
                            Notice::Warn,
                            format!("refused files get {path:?} from {peer}: {reason}"),
                        );
                        self.store.answer_file(
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
        self.sync_streams()
    }

    fn on_offer(
        &mut self,
        inbound: &Inbound,
        offer: &FileOffer,
        now: u64,
    ) -> Result<(), StoreError> {
        let peer = inbound.env.from.clone();
        let refuse = |node: &mut Node, reason: String| -> Result<(), StoreError> {
            node.notice(
                Notice::Warn,
                format!("refused file {:?} from {peer}: {reason}", offer.id),
            );
            let store = &mut node.store;
            // A `files get` waiting for this file learns why it will not come.
            if let Some(t) = store.transfer("in", &peer, &offer.id)? {
                store.set_transfer_state(t.id, "failed", &reason, now)?;
            }
            store.answer_file(inbound, None, (&offer.id, FileState::Failed, &reason), now)?;
            Ok(())
        };
        // Pushing files here needs `files`; answering our own `files get` does not.
        let requested = self
            .store
            .transfer("in", &peer, &offer.id)?
            .is_some_and(|t| t.state == "requested");
        if !requested {
            if let Err(reason) = self.may_use_files(&peer) {
                return refuse(self, reason);
            }
        }
        if offer.expires_ms.is_some_and(|e| e <= now) {
            return refuse(self, "the file expired before it arrived".into());
        }
        if offer.sha256.len() != 32 || offer.chunk_size == 0 {
            return refuse(self, "malformed offer".into());
        }
        let (target, part) = match files::landing(&self.cfg.files.dir, &peer, &offer.id) {
            Ok(v) => v,
            Err(reason) => return refuse(self, reason),
        };
        let held = self.store.held_file(&peer, &offer.id)?;
        if held.is_some_and(|f| f.sha256 == offer.sha256 && target.is_file()) {
            let part = part.to_string_lossy();
            self.store.answer_file(
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
        self.store.answer_file(
            inbound,
            Some((offer, &part_s)),
            (&offer.id, FileState::Want, ""),
            now,
        )?;
        self.notice(
            Notice::Info,
            format!("receiving {} ({} bytes) from {peer}", offer.id, offer.size),
        );
        if offer.size == 0 {
            if let Some(t) = self.store.transfer("in", &peer, &offer.id)? {
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
        let t = match self.store.transfer("in", &peer, id)? {
            Some(t) if t.state == "receiving" => t,
            _ => {
                // A chunk of a transfer we refused, finished or swept: nothing to keep.
                return self.store.consume(inbound);
            }
        };
        if index != t.next_chunk || index >= t.n_chunks {
            let reason = format!("chunk {index} out of place (expected {})", t.next_chunk);
            self.store.consume(inbound)?;
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
            self.store.consume(inbound)?;
            return self.fail_incoming(&t, &reason, now);
        }
        self.store.chunk_received(inbound, t.id, index, now)?;
        if index + 1 == t.n_chunks {
            self.complete_incoming(&t, now)?;
        }
        Ok(())
    }

    fn complete_incoming(&mut self, t: &Transfer, now: u64) -> Result<(), StoreError> {
        let target = match files::landing(&self.cfg.files.dir, &t.peer, &t.file_id) {
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
                self.store
                    .finish_incoming(t, Some(&held), FileState::Done, "", now)?;
                self.notice(
                    Notice::Info,
                    format!(
                        "received {} from {} into {}",
                        t.file_id,
                        t.peer,
                        target.display()
                    ),
                );
                self.sync_streams()
            }
            Err(reason) => self.fail_incoming(t, &reason, now),
        }
    }

    fn fail_incoming(&mut self, t: &Transfer, reason: &str, now: u64) -> Result<(), StoreError> {
        self.notice(
            Notice::Error,
            format!("file {} from {}: {reason}", t.file_id, t.peer),
        );
        let _ = std::fs::remove_file(&t.path);
        self.store
            .finish_incoming(t, None, FileState::Failed, reason, now)?;
        self.sync_streams()
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
            chunk_size: self.cfg.files.chunk_size,
            expires_ms: None,
        };
        let root_s = root.to_string_lossy();
        let t = self
            .store
            .start_outgoing(peer, &offer, (Some(&root_s), &rel.to_string_lossy()), now)
            .map_err(|e| e.to_string())?;
        self.sources.insert(t, f);
        self.sync_streams().map_err(|e| e.to_string())?;
        Ok(t)
    }

    /// Hashes `path` and offers it to `peer` as `id`.
    pub fn offer(
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
            chunk_size: self.cfg.files.chunk_size,
            expires_ms: ttl_s.map(|t| now + t * 1000),
        };
        let path = path
            .canonicalize()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let t = self
            .store
            .start_outgoing(peer, &offer, (None, &path.to_string_lossy()), now)
            .map_err(|e| e.to_string())?;
        self.sync_streams().map_err(|e| e.to_string())?;
        Ok(t)
    }

    /// Tops up the outbox with chunks of transfers being sent, and sweeps expired
    /// transfers and files. Called on every turn of the loop.
    pub fn pump_files(&mut self, now: u64) -> Result<(), StoreError> {
        let transfers = self.store.transfers(500)?;
        self.sources
            .retain(|id, _| transfers.iter().any(|t| t.id == *id && !t.finished()));
        let mut active = false;
        for t in transfers.iter().filter(|t| !t.finished()) {
            active = true;
            if t.expires_ms.is_some_and(|e| e <= now) {
                self.notice(
                    Notice::Warn,
                    format!(
                        "file {} {} {}: its ttl passed; swept",
                        t.file_id,
                        if t.direction == "out" { "to" } else { "from" },
                        t.peer
                    ),
                );
                if t.direction == "in" {
                    let _ = std::fs::remove_file(&t.path);
                }
                self.store.set_transfer_state(
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
            let depth = self.store.stream_depth(&t.peer, &bulk_lane())?;
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
                        self.notice(
                            Notice::Error,
                            format!("file {} to {}: {reason}", t.file_id, t.peer),
                        );
                        self.store
                            .set_transfer_state(t.id, "failed", &reason, now)?;
                        chunks.clear();
                        break;
                    }
                }
            }
            if chunks.is_empty() {
                continue;
            }
            match self.store.enqueue_chunks(t, chunks, now) {
                Ok(_) => self.sync_streams()?,
                Err(StoreError::Full { .. }) => {} // acks will free room
                Err(e) => return Err(e),
            }
        }
        for f in self.store.held_files()? {
            if f.expires_ms.is_some_and(|e| e <= now) {
                self.notice(
                    Notice::Info,
                    format!(
                        "file {} from {} expired; removing {}",
                        f.file_id,
                        f.source,
                        f.path.display()
                    ),
                );
                let _ = std::fs::remove_file(&f.path);
                self.store.forget_file(&f.source, &f.file_id)?;
            } else if f.expires_ms.is_some() {
                active = true;
            }
        }
        self.files_active = active;
        Ok(())
    }
}

impl Node {
    /// Asks `peer` for a file from its share directories; the transfer that will
    /// receive it.
    pub fn request_file(
        &mut self,
        peer: &Name,
        path: String,
        now: u64,
    ) -> Result<(String, i64), String> {
        let id = files::id_for(Path::new(&path));
        let item = Outgoing {
            to: peer.clone(),
            lane: control_lane(),
            ttl_s: None,
            body: Body::FileRequest { path },
        };
        let transfer = self
            .store
            .request_incoming(peer, &id, now)
            .map_err(|e| e.to_string())?;
        self.submit(vec![item], now).map_err(|e| e.to_string())?;
        Ok((id, transfer))
    }

    /// Deletes a received file and forgets it.
    pub fn remove_held(&mut self, f: &HeldFile) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(&f.path);
        self.store.forget_file(&f.source, &f.file_id).map(|_| ())
    }
}
