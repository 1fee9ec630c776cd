//! The retention bound: database sizes stay flat once pruning keeps up.
//!
//! - `core`: 1,000,000 `exec` commands from a central to a node through the
//!   library core the agent runs (`Node`: store, delivery, sealing; the same
//!   submit, take, start, finish and record calls as the agent loop), on a
//!   simulated clock of 10 ms per command, pruning as the agent does (a pass every
//!   quarter of the retention period, batches of 1,000 rows). No processes and no
//!   broker: 1M through the real link would take hours on two shared cores.
//! - `real`: 20,000 commands (`--commands N`) through the real binaries and a
//!   real mosquitto, `exec true` on the node, with `--retention 1m
//!   --retention-jobs 1000`.
//!
//! Both print the node's and the central's `store.db` (and `-wal`) sizes at
//! intervals, and SQLite's used and free pages.
//!
//!   cargo bench --bench retention               # both
//!   cargo bench --bench retention -- core       # one; --commands N for either
//!
//! Prints what it measured; asserts only that every command got its result.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::control::{CommandSpec, Request};
use outpost::delivery::DeliveryConfig;
use outpost::frame::{self, Body, CmdResult, Command, Exec, Method, Name, Status};
use outpost::node::{Node, NodeConfig};
use outpost::store::{Durability, Outgoing, Pruned, Retention, StoreConfig};
use outpost::trust::Keys;
use x25519_dalek::{PublicKey, StaticSecret};

use support::broker::Broker;
use support::outpost::{introduce, Agent};
use support::TempDir;

/// The sizes of `store.db` and its `-wal` in `dir`.
fn sizes(dir: &Path) -> (u64, u64) {
    let len = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    (len(dir.join("store.db")), len(dir.join("store.db-wal")))
}

fn kib(n: u64) -> String {
    format!("{:.0} KiB", n as f64 / 1024.0)
}

fn secret(name: &str) -> StaticSecret {
    StaticSecret::from([name.len() as u8 + 7; 32])
}

fn core_node(dir: &Path, me: &str, peer: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = NodeConfig {
        store: StoreConfig {
            durability: Durability::Normal,
            quota_bytes: u64::MAX,
        },
        delivery: DeliveryConfig::default(),
        ..NodeConfig::default()
    };
    let keys = Keys {
        secret: secret(me),
        public: PublicKey::from(&secret(me)),
    };
    let mut n = Node::open(&dir.join("store.db"), &Name::new(me).unwrap(), cfg, keys, 0).unwrap();
    let trust = [(
        Name::new(peer).unwrap(),
        *PublicKey::from(&secret(peer)).as_bytes(),
    )]
    .into_iter()
    .collect();
    n.set_trust(trust, 0);
    n.on_connected(0);
    n
}

/// Takes what is runnable on `n` as the agent loop does, in one batch: commands
/// are started and finished at once (an `exec true` with an uptime-sized
/// output), results recorded. Returns how many frames it took.
fn take_all(n: &mut Node, now: u64) -> usize {
    n.begin_batch().unwrap();
    let mut taken = 0;
    loop {
        let ready = n.take_ready(now).unwrap();
        let k = ready.taken + ready.commands.len();
        for cmd in ready.commands {
            n.start(&cmd, now).unwrap();
            let mut r = CmdResult::without_run(cmd.env.seq, Status::Ok, "", now);
            r.exit_code = Some(0);
            r.stdout =
                b" 10:02:01 up 3 days,  4:05,  0 users,  load average: 0.00, 0.01, 0.05\n".to_vec();
            n.finish(&cmd, r, now).unwrap();
        }
        taken += k;
        if k == 0 {
            break;
        }
    }
    n.end_batch().unwrap();
    taken
}

