//! `outpost send`: queue a command for nodes and, unless `--async`, print each
//! target's result as it arrives. Also `jobs show --follow`'s printing.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use serde::Serialize;

use super::{client_args, duration_flag, Common};
use crate::config;
use crate::control::output::{write_result, OutputSpec};
use crate::control::reply::ResultView;
use crate::control::{Client, CommandSpec, Request, Select};

/// Largest stdin `send` passes to a command (it travels in one frame).
pub(super) const MAX_STDIN: usize = 256 * 1024;

client_args! {
    /// send a command to nodes; waits for results unless --async
    #[argh(subcommand, name = "send")]
    pub struct SendArgs {
        /// target nodes: comma-separated names and glob patterns (e.g. ship1,wind-*);
        /// patterns match trusted nodes, online or not (default with --where or
        /// --online: every trusted node)
        #[argh(option)]
        pub to: Option<String>,
        /// only nodes whose facts match, KEY=VALUE or KEY!=VALUE, the value a glob
        /// (repeatable: all must match), e.g. --where os=openwrt
        #[argh(option, long = "where")]
        pub where_: Vec<String>,
        /// only nodes whose presence says online
        #[argh(switch)]
        pub online: bool,
        /// ordered (default, one after another) or parallel
        #[argh(option)]
        pub lane: Option<String>,
        /// urgent (goes past budgets and link windows, on the `urgent` lane, ahead
        /// of queued normal commands) or normal (default)
        #[argh(option)]
        pub priority: Option<String>,
        /// do not start after this long, e.g. 1h
        #[argh(option)]
        pub ttl: Option<String>,
        /// kill the command after this long (default 60s; 0: never)
        #[argh(option)]
        pub timeout: Option<String>,
        /// print the job id and return at once
        #[argh(switch, long = "async")]
        pub no_wait: bool,
        /// latest wins: cancel an earlier command with this key to the same node
        /// that has not started yet
        #[argh(option)]
        pub key: Option<String>,
        /// write each target's result to DIR/NODE.out, NODE.err and NODE.json as
        /// it arrives (with --async the agent writes them)
        #[argh(option)]
        pub output_dir: Option<std::path::PathBuf>,
        /// with --output-dir: append to the files instead of replacing them
        #[argh(switch)]
        pub append: bool,
        #[argh(subcommand)]
        pub method: MethodArgs,
    }
}

/// The method to run, one subcommand each.
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum MethodArgs {
    Exec(ExecArgs),
    Ping(PingArgs),
    HttpGet(HttpGetArgs),
}

/// run a program: outpost send --to N exec -- PROGRAM ARGS... (stdin that is not a
/// terminal is the command's stdin, up to 256 KiB; -n sends none)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "exec", help_triggers("-h", "--help"))]
pub struct ExecArgs {
    /// environment variable for the command, NAME=VALUE (repeatable)
    #[argh(option)]
    pub env: Vec<String>,
    /// working directory on the node
    #[argh(option)]
    pub cwd: Option<String>,
    /// run again if the agent was restarted while it ran (default: report interrupted)
    #[argh(switch)]
    pub rerun: bool,
    /// do not read stdin (as `ssh -n`; for scripts that loop over a file)
    #[argh(switch, short = 'n')]
    pub no_stdin: bool,
    /// program and arguments
    #[argh(positional, greedy)]
    pub argv: Vec<String>,
}

/// measure the round trip to the nodes
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ping", help_triggers("-h", "--help"))]
pub struct PingArgs {}

/// fetch a URL from the node's own network
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "http-get", help_triggers("-h", "--help"))]
pub struct HttpGetArgs {
    /// largest body to return, e.g. 64KiB
    #[argh(option)]
    pub max_body: Option<String>,
    /// the URL
    #[argh(positional)]
    pub url: String,
}

