//! Retention: finished history is pruned after an age and beyond a count.
//!
//! What goes: jobs whose every target has its result (with those targets and
//! results), results no job target refers to, journal rows `done`, events,
//! quarantined frames, entries of the error log, and transfers that finished. What never goes: a job with a
//! target still queued, delivered or running, a journal row `running`, a transfer
//! in progress, and anything in the inbox or outbox (those are not history, they
//! are the work). A journal row whose frame is still in the inbox is kept too: the
//! row is what says the frame was taken.
//!
//! One call prunes at most `batch` rows of each kind, in one savepoint, so a pass
//! never holds a long transaction nor blocks the agent's loop for long; the caller
//! calls again while [`Pruned::full`] says a kind had more. Every prune query walks
//! an index or a bounded range of row ids (migration 7), never the whole history.
//!
//! The database file does not shrink: freed pages go on SQLite's freelist and the
//! next inserts reuse them, so the file stays at its high-water mark and grows no
//! further once pruning keeps up (flat after the first pass). `auto_vacuum` would
//! only apply to a database created with it or after a full `VACUUM`, which
//! rewrites the whole file and needs as much free space again: not worth it on a
//! small flash partition for space the store will use again anyway.

use super::sql::Cached;
use rusqlite::params;

use super::{commit, Store, StoreError};

/// How much finished history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this (finished this long ago) go.
    pub max_age_ms: u64,
    /// Of each kind, at most this many of the newest finished rows stay.
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_ms: 30 * 86_400_000,
            max_rows: 100_000,
        }
    }
}

/// How many rows of each kind one call (or several, added up) pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub results: u64,
    pub journal: u64,
    pub events: u64,
    pub quarantine: u64,
    pub transfers: u64,
    /// Entries of the error log nodes reported (`node_errors`).
    pub errors: u64,
    /// Some kind had a full batch: there may be more to prune now.
    pub full: bool,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.jobs
            + self.results
            + self.journal
            + self.events
            + self.quarantine
            + self.transfers
            + self.errors
    }

    pub fn add(&mut self, other: &Pruned) {
        self.jobs += other.jobs;
        self.results += other.results;
        self.journal += other.journal;
        self.events += other.events;
        self.quarantine += other.quarantine;
        self.transfers += other.transfers;
        self.errors += other.errors;
        self.full |= other.full;
    }
}

/// Target states that are not a result yet.
const UNFINISHED: &str = "('queued', 'delivered', 'running')";

