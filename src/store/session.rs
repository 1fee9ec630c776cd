//! Store operations for sessions with peers: their epochs and replay windows, the
//! handshake flags, seal counters, and applying a peer's [`Sync`] to the streams.

use super::sql::Cached;
use std::ops::Range;

use rusqlite::{params, Connection, OptionalExtension};

use super::{commit, lane_of, name, watermark, Store, StoreError};
use crate::frame::{self, Body, CmdResult, Envelope, Lane, Name, SentStream, Status, Sync};

/// What this node keeps about one peer's store; see [`crate::session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSession {
    /// The peer's store epoch, as last authenticated; 0 when never heard from.
    pub epoch: u64,
    /// Replay window of payloads from that epoch.
    pub highest: u64,
    pub bits: u64,
    /// The peer opened a payload sealed for our current epoch.
    pub knows_mine: bool,
    /// We applied the peer's Sync for both current epochs.
    pub synced: bool,
    /// Our numbering toward this peer is provisional: we never synchronised with
    /// it, or our store lost state since we last did. Streams created meanwhile
    /// are numbered from `base` 0 and moved above what the peer has at the Sync.
    pub we_lost: bool,
    /// This store's loss count ([`Store::losses`]) when we last synchronised with
    /// the peer: a first Sync after a loss treats everything the peer ever sent as
    /// possibly taken (and run) by the store that was lost.
    pub synced_after: u64,
    /// Epochs of the peer's earlier stores.
    pub retired: Vec<u64>,
}

impl Default for PeerSession {
    /// A peer never heard from: nothing known, nothing synchronised.
    fn default() -> Self {
        PeerSession {
            epoch: 0,
            highest: 0,
            bits: 0,
            knows_mine: false,
            synced: false,
            we_lost: true,
            synced_after: 0,
            retired: Vec::new(),
        }
    }
}

/// What applying a peer's Sync found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Our frames `from..=to` on a lane were acknowledged to an earlier store of
    /// the peer and are gone from both sides; commands among them are reported
    /// `interrupted`.
    pub lost_out: Vec<(Lane, u64, u64)>,
    /// The peer's frames `from..=to` were acknowledged to an earlier store of ours.
    pub lost_in: Vec<(Lane, u64, u64)>,
    /// Frames we numbered while our store had lost state, moved up by this much.
    pub moved: Vec<(Lane, u64)>,
    /// Job targets given a result of our own (lost with a store).
    pub interrupted: usize,
}

/// Why a job target got a result of this node's own making.
const LOST_BY_PEER: &str =
    "the node's store was replaced after this command was delivered to it (lost, or gone back in time); the command may or may not have run, and a result that still arrives replaces this one";
const LOST_HERE: &str =
    "this node's store went back in time and may have lost this command's result; a result that still arrives replaces this one";

