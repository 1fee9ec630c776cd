//! The SQLite store: the only module that knows SQL.
//!
//! It is the truth about what is undelivered: the broker may drop anything, the two
//! stores at the ends of a stream decide what is resent and what is a duplicate.
//! Every operation that changes state is one transaction, so a crash leaves either
//! all of it or none of it. Every frame read back is CRC-checked; a bad one is moved
//! to `quarantine`, reported as a [`Corrupt`] value, and replaced so the stream flows.
//!
//! Blocking: call it from a dedicated thread, never from an async executor.

mod cancel;
mod errors;
mod files;
pub mod marker;
mod output;
mod registry;
mod retention;
mod schema;
mod session;
mod sql;
mod usage;

pub use cancel::{CancelAt, Cancelled, Waiting};
pub use errors::NodeError;
pub use files::{bulk_lane, control_lane, HeldFile, Transfer};
pub use output::JobOutput;
pub use registry::{FactsSent, NodeRecord, Polls};
pub use retention::{Pruned, Retention};
pub use session::{PeerSession, SyncOutcome};
pub use usage::UsageDelta;

use marker::Marker;
use sql::Cached;

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::frame::{self, Body, CmdResult, Envelope, FrameError, Lane, Method, Name, Status};

/// When commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync at every commit: nothing acknowledged is ever lost to a power cut.
    Full,
    /// fsync at WAL checkpoints only: a power cut may lose the last commits (never
    /// corrupt the database); fewer flash writes.
    Normal,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            _ => Err(format!(
                "unknown durability {s:?} (expected full or normal)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub durability: Durability,
    /// Bytes of frames (outbox plus inbox) past which new work is refused.
    pub quota_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Full,
            quota_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The quota would be exceeded; nothing was written. The items come back.
    #[error("store quota exceeded: {used} of {quota} bytes used, {needed} more needed")]
    Full {
        used: u64,
        quota: u64,
        needed: u64,
        rejected: Vec<Outgoing>,
    },
    #[error("cannot encode frame: {0}")]
    Frame(#[from] FrameError),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database is at schema version {0}, newer than this build understands ({1})")]
    TooNew(usize, usize),
    #[error("bad value in database: {0}")]
    Invalid(String),
}

/// A stored frame that failed its check; it was quarantined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place} frame {peer}/{lane}#{seq} quarantined: {error}")]
pub struct Corrupt {
    pub place: &'static str,
    pub peer: Name,
    pub lane: Lane,
    pub seq: u64,
    pub error: FrameError,
}

/// A frame to send, before it has a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub to: Name,
    pub lane: Lane,
    pub ttl_s: Option<u32>,
    pub body: Body,
}

/// Where an enqueued frame landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub to: Name,
    pub lane: Lane,
    pub seq: u64,
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Stored; the stream's watermark is now this.
    Accepted { watermark: u64 },
    /// Seen before; dropped (and worth acknowledging again).
    Duplicate { watermark: u64 },
    /// Stored but after a gap: it waits for the frames before it.
    Held { watermark: u64 },
    /// Too far past the watermark to hold; dropped, the sender will resend.
    Ahead { watermark: u64 },
    /// No room under the quota; dropped, not acknowledged, the sender will resend.
    NoSpace { watermark: u64 },
}

impl Receipt {
    pub fn watermark(self) -> u64 {
        match self {
            Receipt::Accepted { watermark }
            | Receipt::Duplicate { watermark }
            | Receipt::Held { watermark }
            | Receipt::Ahead { watermark }
            | Receipt::NoSpace { watermark } => watermark,
        }
    }
}

/// A received frame whose turn has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub env: Envelope,
    /// A command that may have reached an earlier store of this node (its sender
    /// said so after that store was lost): not to be run again.
    pub doubtful: bool,
    /// Its ttl has passed: the age it had when it arrived plus the time it has
    /// waited here since, on the monotonic clock (so a wall clock that is set
    /// forward or back changes nothing).
    pub expired: bool,
}

/// A reading of the monotonic clock (`CLOCK_BOOTTIME`: it keeps counting through
/// suspend) and the boot it counts from. Across a reboot it says nothing, and the
/// wall clock stands in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mono {
    pub ms: u64,
    pub boot: u64,
}

impl Inbound {
    pub fn peer(&self) -> &Name {
        &self.env.from
    }
}

/// The sending side of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutStream {
    pub peer: Name,
    pub lane: Lane,
    pub acked: u64,
    pub last_seq: u64,
}

/// A stored frame and its sequence number.
pub type SeqFrame = (u64, Vec<u8>);

/// Frames held after a gap may run at most this far past the watermark.
pub const HOLD_AHEAD: u64 = 4096;

pub struct Store {
    conn: Connection,
    me: Name,
    quota: u64,
    /// Bytes of frames in outbox and inbox; kept in step with every commit.
    used: u64,
    /// A batch is open: the operations' own savepoints nest inside it and nothing
    /// is committed until [`Store::end_batch`].
    batch: bool,
    /// This store's epoch (see [`crate::seal`]) and its generation: `meta.gen`,
    /// which every commit bumps, mirrored in the marker file.
    epoch: u64,
    gen: u64,
    marker: Marker,
    /// The monotonic clock as of the last [`Store::tick`].
    mono: Mono,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("me", &self.me)
            .field("epoch", &format_args!("{:016x}", self.epoch))
            .field("gen", &self.gen)
            .finish_non_exhaustive()
    }
}

/// This store found, when it opened, that it had lost committed state: it was
/// emptied, replaced, or went back to an earlier generation. The store has a new
/// epoch then, and every peer is resynchronised (see [`crate::node`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub reason: String,
}

/// Ends a change made in `tx`: bumps the store's generation, unless a batch is
/// open (the batch bumps it once when it commits), and commits. Call
/// [`Store::committed`] after it.
fn commit(tx: rusqlite::Savepoint<'_>, batch: bool) -> rusqlite::Result<()> {
    if !batch {
        tx.run("UPDATE meta SET gen = gen + 1", [])?;
    }
    tx.commit()
}

/// After a loss: a new epoch, counters of the old one forgotten, every peer to be
/// resynchronised. Every frame in the outbox now was numbered before the loss, the
/// same as the peer may already have it (`base`): frames numbered from here until
/// the next Sync are the provisional ones.
fn forget_own_epoch(
    tx: &Connection,
    epoch: u64,
    now_ms: u64,
    reason: &str,
) -> rusqlite::Result<()> {
    tx.run(
"UPDATE meta SET epoch = ?1, gen = gen + 1, lost_ms = ?2, lost_reason = ?3, losses = losses + 1 WHERE id = 1",
        params![epoch as i64, now_ms as i64, reason],
    )?;
    tx.execute_batch(
        "DELETE FROM seal_out;
         UPDATE peer_sessions SET synced = 0, knows_mine = 0, we_lost = 1;
         UPDATE out_streams SET base = last_seq;",
    )
}

