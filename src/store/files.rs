//! Store operations for file transfers: offers, chunks, verdicts, files held.

use super::sql::Cached;
use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Row};

use super::{commit, consume_in, enqueue_in, name, Inbound, Outgoing, Queued, Store, StoreError};
use crate::frame::{Body, FileOffer, FileState, Lane, Name};

/// One file transfer, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: i64,
    /// `out` (we send) or `in` (we receive).
    pub direction: String,
    pub peer: Name,
    pub file_id: String,
    /// out: the source (below `root` when set); in: the partial file.
    pub path: PathBuf,
    /// out, for a file from share_dirs: the share directory `path` is below.
    pub root: Option<PathBuf>,
    pub size: u64,
    pub sha256: Vec<u8>,
    pub chunk_size: u32,
    pub n_chunks: u32,
    /// out: next chunk to enqueue; in: chunks received.
    pub next_chunk: u32,
    pub state: String,
    pub reason: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub expires_ms: Option<u64>,
}

impl Transfer {
    pub fn finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "done" | "skipped" | "failed" | "expired"
        )
    }
}

/// A file received and held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldFile {
    pub source: Name,
    pub file_id: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: Vec<u8>,
    pub received_ms: u64,
    pub expires_ms: Option<u64>,
}

pub fn bulk_lane() -> Lane {
    Lane::new("bulk").expect("valid lane")
}

pub fn control_lane() -> Lane {
    Lane::new("control").expect("valid lane")
}

const COLUMNS: &str = "id, direction, peer, file_id, path, size, sha256, chunk_size, n_chunks, next_chunk, state, reason, started_ms, updated_ms, expires_ms, root";

fn transfer(r: &Row<'_>) -> rusqlite::Result<(Transfer, String)> {
    let peer: String = r.get(2)?;
    Ok((
        Transfer {
            id: r.get(0)?,
            direction: r.get(1)?,
            peer: Name::new("x").expect("placeholder"),
            file_id: r.get(3)?,
            path: PathBuf::from(r.get::<_, String>(4)?),
            size: r.get::<_, i64>(5)? as u64,
            sha256: r.get(6)?,
            chunk_size: r.get::<_, i64>(7)? as u32,
            n_chunks: r.get::<_, i64>(8)? as u32,
            next_chunk: r.get::<_, i64>(9)? as u32,
            state: r.get(10)?,
            reason: r.get(11)?,
            started_ms: r.get::<_, i64>(12)? as u64,
            updated_ms: r.get::<_, i64>(13)? as u64,
            expires_ms: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            root: r.get::<_, Option<String>>(15)?.map(PathBuf::from),
        },
        peer,
    ))
}

fn with_peer((mut t, peer): (Transfer, String)) -> Result<Transfer, StoreError> {
    t.peer = name(&peer)?;
    Ok(t)
}

impl Store {
    /// Records an outgoing transfer and enqueues its offer, in one transaction. An
    /// earlier transfer of the same id to the same peer starts over.
    pub fn start_outgoing(
        &mut self,
        peer: &Name,
        offer: &FileOffer,
        (root, path): (Option<&str>, &str),
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        let n_chunks = offer.size.div_ceil(u64::from(offer.chunk_size.max(1))) as i64;
        let item = Outgoing {
            to: peer.clone(),
            lane: bulk_lane(),
            ttl_s: None,
            body: Body::FileOffer(offer.clone()),
        };
        let tx = self.conn.savepoint()?;
        tx.run(
"INSERT INTO transfers (direction, peer, file_id, path, size, sha256, chunk_size, n_chunks, next_chunk,
                                    state, reason, started_ms, updated_ms, expires_ms, root)
             VALUES ('out', ?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 'offered', '', ?8, ?8, ?9, ?10)
             ON CONFLICT (direction, peer, file_id) DO UPDATE SET path = ?3, size = ?4, sha256 = ?5,
                 chunk_size = ?6, n_chunks = ?7, next_chunk = 0, state = 'offered', reason = '',
                 started_ms = ?8, updated_ms = ?8, expires_ms = ?9, root = ?10",
            params![
                peer.as_str(),
                offer.id,
                path,
                offer.size as i64,
                offer.sha256,
                offer.chunk_size,
                n_chunks,
                now_ms as i64,
                offer.expires_ms.map(|v| v as i64),
                root
            ],
        )?;
        let id: i64 = tx.row(
            "SELECT id FROM transfers WHERE direction = 'out' AND peer = ?1 AND file_id = ?2",
            params![peer.as_str(), offer.id],
            |r| r.get(0),
        )?;
        let (_, added) = enqueue_in(
            &tx,
            (&self.me, self.mono),
            std::slice::from_ref(&item),
            now_ms,
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(id)
    }