pub(super) fn run(args: SendArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let timeout_ms = duration_flag("--timeout", args.timeout.as_deref())?
        .map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32);
    let ttl_s = duration_flag("--ttl", args.ttl.as_deref())?
        .map(|d| d.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
    let command = command_spec(args.method, timeout_ms)?;
    let select = Select {
        where_: args.where_,
        online: args.online,
    };
    let to = match args.to {
        Some(to) => to,
        None if !select.where_.is_empty() || select.online => "*".into(),
        None => {
            return Err(
                "--to is needed (or --where / --online to pick nodes by their facts)".into(),
            )
        }
    };
    let output = output_spec(args.output_dir.as_deref(), args.append)?;
    let lane = lane_of(args.lane.as_deref(), args.priority.as_deref())?;
    let mut client = common.client()?;
    let reply = client.submit(&Request::Send {
        to,
        lane: Some(lane),
        ttl_s,
        key: args.key.clone(),
        output: output.clone().filter(|_| args.no_wait),
        command,
        where_: select.where_.clone(),
        online: select.online,
    })?;
    for note in &reply.notes {
        eprintln!("outpost: {note}");
    }
    for s in &reply.superseded {
        eprintln!("outpost: superseded job {} for {}", s.job, s.node);
    }
    if args.no_wait {
        if common.json {
            #[derive(Serialize)]
            struct Async<'a> {
                job: i64,
                targets: &'a [crate::control::reply::Queued],
                #[serde(skip_serializing_if = "<[_]>::is_empty")]
                superseded: &'a [crate::control::reply::Superseded],
            }
            print_json(&Async {
                job: reply.job,
                targets: &reply.targets,
                superseded: &reply.superseded,
            })?;
        } else {
            println!("{}", reply.job);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // First, so that a job is never lost to the operator if this stops waiting.
    eprintln!("outpost: job {}", reply.job);
    follow_into(&mut client, reply.job, common.json, output.as_ref())
}

/// `--output-dir` as the agent needs it: absolute (a relative one is taken from
/// the current directory here, where the user typed it).
fn output_spec(dir: Option<&std::path::Path>, append: bool) -> Result<Option<OutputSpec>, String> {
    let Some(dir) = dir else {
        if append {
            return Err("--append goes with --output-dir".into());
        }
        return Ok(None);
    };
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("--output-dir: the current directory: {e}"))?
            .join(dir)
    };
    let dir = dir
        .to_str()
        .ok_or_else(|| format!("--output-dir {}: not UTF-8", dir.display()))?;
    Ok(Some(OutputSpec {
        dir: dir.to_string(),
        append,
    }))
}

/// The command the flags describe. Exec reads stdin when it is not a terminal.
fn command_spec(method: MethodArgs, timeout_ms: Option<u32>) -> Result<CommandSpec, String> {
    Ok(match method {
        MethodArgs::Exec(e) => {
            let mut env = Vec::new();
            for kv in e.env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv:?}: expected NAME=VALUE"))?;
                env.push((k.to_string(), v.to_string()));
            }
            let stdin = if e.no_stdin || std::io::stdin().is_terminal() {
                String::new()
            } else {
                read_stdin()?
            };
            CommandSpec::Exec {
                argv: e.argv,
                env,
                cwd: e.cwd,
                stdin,
                timeout_ms,
                rerun: e.rerun,
            }
        }
        MethodArgs::Ping(_) => CommandSpec::Ping,
        MethodArgs::HttpGet(h) => {
            let max_body = h
                .max_body
                .as_deref()
                .map(|s| config::parse_size(s).map(|n| n.min(u64::from(u32::MAX)) as u32))
                .transpose()
                .map_err(|e| format!("--max-body: {e}"))?;
            CommandSpec::HttpGet {
                url: h.url,
                timeout_ms,
                max_body,
            }
        }
    })
}

fn read_stdin() -> Result<String, String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STDIN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading stdin: {e}"))?;
    if buf.len() > MAX_STDIN {
        return Err(format!(
            "stdin is larger than {} KiB; send a file with `outpost files put` and read it there (or pass -n to send no stdin)",
            MAX_STDIN / 1024
        ));
    }
    String::from_utf8(buf).map_err(|_| {
        "stdin is not UTF-8 text; send binary data with `outpost files put`".to_string()
    })
}

