//! outpost side by side with what users would otherwise pick (issue 7): a raw
//! rumqttc QoS 1 publisher (the ceiling), a mosquitto bridge with persistence, and
//! JSON commands in thin-edge.io's style. Starts its own brokers and agents.
//!
//!     cargo bench --bench compare                      # every scenario
//!     cargo bench --bench compare -- replay wire       # some of them
//!     cargo bench --bench compare -- --quick           # 1/10 of the counts
//!
//! Prints a table (Markdown, the README's) and writes `target/compare.json`.
//! Scenarios: replay (1, and flash wear, 6), wire (2), enqueue (3), latency (4),
//! footprint (5), satellite (7), cost (8).

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

#[path = "../../tests/it/support/mod.rs"]
mod support;

mod cost;
mod footprint;
mod replay;
mod report;
mod rig;
mod satellite;
mod wire;

use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use report::Report;

/// What the command line asked for.
#[derive(Debug)]
pub struct Opts {
    /// Divide message counts by 10 (for trying the benchmark out, not for the README).
    pub quick: bool,
}

impl Opts {
    /// `n`, or a tenth of it with `--quick`.
    pub fn count(&self, n: usize) -> usize {
        if self.quick {
            (n / 10).max(1)
        } else {
            n
        }
    }
}

type Scenario = (&'static str, fn(&mut Report, &Opts));

const SCENARIOS: &[Scenario] = &[
    ("replay", replay::run),
    ("wire", wire::run),
    ("enqueue", footprint::enqueue),
    ("latency", footprint::latency),
    ("footprint", footprint::run),
    ("satellite", satellite::run),
    ("cost", cost::run),
];

fn main() {
    let mut quick = false;
    let mut chosen = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            "--quick" => quick = true,
            "-h" | "--help" => {
                println!("usage: cargo bench --bench compare -- [--quick] [SCENARIO...]");
                println!(
                    "scenarios: {}",
                    SCENARIOS.iter().map(|s| s.0).collect::<Vec<_>>().join(" ")
                );
                return;
            }
            name if SCENARIOS.iter().any(|s| s.0 == name) => chosen.push(name.to_string()),
            other => {
                eprintln!(
                    "unknown argument {other:?}; scenarios: {}",
                    SCENARIOS.iter().map(|s| s.0).collect::<Vec<_>>().join(" ")
                );
                std::process::exit(2);
            }
        }
    }
    let opts = Opts { quick };
    let mut report = Report::default();
    let started = Instant::now();
    for (name, run) in SCENARIOS {
        if !chosen.is_empty() && !chosen.iter().any(|c| c == name) {
            continue;
        }
        eprintln!("== {name}");
        let t = Instant::now();
        run(&mut report, &opts);
        eprintln!("== {name} took {:.0} s", t.elapsed().as_secs_f64());
    }
    let machine = machine();
    println!("{}", report.table());
    for n in &report.notes {
        println!("- {n}");
    }
    println!(
        "\nmachine: {}; {} s in all{}",
        machine["summary"].as_str().unwrap_or(""),
        started.elapsed().as_secs(),
        if quick {
            " (--quick: 1/10 of the counts)"
        } else {
            ""
        }
    );
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("compare.json");
    let mut v = report.json(&machine);
    v["quick"] = json!(quick);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap() + "\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("results: {}", path.display());
}

/// CPU, cores, kernel, mosquitto: what the numbers depend on.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    let kernel = run("uname", &["-r"]);
    let mosquitto = support::find_program("mosquitto")
        .map(|p| run(p.to_str().unwrap(), &["-h"]))
        .unwrap_or_default();
    json!({
        "summary": format!("{cpu}, {cores} cores, Linux {kernel}, {mosquitto}"),
        "cpu": cpu,
        "cores": cores,
        "kernel": kernel,
        "mosquitto": mosquitto,
    })
}