    /// Records that we asked `peer` for file `file_id` (`files get`).
    pub fn request_incoming(
        &mut self,
        peer: &Name,
        file_id: &str,
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        self.change(
            "INSERT INTO transfers (direction, peer, file_id, path, size, sha256, chunk_size, n_chunks, state, started_ms, updated_ms)
             VALUES ('in', ?1, ?2, '', 0, x'', 1, 0, 'requested', ?3, ?3)
             ON CONFLICT (direction, peer, file_id) DO UPDATE SET state = 'requested', reason = '', started_ms = ?3, updated_ms = ?3",
            params![peer.as_str(), file_id, now_ms as i64],
        )?;
        Ok(self.conn.row(
            "SELECT id FROM transfers WHERE direction = 'in' AND peer = ?1 AND file_id = ?2",
            params![peer.as_str(), file_id],
            |r| r.get(0),
        )?)
    }

    pub fn transfer(
        &self,
        direction: &str,
        peer: &Name,
        file_id: &str,
    ) -> Result<Option<Transfer>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND peer = ?2 AND file_id = ?3"
        );
        let t = self
            .conn
            .query_row(&sql, params![direction, peer.as_str(), file_id], transfer)
            .optional()?;
        t.map(with_peer).transpose()
    }

    pub fn transfer_by_id(&self, id: i64) -> Result<Option<Transfer>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM transfers WHERE id = ?1");
        self.conn
            .query_row(&sql, [id], transfer)
            .optional()?
            .map(with_peer)
            .transpose()
    }

    /// Transfers, newest first.
    pub fn transfers(&self, limit: u32) -> Result<Vec<Transfer>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM transfers ORDER BY updated_ms DESC, id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([limit], transfer)?;
        rows.map(|r| with_peer(r?)).collect()
    }

    pub fn set_transfer_state(
        &mut self,
        id: i64,
        state: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.change(
            "UPDATE transfers SET state = ?2, reason = ?3, updated_ms = ?4 WHERE id = ?1",
            params![id, state, reason, now_ms as i64],
        )?;
        Ok(())
    }

    /// Frames waiting in the outbox on one stream.
    pub fn stream_depth(&self, peer: &Name, lane: &Lane) -> Result<u64, StoreError> {
        let n: i64 = self.conn.row(
            "SELECT COUNT(*) FROM outbox WHERE peer = ?1 AND lane = ?2",
            params![peer.as_str(), lane.as_str()],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Enqueues the next chunks of an outgoing transfer and advances it, atomically.
    pub fn enqueue_chunks(
        &mut self,
        t: &Transfer,
        chunks: Vec<Vec<u8>>,
        now_ms: u64,
    ) -> Result<Vec<Queued>, StoreError> {
        let n = chunks.len() as u32;
        let items: Vec<Outgoing> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, data)| Outgoing {
                to: t.peer.clone(),
                lane: bulk_lane(),
                ttl_s: None,
                body: Body::FileChunk {
                    id: t.file_id.clone(),
                    index: t.next_chunk + i as u32,
                    data,
                },
            })
            .collect();
        let tx = self.conn.savepoint()?;
        let (queued, added) = enqueue_in(&tx, (&self.me, self.mono), &items, now_ms)?;
        if let Err(full) = super::fits((self.used, self.quota), added, items) {
            drop(tx);
            return Err(full);
        }
        tx.run(
            "UPDATE transfers SET next_chunk = next_chunk + ?2, updated_ms = ?3 WHERE id = ?1",
            params![t.id, n, now_ms as i64],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(queued)
    }

    /// Consumes an inbound file frame and queues our answer, atomically; with
    /// `incoming`, also records (or restarts) the incoming transfer it opens.
    pub fn answer_file(
        &mut self,
        inbound: &Inbound,
        incoming: Option<(&FileOffer, &str)>,
        reply: (&str, FileState, &str),
        now_ms: u64,
    ) -> Result<Queued, StoreError> {
        let peer = &inbound.env.from;
        let (id, state, reason) = reply;
        let item = Outgoing {
            to: peer.clone(),
            lane: control_lane(),
            ttl_s: None,
            body: Body::FileStatus {
                id: id.to_string(),
                state,
                reason: reason.to_string(),
            },
        };
        let tx = self.conn.savepoint()?;
        if let Some((offer, part)) = incoming {
            let n_chunks = offer.size.div_ceil(u64::from(offer.chunk_size.max(1))) as i64;
            let st = if state == FileState::Have {
                "skipped"
            } else {
                "receiving"
            };
            tx.run(
"INSERT INTO transfers (direction, peer, file_id, path, size, sha256, chunk_size, n_chunks, next_chunk,
                                        state, reason, started_ms, updated_ms, expires_ms)
                 VALUES ('in', ?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, '', ?9, ?9, ?10)
                 ON CONFLICT (direction, peer, file_id) DO UPDATE SET path = ?3, size = ?4, sha256 = ?5,
                     chunk_size = ?6, n_chunks = ?7, next_chunk = 0, state = ?8, reason = '',
                     started_ms = ?9, updated_ms = ?9, expires_ms = ?10",
                params![
                    peer.as_str(),
                    offer.id,
                    part,
                    offer.size as i64,
                    offer.sha256,
                    offer.chunk_size,
                    n_chunks,
                    st,
                    now_ms as i64,
                    offer.expires_ms.map(|v| v as i64)
                ],
            )?;
            tx.run(
"DELETE FROM file_chunks WHERE transfer = (SELECT id FROM transfers WHERE direction = 'in' AND peer = ?1 AND file_id = ?2)",
                params![peer.as_str(), offer.id],
            )?;
        }
        let freed = consume_in(&tx, &inbound.env)?;
        let (mut queued, added) = enqueue_in(
            &tx,
            (&self.me, self.mono),
            std::slice::from_ref(&item),
            now_ms,
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used = self.used + added - freed;
        Ok(queued.remove(0))
    }

    /// Records a chunk written to disk and consumes its frame, atomically.
    pub fn chunk_received(
        &mut self,
        inbound: &Inbound,
        transfer: i64,
        index: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let n = tx.run(
            "INSERT OR IGNORE INTO file_chunks (transfer, idx) VALUES (?1, ?2)",
            params![transfer, index],
        )?;
        tx.run(
            "UPDATE transfers SET next_chunk = next_chunk + ?2, updated_ms = ?3 WHERE id = ?1",
            params![transfer, n as i64, now_ms as i64],
        )?;
        let freed = consume_in(&tx, &inbound.env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(())
    }

    /// Ends an incoming transfer: records the file (when ok) and tells the sender.
    pub fn finish_incoming(
        &mut self,
        t: &Transfer,
        held: Option<&HeldFile>,
        state: FileState,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let item = Outgoing {
            to: t.peer.clone(),
            lane: control_lane(),
            ttl_s: None,
            body: Body::FileStatus {
                id: t.file_id.clone(),
                state,
                reason: reason.to_string(),
            },
        };
        let st = match state {
            FileState::Done => "done",
            _ => "failed",
        };
        let tx = self.conn.savepoint()?;
        tx.run(
            "UPDATE transfers SET state = ?2, reason = ?3, updated_ms = ?4 WHERE id = ?1",
            params![t.id, st, reason, now_ms as i64],
        )?;
        tx.run("DELETE FROM file_chunks WHERE transfer = ?1", [t.id])?;
        if let Some(f) = held {
            tx.run(
"INSERT OR REPLACE INTO files (source, file_id, path, size, sha256, received_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    f.source.as_str(),
                    f.file_id,
                    f.path.to_string_lossy(),
                    f.size as i64,
                    f.sha256,
                    f.received_ms as i64,
                    f.expires_ms.map(|v| v as i64)
                ],
            )?;
        }
        let (_, added) = enqueue_in(
            &tx,
            (&self.me, self.mono),
            std::slice::from_ref(&item),
            now_ms,
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(())
    }

    /// Records that a command we sent is running on its node, and consumes the notice.
    pub fn record_started(&mut self, inbound: &Inbound, seq: u64) -> Result<(), StoreError> {
        let env = &inbound.env;
        let tx = self.conn.savepoint()?;
        tx.run(
            "UPDATE job_targets SET state = 'running'
             WHERE node = ?1 AND lane = ?2 AND seq = ?3 AND state IN ('queued', 'delivered')",
            params![env.from.as_str(), env.lane.as_str(), seq as i64],
        )?;
        let freed = consume_in(&tx, env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(())
    }

    /// Consumes a frame that needs no answer (a file status for our transfer).
    pub fn consume(&mut self, inbound: &Inbound) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let freed = consume_in(&tx, &inbound.env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(())
    }

    pub fn held_file(&self, source: &Name, file_id: &str) -> Result<Option<HeldFile>, StoreError> {
        let f = self
            .conn
            .row(
"SELECT source, file_id, path, size, sha256, received_ms, expires_ms FROM files WHERE source = ?1 AND file_id = ?2",
                params![source.as_str(), file_id],
                held,
            )
            .optional()?;
        f.map(|(f, s)| {
            Ok(HeldFile {
                source: name(&s)?,
                ..f
            })
        })
        .transpose()
    }

    pub fn held_files(&self) -> Result<Vec<HeldFile>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT source, file_id, path, size, sha256, received_ms, expires_ms FROM files ORDER BY source, file_id",
        )?;
        let rows = stmt.query_map([], held)?;
        rows.map(|r| {
            let (f, s) = r?;
            Ok(HeldFile {
                source: name(&s)?,
                ..f
            })
        })
        .collect()
    }

    pub fn forget_file(&mut self, source: &Name, file_id: &str) -> Result<bool, StoreError> {
        let n = self.change(
            "DELETE FROM files WHERE source = ?1 AND file_id = ?2",
            params![source.as_str(), file_id],
        )?;
        Ok(n > 0)
    }
}

fn held(r: &Row<'_>) -> rusqlite::Result<(HeldFile, String)> {
    Ok((
        HeldFile {
            source: Name::new("x").expect("placeholder"),
            file_id: r.get(1)?,
            path: PathBuf::from(r.get::<_, String>(2)?),
            size: r.get::<_, i64>(3)? as u64,
            sha256: r.get(4)?,
            received_ms: r.get::<_, i64>(5)? as u64,
            expires_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        },
        r.get(0)?,
    ))
}
