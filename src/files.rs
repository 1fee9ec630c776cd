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
    write_chunk_io(part, index, chunk_size, data)
        .map_err(|e| format!("cannot write {}: {e}", part.display()))
}

/// [`write_chunk`] with the error as it came: a full disk (`ENOSPC`) is worth
/// waiting out rather than failing the transfer.
pub fn write_chunk_io(
    part: &Path,
    index: u32,
    chunk_size: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)?;
    f.seek(SeekFrom::Start(u64::from(index) * u64::from(chunk_size)))?;
    f.write_all(data).and_then(|_| f.sync_data())
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

/// Finds `path` inside one of `share_dirs`: the share directory (resolved once,
/// it is the operator's) and the path below it, which must be plain names (no
/// `..`, no `.`). Nothing is opened here; see [`open_confined`].
pub fn resolve_shared(share_dirs: &[PathBuf], path: &str) -> Result<(PathBuf, PathBuf), String> {
    use std::path::Component;
    if share_dirs.is_empty() {
        return Err("this node shares no files (set share_dirs in its configuration)".into());
    }
    let refused = || format!("{path:?} is not a file in this node's share directories");
    for dir in share_dirs {
        let Ok(root) = dir.canonicalize() else {
            continue;
        };
        let rel = if Path::new(path).is_absolute() {
            match Path::new(path)
                .strip_prefix(&root)
                .or_else(|_| Path::new(path).strip_prefix(dir))
            {
                Ok(rel) => rel.to_path_buf(),
                Err(_) => continue,
            }
        } else {
            PathBuf::from(path)
        };
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(refused());
        }
        if open_confined(&root, &rel).is_ok() {
            return Ok((root, rel));
        }
    }
    Err(refused())
}

/// Opens `root/rel` for reading without following any symlink on the way (each
/// directory is opened below the last with `O_NOFOLLOW`), and checks that what
/// was opened is a regular file. Whatever is swapped in after this, the file
/// returned is the one that was checked: read only from it.
pub fn open_confined(root: &Path, rel: &Path) -> Result<File, String> {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let refused = |why: &str| format!("{}: {why}", root.join(rel).display());
    let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|_| refused("bad path"))?;
    // SAFETY: a valid C string; the descriptor is owned below.
    let mut dir = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return Err(refused(&std::io::Error::last_os_error().to_string()));
    }
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let std::path::Component::Normal(name) = part else {
            // SAFETY: closing a descriptor we opened.
            unsafe { libc::close(dir) };
            return Err(refused("not a plain path below the share directory"));
        };
        let last = i + 1 == parts.len();
        let name = CString::new(name.as_bytes()).map_err(|_| refused("bad path"))?;
        let flags = libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last { 0 } else { libc::O_DIRECTORY };
        // SAFETY: `dir` is an open directory, `name` a valid C string.
        let next = unsafe { libc::openat(dir, name.as_ptr(), flags) };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing a descriptor we opened.
        unsafe { libc::close(dir) };
        if next < 0 {
            let why = if err.raw_os_error() == Some(libc::ELOOP) {
                "a symlink; refusing to follow it out of the share".to_string()
            } else {
                err.to_string()
            };
            return Err(refused(&why));
        }
        dir = next;
    }
    // SAFETY: `dir` is now the opened file, owned by nobody else.
    let file = unsafe { File::from_raw_fd(dir) };
    let meta = file.metadata().map_err(|e| refused(&e.to_string()))?;
    if !meta.is_file() {
        return Err(refused("not a regular file"));
    }
    Ok(file)
}

/// SHA-256 and size of an open file, streamed from its start.
pub fn sha256_open(f: &mut File) -> Result<(Vec<u8>, u64), String> {
    f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("cannot read: {e}"))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((ctx.finish().as_ref().to_vec(), size))
}

/// Reads chunk `index` from an open file.
pub fn read_chunk_open(f: &mut File, index: u32, chunk_size: u32) -> Result<Vec<u8>, String> {
    f.seek(SeekFrom::Start(u64::from(index) * u64::from(chunk_size)))
        .map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(chunk_size as usize);
    f.take(u64::from(chunk_size))
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_files_open_only_below_their_share_without_following_symlinks() {
        let base = std::env::temp_dir().join(format!("outpost-share-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let share = base.join("share");
        std::fs::create_dir_all(share.join("sub")).unwrap();
        std::fs::write(share.join("sub/a.log"), "inside").unwrap();
        std::fs::write(base.join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), share.join("link")).unwrap();
        std::os::unix::fs::symlink(&base, share.join("up")).unwrap();
        let dirs = vec![share.clone()];
        let (root, rel) = resolve_shared(&dirs, "sub/a.log").unwrap();
        let mut f = open_confined(&root, &rel).unwrap();
        assert_eq!(read_chunk_open(&mut f, 0, 100).unwrap(), b"inside");
        let abs = share.join("sub/a.log");
        assert!(resolve_shared(&dirs, abs.to_str().unwrap()).is_ok());
        for bad in [
            "link",
            "up/secret",
            "../secret",
            "sub/../../secret",
            "sub",
            "",
        ] {
            assert!(resolve_shared(&dirs, bad).is_err(), "{bad}");
        }
        let err = open_confined(&share, Path::new("link")).unwrap_err();
        assert!(err.contains("symlink"), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }

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
