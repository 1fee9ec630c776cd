//! Reading facts from the system: `/proc`, `/etc/os-release`, `statvfs`,
//! `getifaddrs`, and the entries of `facts_dir` (Mender's inventory scripts and
//! facter's facts.d are the model: an executable prints `KEY=VALUE` lines, any
//! other file holds them).
//!
//! [`system`] is quick and synchronous (a few small reads); [`custom`] runs
//! programs, each in its own process group with a timeout and an output cap (see
//! [`crate::exec`]), so it is async and runs as a task off the agent's loop.

use std::ffi::CStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{os_facts, parse_key_values, valid_key, Snapshot, MAX_VALUE};
use crate::exec;

/// Longest a `facts_dir` program may run.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most output read from one `facts_dir` entry.
pub const OUTPUT_CAP: usize = 16 * 1024;

/// A `facts_dir` entry that did not give its facts, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub entry: String,
    pub reason: String,
}

/// The facts the system itself tells: hostname, OS, kernel, arch, boot, load,
/// memory, free space where the state and the received files live, interface
/// addresses. (The agent adds its version, link counters and queue depths.)
pub fn system(state_dir: &Path, files_dir: &Path) -> Snapshot {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut f = os_facts(
        read("/etc/os-release")
            .or_else(|| read("/usr/lib/os-release"))
            .as_deref(),
        read("/etc/openwrt_release").as_deref(),
    );
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
            f.insert(k.to_string(), v);
        }
    };
    let (host, release, machine) = uname();
    put("hostname", host);
    put("kernel", release);
    put("arch", machine);
    put("boot.id", read("/proc/sys/kernel/random/boot_id"));
    let stat = read("/proc/stat").unwrap_or_default();
    put(
        "boot.time",
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .map(str::to_string),
    );
    let load = read("/proc/loadavg").unwrap_or_default();
    let mut parts = load.split_whitespace();
    for key in ["load.1", "load.5", "load.15"] {
        put(key, parts.next().map(str::to_string));
    }
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    for (key, field) in [
        ("mem.total", "MemTotal:"),
        ("mem.available", "MemAvailable:"),
    ] {
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        put(key, kib.map(|k| (k * 1024).to_string()));
    }
    for (name, dir) in [("state", state_dir), ("files", files_dir)] {
        if let Some((total, free)) = disk(dir) {
            put(&format!("disk.{name}.total"), Some(total.to_string()));
            put(&format!("disk.{name}.free"), Some(free.to_string()));
        }
    }
    for (iface, addrs) in interfaces() {
        put(&format!("net.{iface}"), Some(addrs.join(" ")));
    }
    f
}

/// (nodename, release, machine) from uname(2).
fn uname() -> (Option<String>, Option<String>, Option<String>) {
    // SAFETY: utsname is plain data; uname only writes into it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname owned by this frame.
    if unsafe { libc::uname(&mut u) } != 0 {
        return (None, None, None);
    }
    let s = |field: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        let c = unsafe { CStr::from_ptr(field.as_ptr()) };
        Some(c.to_string_lossy().into_owned())
    };
    (s(&u.nodename), s(&u.release), s(&u.machine))
}

/// (total, available to this user) bytes of the filesystem holding `dir` (or
/// its nearest existing parent).
fn disk(dir: &Path) -> Option<(u64, u64)> {
    let mut dir = dir;
    while !dir.exists() {
        dir = dir.parent()?;
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; statvfs(3) only writes into it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid pointer owned by this frame.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// Addresses per interface (loopback, link-local and temporary IPv6 addresses
/// left out: they say nothing about where the node is, and temporary ones change
/// every day).
fn interfaces() -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and writes its head into ifap.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned, freed only below.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string in the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and at least a sockaddr.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            let bits = prefix_len_v4(ifa.ifa_netmask);
            out.entry(name).or_default().push(format!("{ip}/{bits}"));
        }
    }
    // SAFETY: the list from getifaddrs, not used after this.
    unsafe { libc::freeifaddrs(ifap) };
    // IPv6 from /proc, which says which addresses are temporary.
    let v6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    for line in v6.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [hex, _, plen, scope, flags, name] = cols[..] else {
            continue;
        };
        let scope = u32::from_str_radix(scope, 16).unwrap_or(0xff);
        let flags = u32::from_str_radix(flags, 16).unwrap_or(0);
        // Global scope only; IFA_F_TEMPORARY is 0x01.
        if scope != 0 || flags & 0x01 != 0 {
            continue;
        }
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        let plen = u32::from_str_radix(plen, 16).unwrap_or(0);
        let ip = std::net::Ipv6Addr::from(bits);
        out.entry(name.to_string())
            .or_default()
            .push(format!("{ip}/{plen}"));
    }
    out
}

