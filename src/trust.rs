//! Keys and trust: this node's X25519 key pair, and the peers it trusts with what.
//!
//! Files in the state directory:
//! - `node.key`: the private key, hex, mode 0600 (the agent refuses a key others can read);
//! - `trust`: one trusted peer per line, editable by hand, re-read when it changes:
//!
//! ```text
//! # NAME  PUBLIC-KEY (hex)  allow=METHOD,...  [exec=/path/prog,...]
//! central 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29 allow=exec,ping,http-get
//! ship1   8f0e...                                                         allow=
//! ```
//!
//! `allow=` lists the methods the peer may ask of us (`exec`, `ping`, `http-get`,
//! later `files`, ...); empty means it may only exchange results and acks. `exec=`
//! optionally limits exec to those program paths (argv[0] exactly).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use x25519_dalek::{PublicKey, StaticSecret};

use crate::frame::{Command, Name};
use crate::seal::{from_hex32, to_hex};

pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("node.key")
}

pub fn trust_path(state_dir: &Path) -> PathBuf {
    state_dir.join("trust")
}

/// This node's key pair.
pub struct Keys {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

/// Writes a new key pair; refuses to overwrite one unless `force`.
pub fn generate(state_dir: &Path, force: bool) -> Result<PublicKey, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    let path = key_path(state_dir);
    if path.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to replace it (peers must then trust the new key)",
            path.display()
        ));
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the system random number generator failed".to_string())?;
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from(&secret);
    let tmp = path.with_extension("key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    writeln!(f, "{}", to_hex(&bytes))
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot move key into place: {e}"))?;
    Ok(public)
}

/// Loads the key pair; a key readable or writable by others is refused.
pub fn load(state_dir: &Path) -> Result<Keys, String> {
    let path = key_path(state_dir);
    let meta = std::fs::metadata(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (create it with `outpost keys gen --state-dir {}`)",
            path.display(),
            state_dir.display()
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible by others (mode {mode:03o}); the private key must be mode 600: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bytes =
        from_hex32(&text).ok_or_else(|| format!("{}: not a 64-digit hex key", path.display()))?;
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from(&secret);
    Ok(Keys { secret, public })
}

/// A trusted peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: Name,
    pub public: [u8; 32],
    pub allow: Vec<String>,
    pub exec_paths: Vec<String>,
}

/// The trust file, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub peers: BTreeMap<Name, Peer>,
}

pub const METHODS: &[&str] = &["exec", "ping", "http-get", "files"];

