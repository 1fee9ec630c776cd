//! What the link spent: bytes on the wire per hour and category (`usage`), per
//! day and peer (`peer_usage`), and each budget's spending in its current period
//! (`budget_spent`). Written by the agent every few seconds while bytes flow;
//! hourly and daily rows older than [`KEEP_DAYS`] are deleted as new ones come.

use rusqlite::params;

use super::{commit, Store, StoreError};
use crate::budget::Category;

/// Hourly and per-peer rows are kept this long: this month and the last.
const KEEP_DAYS: u64 = 62;

/// Bytes up and down, added to what is stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// (hour since the epoch, category, up, down).
    pub hours: Vec<(u64, Category, u64, u64)>,
    /// (day since the epoch, peer, up, down).
    pub peers: Vec<(u64, String, u64, u64)>,
    /// Every budget's (scope, budget, period start, bytes spent), replacing.
    pub spent: Vec<(String, String, u64, u64)>,
}

impl Store {
    /// Adds link usage and replaces budget spending, in one transaction, and
    /// drops rows past [`KEEP_DAYS`] of `now_ms`.
    pub fn add_usage(&mut self, delta: &UsageDelta, now_ms: u64) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        for (hour, category, up, down) in &delta.hours {
            tx.prepare_cached(
                "INSERT INTO usage (hour, category, up, down) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (hour, category) DO UPDATE SET up = up + excluded.up, down = down + excluded.down",
            )?
            .execute(params![*hour as i64, category.as_str(), *up as i64, *down as i64])?;
        }
        for (day, peer, up, down) in &delta.peers {
            tx.prepare_cached(
                "INSERT INTO peer_usage (day, peer, up, down) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (day, peer) DO UPDATE SET up = up + excluded.up, down = down + excluded.down",
            )?
            .execute(params![*day as i64, peer, *up as i64, *down as i64])?;
        }
        for (scope, budget, start_ms, bytes) in &delta.spent {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO budget_spent (scope, budget, start_ms, bytes) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![scope, budget, *start_ms as i64, *bytes as i64])?;
        }
        let day = now_ms / 86_400_000;
        let keep_from = day.saturating_sub(KEEP_DAYS);
        tx.prepare_cached("DELETE FROM usage WHERE hour < ?1")?
            .execute([(keep_from * 24) as i64])?;
        tx.prepare_cached("DELETE FROM peer_usage WHERE day < ?1")?
            .execute([keep_from as i64])?;
        commit(tx, self.batch)?;
        self.committed();
        Ok(())
    }

    /// Hourly rows from `hour` on: (hour, category, up, down).
    pub fn usage_since(&self, hour: u64) -> Result<Vec<(u64, Category, u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT hour, category, up, down FROM usage WHERE hour >= ?1 ORDER BY hour, category",
        )?;
        let rows = stmt.query_map([hour as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (hour, category, up, down) = row?;
            // A category a newer version wrote is not shown here.
            if let Some(c) = Category::parse(&category) {
                out.push((hour, c, up, down));
            }
        }
        Ok(out)
    }

    /// Per-peer daily rows from `day` on: (peer, up, down) summed.
    pub fn peer_usage_since(&self, day: u64) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT peer, SUM(up), SUM(down) FROM peer_usage WHERE day >= ?1 GROUP BY peer ORDER BY peer",
        )?;
        let rows = stmt.query_map([day as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every budget's spending as last stored.
    pub fn budget_spent(&self) -> Result<Vec<(String, String, u64, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT scope, budget, start_ms, bytes FROM budget_spent")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
