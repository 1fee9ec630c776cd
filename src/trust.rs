//! Keys and trust: this node's X25519 key pair, and the peers it trusts with what.
//!
//! Files in the state directory:
//! - `node.key`: the private key, hex, mode 0600 (the agent refuses a key others can read);
//! - `trust`: one trusted peer per line, editable by hand, re-read when it changes:
//!
//! ```text
//! # NAME  PUBLIC-KEY (hex)  allow=METHOD,...  [exec=/path/prog,...] [env=NAME,...] [cwd=/dir,...] [stdin=yes]
//! central 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29 allow=exec,ping,http-get
//! ship1   8f0e...                                                         allow=
//! ```
//!
//! `allow=` lists the methods the peer may ask of us (`exec`, `ping`, `http-get`,
//! `files`); empty means it may only exchange results and acks. `exec=` limits exec
//! to those program paths (argv[0] exactly, absolute). A path-limited exec is not a
//! shell by another name: it runs with a fixed clean environment ([`CLEAN_ENV`])
//! plus only the variables `env=` names, in `/` or a directory `cwd=` names, and
//! without stdin unless `stdin=yes` (see [`ExecPolicy`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use x25519_dalek::{PublicKey, StaticSecret};

use crate::frame::{Command, Method, Name};
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

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ public: {} }}", to_hex(self.public.as_bytes()))
    }
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
    write_private(&path, format!("{}\n", to_hex(&bytes)).as_bytes())?;
    Ok(public)
}

/// Replaces `path` with `bytes` atomically (a temporary file beside it, synced,
/// renamed), readable and writable by the owner only: the one way the key and the
/// trust file are written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot update {}: {e}", path.display()))
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
    pub allow: Vec<Method>,
    pub exec_paths: Vec<String>,
    /// For a path-limited exec: variables the command may set.
    pub exec_env: Vec<String>,
    /// For a path-limited exec: working directories it may ask for.
    pub exec_cwd: Vec<String>,
    /// For a path-limited exec: whether it may send stdin.
    pub exec_stdin: bool,
}

impl Peer {
    /// A peer that may only exchange results and acks.
    pub fn new(name: Name, public: [u8; 32]) -> Peer {
        Peer {
            name,
            public,
            allow: Vec::new(),
            exec_paths: Vec::new(),
            exec_env: Vec::new(),
            exec_cwd: Vec::new(),
            exec_stdin: false,
        }
    }
}

/// The environment a path-limited exec starts from: nothing inherited from the
/// agent (no `LD_PRELOAD`, `BASH_ENV`, `ENV`, `PYTHONPATH`, ... however the agent
/// itself was started).
pub const CLEAN_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/"),
    ("LANG", "C"),
];

/// How an authorised exec may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecPolicy {
    /// The peer may run anything: the agent's environment plus the command's own.
    Unrestricted,
    /// Path-limited: [`CLEAN_ENV`] plus the command's (allowed) variables, in `cwd`.
    Limited { cwd: String },
}

/// The trust file, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub peers: BTreeMap<Name, Peer>,
}