/// 64 random bits from the system, as a store epoch.
fn new_epoch() -> Result<u64, StoreError> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| StoreError::Invalid("the system random number generator failed".into()))?;
    Ok(crate::seal::epoch_from(u64::from_le_bytes(b)))
}

impl Store {
    /// Opens (creating) the store at `path`, and checks it against its marker
    /// file (`store.gen` beside it, see [`marker`]): a store that lost committed
    /// state gets a new epoch and comes back with the [`Loss`].
    pub fn open(
        path: &Path,
        me: &Name,
        cfg: &StoreConfig,
    ) -> Result<(Store, Option<Loss>), StoreError> {
        let marker_path = marker::path_for(path);
        let before = marker::read(&marker_path);
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(sql::CACHE);
        conn.pragma_update(None, "journal_mode", "wal")?;
        let sync = match cfg.durability {
            Durability::Full => "full",
            Durability::Normal => "normal",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "on")?;
        // A small, bounded WAL: checkpoint every 256 pages (1 MiB) and cut the file
        // back to 1 MiB after a checkpoint, so a small flash partition is not filled
        // by the log (see ARCHITECTURE.md, "The store on disk").
        conn.pragma_update(None, "wal_autocheckpoint", 256)?;
        conn.pragma_update(None, "journal_size_limit", 1024 * 1024)?;
        let version = conn.row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if version > schema::latest() {
            return Err(StoreError::TooNew(version, schema::latest()));
        }
        schema::migrate(&mut conn)?;
        let meta: Option<(i64, i64)> = conn
            .row("SELECT epoch, gen FROM meta WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let meta = meta.map(|(e, g)| marker::Mark {
            epoch: e as u64,
            gen: g as u64,
        });
        let lost = match (before, meta) {
            (Err(_), _) | (Ok(None), _) => None,
            (Ok(Some(m)), None) => Some(format!(
                "{} holds nothing, but this state directory last had store epoch {:016x} at generation {}",
                path.display(),
                m.epoch,
                m.gen
            )),
            (Ok(Some(m)), Some(db)) if m.epoch != db.epoch => Some(format!(
                "{} is store epoch {:016x}, but this state directory last had {:016x}",
                path.display(),
                db.epoch,
                m.epoch
            )),
            (Ok(Some(m)), Some(db)) if db.gen < m.gen => Some(format!(
                "{} went back from generation {} to {} (commits were lost: a deleted or damaged -wal, or a power cut)",
                path.display(),
                m.gen,
                db.gen
            )),
            _ => None,
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (epoch, gen) = match meta {
            None => {
                let epoch = new_epoch()?;
                conn.run(
"INSERT INTO meta (id, epoch, gen, lost_ms, lost_reason, losses) VALUES (1, ?1, 0, ?2, ?3, ?4)",
                    params![
                        epoch as i64,
                        lost.as_ref().map(|_| now_ms as i64),
                        lost.as_deref(),
                        i64::from(lost.is_some())
                    ],
                )?;
                (epoch, 0)
            }
            Some(db) if lost.is_some() => {
                let epoch = new_epoch()?;
                let tx = conn.transaction()?;
                forget_own_epoch(&tx, epoch, now_ms, lost.as_deref().unwrap_or_default())?;
                tx.commit()?;
                (epoch, db.gen + 1)
            }
            Some(db) => (db.epoch, db.gen),
        };
        if let Some(reason) = &lost {
            conn.run(
                "INSERT INTO events (at_ms, text) VALUES (?1, ?2)",
                params![
                    now_ms as i64,
                    format!("this node's store lost committed state: {reason}")
                ],
            )?;
        }
        let marker = Marker::create(&marker_path, marker::Mark { epoch, gen })
            .map_err(StoreError::Invalid)?;
        let used = bytes_held(&conn)?;
        let store = Store {
            conn,
            me: me.clone(),
            quota: cfg.quota_bytes,
            used,
            batch: false,
            epoch,
            gen,
            marker,
            mono: Mono::default(),
        };
        Ok((store, lost.map(|reason| Loss { reason })))
    }

    /// The monotonic clock now; receipts and ttls are measured on it.
    pub fn tick(&mut self, mono: Mono) {
        self.mono = mono;
    }

    /// This store's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many times this store found it had lost committed state.
    pub fn losses(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .row("SELECT losses FROM meta WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// When and why this store last found it had lost committed state.
    pub fn lost(&self) -> Result<Option<(u64, String)>, StoreError> {
        let row: Option<(Option<i64>, Option<String>)> = self
            .conn
            .row(
                "SELECT lost_ms, lost_reason FROM meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            Some((Some(at), Some(why))) => Some((at as u64, why)),
            _ => None,
        })
    }

    /// Runs one statement as a change of its own (or of the open batch).
    fn change(&mut self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        let tx = self.conn.savepoint()?;
        let n = tx.run(sql, params)?;
        commit(tx, self.batch)?;
        self.committed();
        Ok(n)
    }

    /// Records a commit made outside a batch: the generation went up by one.
    fn committed(&mut self) {
        if !self.batch {
            self.gen += 1;
            self.marker.record(marker::Mark {
                epoch: self.epoch,
                gen: self.gen,
            });
        }
    }

    /// Opens a batch: every change until [`Store::end_batch`] shares one commit
    /// (one WAL append and, with durability `full`, one fsync), which is what
    /// keeps bytes written per message small when many small frames are handled
    /// together. Each operation stays atomic on its own: a failing one rolls back
    /// to its own savepoint and leaves the batch intact. Nothing outside the store
    /// may act on a batched change (run a command, send a frame, answer a client)
    /// before the batch is committed. Does nothing if a batch is open.
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        if !self.batch {
            self.conn.execute_batch("SAVEPOINT batch")?;
            self.batch = true;
        }
        Ok(())
    }

