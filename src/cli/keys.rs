//! `outpost keys`: this node's key pair and the peers it trusts.

use std::path::Path;
use std::process::ExitCode;

use argh::FromArgs;
use serde::Serialize;

use super::send::print_json;
use super::{client_args, Common};
use crate::frame::{Method, Name};
use crate::seal::{from_hex32, to_hex};
use crate::trust;

/// this node's key pair and the peers it trusts
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keys", help_triggers("-h", "--help"))]
pub struct KeysArgs {
    #[argh(subcommand)]
    pub cmd: KeysCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum KeysCmd {
    Gen(KeysGen),
    Show(KeysShow),
    Trust(KeysTrust),
}

client_args! {
    /// write a new key pair into the state directory (private key mode 0600)
    #[argh(subcommand, name = "gen")]
    pub struct KeysGen {
        /// this node's name: recorded in the state directory, the agent's default
        /// when the configuration names none
        #[argh(option)]
        pub name: Option<String>,
        /// replace an existing key pair (and a different recorded name)
        #[argh(switch)]
        pub force: bool,
    }
}

client_args! {
    /// print `NAME PUBLIC-KEY`, to paste into another node's trust
    #[argh(subcommand, name = "show")]
    pub struct KeysShow {}
}

client_args! {
    /// trust a peer: outpost keys trust NAME PUBLIC-KEY --allow exec,ping
    #[argh(subcommand, name = "trust")]
    pub struct KeysTrust {
        /// methods the peer may use here: exec, ping, http-get, files, facts (empty:
        /// none; any method also makes this node send the peer its facts and errors)
        #[argh(option, default = "String::new()")]
        pub allow: String,
        /// limit exec to these program paths, comma-separated; such an exec runs with a
        /// clean environment, in /, without stdin (see --exec-env, --exec-cwd, --exec-stdin)
        #[argh(option)]
        pub exec_path: Option<String>,
        /// for a path-limited exec: variables the peer may set, comma-separated
        #[argh(option)]
        pub exec_env: Option<String>,
        /// for a path-limited exec: directories it may run in, comma-separated
        #[argh(option)]
        pub exec_cwd: Option<String>,
        /// for a path-limited exec: allow the peer to send stdin
        #[argh(switch)]
        pub exec_stdin: bool,
        /// the peer's name
        #[argh(positional)]
        pub peer: String,
        /// the peer's public key (64 hex digits)
        #[argh(positional)]
        pub public_key: String,
    }
}

#[derive(Serialize)]
struct KeyLine<'a> {
    name: Option<&'a str>,
    public_key: String,
}

pub(super) fn run(args: KeysArgs) -> Result<ExitCode, String> {
    match args.cmd {
        KeysCmd::Gen(g) => gen(g),
        KeysCmd::Show(sh) => {
            let common = sh.common(Common::default());
            let dir = common.dir();
            let keys = trust::load(&dir)?;
            let name = node_name(&dir).ok_or_else(|| {
                format!("the node's name is not known in {} yet: run the agent once, or `keys gen --name NAME`", dir.display())
            })?;
            print_key(&common, Some(&name), keys.public.as_bytes())
        }
        KeysCmd::Trust(t) => trust_peer(t),
    }
}

fn gen(g: KeysGen) -> Result<ExitCode, String> {
    let common = g.common(Common::default());
    let dir = common.dir();
    let recorded = node_name(&dir);
    if let Some(name) = &g.name {
        Name::new(name).map_err(|e| e.to_string())?;
        if let Some(old) = recorded.as_ref().filter(|old| *old != name && !g.force) {
            return Err(format!(
                "{} already names this node {old:?}; pass --force to rename it {name:?} (peers trust a name and a key together)",
                dir.join("name").display()
            ));
        }
    }
    let public = trust::generate(&dir, g.force)?;
    if let Some(name) = &g.name {
        std::fs::write(dir.join("name"), format!("{name}\n"))
            .map_err(|e| format!("cannot write {}: {e}", dir.join("name").display()))?;
    }
    let name = node_name(&dir);
    print_key(&common, name.as_deref(), public.as_bytes())
}

fn print_key(common: &Common, name: Option<&str>, public: &[u8; 32]) -> Result<ExitCode, String> {
    if common.json {
        print_json(&KeyLine {
            name,
            public_key: to_hex(public),
        })?;
    } else {
        println!("{} {}", name.unwrap_or("NAME"), to_hex(public));
    }
    Ok(ExitCode::SUCCESS)
}

fn trust_peer(t: KeysTrust) -> Result<ExitCode, String> {
    let common = t.common(Common::default());
    let dir = common.dir();
    let name = Name::new(&t.peer).map_err(|e| e.to_string())?;
    let public = from_hex32(&t.public_key)
        .ok_or("the public key must be 64 hex digits (from `outpost keys show`)")?;
    let split = |s: &str| {
        s.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let allow: Vec<Method> = split(&t.allow)
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_, String>>()
        .map_err(|e| format!("--allow: {e}"))?;
    let peer = trust::Peer {
        name: name.clone(),
        public,
        allow: allow.clone(),
        exec_paths: t.exec_path.as_deref().map(split).unwrap_or_default(),
        exec_env: t.exec_env.as_deref().map(split).unwrap_or_default(),
        exec_cwd: t.exec_cwd.as_deref().map(split).unwrap_or_default(),
        exec_stdin: t.exec_stdin,
    };
    // One set of rules for a line, whether written here or by hand.
    let mut one = trust::Trust::default();
    one.peers.insert(name.clone(), peer.clone());
    trust::Trust::parse(&one.render()).map_err(|e| e.replace("trust line 1: ", ""))?;
    trust::upsert(&dir, peer)?;
    if common.json {
        #[derive(Serialize)]
        struct Trusted<'a> {
            name: &'a str,
            allow: &'a [Method],
        }
        print_json(&Trusted {
            name: name.as_str(),
            allow: &allow,
        })?;
    } else {
        let allowed: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
        println!(
            "trusting {name} for {}",
            if allowed.is_empty() {
                "results only".into()
            } else {
                allowed.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The node's name as the agent or `keys gen --name` recorded it.
pub(super) fn node_name(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("name"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
