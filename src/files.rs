//! Files on disk: ids, where received files land, chunked reads and writes, and
//! whole-file verification. Nothing here holds a whole file in memory.
//!
//! Received files live at `FILES_DIR/SOURCE/ID`; a transfer writes
//! `FILES_DIR/SOURCE/.ID.part` and renames it into place only after the SHA-256 of
//! the whole file matches. Ids are single path components from a small alphabet,
//! and no directory on the way may be a symlink, so nothing lands outside
//! `FILES_DIR`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};

use crate::frame::Name;

/// Checks a file id: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, so never `..`, `/` or absolute.
pub fn validate_id(id: &str) -> Result<(), String> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !first_ok || !rest_ok || id.len() > 128 {
        return Err(format!(
            "invalid file id {id:?}: use 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
        ));
    }
    Ok(())
}

/// An id for a path: its file name, made valid.
pub fn id_for(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut id: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    while id.starts_with(['.', '_', '-']) {
        id.remove(0);
    }
    id.truncate(128);
    if id.is_empty() {
        "file".into()
    } else {
        id
    }
}

/// A real directory (not a symlink), created if missing.
fn real_dir(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{} is a symlink; refusing to write through it",
            dir.display()
        )),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(_) => std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display())),
    }
}

/// Where a file `id` from `source` lands, and its partial file.
pub fn landing(files_dir: &Path, source: &Name, id: &str) -> Result<(PathBuf, PathBuf), String> {
    validate_id(id)?;
    real_dir(files_dir)?;
    let dir = files_dir.join(source.as_str());
    real_dir(&dir)?;
    Ok((dir.join(id), dir.join(format!(".{id}.part"))))
}

/// SHA-256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(Vec<u8>, u64), String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((ctx.finish().as_ref().to_vec(), size))
}

/// Reads chunk `index` of `path`.
pub fn read_chunk(path: &Path, index: u32, chunk_size: u32) -> Result<Vec<u8>, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(u64::from(index) * u64::from(chunk_size)))
        .map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(chunk_size as usize);
    f.take(u64::from(chunk_size))
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(data)
}

/// Writes chunk `index` into the partial file and syncs it, so a recorded chunk is
/// on disk. Refuses to follow a symlink planted at the partial file's name.
pub fn write_chunk(part: &Path, index: u32, chunk_size: u32, data: &[u8]) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)
        .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    f.seek(SeekFrom::Start(u64::from(index) * u64::from(chunk_size)))
        .map_err(|e| e.to_string())?;
    f.write_all(data)
        .and_then(|_| f.sync_data())
        .map_err(|e| format!("cannot write {}: {e}", part.display()))
}

/// Verifies the partial file against `sha256` and `size`, then renames it into place.
pub fn complete(part: &Path, target: &Path, sha256: &[u8], size: u64) -> Result<(), String> {
    let (got, got_size) = sha256_file(part)?;
    if got_size != size || got != sha256 {
        let _ = std::fs::remove_file(part);
        return Err(format!(
            "the received file does not match its SHA-256 ({got_size} of {size} bytes)"
        ));
    }
    File::open(part)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    // rename replaces a symlink at `target` itself; it never writes through one.
    std::fs::rename(part, target).map_err(|e| format!("cannot move the file into place: {e}"))?;
    if let Some(dir) = target.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Resolves `path` inside one of `share_dirs` (after following symlinks), or refuses.
pub fn shared(share_dirs: &[PathBuf], path: &str) -> Result<PathBuf, String> {
    if share_dirs.is_empty() {
        return Err("this node shares no files (set share_dirs in its configuration)".into());
    }
    for dir in share_dirs {
        let Ok(root) = dir.canonicalize() else {
            continue;
        };
        let candidate = if Path::new(path).is_absolute() {
            PathBuf::from(path)
        } else {
            root.join(path)
        };
        if let Ok(real) = candidate.canonicalize() {
            if real.starts_with(&root) && real.is_file() {
                return Ok(real);
            }
        }
    }
    Err(format!(
        "{path:?} is not a file in this node's share directories"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_are_refused() {
        for bad in [
            "../../etc/passwd",
            "/abs",
            "a/b",
            "..",
            ".hidden",
            "",
            "x\0y",
            &"a".repeat(129),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["config.tar.gz", "fw-1.2_b", "A"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        assert_eq!(id_for(Path::new("/tmp/.my file!.txt")), "my_file_.txt");
    }
}