    /// Commits the open batch, if any. If the commit fails (a full disk), the
    /// whole batch is rolled back and the byte count re-read; the caller must then
    /// resynchronise whatever it derived from the batched operations.
    pub fn end_batch(&mut self) -> Result<(), StoreError> {
        if !self.batch {
            return Ok(());
        }
        self.batch = false;
        match self
            .conn
            .execute_batch("UPDATE meta SET gen = gen + 1; RELEASE batch")
        {
            Ok(()) => {
                self.committed();
                Ok(())
            }
            Err(e) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.used = bytes_held(&self.conn)?;
                Err(e.into())
            }
        }
    }

    /// A batch is open.
    pub fn in_batch(&self) -> bool {
        self.batch
    }

    pub fn me(&self) -> &Name {
        &self.me
    }

    /// Bytes of frames held, against the quota.
    pub fn usage(&self) -> (u64, u64) {
        (self.used, self.quota)
    }

    /// Enqueues frames in one transaction (group commit), numbering each within its
    /// stream. Past the quota nothing is written and the items come back in the error.
    pub fn enqueue(
        &mut self,
        items: Vec<Outgoing>,
        now_ms: u64,
    ) -> Result<Vec<Queued>, StoreError> {
        let tx = self.conn.savepoint()?;
        let (queued, added) = enqueue_in(&tx, (&self.me, self.mono), &items, now_ms)?;
        if let Err(full) = fits((self.used, self.quota), added, items) {
            drop(tx);
            return Err(full);
        }
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(queued)
    }

    /// Streams with frames not yet acknowledged.
    pub fn out_streams(&self) -> Result<Vec<OutStream>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT peer, lane, acked, last_seq FROM out_streams WHERE last_seq > acked",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (peer, lane, acked, last) = row?;
            out.push(OutStream {
                peer: name(&peer)?,
                lane: lane_of(&lane)?,
                acked: acked as u64,
                last_seq: last as u64,
            });
        }
        Ok(out)
    }

    /// Outbox frames of one stream with `from <= seq <= to`, oldest first, CRC-checked.
    /// A corrupt one is quarantined and replaced by a [`Body::Lost`] frame with the
    /// same number, which is returned in its place.
    pub fn outbox_frames(
        &mut self,
        peer: &Name,
        lane: &Lane,
        from: u64,
        to: u64,
        now_ms: u64,
    ) -> Result<(Vec<SeqFrame>, Vec<Corrupt>), StoreError> {
        let rows: Vec<(u64, Vec<u8>)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT seq, frame FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq BETWEEN ?3 AND ?4 ORDER BY seq",
            )?;
            let rows = stmt.query_map(
                params![peer.as_str(), lane.as_str(), from as i64, to as i64],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
            )?;
            rows.collect::<Result<_, _>>()?
        };
        let mut frames = Vec::with_capacity(rows.len());
        let mut corrupt = Vec::new();
        for (seq, bytes) in rows {
            match check_stored(&bytes, &self.me, peer, lane, seq) {
                Ok(()) => frames.push((seq, bytes)),
                Err(error) => {
                    let lost = Envelope {
                        from: self.me.clone(),
                        to: peer.clone(),
                        lane: lane.clone(),
                        seq,
                        created_ms: now_ms,
                        ttl_s: None,
                        body: Body::Lost {
                            reason: format!("frame was corrupt in the sender's store: {error}"),
                        },
                    };
                    let replacement = frame::encode(&lost)?;
                    let tx = self.conn.savepoint()?;
                    quarantine(&tx, now_ms, "outbox", peer, lane, seq, &error, &bytes)?;
                    tx.run(
                        "UPDATE outbox SET frame = ?4 WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                        params![peer.as_str(), lane.as_str(), seq as i64, replacement],
                    )?;
                    commit(tx, self.batch)?;
                    self.committed();
                    self.used = self.used + replacement.len() as u64 - bytes.len() as u64;
                    corrupt.push(Corrupt {
                        place: "outbox",
                        peer: peer.clone(),
                        lane: lane.clone(),
                        seq,
                        error,
                    });
                    frames.push((seq, replacement));
                }
            }
        }
        Ok((frames, corrupt))
    }

    /// Applies a cumulative acknowledgement; returns how many frames it freed.
    /// An ack past what was ever sent is clamped (it cannot free the future).
    pub fn apply_ack(&mut self, peer: &Name, lane: &Lane, upto: u64) -> Result<u64, StoreError> {
        let tx = self.conn.savepoint()?;
        let stream: Option<(i64, i64)> = tx
            .row(
                "SELECT last_seq, acked FROM out_streams WHERE peer = ?1 AND lane = ?2",
                params![peer.as_str(), lane.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((last, acked)) = stream else {
            return Ok(0);
        };
        let upto = upto.min(last as u64) as i64;
        let freed_bytes: i64 = tx.row(
"SELECT COALESCE(SUM(length(frame)), 0) FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq <= ?3",
            params![peer.as_str(), lane.as_str(), upto],
            |r| r.get(0),
        )?;
        let n = tx.run(
            "DELETE FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq <= ?3",
            params![peer.as_str(), lane.as_str(), upto],
        )?;
        tx.run(
            "UPDATE out_streams SET acked = MAX(acked, ?3) WHERE peer = ?1 AND lane = ?2",
            params![peer.as_str(), lane.as_str(), upto],
        )?;
        tx.run(
            // Only what this ack newly covers: everything up to `acked` was
            // marked before, and the stream's history grows without bound.
            "UPDATE job_targets SET state = 'delivered'
             WHERE node = ?1 AND lane = ?2 AND seq > ?4 AND seq <= ?3 AND state = 'queued'",
            params![peer.as_str(), lane.as_str(), upto, acked],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed_bytes as u64;
        Ok(n as u64)
    }

    /// Stores received frames in one transaction: duplicates are dropped, frames after
    /// a gap are held, the watermark advances over every contiguous frame.
    /// `frames` must be sequenced frames addressed to this node.
    /// Each is stamped with when it arrived (`now_ms` and the monotonic clock of
    /// [`Store::tick`]), which is what its ttl is measured from.
    pub fn receive(
        &mut self,
        frames: &[(Envelope, &[u8])],
        now_ms: u64,
    ) -> Result<Vec<Receipt>, StoreError> {
        let tx = self.conn.savepoint()?;
        let mut receipts = Vec::with_capacity(frames.len());
        let mut added = 0u64;
        for (env, bytes) in frames {
            let space = (self.used + added, self.quota);
            let receipt = receive_one(&tx, env, bytes, space, (now_ms, self.mono))?;
            if matches!(receipt, Receipt::Accepted { .. } | Receipt::Held { .. }) {
                added += bytes.len() as u64;
            }
            receipts.push(receipt);
        }
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(receipts)
    }

    /// Highest contiguous sequence number received on a stream.
    pub fn watermark(&self, peer: &Name, lane: &Lane) -> Result<u64, StoreError> {
        Ok(watermark(&self.conn, peer, lane)?)
    }

    /// Frames whose turn has come, oldest first per stream: for an ordered stream the
    /// next frame if nothing of that stream is running, for a parallel stream up to
    /// `parallel` frames at once. Corrupt frames are quarantined, the sender is told
    /// with a [`Body::Discarded`] frame, and they are reported in the second list.
    pub fn runnable(
        &mut self,
        parallel: usize,
        now_ms: u64,
    ) -> Result<(Vec<Inbound>, Vec<Corrupt>), StoreError> {
        let streams: Vec<(String, String, i64, i64)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT s.peer, s.lane, s.watermark, s.doubt FROM in_streams s
                 WHERE EXISTS (SELECT 1 FROM inbox i WHERE i.peer = s.peer AND i.lane = s.lane AND i.seq <= s.watermark)",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut ready = Vec::new();
        let mut corrupt = Vec::new();
        for (peer, lane, wm, doubt) in streams {
            let (peer, lane) = (name(&peer)?, lane_of(&lane)?);
            // Through the partial index on running entries (migration 5): the
            // journal keeps every command ever run and the inbox can hold a long
            // backlog, and walking either made each call O(history) or O(backlog).
            // A running command's frame stays in the inbox until it finishes.
            let running: i64 = self.conn.row(
                "SELECT COUNT(*) FROM journal
                 WHERE peer = ?1 AND lane = ?2 AND state = 'running'",
                params![peer.as_str(), lane.as_str()],
                |r| r.get(0),
            )?;
            let room = match lane.class() {
                frame::LaneClass::Parallel => parallel.saturating_sub(running as usize),
                _ if running > 0 => 0,
                _ => 1,
            };
            if room == 0 {
                continue;
            }
            #[allow(clippy::type_complexity)]
            let rows: Vec<(u64, Vec<u8>, Option<i64>, Option<i64>, Option<i64>)> = {
                let mut stmt = self.conn.prepare_cached(
                    "SELECT i.seq, i.frame, i.recv_ms, i.recv_mono, i.recv_boot FROM inbox i
                     WHERE i.peer = ?1 AND i.lane = ?2 AND i.seq <= ?3
                       AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.peer = i.peer AND j.lane = i.lane AND j.seq = i.seq)
                     ORDER BY i.seq LIMIT ?4",
                )?;
                let rows = stmt.query_map(
                    params![peer.as_str(), lane.as_str(), wm, room as i64],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                        ))
                    },
                )?;
                rows.collect::<Result<_, _>>()?
            };
            for (seq, bytes, recv_ms, recv_mono, recv_boot) in rows {
                match frame::decode(&bytes)
                    .and_then(|env| matching(env, &peer, &self.me, &lane, seq))
                {
                    Ok(env) => {
                        // A withdrawn command, too: the sender's answer (cancelled,
                        // expired) may be wrong if an earlier store of ours had it.
                        let doubtful = seq <= doubt as u64
                            && match &env.body {
                                Body::Command(c) => !c.reruns(),
                                Body::Withdrawn { .. } => true,
                                _ => false,
                            };
                        let arrived = recv_ms.map(|w| Arrival {
                            wall_ms: w as u64,
                            mono: Mono {
                                ms: recv_mono.unwrap_or(0) as u64,
                                boot: recv_boot.unwrap_or(0) as u64,
                            },
                        });
                        let expired = expired(&env, arrived, now_ms, self.mono);
                        ready.push(Inbound {
                            env,
                            doubtful,
                            expired,
                        });
                    }
                    Err(error) => {
                        self.discard(&peer, &lane, seq, &bytes, &error, now_ms)?;
                        corrupt.push(Corrupt {
                            place: "inbox",
                            peer: peer.clone(),
                            lane: lane.clone(),
                            seq,
                            error,
                        });
                        // An ordered stream must not run past the hole in the same pass;
                        // the next call picks up what follows.
                        if lane.class() != frame::LaneClass::Parallel {
                            break;
                        }
                    }
                }
            }
        }
        Ok((ready, corrupt))
    }

    /// Records that a command is about to start. Committed before the process exists,
    /// so a crash afterwards is reported `interrupted`, never silently re-run.
    pub fn start(&mut self, cmd: &Inbound, method: &str, now_ms: u64) -> Result<(), StoreError> {
        let env = &cmd.env;
        self.change(
            "INSERT INTO journal (peer, lane, seq, state, method, started_ms) VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
            params![env.from.as_str(), env.lane.as_str(), env.seq as i64, method, now_ms as i64],
        )?;
        Ok(())
    }

    /// Journals a command done and enqueues its result for the sender, in one
    /// transaction. Works whether or not `start` was called (expired, rejected).
    /// Results of accepted work are never refused for quota: the quota gates new work.
    pub fn finish(
        &mut self,
        cmd: &Inbound,
        method: &str,
        result: CmdResult,
        now_ms: u64,
    ) -> Result<Queued, StoreError> {
        let env = &cmd.env;
        let status = result.status.as_str();
        let out = Outgoing {
            to: env.from.clone(),
            lane: env.lane.clone(),
            ttl_s: None,
            body: Body::Result(result),
        };
        let tx = self.conn.savepoint()?;
        tx.run(
"INSERT INTO journal (peer, lane, seq, state, method, started_ms, finished_ms, status)
             VALUES (?1, ?2, ?3, 'done', ?4, ?5, ?5, ?6)
             ON CONFLICT (peer, lane, seq) DO UPDATE SET state = 'done', finished_ms = ?5, status = ?6",
            params![env.from.as_str(), env.lane.as_str(), env.seq as i64, method, now_ms as i64, status],
        )?;
        let freed = consume_in(&tx, env)?;
        let (mut queued, added) = enqueue_in(
            &tx,
            (&self.me, self.mono),
            std::slice::from_ref(&out),
            now_ms,
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used = self.used + added - freed;
        Ok(queued.remove(0))
    }

    /// Records a result received for one of this node's commands and consumes its
    /// frame, in one transaction. Returns the result's row id (arrival order).
    /// `None` when a result for that command was already recorded: the frame is
    /// consumed and the second result ignored (a peer cannot overwrite history).
    pub fn record_result(
        &mut self,
        inbound: &Inbound,
        now_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        let env = &inbound.env;
        let (cmd_seq, status) = match &env.body {
            Body::Result(r) => (r.seq, r.status),
            Body::Discarded { seq, .. } => (*seq, Status::Rejected),
            _ => return Err(StoreError::Invalid("record_result takes results".into())),
        };
        let bytes = frame::encode(env)?;
        let tx = self.conn.savepoint()?;
        let id = store_result(&tx, env, cmd_seq, &bytes, now_ms)?;
        if let Some(id) = id {
            tx.run(
"UPDATE job_targets SET state = ?4, result = ?5 WHERE node = ?1 AND lane = ?2 AND seq = ?3",
                params![env.from.as_str(), env.lane.as_str(), cmd_seq as i64, status.as_str(), id],
            )?;
        }
        let freed = consume_in(&tx, env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(id)
    }

    /// Enqueues one command per target and records them as one job, atomically.
    pub fn submit_job(
        &mut self,
        method: Method,
        summary: &str,
        items: Vec<Outgoing>,
        now_ms: u64,
    ) -> Result<(i64, Vec<Queued>), StoreError> {
        let tx = self.conn.savepoint()?;
        let (queued, added) = enqueue_in(&tx, (&self.me, self.mono), &items, now_ms)?;
        let fps: Vec<u32> = items.iter().map(|i| frame::fingerprint(&i.body)).collect();
        if let Err(full) = fits((self.used, self.quota), added, items) {
            drop(tx);
            return Err(full);
        }
        tx.run(
            "INSERT INTO jobs (created_ms, method, summary) VALUES (?1, ?2, ?3)",
            params![now_ms as i64, method.as_str(), summary],
        )?;
        let job = tx.last_insert_rowid();
        for (q, fp) in queued.iter().zip(fps) {
            tx.run(
"INSERT INTO job_targets (job, node, lane, seq, state, fp) VALUES (?1, ?2, ?3, ?4, 'queued', ?5)",
                params![job, q.to.as_str(), q.lane.as_str(), q.seq as i64, fp],
            )?;
        }
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok((job, queued))
    }

    /// Withdraws commands whose ttl passed before their receiver took them: the
    /// outbox frame becomes a [`Body::Withdrawn`] with the same number (the stream
    /// keeps flowing), and the job target gets an `expired` result of our own,
    /// which a result from the receiver (had it taken the command after all)
    /// replaces. Measured on the monotonic clock of [`Store::tick`] within one
    /// boot, on the wall clock across one. Returns how many.
    pub fn expire_unsent(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        let rows: Vec<(String, String, i64, Vec<u8>)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT peer, lane, seq, frame FROM outbox WHERE expires_ms IS NOT NULL
                 AND ((boot = ?1 AND expires_mono <= ?2) OR (boot IS NOT ?1 AND expires_ms <= ?3))",
            )?;
            let rows = stmt.query_map(
                params![self.mono.boot as i64, self.mono.ms as i64, now_ms as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            rows.collect::<Result<_, _>>()?
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let me = self.me.clone();
        let tx = self.conn.savepoint()?;
        let mut n = 0;
        for (peer, lane, seq, bytes) in rows {
            let (peer, lane) = (name(&peer)?, lane_of(&lane)?);
            let key = params![peer.as_str(), lane.as_str(), seq];
            let Ok(env) = frame::decode(&bytes) else {
                // Reported as corrupt when it is next read for sending.
                tx.run(
"UPDATE outbox SET expires_ms = NULL WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                    key,
                )?;
                continue;
            };
            let reason =
                format!("the ttl passed before {peer} took the command; withdrawn by the sender");
            let result = CmdResult::without_run(seq as u64, Status::Expired, &reason, now_ms);
            withdraw(&tx, &me, env, &reason, result, now_ms)?;
            n += 1;
        }
        commit(tx, self.batch)?;
        self.committed();
        self.used = bytes_held(&self.conn)?;
        Ok(n)
    }

    /// When (wall clock) the next unsent command's ttl passes, if any has one.
    pub fn next_expiry(&self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let next: Option<(i64, Option<i64>, Option<i64>)> = self
            .conn
            .prepare_cached(
                "SELECT expires_ms, expires_mono, boot FROM outbox WHERE expires_ms IS NOT NULL
                 ORDER BY expires_ms LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(next.map(|(wall, mono, boot)| match (mono, boot) {
            (Some(m), Some(b)) if b as u64 == self.mono.boot => {
                now_ms + (m as u64).saturating_sub(self.mono.ms)
            }
            _ => wall as u64,
        }))
    }

    /// The job that sent command `seq` to `node` on `lane`, if it was one.
    pub fn job_of(&self, node: &Name, lane: &Lane, seq: u64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT job FROM job_targets WHERE node = ?1 AND lane = ?2 AND seq = ?3",
            )?
            .query_row(params![node.as_str(), lane.as_str(), seq as i64], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Jobs, newest first, at most `limit`.
    pub fn jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id FROM jobs ORDER BY id DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        ids.into_iter()
            .filter_map(|id| self.job(id).transpose())
            .collect()
    }

    /// One job with its targets and the results received so far.
    pub fn job(&self, id: i64) -> Result<Option<Job>, StoreError> {
        let head: Option<(i64, String, String)> = self
            .conn
            .row(
                "SELECT created_ms, method, summary FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((created_ms, method, summary)) = head else {
            return Ok(None);
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT t.node, t.lane, t.seq, t.state, r.frame, r.at_ms, r.id FROM job_targets t
             LEFT JOIN results r ON r.id = t.result WHERE t.job = ?1 ORDER BY t.node",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        let mut targets = Vec::new();
        for row in rows {
            let (node, lane, seq, state, frame_bytes, at_ms, result_id) = row?;
            let result = match frame_bytes {
                Some(b) => match frame::decode(&b)?.body {
                    Body::Result(r) => Some(r),
                    Body::Discarded { seq, reason } => Some(CmdResult::without_run(
                        seq,
                        Status::Rejected,
                        format!("discarded by {node}: {reason}"),
                        0,
                    )),
                    _ => None,
                },
                None => None,
            };
            targets.push(JobTarget {
                node: name(&node)?,
                lane: lane_of(&lane)?,
                seq: seq as u64,
                state,
                result,
                at_ms: at_ms.map(|v| v as u64),
                result_id,
            });
        }
        Ok(Some(Job {
            id,
            created_ms: created_ms as u64,
            method: method.parse().map_err(StoreError::Invalid)?,
            summary,
            targets,
        }))
    }

    /// Records a peer's presence; a plain `offline` also forgets how it polled
    /// (see [`Store::set_asleep`]).
    pub fn set_presence(
        &mut self,
        peer: &Name,
        online: bool,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO peers (name, online, since_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET since_ms = CASE WHEN online = ?2 THEN since_ms ELSE ?3 END, online = ?2,
             poll_every_ms = CASE WHEN ?2 THEN poll_every_ms END,
             poll_next_ms = CASE WHEN ?2 THEN poll_next_ms END",
            params![peer.as_str(), online, now_ms as i64],
        )?;
        Ok(())
    }

    /// Peers seen, with whether they are online and since when.
    pub fn peers(&self) -> Result<Vec<(Name, bool, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, online, since_ms FROM peers ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (n, online, since) = row?;
            out.push((name(&n)?, online, since as u64));
        }
        Ok(out)
    }

    /// Per stream: frames waiting in the outbox (not yet acknowledged).
    pub fn outbox_depths(&self) -> Result<Vec<(Name, Lane, u64)>, StoreError> {
        self.depths("SELECT peer, lane, COUNT(*) FROM outbox GROUP BY peer, lane")
    }

    /// Whether frames of this stream are waiting in the inbox.
    pub fn waiting(&self, peer: &Name, lane: &Lane) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM inbox WHERE peer = ?1 AND lane = ?2)")?;
        Ok(stmt.query_row(params![peer.as_str(), lane.as_str()], |r| r.get(0))?)
    }

    /// Per stream: received frames waiting for their turn.
    pub fn inbox_depths(&self) -> Result<Vec<(Name, Lane, u64)>, StoreError> {
        self.depths("SELECT peer, lane, COUNT(*) FROM inbox GROUP BY peer, lane")
    }

    fn depths(&self, sql: &str) -> Result<Vec<(Name, Lane, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (p, l, n) = row?;
            out.push((name(&p)?, lane_of(&l)?, n as u64));
        }
        Ok(out)
    }

    /// Per stream: creation time of the oldest unacknowledged frame.
    pub fn oldest_unacked(&self) -> Result<Vec<(Name, Lane, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.peer, o.lane, o.frame FROM outbox o
             JOIN (SELECT peer, lane, MIN(seq) AS seq FROM outbox GROUP BY peer, lane) m USING (peer, lane, seq)",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (p, l, bytes) = row?;
            // A corrupt frame here is reported when it is next sent; skip it.
            if let Ok(env) = frame::decode(&bytes) {
                out.push((name(&p)?, lane_of(&l)?, env.created_ms));
            }
        }
        Ok(out)
    }

    /// Records a frame that carries only a report (e.g. [`Body::Lost`]) as an event
    /// and consumes it.
    pub fn record_event(
        &mut self,
        inbound: &Inbound,
        text: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let env = &inbound.env;
        let tx = self.conn.savepoint()?;
        tx.run(
            "INSERT INTO events (at_ms, peer, lane, seq, text) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now_ms as i64,
                env.from.as_str(),
                env.lane.as_str(),
                env.seq as i64,
                text
            ],
        )?;
        let freed = consume_in(&tx, env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(())
    }

    /// After a restart: commands journaled `running` died with the process. Each is
    /// finished `interrupted` (its result goes back), unless it asked to be re-run,
    /// in which case its journal entry is cleared and it becomes runnable again.
    pub fn recover_interrupted(&mut self, now_ms: u64) -> Result<Vec<Queued>, StoreError> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(String, String, i64, String, Option<Vec<u8>>)> = {
            let mut stmt = self.conn.prepare(
                "SELECT j.peer, j.lane, j.seq, j.method, i.frame FROM journal j
                 LEFT JOIN inbox i USING (peer, lane, seq) WHERE j.state = 'running'",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut queued = Vec::new();
        for (peer, lane, seq, method, bytes) in rows {
            let env = bytes.as_deref().map(frame::decode).and_then(Result::ok);
            let rerun = matches!(&env, Some(Envelope { body: Body::Command(frame::Command::Exec(e)), .. }) if e.rerun);
            if rerun {
                self.change(
                    "DELETE FROM journal WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
                    params![peer, lane, seq],
                )?;
                continue;
            }
            let (peer, lane) = (name(&peer)?, lane_of(&lane)?);
            // Without a readable frame, answer from what the journal knows.
            let env = env.unwrap_or(Envelope {
                from: peer,
                to: self.me.clone(),
                lane,
                seq: seq as u64,
                created_ms: now_ms,
                ttl_s: None,
                body: Body::Lost {
                    reason: String::new(),
                },
            });
            let result = CmdResult::without_run(
                seq as u64,
                Status::Interrupted,
                "the agent stopped while the command was running; it was not run again",
                now_ms,
            );
            let inbound = Inbound {
                env,
                doubtful: false,
                expired: false,
            };
            queued.push(self.finish(&inbound, &method, result, now_ms)?);
        }
        Ok(queued)
    }

    /// Results received so far for commands sent to `peer` on `lane`, in arrival order.
    pub fn results(&self, peer: &Name, lane: &Lane) -> Result<Vec<(i64, CmdResult)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, frame FROM results WHERE peer = ?1 AND lane = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![peer.as_str(), lane.as_str()], |r| {
            Ok((r.get(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, bytes) = row?;
            let env = frame::decode(&bytes)?;
            match env.body {
                Body::Result(r) => out.push((id, r)),
                Body::Discarded { seq, reason } => out.push((
                    id,
                    CmdResult::without_run(
                        seq,
                        Status::Rejected,
                        format!("discarded by {}: {reason}", env.from),
                        0,
                    ),
                )),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Counts for status and tests.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let count = |sql: &str| -> Result<u64, StoreError> {
            Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
        };
        Ok(Counts {
            outbox: count("SELECT COUNT(*) FROM outbox")?,
            inbox: count("SELECT COUNT(*) FROM inbox")?,
            running: count("SELECT COUNT(*) FROM journal WHERE state = 'running'")?,
            quarantined: count("SELECT COUNT(*) FROM quarantine")?,
            events: count("SELECT COUNT(*) FROM events")?,
        })
    }

    /// `PRAGMA integrity_check`; `Ok(())` when SQLite says "ok".
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let res: String = self.conn.row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if res == "ok" {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!("integrity check: {res}")))
        }
    }

    fn discard(
        &mut self,
        peer: &Name,
        lane: &Lane,
        seq: u64,
        bytes: &[u8],
        error: &FrameError,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let notice = Outgoing {
            to: peer.clone(),
            lane: lane.clone(),
            ttl_s: None,
            body: Body::Discarded {
                seq,
                reason: format!("frame was corrupt in the receiver's store: {error}"),
            },
        };
        let tx = self.conn.savepoint()?;
        quarantine(&tx, now_ms, "inbox", peer, lane, seq, error, bytes)?;
        tx.run(
            "DELETE FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            params![peer.as_str(), lane.as_str(), seq as i64],
        )?;
        // Also journal it done, so the hole is not mistaken for pending work.
        tx.run(
"INSERT OR REPLACE INTO journal (peer, lane, seq, state, method, started_ms, finished_ms, status)
             VALUES (?1, ?2, ?3, 'done', 'unknown', ?4, ?4, 'rejected')",
            params![peer.as_str(), lane.as_str(), seq as i64, now_ms as i64],
        )?;
        let (_, added) = enqueue_in(
            &tx,
            (&self.me, self.mono),
            std::slice::from_ref(&notice),
            now_ms,
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used = self.used + added - bytes.len() as u64;
        Ok(())
    }

    /// Keeps a received frame (or payload) that failed its checks, for inspection.
    pub fn quarantine_received(
        &mut self,
        bytes: &[u8],
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO quarantine (at_ms, place, reason, frame) VALUES (?1, 'received', ?2, ?3)",
            params![
                now_ms as i64,
                reason,
                &bytes[..bytes.len().min(frame::MAX_FRAME)]
            ],
        )?;
        Ok(())
    }

    /// Test hook: the raw connection, to corrupt bytes on purpose.
    #[doc(hidden)]
    pub fn raw(&self) -> &Connection {
        &self.conn
    }
}