impl Store {
    /// Prunes at most `batch` rows of each kind that `keep` lets go, in one
    /// savepoint (part of an open batch, if one is).
    pub fn prune(
        &mut self,
        keep: &Retention,
        batch: u32,
        now_ms: u64,
    ) -> Result<Pruned, StoreError> {
        let cut = now_ms.saturating_sub(keep.max_age_ms) as i64;
        let rows = keep.max_rows.min(i64::MAX as u64) as i64;
        let n = i64::from(batch);
        let tx = self.conn.savepoint()?;
        // Jobs: finished, and either created and answered before the cut or
        // beyond the newest `rows` jobs. The scan runs over row ids up to the last
        // job that could qualify (found through `jobs_created`), so what it walks
        // in vain is only jobs still waiting for results.
        let max_id: i64 = tx.row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))?;
        let by_count = max_id - rows;
        let by_age = last_before(&tx, "jobs", "created_ms", cut)?;
        let jobs: Vec<i64> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT j.id FROM jobs j
                 WHERE j.id <= ?1 AND (j.id <= ?2 OR j.created_ms < ?3)
                   AND NOT EXISTS (SELECT 1 FROM job_targets t LEFT JOIN results r ON r.id = t.result
                                   WHERE t.job = j.id AND (t.result IS NULL OR t.state IN {UNFINISHED}
                                                           OR (j.id > ?2 AND r.at_ms >= ?3)))
                 ORDER BY j.id LIMIT ?4"
            ))?;
            let rows = stmt.query_map(params![by_count.max(by_age), by_count, cut, n], |r| {
                r.get(0)
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut pruned = Pruned {
            jobs: jobs.len() as u64,
            full: jobs.len() as i64 == n,
            ..Pruned::default()
        };
        if !jobs.is_empty() {
            // Set-based, one statement per table: the ids are integers read from
            // this database, so listing them in the statement is safe.
            let list = jobs
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let results: Vec<i64> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT result FROM job_targets WHERE job IN ({list}) AND result IS NOT NULL"
                ))?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            // Targets first: they refer to the job and to their results.
            tx.execute_batch(&format!(
                "DELETE FROM job_targets WHERE job IN ({list});
                 DELETE FROM job_outputs_written WHERE job IN ({list});
                 DELETE FROM job_outputs WHERE job IN ({list});
                 DELETE FROM jobs WHERE id IN ({list});"
            ))?;
            if !results.is_empty() {
                let list = results
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                pruned.results +=
                    tx.execute(&format!("DELETE FROM results WHERE id IN ({list})"), [])? as u64;
            }
        }
        // Results no target refers to (a command sent without a job, a late
        // result for a job already pruned): old or beyond the newest `rows`. Only
        // once the jobs are done with, so that the range walked holds no results
        // of jobs about to go, only those of jobs still kept.
        if !pruned.full {
            let max_result: i64 =
                tx.row("SELECT COALESCE(MAX(id), 0) FROM results", [], |r| r.get(0))?;
            let by_count = max_result - rows;
            let by_age: i64 = last_before(&tx, "results", "at_ms", cut)?;
            let orphans =
                tx.prepare_cached(
                    "DELETE FROM results WHERE id IN (
                       SELECT r.id FROM results r
                       WHERE r.id <= ?1 AND (r.id <= ?2 OR r.at_ms < ?3)
                         AND NOT EXISTS (SELECT 1 FROM job_targets t WHERE t.result = r.id)
                       ORDER BY r.id LIMIT ?4)",
                )?
                .execute(params![by_count.max(by_age), by_count, cut, n])? as u64;
            pruned.results += orphans;
            pruned.full |= orphans as i64 == n;
        }
        // Journal: rows `done` whose frame is gone, by age (`journal_done`) and
        // beyond the newest `rows` (row ids grow with every command taken).
        let old = tx
            .prepare_cached(
                "DELETE FROM journal WHERE rowid IN (
                   SELECT j.rowid FROM journal j
                   WHERE j.state = 'done' AND j.finished_ms < ?1
                     AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.peer = j.peer AND i.lane = j.lane AND i.seq = j.seq)
                   ORDER BY j.finished_ms LIMIT ?2)",
            )?
            .execute(params![cut, n])? as u64;
        let max_row: i64 = tx.row("SELECT COALESCE(MAX(rowid), 0) FROM journal", [], |r| {
            r.get(0)
        })?;
        let many = tx
            .prepare_cached(
                "DELETE FROM journal WHERE rowid IN (
                   SELECT j.rowid FROM journal j
                   WHERE j.rowid <= ?1 AND j.state = 'done'
                     AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.peer = j.peer AND i.lane = j.lane AND i.seq = j.seq)
                   ORDER BY j.rowid LIMIT ?2)",
            )?
            .execute(params![max_row - rows, n])? as u64;
        pruned.journal = old + many;
        pruned.full |= old as i64 == n || many as i64 == n;
        // Events and quarantine are never unfinished: the oldest rows go first, so
        // looking at the oldest `batch` is enough.
        for (table, count) in [
            ("events", &mut pruned.events),
            ("quarantine", &mut pruned.quarantine),
        ] {
            let max: i64 = tx.query_row(
                &format!("SELECT COALESCE(MAX(id), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )?;
            *count = tx
                .prepare_cached(&format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?3)
                     AND (at_ms < ?1 OR id <= ?2)"
                ))?
                .execute(params![cut, max - rows, n])? as u64;
        }
        pruned.full |= pruned.events as i64 == n || pruned.quarantine as i64 == n;
        // Errors nodes reported, by when they last happened (oldest change first).
        let max_error: i64 = tx.row("SELECT COALESCE(MAX(seq), 0) FROM node_errors", [], |r| {
            r.get(0)
        })?;
        let errors = tx
            .prepare_cached(
                "DELETE FROM node_errors WHERE id IN (SELECT id FROM node_errors ORDER BY seq LIMIT ?3)
                 AND (last_ms < ?1 OR seq <= ?2)",
            )?
            .execute(params![cut, max_error - rows, n])? as u64;
        pruned.errors = errors;
        pruned.full |= errors as i64 == n;
        // Transfers that finished (their chunks go with them, ON DELETE CASCADE).
        // Files held are swept when they expire (`Node::pump_files`), not here.
        let max_transfer: i64 = tx.row("SELECT COALESCE(MAX(id), 0) FROM transfers", [], |r| {
            r.get(0)
        })?;
        pruned.transfers = tx
            .prepare_cached(
                "DELETE FROM transfers WHERE id IN (
                   SELECT id FROM transfers
                   WHERE state IN ('done', 'skipped', 'failed', 'expired') AND (updated_ms < ?1 OR id <= ?2)
                   ORDER BY id LIMIT ?3)",
            )?
            .execute(params![cut, max_transfer - rows, n])? as u64;
        pruned.full |= pruned.transfers as i64 == n;
        commit(tx, self.batch)?;
        self.committed();
        Ok(pruned)
    }

    /// The database file's pages: (in use, free). Free pages are reused by the
    /// next inserts; the file does not shrink.
    pub fn pages(&self) -> Result<(u64, u64), StoreError> {
        let count: i64 = self.conn.row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self.conn.row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok(((count - free) as u64, free as u64))
    }
}

