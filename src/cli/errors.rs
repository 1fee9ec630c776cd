//! `outpost errors`: the error log nodes reported to this agent (usually
//! central), newest last; `--follow` keeps printing entries as they change.

use std::process::ExitCode;
use std::time::Duration;

use super::jobs::age;
use super::send::print_json;
use super::{client_args, Common};
use crate::control::reply::ErrorView;

/// How often `--follow` asks the local agent for what changed.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

client_args! {
    /// errors nodes reported: node, kind, count, first and last time
    #[argh(subcommand, name = "errors")]
    pub struct ErrorsArgs {
        /// only this node's
        #[argh(option)]
        pub node: Option<String>,
        /// keep printing entries as they arrive or change
        #[argh(switch)]
        pub follow: bool,
        /// how many entries to list (default 1000, the newest)
        #[argh(option, default = "1000")]
        pub limit: u32,
    }
}

pub(super) fn run(args: ErrorsArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let mut client = common.client()?;
    let mut after = 0;
    let mut header = !common.json;
    loop {
        let rows = client.errors(args.node.as_deref(), after, Some(args.limit))?;
        if header && (!rows.is_empty() || !args.follow) {
            println!(
                "{:<16}  {:<10}  {:>7}  {:>6}  {:>6}  text",
                "node", "kind", "count", "first", "last"
            );
            header = false;
        }
        for e in &rows {
            after = after.max(e.seq);
            if common.json {
                print_json(e)?;
            } else {
                print_row(e);
            }
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        // A local socket, asked once a second: the agent does not wait for it.
        std::thread::sleep(FOLLOW_EVERY);
    }
}

fn print_row(e: &ErrorView) {
    let now = crate::agent::now_ms();
    println!(
        "{:<16}  {:<10}  {:>7}  {:>6}  {:>6}  {}",
        e.node,
        e.kind,
        e.count,
        age(now.saturating_sub(e.first_ms)),
        age(now.saturating_sub(e.last_ms)),
        e.text
    );
}
