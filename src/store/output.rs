//! Where the agent writes a job's results (`send --output-dir` with `--async`),
//! kept with the job so that an agent restarted between a result and its files
//! still writes them.

use super::sql::Cached;
use std::path::PathBuf;

use rusqlite::{params, OptionalExtension};

use super::{commit, Store, StoreError};
use crate::frame::Name;

/// A job's output directory and what of it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutput {
    pub dir: PathBuf,
    pub append: bool,
    /// Targets whose result files are written (or failed to be: they are not
    /// tried again).
    pub written: Vec<Name>,
}

impl Store {
    /// Records that `job`'s results go to files in `dir`.
    pub fn set_job_output(&mut self, job: i64, dir: &str, append: bool) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO job_outputs (job, dir, append) VALUES (?1, ?2, ?3)",
            params![job, dir, append],
        )?;
        Ok(())
    }

    /// `job`'s output, if it has one.
    pub fn job_output(&self, job: i64) -> Result<Option<JobOutput>, StoreError> {
        let head: Option<(String, bool)> = self
            .conn
            .prepare_cached("SELECT dir, append FROM job_outputs WHERE job = ?1")?
            .query_row([job], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((dir, append)) = head else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT node FROM job_outputs_written WHERE job = ?1")?;
        let written = stmt
            .query_map([job], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(JobOutput {
            dir: dir.into(),
            append,
            written: written
                .iter()
                .map(|n| Name::new(n).map_err(|e| StoreError::Invalid(e.to_string())))
                .collect::<Result<_, _>>()?,
        }))
    }

    /// Jobs whose results are not all written yet.
    pub fn pending_outputs(&self) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT job FROM job_outputs WHERE pending = 1 ORDER BY job")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<i64>, _>>()?;
        Ok(ids)
    }

    /// Records `node`'s result files of `job` written (or why not); the job is no
    /// longer pending once every target's are.
    pub fn output_written(
        &mut self,
        job: i64,
        node: &Name,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.run(
            "INSERT OR REPLACE INTO job_outputs_written (job, node, error) VALUES (?1, ?2, ?3)",
            params![job, node.as_str(), error],
        )?;
        tx.run(
            "UPDATE job_outputs SET pending = 0 WHERE job = ?1
             AND (SELECT COUNT(*) FROM job_outputs_written WHERE job = ?1)
                 >= (SELECT COUNT(*) FROM job_targets WHERE job = ?1)",
            [job],
        )?;
        commit(tx, self.batch)?;
        self.committed();
        Ok(())
    }
}
