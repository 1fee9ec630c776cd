//! `store.gen`: the store's epoch and generation, kept beside the database so that
//! a store which lost commits (a deleted or damaged `-wal`, an emptied or replaced
//! `store.db`, a power cut with `durability = normal`) is noticed when it opens.
//!
//! SQLite cannot tell: it drops a WAL frame with a bad checksum and every frame
//! after it without a word, and an empty file is just a new database. The
//! database's `meta.gen` goes up by one with every commit and the marker is
//! rewritten after each commit, so a database whose generation is below the
//! marker's has gone back in time. The marker is written in place (one `pwrite`
//! of a fixed-size line, no fsync): after a power cut it can only be behind the
//! database, never ahead of what `durability = full` committed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One fixed-size line, so that rewriting it never leaves a stale tail.
const LEN: usize = 64;

/// What the marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub epoch: u64,
    pub gen: u64,
}

/// The marker file beside `db`: `store.db` -> `store.gen`.
pub fn path_for(db: &Path) -> PathBuf {
    db.with_extension("gen")
}

fn line(m: Mark) -> [u8; LEN] {
    let text = format!("outpost store epoch {:016x} gen {:020}", m.epoch, m.gen);
    let mut out = [b' '; LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[LEN - 1] = b'\n';
    out
}

fn parse(bytes: &[u8]) -> Option<Mark> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut words = text.split_whitespace();
    let ok = words.next() == Some("outpost")
        && words.next() == Some("store")
        && words.next() == Some("epoch");
    if !ok {
        return None;
    }
    let epoch = u64::from_str_radix(words.next()?, 16).ok()?;
    if words.next() != Some("gen") {
        return None;
    }
    let gen = words.next()?.parse().ok()?;
    Some(Mark { epoch, gen })
}

/// Reads the marker: `Ok(None)` when there is none, `Err` when it is unreadable
/// or garbled (then nothing can be concluded from it).
pub fn read(path: &Path) -> Result<Option<Mark>, String> {
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes)
            .map(Some)
            .ok_or_else(|| format!("{} is garbled", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The open marker file, rewritten after every commit.
#[derive(Debug)]
pub struct Marker {
    file: Option<File>,
}

impl Marker {
    /// Opens (creating) the marker and writes `m` into it, synced: this is the
    /// line later opens compare against.
    pub fn create(path: &Path, m: Mark) -> Result<Marker, String> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        file.set_len(LEN as u64)
            .and_then(|()| file.write_all_at(&line(m), 0))
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Marker { file: Some(file) })
    }

    /// A marker that records nothing (stores opened without a state directory's
    /// marker, such as read-only inspection).
    pub fn none() -> Marker {
        Marker { file: None }
    }

    /// Records a commit. Failing to write (a full disk) only leaves the marker
    /// behind the database, which is never mistaken for lost state.
    pub fn record(&self, m: Mark) {
        if let Some(f) = &self.file {
            let _ = f.write_all_at(&line(m), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lines_roundtrip_and_garbage_is_not_a_mark() {
        let m = Mark {
            epoch: 0x0123_4567_89ab_cdef,
            gen: 42,
        };
        let l = line(m);
        assert_eq!(l.len(), LEN);
        assert_eq!(parse(&l), Some(m));
        assert_eq!(parse(b"outpost store epoch zz gen 1"), None);
        assert_eq!(parse(b""), None);
        let mut flipped = l;
        flipped[3] ^= 0x20;
        assert_eq!(parse(&flipped), None);
    }
}
