//! The `outpost` binary: parse flags, build the config, run. The only place errors
//! become exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use outpost::agent::{self, target_result_json};
use outpost::cli::{
    Cli, Cmd, ConfigCmd, FilesArgs, FilesCmd, JobsArgs, KeysArgs, KeysCmd, Method, SendArgs,
    StatusArgs,
};
use outpost::config::{self, Config, FileConfig};
use outpost::control::{Client, CommandSpec, Request};

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.cmd {
        Cmd::Agent(args) => {
            let (path, explicit) = config_path(args.config.clone());
            let file = FileConfig::load(&path, explicit)?;
            let cfg = Config::build(file.overlay(args.layer()))?;
            let level = match std::env::var("OUTPOST_LOG") {
                Ok(l) if args.log_level.is_none() => l.parse()?,
                _ => cfg.log_level,
            };
            outpost::log::set_level(level);
            agent::run(cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Send(args) => send(args),
        Cmd::Jobs(args) => jobs(args),
        Cmd::Status(args) => status(args),
        Cmd::Config(c) => match c.cmd {
            ConfigCmd::Check(check) => {
                let (path, _) = config_path(check.config);
                let file = FileConfig::load(&path, true)?;
                let cfg = Config::build(file)?;
                if check.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?
                    );
                } else {
                    println!("{}: ok", path.display());
                    print!("{}", toml::to_string(&cfg).map_err(|e| e.to_string())?);
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Keys(k) => keys(k),
        Cmd::Files(f) => files(f),
        Cmd::Version(_) => {
            println!(
                "outpost {} ({})",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(args) => {
            outpost::demo::run(args.keep)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config_path(flag: Option<PathBuf>) -> (PathBuf, bool) {
    match flag {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG), false),
    }
}

/// `--state-dir`, else `OUTPOST_STATE_DIR`, else the configured default.
fn state_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(p) = std::env::var_os("OUTPOST_STATE_DIR") {
        return p.into();
    }
    FileConfig::load(Path::new(config::DEFAULT_CONFIG), false)
        .ok()
        .and_then(|f| f.state_dir)
        .unwrap_or_else(|| config::DEFAULT_STATE_DIR.into())
}

fn send(args: SendArgs) -> Result<ExitCode, String> {
    let dir = state_dir(args.state_dir.clone());
    let timeout_ms = args
        .timeout
        .as_deref()
        .map(|t| config::parse_duration(t).map(|d| d.as_millis().min(u32::MAX as u128) as u32))
        .transpose()
        .map_err(|e| format!("--timeout: {e}"))?;
    let ttl_s = args
        .ttl
        .as_deref()
        .map(|t| config::parse_duration(t).map(|d| d.as_secs().clamp(1, u32::MAX as u64) as u32))
        .transpose()
        .map_err(|e| format!("--ttl: {e}"))?;
    let command = match args.method {
        Method::Exec(e) => {
            let mut env = Vec::new();
            for kv in e.env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv:?}: expected NAME=VALUE"))?;
                env.push((k.to_string(), v.to_string()));
            }
            CommandSpec::Exec {
                argv: e.argv,
                env,
                cwd: e.cwd,
                stdin: String::new(),
                timeout_ms,
                rerun: e.rerun,
            }
        }
        Method::Ping(_) => CommandSpec::Ping,
        Method::HttpGet(h) => {
            let max_body = h
                .max_body
                .as_deref()
                .map(|s| config::parse_size(s).map(|n| n.min(u32::MAX as u64) as u32))
                .transpose()
                .map_err(|e| format!("--max-body: {e}"))?;
            CommandSpec::HttpGet {
                url: h.url,
                timeout_ms,
                max_body,
            }
        }
    };
    let mut client = Client::connect(&dir)?;
    let req = Request::Send {
        to: args.to,
        lane: Some(args.lane),
        ttl_s,
        command,
    };
    let reply = client.call(&req, Duration::from_secs(60))?;
    for note in reply["notes"].as_array().into_iter().flatten() {
        eprintln!("outpost: {}", note.as_str().unwrap_or_default());
    }
    let job = reply["job"]
        .as_i64()
        .ok_or("agent reply without a job id")?;
    if args.no_wait {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "job": job, "targets": reply["targets"] })
            );
        } else {
            println!("{job}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(&mut client, job, args.json)
}

/// Prints each target's result as it arrives; exit 0 when every one is ok.
fn follow(client: &mut Client, job: i64, json: bool) -> Result<ExitCode, String> {
    let mut printed: Vec<String> = Vec::new();
    let mut all_ok = true;
    loop {
        let req = Request::Wait {
            id: job,
            seen: printed.len(),
            timeout_ms: 300_000,
        };
        let reply = client.call(&req, Duration::from_secs(310))?;
        if reply["timeout"] == Value::Bool(true) {
            continue;
        }
        let j = &reply["job"];
        let targets = j["targets"].as_array().cloned().unwrap_or_default();
        for t in &targets {
            let node = t["node"].as_str().unwrap_or_default().to_string();
            if t["result"].is_null() || printed.contains(&node) {
                continue;
            }
            printed.push(node.clone());
            all_ok &= t["result"]["status"] == "ok";
            if json {
                println!("{}", target_result_json(j, t));
            } else {
                print_result(&node, &t["result"]);
            }
        }
        if printed.len() >= targets.len() {
            return Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
}

fn print_result(node: &str, r: &Value) {
    for line in r["stdout"].as_str().unwrap_or_default().lines() {
        println!("{node}: {line}");
    }
    for line in r["stderr"].as_str().unwrap_or_default().lines() {
        eprintln!("{node}: {line}");
    }
    let status = r["status"].as_str().unwrap_or("unknown");
    if let Some(rtt) = r["rtt_ms"].as_u64() {
        println!("{node}: round trip {rtt} ms");
    }
    if status != "ok" {
        let reason = r["reason"].as_str().unwrap_or_default();
        eprintln!("{node}: [{status}] {reason}");
    }
}

fn jobs(args: JobsArgs) -> Result<ExitCode, String> {
    let dir = state_dir(args.state_dir);
    let mut client = Client::connect(&dir)?;
    if let Some(show) = args.show {
        if show.follow {
            return follow(&mut client, show.id, show.json || args.json);
        }
        let reply = client.call(&Request::Job { id: show.id }, Duration::from_secs(60))?;
        let j = &reply["job"];
        if show.json || args.json {
            println!("{}", serde_json::to_string_pretty(j).unwrap_or_default());
        } else {
            println!(
                "job {} {} ({})",
                j["id"],
                j["summary"].as_str().unwrap_or_default(),
                j["method"].as_str().unwrap_or_default()
            );
            for t in j["targets"].as_array().into_iter().flatten() {
                let node = t["node"].as_str().unwrap_or_default();
                println!("  {node}: {}", t["state"].as_str().unwrap_or_default());
                if !t["result"].is_null() {
                    print_result(node, &t["result"]);
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let reply = client.call(&Request::Jobs { limit: Some(50) }, Duration::from_secs(60))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply["jobs"]).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>6}  {:<10}  {:<40}  targets", "job", "method", "command");
    for j in reply["jobs"].as_array().into_iter().flatten() {
        let states: Vec<String> = j["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{}={}",
                    t["node"].as_str().unwrap_or_default(),
                    t["state"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let mut summary = j["summary"].as_str().unwrap_or_default().to_string();
        if summary.len() > 40 {
            summary.truncate(37);
            summary.push_str("...");
        }
        println!(
            "{:>6}  {:<10}  {:<40}  {}",
            j["id"].as_i64().unwrap_or_default(),
            j["method"].as_str().unwrap_or_default(),
            summary,
            states.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn status(args: StatusArgs) -> Result<ExitCode, String> {
    let dir = state_dir(args.state_dir);
    let mut client = Client::connect(&dir)?;
    let s = client.call(&Request::Status, Duration::from_secs(60))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let link = &s["link"];
    let state = if link["connected"] == true {
        "connected"
    } else {
        "disconnected"
    };
    println!(
        "node     {} (outpost {})",
        s["node"].as_str().unwrap_or_default(),
        s["version"].as_str().unwrap_or_default()
    );
    println!(
        "broker   {} — {state} for {}s",
        s["broker"].as_str().unwrap_or_default(),
        link["for_s"]
    );
    if let Some(e) = link["last_error"].as_str() {
        println!("error    {e}");
    }
    let st = &s["store"];
    println!(
        "store    {} of {} bytes, {} quarantined, {} events",
        st["used"], st["quota"], st["quarantined"], st["events"]
    );
    for o in s["outbox"].as_array().into_iter().flatten() {
        println!(
            "outbox   {}/{}: {} frames, oldest unacked {}s",
            o["peer"].as_str().unwrap_or_default(),
            o["lane"].as_str().unwrap_or_default(),
            o["frames"],
            o["oldest_unacked_s"]
        );
    }
    for i in s["inbox"].as_array().into_iter().flatten() {
        println!(
            "inbox    {}/{}: {} frames",
            i["peer"].as_str().unwrap_or_default(),
            i["lane"].as_str().unwrap_or_default(),
            i["frames"]
        );
    }
    for r in s["running"].as_array().into_iter().flatten() {
        println!(
            "running  {} from {}/{}#{} for {}s",
            r["method"].as_str().unwrap_or_default(),
            r["peer"].as_str().unwrap_or_default(),
            r["lane"].as_str().unwrap_or_default(),
            r["seq"],
            r["for_s"]
        );
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        let on = if p["online"] == true {
            "online"
        } else {
            "offline"
        };
        println!("peer     {} {on}", p["name"].as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn keys(args: KeysArgs) -> Result<ExitCode, String> {
    use outpost::frame::Name;
    use outpost::seal::{from_hex32, to_hex};
    use outpost::trust;
    match args.cmd {
        KeysCmd::Gen(g) => {
            let dir = state_dir(g.state_dir);
            if let Some(name) = &g.name {
                Name::new(name).map_err(|e| e.to_string())?;
            }
            let public = trust::generate(&dir, g.force)?;
            if let Some(name) = &g.name {
                std::fs::write(dir.join("name"), format!("{name}\n")).map_err(|e| e.to_string())?;
            }
            println!(
                "{} {}",
                node_name(&dir).unwrap_or_else(|| "NAME".into()),
                to_hex(public.as_bytes())
            );
        }
        KeysCmd::Show(sh) => {
            let dir = state_dir(sh.state_dir);
            let keys = trust::load(&dir)?;
            let name = node_name(&dir).ok_or_else(|| {
                format!("the node's name is not known in {} yet: run the agent once, or `keys gen --name NAME`", dir.display())
            })?;
            println!("{name} {}", to_hex(keys.public.as_bytes()));
        }
        KeysCmd::Trust(t) => {
            let dir = state_dir(t.state_dir);
            let name = Name::new(&t.name).map_err(|e| e.to_string())?;
            let public = from_hex32(&t.public_key)
                .ok_or("the public key must be 64 hex digits (from `outpost keys show`)")?;
            let split = |s: &str| {
                s.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            };
            let allow = split(&t.allow);
            if let Some(bad) = allow.iter().find(|m| !trust::METHODS.contains(&m.as_str())) {
                return Err(format!(
                    "--allow: unknown method {bad:?} (known: {})",
                    trust::METHODS.join(", ")
                ));
            }
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
            println!(
                "trusting {name} for {}",
                if allow.is_empty() {
                    "results only".into()
                } else {
                    allow.join(", ")
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The node's name as the agent or `keys gen --name` recorded it.
fn node_name(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("name"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn files(args: FilesArgs) -> Result<ExitCode, String> {
    use std::io::IsTerminal;
    let dir = state_dir(args.state_dir);
    let mut client = Client::connect(&dir)?;
    let call = |client: &mut Client, req: &Request| client.call(req, Duration::from_secs(600));
    match args.cmd {
        FilesCmd::Put(p) => {
            let src = p
                .src
                .canonicalize()
                .map_err(|e| format!("{}: {e}", p.src.display()))?;
            let ttl_s = p
                .ttl
                .as_deref()
                .map(|t| config::parse_duration(t).map(|d| d.as_secs().max(1)))
                .transpose()
                .map_err(|e| format!("--ttl: {e}"))?;
            let req = Request::FilesPut {
                to: p.to,
                path: src.to_string_lossy().into_owned(),
                id: p.id,
                ttl_s,
            };
            let reply = call(&mut client, &req)?;
            let ids: Vec<(String, i64)> = reply["transfers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["node"].as_str().unwrap_or_default().to_string(),
                        t["transfer"].as_i64().unwrap_or_default(),
                    )
                })
                .collect();
            if p.no_wait {
                for (node, t) in &ids {
                    if p.json {
                        println!(
                            "{}",
                            serde_json::json!({ "node": node, "transfer": t, "id": reply["id"] })
                        );
                    } else {
                        println!("{node}: transfer {t}");
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let tty = std::io::stderr().is_terminal() && !p.json;
            let mut all_ok = true;
            for (node, t) in ids {
                let mut last_step = u64::MAX;
                let t = loop {
                    let v = call(&mut client, &Request::Transfer { id: t })?["transfer"].clone();
                    let pct = v["percent"].as_u64().unwrap_or(0);
                    let line = format!(
                        "{node}: {} {}% {}/{} bytes {} B/s {}",
                        v["id"].as_str().unwrap_or_default(),
                        pct,
                        v["bytes"],
                        v["size"],
                        v["rate_bps"],
                        v["state"].as_str().unwrap_or_default()
                    );
                    if tty {
                        eprint!("\r{line}\x1b[K");
                    } else if !p.json && pct / 10 != last_step {
                        eprintln!("{line}");
                        last_step = pct / 10;
                    }
                    if v["finished"] == true {
                        if tty {
                            eprintln!();
                        }
                        break v;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                };
                let state = t["state"].as_str().unwrap_or_default();
                all_ok &= state == "done" || state == "skipped";
                if p.json {
                    println!("{t}");
                } else {
                    let reason = t["reason"].as_str().unwrap_or_default();
                    println!(
                        "{node}: {} {state}{}",
                        t["id"].as_str().unwrap_or_default(),
                        if reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({reason})")
                        }
                    );
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        FilesCmd::Get(g) => {
            let reply = call(
                &mut client,
                &Request::FilesGet {
                    from: g.from.clone(),
                    path: g.path.clone(),
                },
            )?;
            let t = reply["transfer"]
                .as_i64()
                .ok_or("agent reply without a transfer id")?;
            let v = loop {
                let v = call(&mut client, &Request::Transfer { id: t })?["transfer"].clone();
                if v["finished"] == true {
                    break v;
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            if v["state"] != "done" && v["state"] != "skipped" {
                return Err(format!(
                    "files get {}: {} ({})",
                    g.path,
                    v["state"].as_str().unwrap_or_default(),
                    v["reason"].as_str().unwrap_or_default()
                ));
            }
            let list = call(&mut client, &Request::FilesList)?;
            let held = list["files"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|f| f["source"] == g.from.as_str() && f["id"] == reply["id"])
                .and_then(|f| f["path"].as_str().map(PathBuf::from))
                .ok_or("the file arrived but is not in the list of held files")?;
            match g.output {
                Some(dest) => {
                    std::fs::copy(&held, &dest)
                        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                    println!("{}", dest.display());
                }
                None => println!("{}", held.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        FilesCmd::List(l) => {
            let v = call(&mut client, &Request::FilesList)?;
            if l.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!("transfers:");
            for t in v["transfers"].as_array().into_iter().flatten() {
                let arrow = if t["direction"] == "out" { "->" } else { "<-" };
                println!(
                    "  {:>5} {arrow} {:<16} {:<24} {:>3}% {:>12}/{:<12} {:>9} B/s  {}",
                    t["transfer"].as_i64().unwrap_or_default(),
                    t["peer"].as_str().unwrap_or_default(),
                    t["id"].as_str().unwrap_or_default(),
                    t["percent"].as_u64().unwrap_or_default(),
                    t["bytes"].as_u64().unwrap_or_default(),
                    t["size"].as_u64().unwrap_or_default(),
                    t["rate_bps"].as_u64().unwrap_or_default(),
                    t["state"].as_str().unwrap_or_default()
                );
            }
            println!("files held:");
            for f in v["files"].as_array().into_iter().flatten() {
                println!(
                    "  {}/{}  {} bytes  {}",
                    f["source"].as_str().unwrap_or_default(),
                    f["id"].as_str().unwrap_or_default(),
                    f["size"],
                    f["path"].as_str().unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FilesCmd::Rm(r) => {
            let v = call(&mut client, &Request::FilesRm { id: r.id })?;
            for f in v["removed"].as_array().into_iter().flatten() {
                println!("removed {}", f.as_str().unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