impl Trust {
    pub fn parse(text: &str) -> Result<Trust, String> {
        let mut peers = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |msg: String| format!("trust line {}: {msg}", i + 1);
            let mut parts = line.split_whitespace();
            let name =
                Name::new(parts.next().unwrap_or_default()).map_err(|e| at(e.to_string()))?;
            let key = parts
                .next()
                .ok_or_else(|| at("missing public key".into()))?;
            let public = from_hex32(key)
                .ok_or_else(|| at(format!("bad public key {key:?}: 64 hex digits")))?;
            let mut peer = Peer {
                name: name.clone(),
                public,
                allow: Vec::new(),
                exec_paths: Vec::new(),
            };
            for opt in parts {
                let (k, v) = opt
                    .split_once('=')
                    .ok_or_else(|| at(format!("expected allow=... or exec=..., got {opt:?}")))?;
                let list: Vec<String> = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                match k {
                    "allow" => {
                        if let Some(bad) = list.iter().find(|m| !METHODS.contains(&m.as_str())) {
                            return Err(at(format!(
                                "unknown method {bad:?} (known: {})",
                                METHODS.join(", ")
                            )));
                        }
                        peer.allow = list;
                    }
                    "exec" => peer.exec_paths = list,
                    _ => return Err(at(format!("unknown option {k:?}"))),
                }
            }
            peers.insert(name, peer);
        }
        Ok(Trust { peers })
    }

    pub fn render(&self) -> String {
        let mut out = String::from(
            "# outpost trust file: NAME PUBLIC-KEY allow=METHOD,... [exec=/path/prog,...]\n\
             # methods: exec, ping, http-get, files; an empty allow= only exchanges results\n",
        );
        for p in self.peers.values() {
            out += &format!(
                "{} {} allow={}",
                p.name,
                to_hex(&p.public),
                p.allow.join(",")
            );
            if !p.exec_paths.is_empty() {
                out += &format!(" exec={}", p.exec_paths.join(","));
            }
            out.push('\n');
        }
        out
    }

    /// Whether `peer` may use `method` here; `Err` carries the reason.
    pub fn allows(&self, peer: &Name, method: &str) -> Result<(), String> {
        let p = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("{peer} is not trusted"))?;
        if !p.allow.iter().any(|m| m == method) {
            let allowed = none_if_empty(&p.allow);
            return Err(format!(
                "{peer} is not allowed to use {method} (allowed: {allowed})"
            ));
        }
        Ok(())
    }

    /// Whether `peer` may ask this node to run `cmd`; `Err` carries the reason.
    pub fn authorise(&self, peer: &Name, cmd: &Command) -> Result<(), String> {
        let p = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("{peer} is not trusted"))?;
        let method = cmd.method();
        if !p.allow.iter().any(|m| m == method) {
            return Err(format!(
                "{peer} is not allowed to use {method} (allowed: {})",
                none_if_empty(&p.allow)
            ));
        }
        if let Command::Exec(e) = cmd {
            let prog = e.argv.first().map(String::as_str).unwrap_or_default();
            if !p.exec_paths.is_empty() && !p.exec_paths.iter().any(|x| x == prog) {
                return Err(format!(
                    "{peer} may only exec {}, not {prog:?}",
                    p.exec_paths.join(", ")
                ));
            }
        }
        Ok(())
    }
}

fn none_if_empty(v: &[String]) -> String {
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

/// Reads the trust file (missing means nobody is trusted).
pub fn read(state_dir: &Path) -> Result<Trust, String> {
    let path = trust_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Trust::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Trust::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Adds or updates one peer, writing the file atomically.
pub fn upsert(state_dir: &Path, peer: Peer) -> Result<(), String> {
    let mut trust = read(state_dir)?;
    trust.peers.insert(peer.name.clone(), peer);
    let path = trust_path(state_dir);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(trust.render().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot update {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Exec;

    const KEY: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    fn exec(prog: &str) -> Command {
        Command::Exec(Exec {
            argv: vec![prog.into()],
            ..Exec::default()
        })
    }

    #[test]
    fn trust_file_parses_authorises_and_roundtrips() {
        let text = format!(
            "# comment\ncentral {KEY} allow=exec,ping exec=/usr/bin/uptime\nship1 {KEY} allow=\n"
        );
        let t = Trust::parse(&text).unwrap();
        let central = Name::new("central").unwrap();
        assert!(t.authorise(&central, &exec("/usr/bin/uptime")).is_ok());
        assert!(t
            .authorise(&central, &exec("/bin/rm"))
            .unwrap_err()
            .contains("may only exec"));
        assert!(t.authorise(&central, &Command::Ping).is_ok());
        let ship = Name::new("ship1").unwrap();
        assert!(t
            .authorise(&ship, &Command::Ping)
            .unwrap_err()
            .contains("not allowed to use ping"));
        assert!(t
            .authorise(&Name::new("x").unwrap(), &Command::Ping)
            .unwrap_err()
            .contains("not trusted"));
        assert_eq!(Trust::parse(&t.render()).unwrap(), t);
    }

    #[test]
    fn bad_trust_lines_name_the_line() {
        for (text, want) in [
            ("Central abc", "line 1"),
            (&format!("a {KEY} allow=root")[..], "unknown method"),
            ("a 1234", "bad public key"),
            (&format!("a {KEY} sudo")[..], "expected allow="),
        ] {
            let err = Trust::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