/// A command sent to one or more nodes, as the sender tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub created_ms: u64,
    pub method: Method,
    pub summary: String,
    pub targets: Vec<JobTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTarget {
    pub node: Name,
    pub lane: Lane,
    pub seq: u64,
    /// queued, delivered, or the result's status.
    pub state: String,
    pub result: Option<CmdResult>,
    pub at_ms: Option<u64>,
    /// Row id of the result: results are numbered in arrival order.
    pub result_id: Option<i64>,
}

impl Job {
    /// Every target has a result.
    pub fn done(&self) -> bool {
        self.targets.iter().all(|t| t.result.is_some())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub outbox: u64,
    pub inbox: u64,
    pub running: u64,
    pub quarantined: u64,
    pub events: u64,
}

fn name(s: &str) -> Result<Name, StoreError> {
    Name::new(s).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn lane_of(s: &str) -> Result<Lane, StoreError> {
    Lane::new(s).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn watermark(conn: &Connection, peer: &Name, lane: &Lane) -> rusqlite::Result<u64> {
    let wm: Option<i64> = conn
        .row(
            "SELECT watermark FROM in_streams WHERE peer = ?1 AND lane = ?2",
            params![peer.as_str(), lane.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(wm.unwrap_or(0) as u64)
}

/// Numbers and writes frames inside `tx`; returns where they went and the bytes added.
fn enqueue_in(
    tx: &Connection,
    (me, mono): (&Name, Mono),
    items: &[Outgoing],
    now_ms: u64,
) -> Result<(Vec<Queued>, u64), StoreError> {
    let mut queued = Vec::with_capacity(items.len());
    let mut added = 0;
    let mut next = tx.prepare_cached(
        // A new stream toward a peer we have not synchronised with since our store
        // lost state (or never met) is numbered provisionally from 0 (`base`).
        "INSERT INTO out_streams (peer, lane, last_seq, acked, base)
         VALUES (?1, ?2, 1, 0, CASE WHEN EXISTS
             (SELECT 1 FROM peer_sessions WHERE peer = ?1 AND we_lost = 0) THEN NULL ELSE 0 END)
         ON CONFLICT (peer, lane) DO UPDATE SET last_seq = last_seq + 1
         RETURNING last_seq",
    )?;
    // A frame with a ttl records when it expires here, on both clocks (see
    // `Store::expire_unsent`).
    let mut insert = tx.prepare_cached(
        "INSERT INTO outbox (peer, lane, seq, frame, expires_ms, expires_mono, boot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for item in items {
        let seq: i64 =
            next.query_row(params![item.to.as_str(), item.lane.as_str()], |r| r.get(0))?;
        let env = Envelope {
            from: me.clone(),
            to: item.to.clone(),
            lane: item.lane.clone(),
            seq: seq as u64,
            created_ms: now_ms,
            ttl_s: item.ttl_s,
            body: item.body.clone(),
        };
        let bytes = frame::encode(&env)?;
        added += bytes.len() as u64;
        let ttl_ms = item
            .ttl_s
            .filter(|_| matches!(item.body, Body::Command(_)))
            .map(|t| u64::from(t) * 1000);
        insert.execute(params![
            item.to.as_str(),
            item.lane.as_str(),
            seq,
            bytes,
            ttl_ms.map(|t| (now_ms + t) as i64),
            ttl_ms.map(|t| (mono.ms + t) as i64),
            mono.boot as i64
        ])?;
        queued.push(Queued {
            to: item.to.clone(),
            lane: item.lane.clone(),
            seq: seq as u64,
        });
    }
    Ok((queued, added))
}

/// The one quota rule: `added` more bytes fit while `used + added <= quota`.
fn within(used: u64, quota: u64, added: u64) -> bool {
    used.saturating_add(added) <= quota
}

/// The quota check of every enqueue; `Full` hands the refused items back.
pub(crate) fn fits(
    (used, quota): (u64, u64),
    added: u64,
    items: Vec<Outgoing>,
) -> Result<(), StoreError> {
    if within(used, quota, added) {
        return Ok(());
    }
    Err(StoreError::Full {
        used,
        quota,
        needed: added,
        rejected: items,
    })
}

fn receive_one(
    tx: &Connection,
    env: &Envelope,
    bytes: &[u8],
    (used, quota): (u64, u64),
    clock: (u64, Mono),
) -> Result<Receipt, StoreError> {
    let (peer, lane, seq) = (env.from.as_str(), env.lane.as_str(), env.seq);
    let wm = watermark(tx, &env.from, &env.lane)?;
    if seq <= wm {
        return Ok(Receipt::Duplicate { watermark: wm });
    }
    if seq > wm + HOLD_AHEAD {
        return Ok(Receipt::Ahead { watermark: wm });
    }
    let held: bool = tx.row(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3)",
        params![peer, lane, seq as i64],
        |r| r.get(0),
    )?;
    if held {
        return Ok(if seq == wm + 1 {
            Receipt::Accepted { watermark: wm }
        } else {
            Receipt::Duplicate { watermark: wm }
        });
    }
    if !within(used, quota, bytes.len() as u64) {
        return Ok(Receipt::NoSpace { watermark: wm });
    }
    tx.prepare_cached(
        "INSERT INTO inbox (peer, lane, seq, frame, recv_ms, recv_mono, recv_boot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        peer,
        lane,
        seq as i64,
        bytes,
        clock.0 as i64,
        clock.1.ms as i64,
        clock.1.boot as i64
    ])?;
    if seq != wm + 1 {
        return Ok(Receipt::Held { watermark: wm });
    }
    // Advance over this frame and any held ones right after it.
    let mut new_wm = seq;
    let mut exists = tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3)",
    )?;
    while exists.query_row(params![peer, lane, (new_wm + 1) as i64], |r| {
        r.get::<_, bool>(0)
    })? {
        new_wm += 1;
    }
    tx.prepare_cached(
        "INSERT INTO in_streams (peer, lane, watermark) VALUES (?1, ?2, ?3)
         ON CONFLICT (peer, lane) DO UPDATE SET watermark = ?3",
    )?
    .execute(params![peer, lane, new_wm as i64])?;
    Ok(Receipt::Accepted { watermark: new_wm })
}

/// Stores a result from `env.from` for its command `cmd_seq`; returns its row id,
/// or `None` when that command already has a result from the peer. A result this
/// node wrote itself (`local`) is replaced, keeping its id.
fn store_result(
    tx: &Connection,
    env: &Envelope,
    cmd_seq: u64,
    bytes: &[u8],
    now_ms: u64,
) -> rusqlite::Result<Option<i64>> {
    let key = params![env.from.as_str(), env.lane.as_str(), cmd_seq as i64];
    let existing: Option<(i64, bool)> = tx
        .row(
            "SELECT id, local FROM results WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            key,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match existing {
        Some((_, false)) => Ok(None),
        Some((id, true)) => {
            tx.run(
                "UPDATE results SET at_ms = ?2, frame = ?3, local = 0 WHERE id = ?1",
                params![id, now_ms as i64, bytes],
            )?;
            Ok(Some(id))
        }
        None => {
            tx.run(
                "INSERT INTO results (peer, lane, seq, at_ms, frame) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    env.from.as_str(),
                    env.lane.as_str(),
                    cmd_seq as i64,
                    now_ms as i64,
                    bytes
                ],
            )?;
            Ok(Some(tx.last_insert_rowid()))
        }
    }
}

