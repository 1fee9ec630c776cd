//! The node's side of results to files: what the store keeps of each job's
//! output directory (see [`crate::store::JobOutput`]).

use super::Node;
use crate::frame::Name;
use crate::store::StoreError;

impl Node {
    /// Records that `job`'s results go to files in `dir`.
    pub fn set_job_output(&mut self, job: i64, dir: &str, append: bool) -> Result<(), StoreError> {
        self.store.set_job_output(job, dir, append)
    }

    /// Records `node`'s result files of `job` written, or why they were not.
    pub fn output_written(
        &mut self,
        job: i64,
        node: &Name,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.store.output_written(job, node, error)
    }
}
