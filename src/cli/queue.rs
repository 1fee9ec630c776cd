//! `outpost queue`: what waits between this agent and one node, and `queue purge`.

use std::process::ExitCode;

use super::jobs::age;
use super::send::print_json_pretty;
use super::{client_args, Common};
use crate::control::reply::QueueItem;

client_args! {
    /// what waits for a node and from it: outpost queue NODE, or cancel all of it:
    /// outpost queue purge NODE [--lane L]
    #[argh(subcommand, name = "queue")]
    pub struct QueueArgs {
        /// list at most this many items each way (default 1000)
        #[argh(option, default = "1000")]
        pub limit: u32,
        /// with purge: only this lane
        #[argh(option)]
        pub lane: Option<String>,
        /// NODE, or purge NODE
        #[argh(positional)]
        pub words: Vec<String>,
    }
}

pub(super) fn run(args: QueueArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words[..] {
        ["purge", node] => purge(&common, node, args.lane.as_deref()),
        [node] if args.lane.is_none() => list(&common, node, args.limit),
        [_] => Err("--lane goes with purge: outpost queue purge NODE --lane L".into()),
        _ => Err("usage: outpost queue NODE, or outpost queue purge NODE [--lane L]".into()),
    }
}

fn list(common: &Common, node: &str, limit: u32) -> Result<ExitCode, String> {
    let reply = common.client()?.queue(node, Some(limit))?;
    if common.json {
        print_json_pretty(&reply)?;
        return Ok(ExitCode::SUCCESS);
    }
    table(&format!("to {node}"), &reply.to);
    table(&format!("from {node}"), &reply.from);
    Ok(ExitCode::SUCCESS)
}

fn table(title: &str, items: &[QueueItem]) {
    if items.is_empty() {
        println!("{title}: nothing waits");
        return;
    }
    println!("{title}: {} waiting", items.len());
    println!(
        "  {:>6}  {:<10}  {:>6}  {:<11}  {:>5}  what",
        "job", "lane", "seq", "state", "age"
    );
    for i in items {
        let job = i.job.map_or_else(|| "-".into(), |j| j.to_string());
        println!(
            "  {:>6}  {:<10}  {:>6}  {:<11}  {:>5}  {}",
            job,
            i.lane,
            i.seq,
            i.state,
            age(i.age_ms),
            i.what
        );
    }
}

fn purge(common: &Common, node: &str, lane: Option<&str>) -> Result<ExitCode, String> {
    let reply = common.client()?.purge(node, lane)?;
    if common.json {
        print_json_pretty(&reply)?;
    } else {
        let lane = lane.map_or_else(String::new, |l| format!(" on lane {l}"));
        println!("cancelled {} job(s) for {node}{lane}", reply.cancelled);
    }
    Ok(ExitCode::SUCCESS)
}