/// Records a result this node made itself for its command `result.seq` to `peer`
/// (expired before delivery, lost with a store), marked `local` so that a result
/// from the peer still replaces it, and sets the job target's state.
fn local_result(
    tx: &Connection,
    me: &Name,
    peer: &Name,
    lane: &Lane,
    result: CmdResult,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (seq, status) = (result.seq, result.status);
    let env = Envelope {
        from: peer.clone(),
        to: me.clone(),
        lane: lane.clone(),
        seq: 0,
        created_ms: now_ms,
        ttl_s: None,
        body: Body::Result(result),
    };
    let bytes = frame::encode(&env)?;
    tx.run(
        "INSERT INTO results (peer, lane, seq, at_ms, frame, local) VALUES (?1, ?2, ?3, ?4, ?5, 1)
         ON CONFLICT (peer, lane, seq) DO NOTHING",
        params![
            peer.as_str(),
            lane.as_str(),
            seq as i64,
            now_ms as i64,
            bytes
        ],
    )?;
    tx.run(
"UPDATE job_targets SET state = ?4, result = (SELECT id FROM results WHERE peer = ?1 AND lane = ?2 AND seq = ?3)
         WHERE node = ?1 AND lane = ?2 AND seq = ?3 AND result IS NULL",
        params![peer.as_str(), lane.as_str(), seq as i64, status.as_str()],
    )?;
    Ok(())
}

