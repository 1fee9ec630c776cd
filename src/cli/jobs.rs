//! `outpost jobs`: the newest jobs, one job (`jobs show ID [--follow]`), or
//! cancelling one (`jobs cancel ID [--node N]`).

use std::process::ExitCode;

use argh::FromArgs;

use super::send::{follow, print_json_pretty, print_result};
use super::{client_args, Common};

client_args! {
    /// list jobs, newest first, or show or cancel one
    #[argh(subcommand, name = "jobs")]
    pub struct JobsArgs {
        /// how many jobs to list (default 50)
        #[argh(option, default = "50")]
        pub limit: u32,
        #[argh(subcommand)]
        pub show: Option<JobsCmd>,
    }
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum JobsCmd {
    Show(JobsShow),
    Cancel(JobsCancel),
}

client_args! {
    /// show one job: outpost jobs show ID [--follow]
    #[argh(subcommand, name = "show")]
    pub struct JobsShow {
        /// keep printing results as they arrive until every target has one
        #[argh(switch)]
        pub follow: bool,
        /// job id
        #[argh(positional)]
        pub id: i64,
    }
}

client_args! {
    /// cancel a job wherever it is: outpost jobs cancel ID [--node NAME] (what has
    /// not started never runs; a running command is stopped; exit 1 when every
    /// target had finished already)
    #[argh(subcommand, name = "cancel")]
    pub struct JobsCancel {
        /// only this target of the job
        #[argh(option)]
        pub node: Option<String>,
        /// job id
        #[argh(positional)]
        pub id: i64,
    }
}

pub(super) fn run(args: JobsArgs) -> Result<ExitCode, String> {
    let parent = args.common(Common::default());
    match args.show {
        Some(JobsCmd::Show(show)) => return run_show(show, parent),
        Some(JobsCmd::Cancel(cancel)) => return run_cancel(cancel, parent),
        None => {}
    }
    let mut client = parent.client()?;
    let jobs = client.jobs(Some(args.limit))?;
    if parent.json {
        print_json_pretty(&jobs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = crate::agent::now_ms();
    println!(
        "{:>6}  {:>8}  {:<10}  {:<40}  targets",
        "job", "age", "method", "command"
    );
    for j in jobs {
        let states: Vec<String> = j
            .targets
            .iter()
            .map(|t| format!("{}={}", t.node, t.state))
            .collect();
        let mut summary = j.summary.clone();
        if summary.chars().count() > 40 {
            summary = summary.chars().take(37).collect::<String>() + "...";
        }
        println!(
            "{:>6}  {:>8}  {:<10}  {:<40}  {}",
            j.id,
            age(now.saturating_sub(j.created_ms)),
            j.method.as_str(),
            summary,
            states.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_show(show: JobsShow, parent: Common) -> Result<ExitCode, String> {
    let common = show.common(parent);
    let mut client = common.client()?;
    if show.follow {
        return follow(&mut client, show.id, common.json);
    }
    let j = client.job(show.id)?;
    if common.json {
        print_json_pretty(&j)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = crate::agent::now_ms();
    println!(
        "job {} {} ({}, {} ago)",
        j.id,
        j.summary,
        j.method,
        age(now.saturating_sub(j.created_ms))
    );
    for t in &j.targets {
        println!("  {}: {}", t.node, t.state);
        if let Some(r) = &t.result {
            print_result(&t.node, r);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_cancel(cancel: JobsCancel, parent: Common) -> Result<ExitCode, String> {
    let common = cancel.common(parent);
    let mut client = common.client()?;
    let reply = client.cancel(cancel.id, cancel.node.as_deref())?;
    let changed = reply.targets.iter().any(|t| t.outcome != "finished");
    if common.json {
        print_json_pretty(&reply)?;
    } else {
        for t in &reply.targets {
            let says = match t.outcome.as_str() {
                "withdrawn" => "cancelled: withdrawn from the outbox before the node acknowledged it (a cancel follows in case it was on its way)".into(),
                "cancel-sent" => format!(
                    "cancel sent ({}); the node answers where it caught it",
                    t.state
                ),
                "cancelling" => "a cancel was sent before; waiting for the node's answer".into(),
                _ => format!("already finished ({}): nothing changed", t.state),
            };
            println!("{}: {says}", t.node);
        }
    }
    Ok(if changed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `42s`, `5m`, `3h`, `2d`: how long ago, for a table.
pub(super) fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