impl Store {
    /// Every peer session, with the epochs retired for each.
    pub fn peer_sessions(&self) -> Result<Vec<(Name, PeerSession)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT peer, epoch, highest, bits, knows_mine, synced, we_lost, synced_after FROM peer_sessions",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                PeerSession {
                    epoch: r.get::<_, i64>(1)? as u64,
                    highest: r.get::<_, i64>(2)? as u64,
                    bits: r.get::<_, i64>(3)? as u64,
                    knows_mine: r.get(4)?,
                    synced: r.get(5)?,
                    we_lost: r.get(6)?,
                    synced_after: r.get::<_, i64>(7)? as u64,
                    retired: Vec::new(),
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (peer, mut s) = row?;
            let mut retired = self
                .conn
                .prepare_cached("SELECT epoch FROM retired_epochs WHERE peer = ?1")?;
            s.retired = retired
                .query_map([&peer], |r| r.get::<_, i64>(0).map(|e| e as u64))?
                .collect::<Result<_, _>>()?;
            out.push((name(&peer)?, s));
        }
        Ok(out)
    }

    /// Writes one peer's session (not its retired epochs: see
    /// [`Store::retire_epoch`]).
    pub fn save_peer_session(&mut self, peer: &Name, s: &PeerSession) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.prepare_cached(
            "INSERT INTO peer_sessions (peer, epoch, highest, bits, knows_mine, synced, we_lost, synced_after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (peer) DO UPDATE SET epoch = ?2, highest = ?3, bits = ?4,
                 knows_mine = ?5, synced = ?6, we_lost = ?7, synced_after = ?8",
        )?
        .execute(params![
            peer.as_str(),
            s.epoch as i64,
            s.highest as i64,
            s.bits as i64,
            s.knows_mine,
            s.synced,
            s.we_lost,
            s.synced_after as i64
        ])?;
        commit(tx, self.batch)?;
        self.committed();
        Ok(())
    }

    /// The peer's store was replaced (it has a new epoch; `old` is the one we knew,
    /// 0 for none): `old` is retired for good, and if there was one, every frame
    /// of ours up to now may have reached it (`doubt`), and frames it sent that
    /// wait here behind a gap are dropped (the new store numbers its own).
    pub fn peer_replaced(
        &mut self,
        peer: &Name,
        old: u64,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let me = self.me.clone();
        let tx = self.conn.savepoint()?;
        let mut interrupted = 0;
        if old != 0 {
            // What the old store acknowledged and never answered may be gone with
            // it: answered here, and a result that still comes replaces this one.
            let acked: Vec<(String, i64)> = {
                let mut stmt =
                    tx.prepare_cached("SELECT lane, acked FROM out_streams WHERE peer = ?1")?;
                let rows = stmt.query_map([peer.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            for (lane, acked) in acked {
                let lane = lane_of(&lane)?;
                interrupted += local_results(
                    &tx,
                    &me,
                    peer,
                    &lane,
                    (0, acked as u64),
                    LOST_BY_PEER,
                    now_ms,
                )?;
            }
            tx.run(
                "INSERT OR IGNORE INTO retired_epochs (peer, epoch) VALUES (?1, ?2)",
                params![peer.as_str(), old as i64],
            )?;
            tx.run(
                "UPDATE out_streams SET doubt = MAX(doubt, last_seq) WHERE peer = ?1",
                [peer.as_str()],
            )?;
        }
        tx.run(
"DELETE FROM inbox WHERE peer = ?1 AND seq > COALESCE(
                 (SELECT watermark FROM in_streams s WHERE s.peer = inbox.peer AND s.lane = inbox.lane), 0)",
            [peer.as_str()],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used = super::bytes_held(&self.conn)?;
        Ok(interrupted)
    }

    /// Records that `epoch` of `peer` belongs to a store that is gone.
    pub fn retire_epoch(&mut self, peer: &Name, epoch: u64) -> Result<(), StoreError> {
        self.change(
            "INSERT OR IGNORE INTO retired_epochs (peer, epoch) VALUES (?1, ?2)",
            params![peer.as_str(), epoch as i64],
        )?;
        Ok(())
    }

    /// Reserves `n` payload counters for sealing to `peer`, durably, before any is
    /// used: a crash can skip counters but never reuse one. Returns `start..end`.
    /// The counters belong to this store's epoch (a new epoch starts them again).
    pub fn reserve_counters(&mut self, peer: &Name, n: u64) -> Result<Range<u64>, StoreError> {
        let tx = self.conn.savepoint()?;
        let start: i64 = tx
            .row(
                "SELECT reserved FROM seal_out WHERE peer = ?1",
                [peer.as_str()],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(1);
        let end = start + n as i64;
        tx.run(
"INSERT INTO seal_out (peer, reserved) VALUES (?1, ?2) ON CONFLICT (peer) DO UPDATE SET reserved = ?2",
            params![peer.as_str(), end],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        Ok(start as u64..end as u64)
    }

    /// Peers that frames wait for, in either direction.
    pub fn peers_with_work(&self) -> Result<Vec<Name>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT peer FROM outbox UNION SELECT peer FROM inbox")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| name(&r?)).collect()
    }

    /// Where our streams with `peer` stand, as a [`Sync`] tells it.
    pub fn sync_view(&self, peer: &Name, want: bool) -> Result<Sync, StoreError> {
        let mut received = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT lane, watermark FROM in_streams WHERE peer = ?1 ORDER BY lane",
        )?;
        for row in stmt.query_map([peer.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (lane, wm) = row?;
            received.push((lane_of(&lane)?, wm as u64));
        }
        let mut sent = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT lane, acked, doubt, last_seq FROM out_streams WHERE peer = ?1 ORDER BY lane",
        )?;
        for row in stmt.query_map([peer.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })? {
            let (lane, acked, doubt, last) = row?;
            sent.push(SentStream {
                lane: lane_of(&lane)?,
                acked: acked as u64,
                last: last as u64,
                doubt: doubt as u64,
            });
        }
        Ok(Sync {
            want,
            echo: 0,
            received,
            sent,
        })
    }

    /// Brings our streams with `peer` in line with its [`Sync`], in one change.
    /// `doubt_all`: this is the first Sync with the peer since our store lost
    /// state, so whatever it ever sent may have been taken (and run) by the store
    /// that was lost.
    ///
    ///
    /// - our streams to it: frames up to its watermark are delivered; frames we
    ///   numbered while our store had lost state (above `base`) move above its
    ///   watermark, so they are not taken for ones it already has; frames it
    ///   acknowledged to an earlier store of its own are lost, and commands among
    ///   them get an `interrupted` result here;
    /// - its streams to us: frames it holds as acknowledged by an earlier store of
    ///   ours are lost (the watermark jumps over them, and the loss is recorded);
    ///   its `doubt` is kept, so that no command that may have reached an earlier
    ///   store of ours is run again.
    pub fn apply_sync(
        &mut self,
        peer: &Name,
        sync: &Sync,
        doubt_all: bool,
        now_ms: u64,
    ) -> Result<SyncOutcome, StoreError> {
        let mut out = SyncOutcome::default();
        let me = self.me.clone();
        let tx = self.conn.savepoint()?;
        // Cancels kept for commands the peer had not sent yet name its numbers
        // as they were; after a Sync (its store new or gone back) they may name
        // other commands.
        tx.run("DELETE FROM cancels WHERE peer = ?1", [peer.as_str()])?;
        let streams: Vec<(String, i64, i64, Option<i64>)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT lane, last_seq, acked, base FROM out_streams WHERE peer = ?1",
            )?;
            let rows = stmt.query_map([peer.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (lane_s, last, acked, base) in streams {
            let lane = lane_of(&lane_s)?;
            let (mut last, acked) = (last as u64, acked as u64);
            let w = sync
                .received
                .iter()
                .find(|(l, _)| *l == lane)
                .map_or(0, |(_, w)| *w);
            if let Some(base) = base.map(|b| b as u64) {
                if w > base {
                    if last > base {
                        let d = w - base;
                        renumber(&tx, &me, peer, &lane, base, d)?;
                        out.moved.push((lane.clone(), d));
                        last += d;
                    } else {
                        last = w;
                    }
                }
                // What the peer holds of our snapshot may be all there is of
                // results we had already taken: say so, a late result replaces it.
                out.interrupted +=
                    local_results(&tx, &me, peer, &lane, (0, w.min(base)), LOST_HERE, now_ms)?;
            } else if w > last {
                // More of ours than we ever numbered: our store went back without
                // noticing. Continue above it.
                last = w;
            }
            let mut new_acked = acked;
            if w < acked {
                out.lost_out.push((lane.clone(), w + 1, acked));
                out.interrupted +=
                    local_results(&tx, &me, peer, &lane, (w, acked), LOST_BY_PEER, now_ms)?;
            } else if w > acked {
                new_acked = w.min(last);
                tx.run(
                    "DELETE FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq <= ?3",
                    params![peer.as_str(), lane.as_str(), new_acked as i64],
                )?;
                tx.run(
                    "UPDATE job_targets SET state = 'delivered'
                     WHERE node = ?1 AND lane = ?2 AND seq > ?4 AND seq <= ?3 AND state = 'queued'",
                    params![peer.as_str(), lane.as_str(), new_acked as i64, acked as i64],
                )?;
            }
            tx.run(
"UPDATE out_streams SET last_seq = ?3, acked = ?4, base = NULL WHERE peer = ?1 AND lane = ?2",
                params![peer.as_str(), lane.as_str(), last as i64, new_acked as i64],
            )?;
        }
        // Lanes the peer has frames of ours on that this store has no stream for
        // (it is new, or went back to before the lane existed): our numbering there
        // continues above what the peer has, never from 1 again.
        for (lane, w) in &sync.received {
            tx.run(
"INSERT INTO out_streams (peer, lane, last_seq, acked, base) VALUES (?1, ?2, ?3, ?3, NULL)
                 ON CONFLICT (peer, lane) DO NOTHING",
                params![peer.as_str(), lane.as_str(), *w as i64],
            )?;
        }
        for s in &sync.sent {
            let wm = watermark(&tx, peer, &s.lane)?;
            let mut new_wm = wm;
            if s.acked > wm {
                out.lost_in.push((s.lane.clone(), wm + 1, s.acked));
                new_wm = s.acked;
                let mut exists = tx.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM inbox WHERE peer = ?1 AND lane = ?2 AND seq = ?3)",
                )?;
                while exists.query_row(
                    params![peer.as_str(), s.lane.as_str(), (new_wm + 1) as i64],
                    |r| r.get::<_, bool>(0),
                )? {
                    new_wm += 1;
                }
                tx.run(
"INSERT INTO events (at_ms, peer, lane, seq, text) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        now_ms as i64,
                        peer.as_str(),
                        s.lane.as_str(),
                        (wm + 1) as i64,
                        format!(
                            "frames {}..={} from {peer} on {} were acknowledged to an earlier store of this node and are lost",
                            wm + 1,
                            s.acked,
                            s.lane
                        )
                    ],
                )?;
            }
            tx.run(
"INSERT INTO in_streams (peer, lane, watermark, doubt) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (peer, lane) DO UPDATE SET watermark = MAX(watermark, ?3), doubt = MAX(doubt, ?4)",
                params![
                    peer.as_str(),
                    s.lane.as_str(),
                    new_wm as i64,
                    if doubt_all { s.doubt.max(s.last) } else { s.doubt } as i64
                ],
            )?;
        }
        for (lane, from, to) in &out.lost_out {
            tx.run(
"INSERT INTO events (at_ms, peer, lane, seq, text) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    now_ms as i64,
                    peer.as_str(),
                    lane.as_str(),
                    *from as i64,
                    format!(
                        "frames {from}..={to} to {peer} on {lane} were lost with {peer}'s earlier store"
                    )
                ],
            )?;
        }
        commit(tx, self.batch)?;
        self.committed();
        self.used = super::bytes_held(&self.conn)?;
        Ok(out)
    }
}