/// Replaces the outbox frame `env` (a command) by a [`Body::Withdrawn`] with the
/// same number, so the stream keeps its numbering, and answers its job target with
/// `result`, marked local (a result from the receiver still replaces it).
fn withdraw(
    tx: &Connection,
    me: &Name,
    mut env: Envelope,
    reason: &str,
    result: CmdResult,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (peer, lane, seq) = (env.to.clone(), env.lane.clone(), env.seq);
    env.body = Body::Withdrawn {
        reason: reason.into(),
    };
    tx.run(
        "UPDATE outbox SET frame = ?4, expires_ms = NULL, expires_mono = NULL
         WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
        params![
            peer.as_str(),
            lane.as_str(),
            seq as i64,
            frame::encode(&env)?
        ],
    )?;
    local_result(tx, me, &peer, &lane, result, now_ms)
}

/// When a frame arrived, on both clocks.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    wall_ms: u64,
    mono: Mono,
}

/// Whether a received frame's ttl has passed at `now_ms` / `mono`: the age it
/// had on arrival (its creation time was put on our wall clock then, from the age
/// the sender measured) plus how long it has waited since, measured on the
/// monotonic clock of the same boot, or on the wall clock after a reboot.
fn expired(env: &Envelope, arrived: Option<Arrival>, now_ms: u64, mono: Mono) -> bool {
    let Some(ttl) = env.ttl_s else {
        return false;
    };
    let Some(a) = arrived else {
        return env.expired(now_ms);
    };
    let age_on_arrival = a.wall_ms.saturating_sub(env.created_ms);
    let waited = if a.mono.boot == mono.boot && mono.boot != 0 {
        mono.ms.saturating_sub(a.mono.ms)
    } else {
        now_ms.saturating_sub(a.wall_ms)
    };
    age_on_arrival + waited > u64::from(ttl) * 1000
}