fn prefix_len_v4(mask: *const libc::sockaddr) -> u32 {
    if mask.is_null() {
        return 32;
    }
    // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
    let m = unsafe { &*(mask as *const libc::sockaddr_in) };
    u32::from_be(m.sin_addr.s_addr).count_ones()
}

/// The facts of every entry of `dir` (hidden ones skipped), in name order:
/// executables are run (argv is just the path, cwd `dir`, no stdin, `timeout`,
/// output capped) and print `KEY=VALUE` lines; other files are read as such lines.
/// A key given twice has its values joined with `, `. An entry that fails (exit
/// status, timeout, too much output, unreadable) gives nothing; one with bad keys
/// or values gives its good lines; both are reported in the second list.
pub async fn custom(
    dir: &Path,
    tag: Option<String>,
    timeout: Duration,
) -> (Snapshot, Vec<Failure>) {
    let mut facts = Snapshot::new();
    let mut failures = Vec::new();
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            failures.push(Failure {
                entry: dir.display().to_string(),
                reason: format!("cannot read the directory: {e}"),
            });
            return (facts, failures);
        }
    };
    entries.sort();
    for path in entries {
        let entry = path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        if entry.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let text = if meta.permissions().mode() & 0o111 != 0 {
            let out = exec::run(exec::Spec {
                argv: vec![path.to_string_lossy().into_owned()],
                env: Vec::new(),
                base: None,
                tag: tag.clone(),
                cwd: Some(dir.to_path_buf()),
                stdin: Vec::new(),
                timeout,
                output_cap: OUTPUT_CAP,
            })
            .await;
            let why = match &out.outcome {
                exec::Outcome::Exited(0) if !out.truncated => None,
                exec::Outcome::Exited(0) => Some(format!("printed more than {OUTPUT_CAP} bytes")),
                exec::Outcome::Exited(n) => Some(format!("exit status {n}")),
                exec::Outcome::Signalled(s) => Some(format!("killed by signal {s}")),
                exec::Outcome::TimedOut => Some(format!("timed out after {} s", timeout.as_secs())),
                exec::Outcome::SpawnFailed(e) => Some(format!("cannot start: {e}")),
                exec::Outcome::Cancelled => Some("cancelled".into()),
                exec::Outcome::WaitFailed(e) => Some(format!("cannot wait for it: {e}")),
            };
            if let Some(mut reason) = why {
                let err = String::from_utf8_lossy(&out.stderr);
                if let Some(line) = err.lines().rev().find(|l| !l.trim().is_empty()) {
                    reason = format!("{reason}: {}", line.chars().take(200).collect::<String>());
                }
                failures.push(Failure { entry, reason });
                continue;
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            match std::fs::read(&path) {
                Ok(mut b) => {
                    b.truncate(OUTPUT_CAP);
                    String::from_utf8_lossy(&b).into_owned()
                }
                Err(e) => {
                    failures.push(Failure {
                        entry,
                        reason: format!("cannot read: {e}"),
                    });
                    continue;
                }
            }
        };
        let mut bad = Vec::new();
        for (k, v) in parse_key_values(&text) {
            if !valid_key(&k) || v.len() > MAX_VALUE {
                bad.push(k.chars().take(64).collect::<String>());
                continue;
            }
            facts
                .entry(k)
                .and_modify(|old: &mut String| {
                    old.push_str(", ");
                    old.push_str(&v);
                })
                .or_insert(v);
        }
        if !bad.is_empty() {
            failures.push(Failure {
                entry,
                reason: format!(
                    "bad key or value longer than {MAX_VALUE} bytes: {}",
                    bad.join(", ")
                ),
            });
        }
    }
    (facts, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_facts_name_this_machine() {
        let dir = std::env::temp_dir();
        let f = system(&dir, &dir.join("does-not-exist/yet"));
        assert_eq!(f["arch"], std::env::consts::ARCH);
        for key in [
            "hostname",
            "kernel",
            "boot.id",
            "boot.time",
            "load.15",
            "mem.total",
        ] {
            assert!(f.contains_key(key), "{key} missing: {f:?}");
        }
        assert!(f.contains_key("disk.files.free"), "nearest parent: {f:?}");
        assert!(!f.contains_key("uptime"));
    }
}