/// One pass as the agent runs it: batches until one is not full. `slowest`
/// keeps the longest one batch took (what the agent's loop waits at most), the
/// time of all and how many there were.
fn prune_pass(
    n: &mut Node,
    keep: &Retention,
    now: u64,
    timing: &mut (Duration, Duration, u32),
) -> Pruned {
    let mut total = Pruned::default();
    loop {
        let t = Instant::now();
        let p = n.prune(keep, 1000, now).unwrap();
        let took = t.elapsed();
        timing.0 = timing.0.max(took);
        timing.1 += took;
        timing.2 += 1;
        total.add(&p);
        if !p.full {
            return total;
        }
    }
}

/// Moves payloads both ways and takes what arrives until nothing moves; the
/// clock advances 60 ms a round so ack and hold timers fire.
fn converse(c: &mut Node, s: &mut Node, now: &mut u64) {
    loop {
        let (to_s, _) = c.poll_out(*now).unwrap();
        let (to_c, _) = s.poll_out(*now).unwrap();
        let moved = !to_s.is_empty() || !to_c.is_empty();
        for p in to_s {
            s.on_payload(&p.bytes, *now).unwrap();
        }
        for p in to_c {
            c.on_payload(&p.bytes, *now).unwrap();
        }
        let taken = take_all(s, *now) + take_all(c, *now);
        if !moved && taken == 0 && c.backlog().is_empty() && s.backlog().is_empty() {
            return;
        }
        *now += 60;
    }
}

fn core(commands: u64) {
    let tmp = TempDir::new();
    let (cdir, sdir) = (tmp.path().join("central"), tmp.path().join("ship1"));
    let mut c = core_node(&cdir, "central", "ship1");
    let mut s = core_node(&sdir, "ship1", "central");
    let ship = Name::new("ship1").unwrap();
    let keep = Retention {
        max_age_ms: 60_000,
        max_rows: 1000,
    };
    let every = keep.max_age_ms / 4;
    let mut now: u64 = 1_763_800_000_000;
    converse(&mut c, &mut s, &mut now);
    let round = 500u64;
    let report_every = 50_000u64;
    let started = Instant::now();
    let mut next_prune = now + every;
    let mut pruned = (Pruned::default(), Pruned::default());
    let mut first_pass: Option<u64> = None;
    let mut timing = (Duration::ZERO, Duration::ZERO, 0u32);
    println!(
        "core: {commands} exec commands central -> ship1 (library core, durability normal), retention 1m / 1000 rows, 10 ms of simulated time per command"
    );
    println!(
        "{:>9} {:>8} {:>11} {:>9} {:>11} {:>9} {:>17} {:>17}",
        "commands",
        "elapsed",
        "ship1.db",
        "-wal",
        "central.db",
        "-wal",
        "ship1 pages u/f",
        "central pages u/f"
    );
    let mut done = 0u64;
    while done < commands {
        let k = round.min(commands - done);
        c.begin_batch().unwrap();
        for _ in 0..k {
            let cmd = Outgoing {
                to: ship.clone(),
                lane: frame::default_lane(),
                ttl_s: None,
                body: Body::Command(Command::Exec(Exec {
                    argv: vec!["true".into()],
                    timeout_ms: 60_000,
                    ..Exec::default()
                })),
            };
            c.submit_job(Method::Exec, "true", vec![cmd], now).unwrap();
            now += 10;
        }
        c.end_batch().unwrap();
        converse(&mut c, &mut s, &mut now);
        done += k;
        if now >= next_prune {
            pruned.0.add(&prune_pass(&mut c, &keep, now, &mut timing));
            pruned.1.add(&prune_pass(&mut s, &keep, now, &mut timing));
            if first_pass.is_none() && pruned.0.jobs > 0 {
                first_pass = Some(done);
            }
            next_prune = now + every;
        }
        if done.is_multiple_of(report_every)
            || [1_000, 2_000, 5_000, 10_000].contains(&done)
            || done == commands
        {
            let (sd, sw) = sizes(&sdir);
            let (cd, cw) = sizes(&cdir);
            let (su, sf) = s.store().pages().unwrap();
            let (cu, cf) = c.store().pages().unwrap();
            println!(
                "{done:>9} {:>7.0}s {:>11} {:>9} {:>11} {:>9} {:>17} {:>17}",
                started.elapsed().as_secs_f64(),
                kib(sd),
                kib(sw),
                kib(cd),
                kib(cw),
                format!("{su}/{sf}"),
                format!("{cu}/{cf}")
            );
        }
    }
    let last = c.store().jobs(1).unwrap();
    assert_eq!(last.len(), 1);
    assert!(last[0].done(), "the last command has its result");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "core: {commands} commands in {secs:.0} s ({:.0} commands/s); first pass that pruned jobs after {} commands",
        commands as f64 / secs,
        first_pass.unwrap_or(0)
    );
    println!(
        "core: pruned at central: {} jobs, {} results, {} journal rows; at ship1: {} journal rows; {} batches, mean {:.1} ms, slowest {:.1} ms",
        pruned.0.jobs,
        pruned.0.results,
        pruned.0.journal,
        pruned.1.journal,
        timing.2,
        timing.1.as_secs_f64() * 1000.0 / f64::from(timing.2.max(1)),
        timing.0.as_secs_f64() * 1000.0
    );
}