/// Deletes a consumed inbox frame; returns the bytes freed.
fn consume_in(tx: &Connection, env: &Envelope) -> Result<u64, StoreError> {
    let key = params![env.from.as_str(), env.lane.as_str(), env.seq as i64];
    let len: Option<i64> = tx
        .row(
            "SELECT length(frame) FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            key,
            |r| r.get(0),
        )
        .optional()?;
    tx.run(
        "DELETE FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
        key,
    )?;
    Ok(len.unwrap_or(0) as u64)
}

/// A stored outbox frame must pass its CRC and belong where it is stored.
fn check_stored(
    bytes: &[u8],
    me: &Name,
    peer: &Name,
    lane: &Lane,
    seq: u64,
) -> Result<(), FrameError> {
    let env = frame::decode(bytes)?;
    matching(env, me, peer, lane, seq).map(|_| ())
}

fn matching(
    env: Envelope,
    from: &Name,
    to: &Name,
    lane: &Lane,
    seq: u64,
) -> Result<Envelope, FrameError> {
    if &env.from != from || &env.to != to || &env.lane != lane || env.seq != seq {
        return Err(FrameError::Malformed(format!(
            "frame {}->{} {}#{} stored as {from}->{to} {lane}#{seq}",
            env.from, env.to, env.lane, env.seq
        )));
    }
    Ok(env)
}

#[allow(clippy::too_many_arguments)]
fn quarantine(
    tx: &Connection,
    now_ms: u64,
    place: &str,
    peer: &Name,
    lane: &Lane,
    seq: u64,
    error: &FrameError,
    bytes: &[u8],
) -> rusqlite::Result<()> {
    tx.run(
"INSERT INTO quarantine (at_ms, place, peer, lane, seq, reason, frame) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now_ms as i64, place, peer.as_str(), lane.as_str(), seq as i64, error.to_string(), bytes],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;

/// Bytes of frames in outbox and inbox, as the quota counts them.
fn bytes_held(conn: &Connection) -> Result<u64, StoreError> {
    let used: i64 = conn.row(
        "SELECT (SELECT COALESCE(SUM(length(frame)), 0) FROM outbox)
              + (SELECT COALESCE(SUM(length(frame)), 0) FROM inbox)",
        [],
        |r| r.get(0),
    )?;
    Ok(used as u64)
}