impl Trust {
    /// Who gets this node's reports (facts and errors): every peer allowed to ask
    /// anything of this node, `allow=facts` alone included (the operators, not
    /// peers whose results we only accept). The one rule for "who is central".
    pub fn report_peers(&self) -> std::collections::BTreeSet<Name> {
        self.peers
            .values()
            .filter(|p| !p.allow.is_empty())
            .map(|p| p.name.clone())
            .collect()
    }

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
            let mut peer = Peer::new(name.clone(), public);
            for opt in parts {
                let (k, v) = opt.split_once('=').ok_or_else(|| {
                    at(format!(
                        "expected allow=, exec=, env=, cwd= or stdin=, got {opt:?}"
                    ))
                })?;
                let list: Vec<String> = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                match k {
                    "allow" => {
                        peer.allow = list
                            .iter()
                            .map(|m| m.parse())
                            .collect::<Result<_, String>>()
                            .map_err(at)?;
                    }
                    "exec" => {
                        if let Some(bad) = list.iter().find(|p| !p.starts_with('/')) {
                            return Err(at(format!("exec path {bad:?} is not absolute")));
                        }
                        peer.exec_paths = list;
                    }
                    "env" => peer.exec_env = list,
                    "cwd" => {
                        if let Some(bad) = list.iter().find(|p| !p.starts_with('/')) {
                            return Err(at(format!("cwd {bad:?} is not absolute")));
                        }
                        peer.exec_cwd = list;
                    }
                    "stdin" => {
                        peer.exec_stdin = match v {
                            "yes" => true,
                            "no" => false,
                            _ => return Err(at(format!("stdin={v}: expected yes or no"))),
                        }
                    }
                    _ => return Err(at(format!("unknown option {k:?}"))),
                }
            }
            peers.insert(name, peer);
        }
        Ok(Trust { peers })
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "# outpost trust file: NAME PUBLIC-KEY allow=METHOD,... [exec=/path/prog,...] [env=NAME,...] [cwd=/dir,...] [stdin=yes]\n\
             # methods: {}; an empty allow= only exchanges results\n\
             # exec= limits exec to those programs, run with a clean environment (PATH, HOME=/, LANG=C\n\
             # plus the variables env= names), in / or a cwd= directory, without stdin unless stdin=yes\n",
            Method::list()
        );
        for p in self.peers.values() {
            out += &format!(
                "{} {} allow={}",
                p.name,
                to_hex(&p.public),
                p.allow
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if !p.exec_paths.is_empty() {
                out += &format!(" exec={}", p.exec_paths.join(","));
            }
            if !p.exec_env.is_empty() {
                out += &format!(" env={}", p.exec_env.join(","));
            }
            if !p.exec_cwd.is_empty() {
                out += &format!(" cwd={}", p.exec_cwd.join(","));
            }
            if p.exec_stdin {
                out += " stdin=yes";
            }
            out.push('\n');
        }
        out
    }

    /// Whether `peer` may use `method` here; `Err` carries the reason.
    pub fn allows(&self, peer: &Name, method: Method) -> Result<(), String> {
        let p = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("{peer} is not trusted"))?;
        if !p.allow.contains(&method) {
            let allowed: Vec<String> = p
                .allow
                .iter()
                .map(std::string::ToString::to_string)
                .collect();
            return Err(format!(
                "{peer} is not allowed to use {method} (allowed: {})",
                none_if_empty(&allowed)
            ));
        }
        Ok(())
    }

    /// Whether `peer` may ask this node to run `cmd`, and how an exec must run;
    /// `Err` carries the reason.
    pub fn authorise(&self, peer: &Name, cmd: &Command) -> Result<ExecPolicy, String> {
        self.allows(peer, cmd.method())?;
        let p = &self.peers[peer];
        let Command::Exec(e) = cmd else {
            return Ok(ExecPolicy::Unrestricted);
        };
        if p.exec_paths.is_empty() {
            return Ok(ExecPolicy::Unrestricted);
        }
        let prog = e.argv.first().map(String::as_str).unwrap_or_default();
        if !p.exec_paths.iter().any(|x| x == prog) {
            return Err(format!(
                "{peer} may only exec {}, not {prog:?}",
                p.exec_paths.join(", ")
            ));
        }
        if let Some((k, _)) = e.env.iter().find(|(k, _)| !p.exec_env.contains(k)) {
            return Err(format!(
                "{peer} may not set {k} for a path-limited exec (allowed: {}; add env={k} to its trust line)",
                none_if_empty(&p.exec_env)
            ));
        }
        if !e.stdin.is_empty() && !p.exec_stdin {
            return Err(format!(
                "{peer} may not send stdin to a path-limited exec (add stdin=yes to its trust line)"
            ));
        }
        let cwd = match &e.cwd {
            None => "/".to_string(),
            Some(dir) => {
                // Compared as resolved paths, so that `..` or a symlink cannot
                // reach a directory the line does not name.
                let real =
                    std::fs::canonicalize(dir).map_err(|err| format!("cwd {dir:?}: {err}"))?;
                let allowed = p
                    .exec_cwd
                    .iter()
                    .any(|c| std::fs::canonicalize(c).is_ok_and(|c| c == real));
                if !allowed {
                    return Err(format!(
                        "{peer} may not run a path-limited exec in {dir:?} (allowed: /{}{})",
                        if p.exec_cwd.is_empty() { "" } else { ", " },
                        p.exec_cwd.join(", ")
                    ));
                }
                real.to_string_lossy().into_owned()
            }
        };
        Ok(ExecPolicy::Limited { cwd })
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
    write_private(&trust_path(state_dir), trust.render().as_bytes())
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
        assert_eq!(
            t.authorise(&central, &exec("/usr/bin/uptime")),
            Ok(ExecPolicy::Limited { cwd: "/".into() })
        );
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
    fn a_path_limited_exec_sets_only_allowed_variables_in_allowed_directories() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let text = format!(
            "central {KEY} allow=exec exec=/bin/sh env=TZ cwd={} \nops {KEY} allow=exec\n",
            tmp.display()
        );
        let t = Trust::parse(&text).unwrap();
        let central = Name::new("central").unwrap();
        let with = |f: &dyn Fn(&mut Exec)| {
            let mut e = Exec {
                argv: vec!["/bin/sh".into()],
                ..Exec::default()
            };
            f(&mut e);
            t.authorise(&central, &Command::Exec(e))
        };
        for var in ["BASH_ENV", "LD_PRELOAD", "ENV", "PATH"] {
            let err = with(&|e| e.env = vec![(var.into(), "/dev/stdin".into())]).unwrap_err();
            assert!(err.contains(&format!("may not set {var}")), "{err}");
        }
        assert!(with(&|e| e.env = vec![("TZ".into(), "UTC".into())]).is_ok());
        let err = with(&|e| e.stdin = b"id\n".to_vec()).unwrap_err();
        assert!(err.contains("may not send stdin"), "{err}");
        let err = with(&|e| e.cwd = Some("/etc".into())).unwrap_err();
        assert!(err.contains("may not run a path-limited exec in"), "{err}");
        let dotdot = format!(
            "{}/../{}",
            tmp.display(),
            tmp.file_name().unwrap().to_str().unwrap()
        );
        assert_eq!(
            with(&|e| e.cwd = Some(dotdot.clone())),
            Ok(ExecPolicy::Limited {
                cwd: tmp.display().to_string()
            })
        );
        // Without exec= the peer may run anything, as before.
        let ops = Name::new("ops").unwrap();
        let mut e = exec("/bin/sh");
        if let Command::Exec(x) = &mut e {
            x.env = vec![("LD_PRELOAD".into(), "x".into())];
        }
        assert_eq!(t.authorise(&ops, &e), Ok(ExecPolicy::Unrestricted));
        assert_eq!(Trust::parse(&t.render()).unwrap(), t);
        let err = Trust::parse(&format!("a {KEY} allow=exec exec=sh")).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");
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