fn real(commands: u64) {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "exec");
    let broker = Broker::start();
    let flags = [
        "--retention",
        "1m",
        "--retention-jobs",
        "1000",
        "--durability",
        "normal",
    ];
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &flags);
    let ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &flags);
    support::wait_until("central sees ship1", Duration::from_secs(30), || {
        central.sees_online("ship1")
    });
    println!(
        "real: {commands} `exec true` through the real binaries and mosquitto, --retention 1m --retention-jobs 1000 --durability normal"
    );
    println!(
        "{:>9} {:>8} {:>11} {:>9} {:>11} {:>9} {:>12} {:>12}",
        "commands",
        "elapsed",
        "ship1.db",
        "-wal",
        "central.db",
        "-wal",
        "jobs pruned",
        "ship1 pruned"
    );
    let started = Instant::now();
    let window = 1000u64;
    let mut done = 0u64;
    while done < commands {
        let k = window.min(commands - done);
        let mut last = 0;
        for _ in 0..k {
            let req = Request::Send {
                to: "ship1".into(),
                lane: None,
                ttl_s: None,
                key: None,
                output: None,
                where_: vec![],
                online: false,
                command: CommandSpec::Exec {
                    argv: vec!["true".into()],
                    env: vec![],
                    cwd: None,
                    stdin: String::new(),
                    timeout_ms: Some(60_000),
                    rerun: false,
                },
            };
            last = central.call(&req)["job"].as_i64().expect("a job id");
        }
        // Ordered: when the last of the window has its result, all have.
        support::wait_until("the window's results", Duration::from_secs(600), || {
            let r = central.call(&Request::Wait {
                id: last,
                seen: 0,
                timeout_ms: 10_000,
            });
            r["job"]["targets"][0]["result"].is_object()
        });
        done += k;
        if done.is_multiple_of(2000) || done == commands {
            let (sd, sw) = sizes(&ship.dir);
            let (cd, cw) = sizes(&central.dir);
            let cs = central.status();
            let ss = ship.status();
            println!(
                "{done:>9} {:>7.0}s {:>11} {:>9} {:>11} {:>9} {:>12} {:>12}",
                started.elapsed().as_secs_f64(),
                kib(sd),
                kib(sw),
                kib(cd),
                kib(cw),
                cs["store"]["retention"]["since_start"]["jobs"],
                ss["store"]["retention"]["since_start"]["journal"]
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "real: {commands} commands in {secs:.0} s ({:.0} commands/s)",
        commands as f64 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let commands = args
        .iter()
        .position(|a| a == "--commands")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok());
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "core" | "real"))
        .collect();
    let all = wanted.is_empty();
    if all || wanted.contains(&"core") {
        core(commands.unwrap_or(1_000_000));
    }
    if all || wanted.contains(&"real") {
        real(commands.unwrap_or(20_000));
    }
}
