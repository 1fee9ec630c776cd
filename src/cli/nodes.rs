//! `outpost nodes`: the registry of trusted nodes (a table, filtered by pattern,
//! facts and presence), or one node with everything known about it (`nodes show`).

use std::process::ExitCode;

use argh::FromArgs;

use super::jobs::age;
use super::send::print_json_pretty;
use super::{client_args, Common};
use crate::config::{format_duration, format_size, format_utc};
use crate::control::reply::{NodeState, NodeView, PollView};
use crate::control::Select;

client_args! {
    /// trusted nodes: state, last seen, facts, queues; or one (nodes show NAME)
    #[argh(subcommand, name = "nodes")]
    pub struct NodesArgs {
        /// only nodes whose facts match, KEY=VALUE or KEY!=VALUE, the value a glob
        /// (repeatable: all must match), e.g. --where arch=mips
        #[argh(option, long = "where")]
        pub where_: Vec<String>,
        /// only nodes whose presence says online
        #[argh(switch)]
        pub online: bool,
        /// only nodes these comma-separated names or glob patterns name
        #[argh(option)]
        pub to: Option<String>,
        #[argh(subcommand)]
        pub show: Option<NodesCmd>,
    }
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum NodesCmd {
    Show(NodesShow),
}

client_args! {
    /// one node: presence, last seen, queues, last error and every fact
    #[argh(subcommand, name = "show")]
    pub struct NodesShow {
        /// node name
        #[argh(positional)]
        pub name: String,
    }
}

pub(super) fn run(args: NodesArgs) -> Result<ExitCode, String> {
    let parent = args.common(Common::default());
    if let Some(NodesCmd::Show(show)) = args.show {
        let common = show.common(parent);
        let node = common.client()?.node(&show.name)?;
        if common.json {
            print_json_pretty(&node)?;
        } else {
            print_node(&node);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let select = Select {
        where_: args.where_,
        online: args.online,
    };
    let nodes = parent.client()?.nodes(args.to.as_deref(), &select)?;
    if parent.json {
        print_json_pretty(&nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let filtered = args.to.is_some() || !select.where_.is_empty() || select.online;
    if nodes.is_empty() {
        if filtered {
            eprintln!("outpost: no trusted node matches");
            return Ok(ExitCode::from(1));
        }
        eprintln!("outpost: no trusted nodes (add them with `outpost keys trust`)");
        return Ok(ExitCode::SUCCESS);
    }
    let now = crate::agent::now_ms();
    println!(
        "{:<20} {:<16} {:>9}  {:<24} {:<8} {:<9} {:>6} {:>7}  polls",
        "node", "state", "last seen", "os", "arch", "version", "queued", "running"
    );
    for n in &nodes {
        let state = match n.since_ms {
            Some(s) => format!("{} {}", n.state.as_str(), age(now.saturating_sub(s))),
            None => n.state.as_str().to_string(),
        };
        let seen = n
            .last_seen_ms
            .map_or("-".to_string(), |t| age(now.saturating_sub(t)));
        let fact = |k: &str| n.facts.get(k).map_or("-", String::as_str);
        let os = match (n.facts.get("os"), n.facts.get("os.version")) {
            (Some(os), Some(v)) => format!("{os} {v}"),
            (Some(os), None) => os.clone(),
            _ => "-".into(),
        };
        let queued: u64 = n.outbox.iter().map(|q| q.frames).sum();
        let polls = n
            .poll
            .as_ref()
            .map_or("-".to_string(), |p| polls(p, n.state, now));
        println!(
            "{:<20} {:<16} {:>9}  {:<24} {:<8} {:<9} {:>6} {:>7}  {}",
            n.name,
            state,
            seen,
            os,
            fact("arch"),
            fact("outpost.version"),
            queued,
            n.running,
            polls
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `every 30m, next 14:30 UTC`: how an on-demand node polls (its next poll only
/// while it is away).
fn polls(p: &PollView, state: NodeState, now: u64) -> String {
    let every = format_duration(std::time::Duration::from_secs(p.every_s));
    match state {
        NodeState::Online => format!("every {every}"),
        _ => format!("every {every}, next {}", format_utc(p.next_ms, now)),
    }
}

/// One node for people: what the registry knows, then every fact.
fn print_node(n: &NodeView) {
    let now = crate::agent::now_ms();
    let ago = |t: Option<u64>| {
        t.map_or("never".to_string(), |t| {
            format!("{} ago", age(now.saturating_sub(t)))
        })
    };
    println!("node       {}", n.name);
    match n.since_ms {
        Some(s) => println!(
            "state      {} for {}",
            n.state.as_str(),
            age(now.saturating_sub(s))
        ),
        None => println!("state      {}", n.state.as_str()),
    }
    println!("last seen  {}", ago(n.last_seen_ms));
    if let Some(p) = &n.poll {
        println!("link       on-demand, {}", polls(p, n.state, now));
    }
    println!(
        "facts      {}",
        ago(n.facts_ms).replace("never", "none yet")
    );
    for q in &n.outbox {
        let oldest = q.oldest_unacked_s.map_or("-".into(), |a| format!("{a}s"));
        println!(
            "outbox     {}: {} frames, oldest unacked {oldest}",
            q.lane, q.frames
        );
    }
    println!("running    {}", n.running);
    if let Some(e) = &n.last_error {
        println!(
            "last error {} ago: {}",
            age(now.saturating_sub(e.at_ms)),
            e.text
        );
    }
    let width = n.facts.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in &n.facts {
        // Sizes are bytes on the wire; people read them better in units.
        let shown = if (k.starts_with("disk.") || k.starts_with("mem.")) && !k.ends_with("id") {
            v.parse::<u64>()
                .map_or(v.clone(), |b| format!("{v} ({})", format_size(b)))
        } else {
            v.clone()
        };
        println!("  {k:<width$}  {shown}");
    }
}
