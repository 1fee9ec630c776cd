//! Results to files (`send --output-dir`): `DIR/NODE.out`, `DIR/NODE.err` and
//! `DIR/NODE.json` per target, written by the CLI while it waits, or by the agent
//! for an `--async` send. `NODE.json` is the object `send --json` prints.
//!
//! Replacing (the default) writes each file to a temporary name in the same
//! directory and renames it into place, so a reader sees the old file or the new
//! one, never half of one. Appending adds to the end (`NODE.json` then holds one
//! object per line). The directory is created if it is missing. Node names are
//! single path components (`[a-z0-9][a-z0-9._-]*`), so nothing lands outside it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::reply::{JobView, ResultView};

/// Where an agent writes each target's result of an `--async` send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// An absolute directory on the agent's machine.
    pub dir: String,
    /// Append to the files instead of replacing them.
    #[serde(default)]
    pub append: bool,
}

/// What `send --json` prints, and `NODE.json` holds: one object per target result.
#[derive(Debug, Serialize)]
pub struct TargetResult<'a> {
    pub node: &'a str,
    pub job: i64,
    pub status: &'a str,
    pub exit_code: Option<i32>,
    pub stdout: &'a str,
    pub stderr: &'a str,
    pub truncated: bool,
    pub duration_ms: u64,
    pub reason: &'a str,
    pub rtt_ms: Option<u64>,
    pub http_status: Option<u16>,
    pub http_headers: Option<&'a [(String, String)]>,
}

impl<'a> TargetResult<'a> {
    pub fn new(job: &JobView, node: &'a str, r: &'a ResultView) -> TargetResult<'a> {
        TargetResult {
            node,
            job: job.id,
            status: &r.status,
            exit_code: r.exit_code,
            stdout: &r.stdout,
            stderr: &r.stderr,
            truncated: r.truncated,
            duration_ms: r.duration_ms,
            reason: &r.reason,
            rtt_ms: r.rtt_ms,
            http_status: r.http_status,
            http_headers: r.http_headers.as_deref(),
        }
    }
}

/// Writes one target's result into `dir`; the error names the file.
pub fn write_result(
    dir: &Path,
    append: bool,
    job: &JobView,
    node: &str,
    r: &ResultView,
) -> Result<(), String> {
    if node.is_empty() || node.contains('/') || node.starts_with('.') {
        return Err(format!("{node:?} is not a node name"));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut json =
        serde_json::to_string(&TargetResult::new(job, node, r)).map_err(|e| e.to_string())?;
    json.push('\n');
    for (ext, bytes) in [
        ("out", r.stdout.as_bytes()),
        ("err", r.stderr.as_bytes()),
        ("json", json.as_bytes()),
    ] {
        let path = dir.join(format!("{node}.{ext}"));
        let written = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(bytes))
        } else {
            replace(&path, bytes)
        };
        written.map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let done = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