/// Prints each target's result as it arrives; exit 0 when every one is ok.
pub(super) fn follow(client: &mut Client, job: i64, json: bool) -> Result<ExitCode, String> {
    follow_into(client, job, json, None)
}

/// As [`follow`], and writes each result into `output`'s files. A result that
/// cannot be written is still printed; the first such error ends it (exit 2)
/// once every result is in.
fn follow_into(
    client: &mut Client,
    job: i64,
    json: bool,
    output: Option<&OutputSpec>,
) -> Result<ExitCode, String> {
    let mut printed: Vec<String> = Vec::new();
    let mut unwritten: Option<String> = None;
    let mut all_ok = true;
    loop {
        let Some(j) = client.wait(job, printed.len(), Duration::from_secs(300))? else {
            continue;
        };
        for t in &j.targets {
            let Some(r) = &t.result else { continue };
            if printed.contains(&t.node) {
                continue;
            }
            printed.push(t.node.clone());
            all_ok &= r.status == "ok";
            if json {
                print_json(&TargetResult::new(&j, &t.node, r))?;
            } else {
                print_result(&t.node, r);
            }
            if let Some(out) = output {
                let dir = std::path::Path::new(&out.dir);
                if let Err(e) = write_result(dir, out.append, &j, &t.node, r) {
                    eprintln!("outpost: cannot write {}'s result: {e}", t.node);
                    unwritten.get_or_insert(e);
                }
            }
        }
        if printed.len() >= j.targets.len() {
            if let Some(e) = unwritten {
                return Err(format!("results not written to files: {e}"));
            }
            return Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
}

pub(super) use crate::control::output::TargetResult;

/// One target's result for people: output lines prefixed by the node, then what
/// went wrong, if anything.
pub(super) fn print_result(node: &str, r: &ResultView) {
    for line in r.stdout.lines() {
        println!("{node}: {line}");
    }
    for line in r.stderr.lines() {
        eprintln!("{node}: {line}");
    }
    if r.truncated {
        let what = r
            .reason
            .find("kept the last")
            .map_or("the output cap cut it", |i| &r.reason[i..]);
        eprintln!("{node}: [truncated: {what}]");
    }
    if r.status == "ok" {
        if let Some(rtt) = r.rtt_ms {
            println!("{node}: round trip {rtt} ms");
        }
    } else {
        eprintln!("{node}: [{}] {}", r.status, r.reason);
    }
}

/// One JSON document on a line of its own.
pub(super) fn print_json<T: Serialize>(v: &T) -> Result<(), String> {
    println!("{}", serde_json::to_string(v).map_err(|e| e.to_string())?);
    Ok(())
}

/// One JSON document, indented, for people reading `--json` output.
pub(super) fn print_json_pretty<T: Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// The lane `--lane` and `--priority` name: an urgent command travels on the
/// `urgent` lane (or `urgent.NAME`), whose class budgets and windows let pass.
fn lane_of(lane: Option<&str>, priority: Option<&str>) -> Result<String, String> {
    let urgent = |l: &str| l == "urgent" || l.starts_with("urgent.");
    match (priority, lane) {
        (None | Some("normal"), None) => Ok("ordered".into()),
        (None, Some(l)) => Ok(l.into()),
        (Some("normal"), Some(l)) if !urgent(l) => Ok(l.into()),
        (Some("urgent"), None) => Ok("urgent".into()),
        (Some("urgent"), Some(l)) if urgent(l) => Ok(l.into()),
        (Some("urgent"), Some(l)) => Err(format!(
            "--priority urgent uses the urgent lane; --lane {l} is another (use --lane urgent.NAME for an urgent lane of its own)"
        )),
        (Some("normal"), Some(l)) => Err(format!("--lane {l} is urgent; --priority normal contradicts it")),
        (Some(p), _) => Err(format!("--priority {p:?}: expected urgent or normal")),
    }
}
