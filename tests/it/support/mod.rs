//! Shared helpers for the integration tests and the benchmarks: condition waits with
//! deadlines, ports, temporary directories, a real mosquitto per test (`broker`),
//! plain MQTT clients (`mqtt`), the real binary (`outpost`), test certificates
//! (`pki`) and a fault-injecting TCP proxy (`proxy`). Each exists once.
//!
//! Tests never sleep to synchronise (STYLE.md habit 7): they wait for a condition
//! with a deadline. Every deadline these helpers apply is multiplied by
//! [`slow_factor`], so a slow machine or qemu can stretch them with
//! `OUTPOST_TEST_SLOW=4` without editing tests.

// Not every test uses every helper.
#![allow(dead_code)]

pub mod broker;
pub mod mqtt;
pub mod outpost;
pub mod pki;
pub mod proxy;

use std::env;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// splitmix64, seeded: small, reproducible, good enough to pick faults.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Multiplier for every deadline, from `OUTPOST_TEST_SLOW` (default 1).
///
/// Values that are not a positive integer are ignored, so a typo cannot make
/// every deadline zero.
pub fn slow_factor() -> u32 {
    env::var("OUTPOST_TEST_SLOW")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `timeout` stretched by [`slow_factor`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * slow_factor()
}

/// Polls `cond` until it returns `Some`, or gives up with `None` after
/// `timeout` (scaled by [`slow_factor`]).
///
/// The poll interval starts at 5 ms and doubles up to 100 ms: quick for
/// conditions that are almost true, cheap for slow ones. `cond` is always called
/// at least once, and once more at the deadline, so a condition that became true
/// while we slept is not reported as a timeout.
pub fn try_wait_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + scaled(timeout);
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until `cond` returns `Some` and returns its value; panics with
/// `timed out after ..: {what}` at the deadline (`timeout` scaled by
/// [`slow_factor`]).
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, cond: impl FnMut() -> Option<T>) -> T {
    match try_wait_for(timeout, cond) {
        Some(v) => v,
        None => panic!("timed out after {:?}: {what}", scaled(timeout)),
    }
}

/// Waits until `cond` holds; panics with `timed out after ..: {what}` at the
/// deadline (`timeout` scaled by [`slow_factor`]).
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()));
}

/// Waits for `child` to exit; panics (after killing it) at the deadline.
#[track_caller]
pub fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let status = try_wait_for(timeout, || child.try_wait().expect("try_wait on child"));
    match status {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {:?}: {what}", scaled(timeout));
        }
    }
}

/// A child process that is killed and reaped when dropped, so a failing test
/// leaves no stray processes behind.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process may take it before the caller binds it; helpers that start
/// servers on it (like [`broker::Broker::start`]) retry with a new port.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Finds an executable by name in `PATH`, then in the sbin directories that
/// distributions keep out of a normal user's `PATH` (mosquitto lives in
/// `/usr/sbin` on Debian).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A directory under [`env::temp_dir`] that is removed on drop.
///
/// Set `OUTPOST_KEEP_TEST_DIRS=1` to keep it for a post-mortem; its path is then
/// printed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `outpost-test-{pid}-{counter}-{nanos}`; the name is unique across
    /// the threads of this process and across concurrent test processes.
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = env::temp_dir().join(format!("outpost-test-{}-{n}-{nanos}", std::process::id()));
        // create_dir, not create_dir_all: fail rather than share a directory.
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if env::var_os("OUTPOST_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}
