//! `outpost link usage`: where the link's bytes went, the budgets and what they
//! hold back; `outpost link release`: lift budgets and windows for a while.

use std::process::ExitCode;

use super::send::print_json_pretty;
use super::{client_args, duration_flag, Common};
use crate::budget::{BudgetView, HeldView};
use crate::config::format_size;

client_args! {
    /// the link's bytes on the wire by category, its budgets and what they hold
    /// back: outpost link usage; lift budgets and link windows: outpost link
    /// release [--for 2h]
    #[argh(subcommand, name = "link")]
    pub struct LinkArgs {
        /// with release: for this long (default: until the current budget period
        /// ends, or 1h without a budget)
        #[argh(option, long = "for")]
        pub for_: Option<String>,
        /// usage or release
        #[argh(positional)]
        pub words: Vec<String>,
    }
}

pub(super) fn run(args: LinkArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words[..] {
        ["usage"] | [] if args.for_.is_none() => usage(&common),
        ["release"] => release(&common, args.for_.as_deref()),
        ["usage"] | [] => Err("--for goes with release: outpost link release --for 2h".into()),
        _ => Err("usage: outpost link usage, or outpost link release [--for DURATION]".into()),
    }
}

fn usage(common: &Common) -> Result<ExitCode, String> {
    let u = common.client()?.usage()?;
    if common.json {
        print_json_pretty(&u)?;
        return Ok(ExitCode::SUCCESS);
    }
    let how = if u.measured {
        "read from the kernel"
    } else {
        "estimated from MQTT packets"
    };
    println!("bytes on the wire, TCP/IP headers included ({how}), sent / received:");
    println!(
        "  {:<10}  {:>21}  {:>21}  {:>21}",
        "", "this hour", "today (UTC)", "this month"
    );
    let pair = |up: u64, down: u64| format!("{} / {}", format_size(up), format_size(down));
    let mut total = [0u64; 6];
    for c in &u.categories {
        let v = [
            c.hour_up,
            c.hour_down,
            c.day_up,
            c.day_down,
            c.month_up,
            c.month_down,
        ];
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
        if c.month_up + c.month_down == 0 {
            continue;
        }
        println!(
            "  {:<10}  {:>21}  {:>21}  {:>21}",
            c.category.as_str(),
            pair(v[0], v[1]),
            pair(v[2], v[3]),
            pair(v[4], v[5])
        );
    }
    println!(
        "  {:<10}  {:>21}  {:>21}  {:>21}",
        "total",
        pair(total[0], total[1]),
        pair(total[2], total[3]),
        pair(total[4], total[5])
    );
    println!("  {} connect(s) since the agent started", u.connects);
    print_budgets(&u.budgets, &u.held, u.released_until_ms);
    Ok(ExitCode::SUCCESS)
}

/// The budgets, what waits and whether the operator lifted them: for `link
/// usage` and `status`.
pub(super) fn print_budgets(budgets: &[BudgetView], held: &[HeldView], released: Option<u64>) {
    for b in budgets {
        println!(
            "budget   {} {}: {} of {} spent ({}%), period ends {}",
            b.scope,
            b.budget,
            format_size(b.spent),
            format_size(b.limit),
            b.spent * 100 / b.limit.max(1),
            utc(b.period_end_ms)
        );
    }
    if let Some(until) = released {
        println!(
            "released budgets and link windows are lifted until {}",
            utc(until)
        );
    }
    for h in held {
        println!(
            "held     {} traffic to {} ({} lane) until {}: {}",
            h.class,
            h.peer,
            h.lane,
            utc(h.until_ms),
            h.why
        );
    }
}

fn release(common: &Common, for_: Option<&str>) -> Result<ExitCode, String> {
    let for_s = duration_flag("--for", for_)?.map(|d| d.as_secs().max(1));
    let r = common.client()?.release(for_s)?;
    if common.json {
        print_json_pretty(&r)?;
    } else {
        println!("budgets and link windows lifted until {}", utc(r.until_ms));
    }
    Ok(ExitCode::SUCCESS)
}

/// `2026-12-03 00:00 UTC`.
pub(super) fn utc(ms: u64) -> String {
    let (y, m, d) = crate::budget::civil_from_days((ms / 86_400_000) as i64);
    let in_day = ms % 86_400_000 / 60_000;
    format!(
        "{y}-{m:02}-{d:02} {:02}:{:02} UTC",
        in_day / 60,
        in_day % 60
    )
}
