//! What the agent needs from the operating system: clocks, stop signals, the
//! state directory and its lock, the node's keys.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smol::channel::Sender;

use super::Msg;
use crate::config::Config;
use crate::seal;
use crate::store::Mono;
use crate::trust::{self, Keys};
use crate::{info, warn};

/// The monotonic clock: `CLOCK_BOOTTIME` (counts through suspend), in ms.
pub(super) fn mono_now(boot: u64) -> Mono {
    // SAFETY: timespec is plain data; clock_gettime only writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Mono {
        ms: ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
        boot,
    }
}

/// This boot, as 64 bits of the kernel's boot id (never 0).
pub(super) fn boot_id() -> u64 {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0).max(1)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The [`exec::TAG_VAR`] value for this state directory's commands.
pub(super) fn agent_tag(state_dir: &Path) -> String {
    state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .display()
        .to_string()
}

pub(super) fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts).
pub(super) fn block_stop_signals() -> libc::sigset_t {
    let set = stop_signals();
    // SAFETY: a valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// A thread that waits for SIGTERM or SIGINT and tells the loop.
pub(super) fn spawn_signal_thread(set: libc::sigset_t, tx: Sender<Msg>) {
    let _ = std::thread::Builder::new()
        .name("outpost-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: a valid set and a place for the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0
                && tx.send_blocking(Msg::Stop(sig)).is_err()
            {
                return;
            }
        });
}

pub(super) fn load_or_create_keys(cfg: &Config) -> Result<Keys, String> {
    if !trust::key_path(&cfg.state_dir).exists() {
        let public = trust::generate(&cfg.state_dir, false)?;
        info!(
            "generated this node's key pair; public key {}",
            seal::to_hex(public.as_bytes())
        );
    }
    trust::load(&cfg.state_dir)
}

pub(super) fn prepare_state_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create state directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}

/// One agent per state directory: an exclusive `flock` held for the process's life.
pub(super) fn lock_state_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::io::{Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // A predecessor killed a moment ago can hold the lock a little longer: a child
    // it was forking keeps the descriptor until its exec closes it. Wait a few
    // seconds for that before concluding another agent is alive, and say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said = false;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            // Who holds it, for the next one to say.
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = writeln!(file, "{}", std::process::id());
            return Ok(file);
        }
        let holder = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"));
        if Instant::now() >= deadline {
            return Err(format!(
                "another agent ({holder}) is already running with state directory {}",
                dir.display()
            ));
        }
        if !said {
            warn!(
                "waiting up to 10 s for the lock on {} held by {holder} (another agent on this state directory, or one that is just exiting)",
                path.display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