/// The id of the row of `table` with the latest `column` before `cut` (0 if
/// none), through the index on `column`: the last row the age rule can reach, if
/// ids grow with time. After the wall clock went back, rows numbered later but
/// stamped earlier wait for the next passes (or go by count).
fn last_before(
    tx: &rusqlite::Connection,
    table: &str,
    column: &str,
    cut: i64,
) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(tx
        .prepare_cached(&format!(
            "SELECT id FROM {table} WHERE {column} < ?1 ORDER BY {column} DESC LIMIT 1"
        ))?
        .query_row([cut], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::frame::{self, Body, CmdResult, Command, Exec, Method, Name, Status};
    use crate::store::{Durability, Outgoing, StoreConfig};

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "outpost-retention-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn open(dir: &TempDir, me: &str) -> Store {
        let cfg = StoreConfig {
            durability: Durability::Normal,
            quota_bytes: u64::MAX,
        };
        Store::open(&dir.0.join(format!("{me}.db")), &n(me), &cfg)
            .unwrap()
            .0
    }

    fn exec(to: &str) -> Outgoing {
        Outgoing {
            to: n(to),
            lane: frame::default_lane(),
            ttl_s: None,
            body: Body::Command(Command::Exec(Exec {
                argv: vec!["true".into()],
                ..Exec::default()
            })),
        }
    }

    /// Moves every outbox frame from `from` to `to`.
    fn deliver(from: &mut Store, to: &mut Store, now: u64) {
        for s in from.out_streams().unwrap() {
            if s.peer != *to.me() {
                continue;
            }
            let (frames, _) = from
                .outbox_frames(&s.peer, &s.lane, s.acked + 1, s.last_seq, now)
                .unwrap();
            let batch: Vec<_> = frames
                .iter()
                .map(|(_, b)| (frame::decode(b).unwrap(), b.as_slice()))
                .collect();
            to.receive(&batch, now).unwrap();
            from.apply_ack(&s.peer, &s.lane, s.last_seq).unwrap();
        }
    }

    /// Everything runnable on `node`: commands finished ok, results recorded.
    fn take_all(node: &mut Store, now: u64) {
        loop {
            let (ready, _) = node.runnable(8, now).unwrap();
            if ready.is_empty() {
                return;
            }
            for r in ready {
                match &r.env.body {
                    Body::Command(_) => {
                        let res = CmdResult::without_run(r.env.seq, Status::Ok, "", now);
                        node.finish(&r, "exec", res, now).unwrap();
                    }
                    Body::Result(_) => {
                        node.record_result(&r, now).unwrap();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    /// Central sends one job per target list at `now`; returns its id.
    fn job(c: &mut Store, to: &[&str], now: u64) -> i64 {
        c.submit_job(
            Method::Exec,
            "true",
            to.iter().map(|t| exec(t)).collect(),
            now,
        )
        .unwrap()
        .0
    }

    fn job_ids(c: &Store) -> Vec<i64> {
        let mut ids: Vec<i64> = c.jobs(1000).unwrap().iter().map(|j| j.id).collect();
        ids.sort_unstable();
        ids
    }

    fn count(s: &Store, sql: &str) -> i64 {
        s.raw().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn old_finished_history_goes_and_unfinished_work_stays() {
        let dir = TempDir::new("age");
        let (mut c, mut a, mut d) = (open(&dir, "central"), open(&dir, "a"), open(&dir, "d"));
        // Five jobs run and answered on day 1.
        for _ in 0..5 {
            job(&mut c, &["a"], DAY);
        }
        deliver(&mut c, &mut a, DAY);
        take_all(&mut a, DAY);
        deliver(&mut a, &mut c, DAY);
        take_all(&mut c, DAY);
        // Day 1 too: a job to a and b that only a answers, a job b never gets,
        // and a command a journals running and never finishes.
        let half = job(&mut c, &["a", "b"], DAY);
        let waiting = job(&mut c, &["b"], DAY);
        deliver(&mut c, &mut a, DAY);
        take_all(&mut a, DAY);
        deliver(&mut a, &mut c, DAY);
        take_all(&mut c, DAY);
        let stuck = job(&mut c, &["a"], DAY);
        deliver(&mut c, &mut a, DAY);
        let (ready, _) = a.runnable(8, DAY).unwrap();
        a.start(&ready[0], "exec", DAY).unwrap();
        // A job created on day 1 and answered on day 40, and one of day 40.
        let late = job(&mut c, &["d"], DAY);
        let fresh = job(&mut c, &["d"], 40 * DAY);
        deliver(&mut c, &mut d, 40 * DAY);
        take_all(&mut d, 40 * DAY);
        deliver(&mut d, &mut c, 40 * DAY);
        take_all(&mut c, 40 * DAY);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 8);

        let keep = Retention {
            max_age_ms: 30 * DAY,
            max_rows: 1_000,
        };
        let p = c.prune(&keep, 100, 41 * DAY).unwrap();
        assert_eq!((p.jobs, p.results, p.full), (5, 5, false), "{p:?}");
        assert_eq!(job_ids(&c), [half, waiting, stuck, late, fresh]);
        // The half-answered job keeps its result; the others theirs.
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 3);
        assert!(c.job(half).unwrap().unwrap().targets[0].result.is_some());

        let p = a.prune(&keep, 100, 41 * DAY).unwrap();
        assert_eq!(p.journal, 6, "a's six done rows go: {p:?}");
        assert_eq!(
            count(&a, "SELECT COUNT(*) FROM journal WHERE state = 'running'"),
            1,
            "the running command stays"
        );
        // d's rows are from day 40: kept.
        assert_eq!(d.prune(&keep, 100, 41 * DAY).unwrap().total(), 0);
        // Nothing more to do: a second pass prunes nothing.
        assert_eq!(c.prune(&keep, 100, 41 * DAY).unwrap().total(), 0);
        // The frames still queued for b are untouched.
        assert!(c.counts().unwrap().outbox > 0);
    }

    #[test]
    fn beyond_the_count_the_oldest_finished_go_in_bounded_batches() {
        let dir = TempDir::new("count");
        let (mut c, mut a) = (open(&dir, "central"), open(&dir, "a"));
        let waiting = job(&mut c, &["b"], 1);
        for _ in 0..25 {
            job(&mut c, &["a"], 2);
        }
        deliver(&mut c, &mut a, 3);
        take_all(&mut a, 3);
        deliver(&mut a, &mut c, 4);
        take_all(&mut c, 4);
        let keep = Retention {
            max_age_ms: u64::MAX,
            max_rows: 10,
        };
        let mut total = Pruned::default();
        let mut passes = 0;
        loop {
            let p = c.prune(&keep, 4, 5).unwrap();
            assert!(
                p.jobs <= 4 && p.results <= 4 + 4,
                "a pass is bounded: {p:?}"
            );
            total.add(&p);
            passes += 1;
            if !p.full {
                break;
            }
        }
        assert!(passes >= 4, "{passes}");
        // The newest ten job ids are 17..=26; every finished one below goes, the
        // unanswered first job stays.
        assert_eq!(total.jobs, 15, "{total:?}");
        let ids = job_ids(&c);
        assert_eq!(ids[0], waiting);
        assert_eq!(&ids[1..], (17..=26).collect::<Vec<_>>());
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 10);
        let p = a.prune(&keep, 100, 5).unwrap();
        assert_eq!(p.journal, 15);
        assert_eq!(count(&a, "SELECT COUNT(*) FROM journal"), 10);
    }

    #[test]
    fn events_and_quarantine_go_by_age_and_count() {
        let dir = TempDir::new("events");
        let mut c = open(&dir, "central");
        for i in 0..6u64 {
            c.quarantine_received(b"junk", "forged", i * DAY).unwrap();
            c.raw()
                .run(
                    "INSERT INTO events (at_ms, text) VALUES (?1, 'something')",
                    [(i * DAY) as i64],
                )
                .unwrap();
            c.raw()
                .run(
                    "INSERT INTO node_errors (node, kind, text, count, first_ms, last_ms, seq)
                     VALUES ('a', 'store', ?1, 1, ?2, ?2, ?3)",
                    rusqlite::params![format!("error {i}"), (i * DAY) as i64, i as i64 + 1],
                )
                .unwrap();
        }
        let keep = Retention {
            max_age_ms: 3 * DAY,
            max_rows: 1_000,
        };
        let p = c.prune(&keep, 100, 6 * DAY).unwrap();
        assert_eq!(
            (p.events, p.quarantine, p.errors),
            (3, 3, 3),
            "days 0, 1, 2 go"
        );
        let keep = Retention {
            max_age_ms: u64::MAX,
            max_rows: 1,
        };
        let p = c.prune(&keep, 100, 6 * DAY).unwrap();
        assert_eq!((p.events, p.quarantine, p.errors), (2, 2, 2));
        assert_eq!(c.counts().unwrap().events, 1);
    }

    #[test]
    fn a_late_result_for_a_pruned_job_is_pruned_as_an_orphan() {
        let dir = TempDir::new("orphan");
        let (mut c, mut a) = (open(&dir, "central"), open(&dir, "a"));
        job(&mut c, &["a"], DAY);
        deliver(&mut c, &mut a, DAY);
        take_all(&mut a, DAY);
        deliver(&mut a, &mut c, DAY);
        take_all(&mut c, DAY);
        // The job goes with its result; then an orphan row appears (as a
        // result with no job would) and goes by age too.
        let keep = Retention {
            max_age_ms: DAY,
            max_rows: 1_000,
        };
        assert_eq!(c.prune(&keep, 100, 3 * DAY).unwrap().results, 1);
        c.raw()
            .run(
"INSERT INTO results (peer, lane, seq, at_ms, frame) VALUES ('a', 'ordered', 9, ?1, x'00')",
                [DAY as i64],
            )
            .unwrap();
        let p = c.prune(&keep, 100, 3 * DAY).unwrap();
        assert_eq!((p.jobs, p.results), (0, 1));
    }
}
