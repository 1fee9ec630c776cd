//! Store operations for facts and the node registry: what this node last reported
//! to each peer (`facts_sent`), and what peers reported here and when they were
//! last seen (`nodes`).

use super::sql::Cached;
use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::{
    commit, consume_in, enqueue_in, fits, name, Inbound, Outgoing, Queued, Store, StoreError,
};
use crate::facts::{self, Snapshot};
use crate::frame::{Body, Facts, Name};

/// What this node last queued to a peer: the facts the peer holds once the
/// stream delivers it, for which of its stores and ours, and when the last full
/// set was queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactsSent {
    pub peer_epoch: u64,
    pub my_epoch: u64,
    pub full_ms: u64,
    pub facts: Snapshot,
}

/// A peer as the registry knows it from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// The last authenticated payload from it, as recorded (at most a minute old
    /// while it talks; `Node::last_seen` has the exact time).
    pub last_seen_ms: Option<u64>,
    /// When its last Facts frame was taken.
    pub facts_ms: Option<u64>,
    pub facts: Snapshot,
}

/// How a peer on an on-demand link said it polls (its presence, see
/// [`Store::set_asleep`]): a hint for scheduling and for people, never trusted
/// for anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polls {
    pub every_ms: u64,
    /// When it is next expected (its clock, as it said; or when its last will
    /// came plus `every_ms`).
    pub next_ms: u64,
}

fn encode(f: &Snapshot) -> Result<Vec<u8>, StoreError> {
    let pairs: Vec<(&String, &String)> = f.iter().collect();
    postcard::to_allocvec(&pairs).map_err(|e| StoreError::Invalid(format!("facts: {e}")))
}

fn decode(b: &[u8]) -> Result<Snapshot, StoreError> {
    let pairs: Vec<(String, String)> =
        postcard::from_bytes(b).map_err(|e| StoreError::Invalid(format!("facts: {e}")))?;
    Ok(pairs.into_iter().collect())
}

impl Store {
    /// What this node last queued to `peer`, if anything.
    pub fn facts_sent(&self, peer: &Name) -> Result<Option<FactsSent>, StoreError> {
        let row: Option<(i64, i64, i64, Vec<u8>)> = self
            .conn
            .row(
                "SELECT peer_epoch, my_epoch, full_ms, facts FROM facts_sent WHERE peer = ?1",
                params![peer.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(pe, me, full_ms, b)| {
            Ok(FactsSent {
                peer_epoch: pe as u64,
                my_epoch: me as u64,
                full_ms: full_ms as u64,
                facts: decode(&b)?,
            })
        })
        .transpose()
    }

    /// Queues `body` (a Facts frame) to `peer` on the `bulk.facts` lane (bulk
    /// class: budgets hold it back first, and it never holds up a cancel) and records
    /// `sent`, what the peer will hold, in one savepoint.
    pub fn queue_facts(
        &mut self,
        peer: &Name,
        body: Facts,
        sent: &FactsSent,
        now_ms: u64,
    ) -> Result<Queued, StoreError> {
        let items = vec![Outgoing {
            to: peer.clone(),
            lane: facts_lane(),
            ttl_s: None,
            body: Body::Facts(body),
        }];
        let blob = encode(&sent.facts)?;
        let tx = self.conn.savepoint()?;
        let (mut queued, added) = enqueue_in(&tx, (&self.me, self.mono), &items, now_ms)?;
        if let Err(full) = fits((self.used, self.quota), added, items) {
            drop(tx);
            return Err(full);
        }
        tx.run(
            "INSERT OR REPLACE INTO facts_sent (peer, peer_epoch, my_epoch, full_ms, facts)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                peer.as_str(),
                sent.peer_epoch as i64,
                sent.my_epoch as i64,
                sent.full_ms as i64,
                blob
            ],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        self.used += added;
        Ok(queued.remove(0))
    }

    /// Applies a Facts frame from a peer to what the registry holds for it, and
    /// consumes the frame, in one savepoint.
    pub fn take_facts(
        &mut self,
        inbound: &Inbound,
        f: &Facts,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let node = &inbound.env.from;
        let tx = self.conn.savepoint()?;
        let held: Option<Option<Vec<u8>>> = tx
            .row(
                "SELECT facts FROM nodes WHERE name = ?1",
                params![node.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        let mut facts = match held.flatten() {
            Some(b) => decode(&b)?,
            None => Snapshot::new(),
        };
        facts::apply(&mut facts, f);
        tx.run(
            "INSERT INTO nodes (name, facts_ms, facts) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET facts_ms = ?2, facts = ?3",
            params![node.as_str(), now_ms as i64, encode(&facts)?],
        )?;
        let freed = consume_in(&tx, &inbound.env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(())
    }

    /// Records that `peer` was just heard from.
    pub fn note_seen(&mut self, peer: &Name, now_ms: u64) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO nodes (name, last_seen_ms) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2)",
            params![peer.as_str(), now_ms as i64],
        )?;
        Ok(())
    }

    /// Records that `peer` is offline until its next poll (an on-demand link).
    pub fn set_asleep(&mut self, peer: &Name, polls: Polls, now_ms: u64) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO peers (name, online, since_ms, poll_every_ms, poll_next_ms) VALUES (?1, 0, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET since_ms = CASE WHEN online = 0 THEN since_ms ELSE ?2 END, online = 0,
             poll_every_ms = ?3, poll_next_ms = ?4",
            params![
                peer.as_str(),
                now_ms as i64,
                polls.every_ms as i64,
                polls.next_ms as i64
            ],
        )?;
        Ok(())
    }

    /// Peers on an on-demand link, with how they poll.
    pub fn polls(&self) -> Result<BTreeMap<Name, Polls>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, poll_every_ms, poll_next_ms FROM peers WHERE poll_every_ms IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (n, every, next) = row?;
            out.insert(
                name(&n)?,
                Polls {
                    every_ms: every as u64,
                    next_ms: next.unwrap_or(0) as u64,
                },
            );
        }
        Ok(out)
    }

    /// Every peer the registry has a record of.
    pub fn nodes(&self) -> Result<BTreeMap<Name, NodeRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, last_seen_ms, facts_ms, facts FROM nodes")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
            ))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (n, seen, facts_ms, blob) = row?;
            let facts = match blob {
                Some(b) => decode(&b)?,
                None => Snapshot::new(),
            };
            out.insert(
                name(&n)?,
                NodeRecord {
                    last_seen_ms: seen.map(|v| v as u64),
                    facts_ms: facts_ms.map(|v| v as u64),
                    facts,
                },
            );
        }
        Ok(out)
    }

    /// The latest event about each peer (a lost or discarded frame, ...): (when, text).
    pub fn last_events(&self) -> Result<BTreeMap<Name, (u64, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT e.peer, e.at_ms, e.text FROM events e
             JOIN (SELECT peer, MAX(id) AS id FROM events WHERE peer IS NOT NULL GROUP BY peer) m USING (id)",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (p, at, text) = row?;
            if let Ok(n) = Name::new(&p) {
                out.insert(n, (at as u64, text));
            }
        }
        Ok(out)
    }

    /// Per node: commands this node sent that it reported running.
    pub fn running_targets(&self) -> Result<BTreeMap<Name, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, COUNT(*) FROM job_targets WHERE state = 'running' GROUP BY node",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (n, c) = row?;
            out.insert(name(&n)?, c as u64);
        }
        Ok(out)
    }
}

/// The lane facts travel on.
fn facts_lane() -> crate::frame::Lane {
    crate::frame::Lane::new("bulk.facts").expect("a valid lane name")
}
