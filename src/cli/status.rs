//! `outpost status`: the local agent's link, store, queues and peers.

use std::process::ExitCode;

use super::send::print_json_pretty;
use super::{client_args, Common};
use crate::config;

client_args! {
    /// the agent's link, store and queues
    #[argh(subcommand, name = "status")]
    pub struct StatusArgs {}
}

pub(super) fn run(args: StatusArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let s = common.client()?.status()?;
    if common.json {
        print_json_pretty(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let link = &s.link;
    let state = match (link.connected, link.next_poll_ms) {
        (true, _) => "connected".to_string(),
        // An on-demand link between polls.
        (false, Some(next)) => format!(
            "idle (next poll {})",
            config::format_utc(next, crate::agent::now_ms())
        ),
        (false, None) => "disconnected".to_string(),
    };
    println!("node     {} (outpost {})", s.node, s.version);
    println!(
        "broker   {} — {state} for {}s ({} link)",
        s.broker, link.for_s, link.mode
    );
    if let Some(e) = &link.last_error {
        println!("error    {e}");
    }
    if link.poisoned.is_some() {
        println!("presence off (an oversized message cut the link; see --json)");
    }
    let st = &s.store;
    println!(
        "store    {} of {} used, {} quarantined, {} events, epoch {}",
        config::format_size(st.used),
        config::format_size(st.quota),
        st.quarantined,
        st.events,
        st.epoch
    );
    if let Some(f) = &st.failing {
        println!(
            "store    FAILING for {}s: {} ({} result(s) waiting to be recorded)",
            f.for_s, f.error, f.unrecorded_results
        );
    }
    let r = &st.retention;
    let last = match r.last_pass_ms {
        None => "no pass yet".to_string(),
        Some(at) => {
            let p = &r.last;
            format!(
                "last pass {}s ago pruned {} job(s), {} result(s), {} journal row(s), {} event(s), {} quarantined, {} transfer(s)",
                crate::agent::now_ms().saturating_sub(at) / 1000,
                p.jobs, p.results, p.journal, p.events, p.quarantine, p.transfers
            )
        }
    };
    println!(
        "history  kept {} and at most {} of each kind; {last}; {} job(s) pruned since start",
        config::format_duration(std::time::Duration::from_secs(r.keep_s)),
        r.keep_rows,
        r.since_start.jobs
    );
    if let Some(l) = &st.lost {
        println!("store    lost state at {} ms: {}", l.at_ms, l.reason);
    }
    for o in &s.outbox {
        let age = o.oldest_unacked_s.map_or("-".into(), |a| format!("{a}s"));
        println!(
            "outbox   {}/{}: {} frames, oldest unacked {age}",
            o.peer, o.lane, o.frames
        );
    }
    for i in &s.inbox {
        println!("inbox    {}/{}: {} frames", i.peer, i.lane, i.frames);
    }
    for r in &s.running {
        println!(
            "running  {} from {}/{}#{} for {}s",
            r.method, r.peer, r.lane, r.seq, r.for_s
        );
    }
    for p in &s.peers {
        let on = if p.online { "online" } else { "offline" };
        println!("peer     {} {on}", p.name);
    }
    let t = &s.traffic;
    println!(
        "traffic  today {} sent, {} received; this month {} / {} (outpost link usage)",
        config::format_size(t.today_up),
        config::format_size(t.today_down),
        config::format_size(t.month_up),
        config::format_size(t.month_down)
    );
    super::link::print_budgets(&t.budgets, &t.held, t.released_until_ms);
    let rejected: u64 = s.security.rejected.values().sum();
    if rejected > 0 {
        let kinds: Vec<String> = s
            .security
            .rejected
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("rejected {rejected} payload(s): {}", kinds.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
