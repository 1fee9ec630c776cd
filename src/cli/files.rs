//! `outpost files`: send files to nodes, fetch what they share, list and remove
//! what arrived.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use serde::Serialize;

use super::send::{print_json, print_json_pretty};
use super::{client_args, duration_flag, Common};
use crate::config::format_size;
use crate::control::reply::{Direction, TransferView};
use crate::control::Client;

client_args! {
    /// send, fetch and list files
    #[argh(subcommand, name = "files")]
    pub struct FilesArgs {
        #[argh(subcommand)]
        pub cmd: FilesCmd,
    }
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum FilesCmd {
    Put(FilesPut),
    Get(FilesGet),
    List(FilesList),
    Rm(FilesRm),
}

client_args! {
    /// send a file to nodes; resumes across link drops and restarts
    #[argh(subcommand, name = "put")]
    pub struct FilesPut {
        /// target nodes: comma-separated names and glob patterns
        #[argh(option)]
        pub to: String,
        /// the id it is stored under (default: the file name)
        #[argh(option)]
        pub id: Option<String>,
        /// drop the transfer and the file after this long, e.g. 7d
        #[argh(option)]
        pub ttl: Option<String>,
        /// print the transfer ids and return at once
        #[argh(switch, long = "async")]
        pub no_wait: bool,
        /// the file to send
        #[argh(positional)]
        pub src: PathBuf,
    }
}

client_args! {
    /// fetch a file a node shares
    #[argh(subcommand, name = "get")]
    pub struct FilesGet {
        /// the node to fetch from
        #[argh(option)]
        pub from: String,
        /// where to write it (default: only keep it in the files directory)
        #[argh(option, short = 'o')]
        pub output: Option<PathBuf>,
        /// a path in one of the node's share directories
        #[argh(positional)]
        pub path: String,
    }
}

client_args! {
    /// files held and transfers in progress
    #[argh(subcommand, name = "list")]
    pub struct FilesList {}
}

client_args! {
    /// delete a received file: outpost files rm ID (or SOURCE/ID)
    #[argh(subcommand, name = "rm")]
    pub struct FilesRm {
        /// the file id
        #[argh(positional)]
        pub id: String,
    }
}

/// How often a waiting `files put` / `files get` looks at its transfers.
const POLL: Duration = Duration::from_millis(250);

pub(super) fn run(args: FilesArgs) -> Result<ExitCode, String> {
    let parent = args.common(Common::default());
    match args.cmd {
        FilesCmd::Put(p) => put(p, parent),
        FilesCmd::Get(g) => get(g, parent),
        FilesCmd::List(l) => list(l.common(parent)),
        FilesCmd::Rm(r) => {
            let common = r.common(parent);
            let removed = common.client()?.files_rm(&r.id)?;
            if common.json {
                #[derive(Serialize)]
                struct Removed<'a> {
                    removed: &'a [String],
                }
                print_json(&Removed { removed: &removed })?;
            } else {
                for f in removed {
                    println!("removed {f}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn put(p: FilesPut, parent: Common) -> Result<ExitCode, String> {
    let common = p.common(parent);
    let mut client = common.client()?;
    let src = p
        .src
        .canonicalize()
        .map_err(|e| format!("{}: {e}", p.src.display()))?;
    let ttl_s = duration_flag("--ttl", p.ttl.as_deref())?.map(|d| d.as_secs().max(1));
    let reply = client.files_put(&p.to, &src, p.id, ttl_s)?;
    if p.no_wait {
        for t in &reply.transfers {
            if common.json {
                #[derive(Serialize)]
                struct Started<'a> {
                    node: &'a str,
                    transfer: i64,
                    id: &'a str,
                }
                print_json(&Started {
                    node: &t.node,
                    transfer: t.transfer,
                    id: &reply.id,
                })?;
            } else {
                // As `send --async`: the bare ids, one per target.
                println!("{}", t.transfer);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal() && !common.json;
    let mut all_ok = true;
    for started in reply.transfers {
        let mut last_step = u64::MAX;
        let t = loop {
            let v = client.transfer(started.transfer)?;
            let line = format!("{}: {}", started.node, progress(&v));
            if tty {
                eprint!("\r{line}\x1b[K");
            } else if !common.json && v.percent / 10 != last_step {
                eprintln!("{line}");
                last_step = v.percent / 10;
            }
            if v.finished {
                if tty {
                    eprintln!();
                }
                break v;
            }
            std::thread::sleep(POLL);
        };
        all_ok &= delivered(&t);
        if common.json {
            print_json(&t)?;
        } else {
            println!("{}: {} {}{}", started.node, t.id, t.state, reason(&t));
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn get(g: FilesGet, parent: Common) -> Result<ExitCode, String> {
    let common = g.common(parent);
    let mut client = common.client()?;
    let reply = client.files_get(&g.from, &g.path)?;
    let t = wait_finished(&mut client, reply.transfer)?;
    if !delivered(&t) {
        return Err(format!("files get {}: {}{}", g.path, t.state, reason(&t)));
    }
    let held = client
        .files_list()?
        .files
        .into_iter()
        .find(|f| f.source == g.from && f.id == reply.id)
        .map(|f| f.path)
        .ok_or("the file arrived but is not in the list of held files")?;
    let path = match g.output {
        Some(dest) => {
            std::fs::copy(&held, &dest)
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
            dest
        }
        None => held,
    };
    if common.json {
        #[derive(Serialize)]
        struct Got<'a> {
            transfer: &'a TransferView,
            path: &'a std::path::Path,
        }
        print_json(&Got {
            transfer: &t,
            path: &path,
        })?;
    } else {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn list(common: Common) -> Result<ExitCode, String> {
    let v = common.client()?.files_list()?;
    if common.json {
        print_json_pretty(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("transfers:");
    for t in &v.transfers {
        let arrow = match t.direction {
            Direction::Out => "->",
            Direction::In => "<-",
        };
        println!(
            "  {:>5} {arrow} {:<16} {:<24} {}",
            t.transfer,
            t.peer,
            t.id,
            progress(t)
        );
    }
    println!("files held:");
    for f in &v.files {
        println!(
            "  {}/{}  {}  {}",
            f.source,
            f.id,
            format_size(f.size),
            f.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn wait_finished(client: &mut Client, id: i64) -> Result<TransferView, String> {
    loop {
        let v = client.transfer(id)?;
        if v.finished {
            return Ok(v);
        }
        std::thread::sleep(POLL);
    }
}

/// `42% 6.7 KiB/16.0 KiB 2.1 KiB/s sending`; a failed request of unknown size says
/// only what happened.
fn progress(t: &TransferView) -> String {
    if t.size == 0 && !delivered(t) {
        return format!("{}{}", t.state, reason(t));
    }
    format!(
        "{:>3}% {}/{} {}/s {}",
        t.percent,
        format_size(t.bytes),
        format_size(t.size),
        format_size(t.rate_bps),
        t.state
    )
}

fn delivered(t: &TransferView) -> bool {
    t.state == "done" || t.state == "skipped"
}

fn reason(t: &TransferView) -> String {
    if t.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", t.reason)
    }
}
