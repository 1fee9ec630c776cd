//! The central error log: errors peers reported (`Body::Errors`), added up per
//! (node, kind, text).

use rusqlite::params;

use super::{commit, consume_in, Inbound, Store, StoreError};
use crate::frame::{Body, ErrorEntry};

/// One reported error, as kept here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    /// Goes up with every change of any row: newest last.
    pub seq: u64,
    pub node: String,
    pub kind: String,
    pub text: String,
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Store {
    /// Adds a peer's error report to the log and consumes its frame, in one
    /// transaction (the stream delivers each report once).
    pub fn record_errors(&mut self, inbound: &Inbound) -> Result<usize, StoreError> {
        let env = &inbound.env;
        let Body::Errors(entries) = &env.body else {
            return Err(StoreError::Invalid(
                "record_errors takes error reports".into(),
            ));
        };
        let tx = self.conn.savepoint()?;
        for ErrorEntry {
            kind,
            text,
            count,
            first_ms,
            last_ms,
        } in entries
        {
            tx.prepare_cached(
                "INSERT INTO node_errors (node, kind, text, count, first_ms, last_ms, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM node_errors))
                 ON CONFLICT (node, kind, text) DO UPDATE SET
                   count = count + excluded.count,
                   first_ms = MIN(first_ms, excluded.first_ms),
                   last_ms = MAX(last_ms, excluded.last_ms),
                   seq = excluded.seq",
            )?
            .execute(params![
                env.from.as_str(),
                kind,
                text,
                i64::from(*count),
                *first_ms as i64,
                *last_ms as i64
            ])?;
        }
        let freed = consume_in(&tx, env)?;
        commit(tx, self.batch)?;
        self.committed();
        self.used -= freed;
        Ok(entries.len())
    }

    /// Errors changed after `after` (a `seq`), of `node` if given, oldest change
    /// first, at most `limit` (the newest ones when there are more).
    pub fn node_errors(
        &self,
        node: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<NodeError>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, node, kind, text, count, first_ms, last_ms FROM node_errors
             WHERE seq > ?1 AND (?2 IS NULL OR node = ?2) ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after as i64, node, limit], |r| {
            Ok(NodeError {
                seq: r.get::<_, i64>(0)? as u64,
                node: r.get(1)?,
                kind: r.get(2)?,
                text: r.get(3)?,
                count: r.get::<_, i64>(4)? as u64,
                first_ms: r.get::<_, i64>(5)? as u64,
                last_ms: r.get::<_, i64>(6)? as u64,
            })
        })?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }
}