/// Moves outbox frames of one stream numbered above `base` up by `d`, with their
/// job targets. Negated first so that no two rows ever share a number.
fn renumber(
    tx: &Connection,
    me: &Name,
    peer: &Name,
    lane: &Lane,
    base: u64,
    d: u64,
) -> Result<(), StoreError> {
    let rows: Vec<(i64, Vec<u8>)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, frame FROM outbox WHERE peer = ?1 AND lane = ?2 AND seq > ?3",
        )?;
        let rows = stmt.query_map(params![peer.as_str(), lane.as_str(), base as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    for (seq, bytes) in rows {
        let new_seq = seq as u64 + d;
        // A frame that does not decode is re-numbered as a lost one: the stream
        // still flows, and the loss is reported where it is next read.
        let env = match frame::decode(&bytes) {
            Ok(mut env) => {
                env.seq = new_seq;
                env
            }
            Err(e) => Envelope {
                from: me.clone(),
                to: peer.clone(),
                lane: lane.clone(),
                seq: new_seq,
                created_ms: 0,
                ttl_s: None,
                body: Body::Lost {
                    reason: format!("frame was corrupt in the sender's store: {e}"),
                },
            },
        };
        tx.run(
            "UPDATE outbox SET seq = ?4, frame = ?5 WHERE peer = ?1 AND lane = ?2 AND seq = ?3",
            params![
                peer.as_str(),
                lane.as_str(),
                seq,
                -(new_seq as i64),
                frame::encode(&env)?
            ],
        )?;
    }
    tx.run(
        "UPDATE outbox SET seq = -seq WHERE peer = ?1 AND lane = ?2 AND seq < 0",
        params![peer.as_str(), lane.as_str()],
    )?;
    tx.run(
        "UPDATE job_targets SET seq = -(seq + ?4) WHERE node = ?1 AND lane = ?2 AND seq > ?3",
        params![peer.as_str(), lane.as_str(), base as i64, d as i64],
    )?;
    tx.run(
        "UPDATE job_targets SET seq = -seq WHERE node = ?1 AND lane = ?2 AND seq < 0",
        params![peer.as_str(), lane.as_str()],
    )?;
    // Results we wrote ourselves for frames that moved (withdrawn: cancelled or
    // expired) move with them; the peer's results are for its own numbers.
    tx.run(
"UPDATE results SET seq = -(seq + ?4) WHERE peer = ?1 AND lane = ?2 AND seq > ?3 AND local = 1",
        params![peer.as_str(), lane.as_str(), base as i64, d as i64],
    )?;
    tx.run(
        "UPDATE results SET seq = -seq WHERE peer = ?1 AND lane = ?2 AND seq < 0",
        params![peer.as_str(), lane.as_str()],
    )?;
    Ok(())
}

/// Gives every job target toward `peer` on `lane` with a command number in
/// `(after, upto]` and no result yet (or one of our own) a result of our own,
/// `interrupted` with `reason`. Returns how many.
fn local_results(
    tx: &Connection,
    me: &Name,
    peer: &Name,
    lane: &Lane,
    (after, upto): (u64, u64),
    reason: &str,
    now_ms: u64,
) -> Result<usize, StoreError> {
    // Also those we answered ourselves (a command withdrawn, cancelled or
    // expired here): what the peer's lost store made of it is unknown now.
    tx.run(
"UPDATE job_targets SET result = NULL WHERE node = ?1 AND lane = ?2 AND seq > ?3 AND seq <= ?4
         AND result IN (SELECT id FROM results WHERE local = 1)",
        params![peer.as_str(), lane.as_str(), after as i64, upto as i64],
    )?;
    tx.run(
"DELETE FROM results WHERE peer = ?1 AND lane = ?2 AND seq > ?3 AND seq <= ?4 AND local = 1",
        params![peer.as_str(), lane.as_str(), after as i64, upto as i64],
    )?;
    let seqs: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT seq FROM job_targets WHERE node = ?1 AND lane = ?2 AND seq > ?3 AND seq <= ?4
             AND result IS NULL",
        )?;
        let rows = stmt.query_map(
            params![peer.as_str(), lane.as_str(), after as i64, upto as i64],
            |r| r.get(0),
        )?;
        rows.collect::<Result<_, _>>()?
    };
    for &seq in &seqs {
        let result = CmdResult::without_run(seq as u64, Status::Interrupted, reason, now_ms);
        super::local_result(tx, me, peer, lane, result, now_ms)?;
    }
    Ok(seqs.len())
}
