//! Deterministic simulation of the store-and-forward core.
//!
//! Three nodes, each a real [`Node`] (real SQLite store in a temporary directory,
//! real delivery state machine, real keys and sealed payloads), connected by a
//! simulated network that drops, duplicates, reorders, delays and disconnects, with
//! nodes restarted at random points (store closed and reopened, all in-memory state
//! gone), and now and then a store deleted or put back to an earlier copy of
//! itself (a lost `store.db`, a lost or damaged `-wal`). Everything is driven by one
//! seeded PRNG and a virtual clock, so a seed reproduces a run exactly.
//!
//! What must hold: no command ever runs twice; on each stream commands run in the
//! order they were sent; every command its sender still knows about ends with
//! exactly one result, `ok` with its output, or `interrupted` (a store was lost
//! around it); and on streams whose ends never lost their store, every command
//! ran exactly once and came back `ok`.
//!
//! Files too: central pushes a file to n1 and n2 fetches one from central's share
//! directory, in 1 KiB chunks through the same faults; where neither end lost its
//! store, both arrive whole. Long commands announce themselves with `Started`.
//!
//! `OUTPOST_SIM_SEEDS=N` runs N seeds (default 1000); `OUTPOST_SIM_SEED=S` runs one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost::delivery::DeliveryConfig;
use outpost::frame::{Body, CmdResult, Command, Exec, Lane, Name, Status};
use outpost::node::{FilesConfig, Node, NodeConfig, Notice};
use outpost::session::RefusalKind;
use outpost::store::{Durability, Inbound, Mono, Outgoing, StoreConfig};
use outpost::trust::Keys;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::support::Rng;

struct Msg {
    from: usize,
    to: usize,
    at: u64,
    bytes: Vec<u8>,
}

struct SimNode {
    name: Name,
    db: PathBuf,
    node: Option<Node>,
    link_up: bool,
    /// Commands "running" in this process: finish time. Lost on restart.
    running: Vec<(Inbound, u64)>,
    /// A copy of the store's files from an earlier restart, to put back later.
    snapshot: Option<PathBuf>,
    /// This node's store was deleted or put back at some point.
    lost: bool,
}

/// A command the test submitted: who sent it where, its job there, and its word.
#[derive(Debug, Clone)]
struct Sent {
    from: usize,
    to: usize,
    lane: Lane,
    job: i64,
    word: String,
    /// The sender's store no longer has the job (it was lost with the store).
    forgotten: bool,
    /// When the sender cancels it, if it does; whether a running one is stopped.
    cancel_at: Option<(u64, bool)>,
    cancelled: bool,
}

fn cfg(files: FilesConfig) -> NodeConfig {
    NodeConfig {
        files,
        store: StoreConfig {
            durability: Durability::Normal,
            quota_bytes: u64::MAX,
        },
        delivery: DeliveryConfig {
            window: 6,
            bulk_window: 3,
            ack_every: 4,
            ack_delay_ms: 20,
            rto_min_ms: 300,
            rto_max_ms: 3_000,
            online_grace_ms: 200,
            // Holds come and go often: results of queued commands wait for company.
            hold_ms: 30,
            hold_max: 4,
            offline_probe_ms: 1_000,
            asleep_grace_ms: 1_000,
        },
        // Small payloads so batching splits often.
        max_payload: 700,
        parallel: 3,
        compress: true,
    }
}

const NAMES: [&str; 3] = ["central", "n1", "n2"];

fn secret(i: usize) -> StaticSecret {
    StaticSecret::from([i as u8 + 1; 32])
}

fn open(i: usize, n: &SimNode, now: u64) -> Result<Node, String> {
    let keys = Keys {
        secret: secret(i),
        public: PublicKey::from(&secret(i)),
    };
    let dir = n.db.parent().unwrap();
    let files = FilesConfig {
        dir: dir.join(format!("{}-files", n.name)),
        share_dirs: vec![dir.join(format!("{}-share", n.name))],
        chunk_size: 1024,
    };
    let mut node = Node::open(&n.db, &n.name, cfg(files), keys, now)
        .map_err(|e| format!("open {}: {e}", n.name))?;
    let trust = (0..NAMES.len())
        .filter(|&j| j != i)
        .map(|j| {
            (
                Name::new(NAMES[j]).unwrap(),
                *PublicKey::from(&secret(j)).as_bytes(),
            )
        })
        .collect();
    node.set_trust(trust, now);
    node.set_files_peers(NAMES.iter().map(|n| Name::new(n).unwrap()).collect());
    Ok(node)
}

/// The store's files: the database, its WAL and shared memory (not the marker,
/// which stays to notice the loss).
fn store_files(db: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|ext| PathBuf::from(format!("{}{ext}", db.display())))
        .collect()
}

fn word_of(inbound: &Inbound) -> String {
    match &inbound.env.body {
        Body::Command(Command::Exec(e)) => e.argv[1].clone(),
        other => panic!("not an exec: {other:?}"),
    }
}

/// `OUTPOST_SIM_TRACE=1` prints what a seed does (use with `OUTPOST_SIM_SEED`).
fn tracing() -> bool {
    std::env::var_os("OUTPOST_SIM_TRACE").is_some()
}

macro_rules! trace {
    ($($t:tt)*) => { if tracing() { eprintln!($($t)*); } }
}

fn run_seed(seed: u64, base: &Path) -> Result<(), String> {
    let mut rng = Rng(seed);
    let dir = base.join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let names = NAMES;
    let mut nodes: Vec<SimNode> = names
        .iter()
        .map(|s| SimNode {
            name: Name::new(s).unwrap(),
            db: dir.join(format!("{s}.db")),
            node: None,
            link_up: true,
            running: Vec::new(),
            snapshot: None,
            lost: false,
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        let mut node = open(i, n, 0)?;
        node.on_connected(0);
        n.node = Some(node);
    }
    let lanes = [
        Lane::new("ordered").unwrap(),
        Lane::new("parallel").unwrap(),
        Lane::new("deploy").unwrap(),
    ];

    // Workload: mostly central -> nodes, some node -> central and node -> node.
    let n_cmds = 12 + rng.below(12);
    let mut plan: Vec<(u64, usize, usize, Lane)> = (0..n_cmds)
        .map(|_| {
            let at = rng.below(3_000);
            let (from, to) = match rng.below(6) {
                0 => (1, 0),
                1 => (1, 2),
                2 => (0, 2),
                _ => (0, 1),
            };
            (at, from, to, lanes[rng.below(3) as usize].clone())
        })
        .collect();
    plan.sort_by_key(|p| p.0);
    let mut plan = plan.into_iter().peekable();

    // Files: central pushes one to n1; n2 fetches one from central's share.
    let file_at = (rng.below(3_000), rng.below(3_000));
    let pushed: Vec<u8> = (0..2_000 + rng.below(6_000))
        .map(|_| rng.next() as u8)
        .collect();
    let shared: Vec<u8> = (0..2_000 + rng.below(6_000))
        .map(|_| rng.next() as u8)
        .collect();
    let share = dir.join("central-share");
    std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("pushed.bin"), &pushed).map_err(|e| e.to_string())?;
    std::fs::write(share.join("shared.bin"), &shared).map_err(|e| e.to_string())?;
    let mut files_sent = (false, false);

    let mut sent: Vec<Sent> = Vec::new();
    let mut exec_log: Vec<(usize, Name, Lane, u64, String)> = Vec::new();
    let mut net: Vec<Msg> = Vec::new();
    let fault_until = 4_000;
    let deadline = 200_000;
    let mut now = 0u64;

    loop {
        now += 1 + rng.below(15);
        let faults = now < fault_until;

        // Submit what the plan says is due.
        while plan.peek().is_some_and(|p| p.0 <= now) {
            let (_, from, to, lane) = plan.next().unwrap();
            let word = format!("w{}", sent.len());
            let item = Outgoing {
                to: nodes[to].name.clone(),
                lane: lane.clone(),
                ttl_s: None,
                body: Body::Command(Command::Exec(Exec {
                    argv: vec!["sim".into(), word.clone()],
                    ..Exec::default()
                })),
            };
            let node = nodes[from]
                .node
                .as_mut()
                .expect("nodes are always open between steps");
            let (job, _) = node
                .submit_job(outpost::frame::Method::Exec, &word, vec![item], now)
                .map_err(|e| e.to_string())?;
            trace!(
                "t={now} {} sends {word} to {} on {lane} (job {job})",
                names[from],
                names[to]
            );
            let cancel_at = rng
                .chance(250)
                .then(|| (now + rng.below(90), rng.chance(800)));
            sent.push(Sent {
                from,
                to,
                lane,
                job,
                word,
                forgotten: false,
                cancel_at,
                cancelled: false,
            });
        }

        // Cancel what the plan says is due: wherever the command is by now.
        for s in &mut sent {
            let Some((at, stop)) = s.cancel_at else {
                continue;
            };
            if s.cancelled || s.forgotten || at > now {
                continue;
            }
            s.cancelled = true;
            let to = nodes[s.to].name.clone();
            let node = nodes[s.from].node.as_mut().unwrap();
            let outcome = node
                .cancel(s.job, &to, stop, "sim", now)
                .map_err(|e| e.to_string())?;
            trace!(
                "t={now} {} cancels {} (stop {stop}): {outcome:?}",
                names[s.from],
                s.word
            );
        }

        if !files_sent.0 && now >= file_at.0 {
            files_sent.0 = true;
            let n1 = nodes[1].name.clone();
            let central = nodes[0].node.as_mut().unwrap();
            let t = central.offer(&n1, &dir.join("pushed.bin"), "pushed.bin", None, now)?;
            trace!("t={now} central offers pushed.bin to n1: transfer {t}");
        }
        if !files_sent.1 && now >= file_at.1 {
            files_sent.1 = true;
            let central = nodes[0].name.clone();
            let n2 = nodes[2].node.as_mut().unwrap();
            n2.request_file(
                &central,
                share.join("shared.bin").display().to_string(),
                now,
            )?;
        }

        // Faults: links flap, nodes restart.
        if faults && rng.chance(8) {
            let i = rng.below(3) as usize;
            let links: Vec<bool> = nodes.iter().map(|n| n.link_up).collect();
            let up = !nodes[i].link_up;
            nodes[i].link_up = up;
            let name = nodes[i].name.clone();
            let node = nodes[i].node.as_mut().unwrap();
            if up {
                node.on_connected(now);
                // Subscribing delivers every peer's retained presence.
                for (j, other) in names.iter().enumerate() {
                    if j != i {
                        node.on_presence(Name::new(other).unwrap(), links[j], now)
                            .map_err(|e| e.to_string())?;
                    }
                }
            } else {
                node.on_disconnected(now);
            }
            // Presence (retained online / last will offline) reaches the others,
            // unless their own link is down.
            for (j, other) in nodes.iter_mut().enumerate() {
                if j != i && other.link_up {
                    other
                        .node
                        .as_mut()
                        .unwrap()
                        .on_presence(name.clone(), up, now)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        if faults && rng.chance(4) {
            let i = rng.below(3) as usize;
            nodes[i].node = None;
            nodes[i].running.clear();
            let files = store_files(&nodes[i].db);
            // Deleted: the loss must be noticed. Put back: noticed when the copy is
            // older than the store (not if nothing was committed since it).
            let (mut lost_now, mut restored) = (false, false);
            match rng.below(8) {
                // The store is lost: store.db and its WAL deleted.
                0 => {
                    for f in &files {
                        let _ = std::fs::remove_file(f);
                    }
                    lost_now = true;
                    trace!("t={now} {} store deleted", names[i]);
                }
                // The store goes back to an earlier copy of itself.
                1 | 2 if nodes[i].snapshot.is_some() => {
                    let snap = nodes[i].snapshot.take().unwrap();
                    for (k, f) in files.iter().enumerate() {
                        let from = snap.join(k.to_string());
                        let _ = std::fs::remove_file(f);
                        if from.exists() {
                            std::fs::copy(&from, f).map_err(|e| e.to_string())?;
                        }
                    }
                    restored = true;
                    trace!("t={now} {} store put back to its snapshot", names[i]);
                }
                3 | 4 => {
                    let snap = dir.join(format!("snap-{i}"));
                    let _ = std::fs::remove_dir_all(&snap);
                    std::fs::create_dir_all(&snap).map_err(|e| e.to_string())?;
                    for (k, f) in files.iter().enumerate() {
                        if f.exists() {
                            std::fs::copy(f, snap.join(k.to_string()))
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    nodes[i].snapshot = Some(snap);
                    trace!("t={now} {} snapshot taken", names[i]);
                }
                _ => {}
            }
            trace!("t={now} {} restarts", names[i]);
            let mut node = open(i, &nodes[i], now)?;
            if lost_now && node.loss().is_none() {
                return Err(format!("{}: a lost store was not noticed", nodes[i].name));
            }
            nodes[i].lost |= lost_now || (restored && node.loss().is_some());
            // Jobs its store no longer has were lost with it.
            for s in sent.iter_mut().filter(|s| s.from == i && !s.forgotten) {
                let job = node.store().job(s.job).map_err(|e| e.to_string())?;
                if job.is_none_or(|j| j.summary != s.word) {
                    s.forgotten = true;
                }
            }
            if nodes[i].link_up {
                node.on_connected(now);
                for (j, other) in names.iter().enumerate() {
                    if j != i {
                        node.on_presence(Name::new(other).unwrap(), nodes[j].link_up, now)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            nodes[i].node = Some(node);
        }

        // The monotonic clock is the virtual one too.
        for n in &mut nodes {
            n.node.as_mut().unwrap().tick(Mono { ms: now, boot: 1 });
        }

        // Send what each connected node wants to send, through a lossy network.
        for (i, n) in nodes.iter_mut().enumerate() {
            if !n.link_up {
                continue;
            }
            let node = n.node.as_mut().unwrap();
            let (payloads, corrupt) = node.poll_out(now).map_err(|e| e.to_string())?;
            if !corrupt.is_empty() {
                return Err(format!("unexpected corruption: {corrupt:?}"));
            }
            for p in payloads {
                let to = names.iter().position(|n| *n == p.to.as_str()).unwrap();
                if faults && rng.chance(100) {
                    continue; // dropped
                }
                let copies = if faults && rng.chance(50) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = 1 + rng.below(if faults { 120 } else { 20 });
                    net.push(Msg {
                        from: i,
                        to,
                        at: now + delay,
                        bytes: p.bytes.clone(),
                    });
                }
            }
        }

        // Deliver what has arrived; a receiver whose link is down loses it.
        let mut due = Vec::new();
        let mut i = 0;
        while i < net.len() {
            if net[i].at <= now {
                due.push(net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.to));
        let any_lost = nodes.iter().any(|n| n.lost);
        for m in due {
            let n = &mut nodes[m.to];
            if !n.link_up {
                continue;
            }
            let report = n
                .node
                .as_mut()
                .unwrap()
                .on_payload(&m.bytes, now)
                .map_err(|e| e.to_string())?;
            if let Some(r) = &report.refused {
                trace!("t={now} {} refused from {}: {r}", n.name, names[m.from]);
            }
            if report.new_epoch.is_some() || report.synced.is_some() {
                trace!(
                    "t={now} {} from {}: new epoch {:?}, synced {:?}",
                    n.name,
                    names[m.from],
                    report.new_epoch,
                    report.synced
                );
            }
            if !report.rejected.is_empty() || report.malformed.is_some() {
                return Err(format!(
                    "{} rejected frames from {}: {:?} {:?}",
                    n.name, names[m.from], report.rejected, report.malformed
                ));
            }
            // Duplicated payloads are replays; payloads sealed for a store that was
            // replaced since no longer open. Nothing else may be refused.
            if let Some(r) = &report.refused {
                let expected = matches!(
                    r.kind(),
                    RefusalKind::Replay
                        | RefusalKind::Unconfirmed
                        | RefusalKind::StaleEpoch
                        | RefusalKind::Retired
                        | RefusalKind::UnknownEpoch
                );
                // A four-bit epoch hint matches a replaced store one time in fifteen.
                let collided = r.kind() == RefusalKind::BadSeal && any_lost;
                if !expected && !collided {
                    return Err(format!(
                        "{} refused a payload from {}: {r}",
                        n.name, names[m.from]
                    ));
                }
            }
        }

        // Executors: take what is runnable, finish what is due.
        let any_lost = nodes.iter().any(|n| n.lost);
        for (i, n) in nodes.iter_mut().enumerate() {
            let node = n.node.as_mut().unwrap();
            loop {
                let ready = node.take_ready(now).map_err(|e| e.to_string())?;
                if !ready.corrupt.is_empty() {
                    return Err(format!("unexpected corruption: {:?}", ready.corrupt));
                }
                for (level, text) in node.notices() {
                    trace!("t={now} {} notice {level:?}: {text}", n.name);
                    // A store that went back may report again what it reported
                    // before it lost that; the first result stands.
                    if text.starts_with("second result") && !any_lost {
                        return Err(format!("{}: {text}", n.name));
                    }
                    if level == Notice::Error && !any_lost {
                        return Err(format!("{}: {text}", n.name));
                    }
                }
                for c in ready.cancels {
                    // As the agent does: the process is killed and reports cancelled.
                    let Some(k) = n.running.iter().position(|(r, _)| {
                        r.env.from == c.peer && r.env.lane == c.lane && r.env.seq == c.seq
                    }) else {
                        continue;
                    };
                    let (inbound, _) = n.running.swap_remove(k);
                    trace!(
                        "t={now} {} stops {}#{} from {}",
                        n.name,
                        c.lane,
                        c.seq,
                        c.peer
                    );
                    let result = CmdResult::without_run(
                        c.seq,
                        Status::Cancelled,
                        "cancelled while it ran",
                        now,
                    );
                    node.finish(&inbound, result, now)
                        .map_err(|e| e.to_string())?;
                }
                for inbound in ready.commands {
                    if n.running.iter().any(|(r, _)| r.env == inbound.env) {
                        continue;
                    }
                    node.start(&inbound, now).map_err(|e| e.to_string())?;
                    let e = &inbound.env;
                    trace!(
                        "t={now} {} runs {}#{} from {}: {}",
                        n.name,
                        e.lane,
                        e.seq,
                        e.from,
                        word_of(&inbound)
                    );
                    exec_log.push((i, e.from.clone(), e.lane.clone(), e.seq, word_of(&inbound)));
                    let due = now
                        + if rng.chance(250) {
                            rng.below(400)
                        } else {
                            rng.below(60)
                        };
                    if due > now + 30 {
                        // A long one tells its sender it runs, as the agent does.
                        node.announce_started(&e.from, &e.lane, e.seq, now)
                            .map_err(|e| e.to_string())?;
                    }
                    n.running.push((inbound, due));
                }
                if ready.taken == 0 {
                    break;
                }
            }
            node.pump_files(now).map_err(|e| e.to_string())?;
            for (level, text) in node.notices() {
                trace!("t={now} {} notice {level:?}: {text}", n.name);
                if level == Notice::Error && !any_lost {
                    return Err(format!("{}: {text}", n.name));
                }
            }
            let mut k = 0;
            while k < n.running.len() {
                if n.running[k].1 <= now {
                    let (inbound, _) = n.running.swap_remove(k);
                    let mut result = CmdResult::without_run(inbound.env.seq, Status::Ok, "", now);
                    result.stdout = word_of(&inbound).into_bytes();
                    node.finish(&inbound, result, now)
                        .map_err(|e| e.to_string())?;
                } else {
                    k += 1;
                }
            }
        }

        // After the faults stop: heal every link and wait until everything settled.
        if !faults {
            for i in 0..nodes.len() {
                if !nodes[i].link_up {
                    nodes[i].link_up = true;
                    nodes[i].node.as_mut().unwrap().on_connected(now);
                    let name = nodes[i].name.clone();
                    for (j, other) in nodes.iter_mut().enumerate() {
                        if j != i {
                            other
                                .node
                                .as_mut()
                                .unwrap()
                                .on_presence(name.clone(), true, now)
                                .map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
            if plan.peek().is_none() && net.is_empty() && settled(&nodes)? {
                break;
            }
        }
        if now > deadline {
            return Err(format!(
                "did not settle by t={deadline}: {}",
                describe(&nodes)?
            ));
        }
    }

    check(&nodes, &sent, &exec_log)?;
    check_files(&nodes, &pushed, &shared)?;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Empty outboxes mean every frame was acknowledged, i.e. stored by its receiver;
/// empty inboxes mean every stored frame was consumed. Together: all done.
fn settled(nodes: &[SimNode]) -> Result<bool, String> {
    for n in nodes {
        let c = n
            .node
            .as_ref()
            .unwrap()
            .store()
            .counts()
            .map_err(|e| e.to_string())?;
        if c.outbox > 0 || c.inbox > 0 || c.running > 0 || !n.running.is_empty() {
            return Ok(false);
        }
        // Chunks are queued a few at a time: an empty outbox is not a finished
        // transfer. Where a store was lost, a transfer may never finish (see
        // `check_files`), so only the strict case waits for them.
        let strict = !nodes.iter().any(|n| n.lost);
        let store = n.node.as_ref().unwrap().store();
        let open = store.transfers(100).map_err(|e| e.to_string())?;
        if strict && open.iter().any(|t| !t.finished()) {
            return Ok(false);
        }
        // A store that is still announcing itself (after a loss, with nothing to
        // send) has not been heard yet: its peers may believe in work it lost.
        if n.node.as_ref().unwrap().is_handshaking() {
            return Ok(false);
        }
        // A store met but not yet synchronised with may still owe results.
        if n.node
            .as_ref()
            .unwrap()
            .sessions()
            .iter()
            .any(|(_, synced)| !synced)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

fn describe(nodes: &[SimNode]) -> Result<String, String> {
    let mut out = String::new();
    for n in nodes {
        let node = n.node.as_ref().unwrap();
        let c = node.store().counts().map_err(|e| e.to_string())?;
        out += &format!(
            "\n  {}: {c:?} link_up={} backlog={:?} synced={:?}",
            n.name,
            n.link_up,
            node.backlog(),
            NAMES
                .iter()
                .filter(|p| node.synced(&Name::new(p).unwrap()))
                .collect::<Vec<_>>(),
        );
        let rows = |sql: &str| -> Vec<String> {
            let mut stmt = node.store().raw().prepare(sql).unwrap();
            stmt.query_map([], |r| {
                Ok(format!(
                    "{}/{}#{}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?
                ))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        out += &format!(
            "\n    outbox {:?}\n    inbox {:?}\n    out_streams(acked) {:?}\n    in_streams(wm) {:?}\n    journal {:?}\n    results {:?}",
            rows("SELECT peer, lane, seq FROM outbox"),
            rows("SELECT peer, lane, seq FROM inbox"),
            rows("SELECT peer, lane, acked FROM out_streams"),
            rows("SELECT peer, lane, watermark FROM in_streams"),
            rows("SELECT peer, lane || ':' || status, seq FROM journal"),
            rows("SELECT peer, lane, seq FROM results"),
        );
    }
    Ok(out)
}

/// Cancelled commands over every seed, by where they were caught (words of the
/// result's reason): each place must be reached, or the simulation does not
/// test it.
static CAUGHT: [(&str, AtomicUsize); 5] = [
    ("outbox", AtomicUsize::new(0)),
    ("in flight", AtomicUsize::new(0)),
    ("inbox", AtomicUsize::new(0)),
    ("while it ran", AtomicUsize::new(0)),
    ("", AtomicUsize::new(0)),
];

fn check(
    nodes: &[SimNode],
    sent: &[Sent],
    exec_log: &[(usize, Name, Lane, u64, String)],
) -> Result<(), String> {
    // No command ever ran twice.
    let mut ran: BTreeSet<&str> = BTreeSet::new();
    for (_, _, _, _, word) in exec_log {
        if !ran.insert(word) {
            return Err(format!("{word} executed twice"));
        }
    }
    // On each stream, commands ran in the order they were sent (a subsequence of
    // it when stores were lost; all of it otherwise).
    let mut order: BTreeMap<(usize, Name, Lane), Vec<&str>> = BTreeMap::new();
    for (i, from, lane, _, word) in exec_log {
        order
            .entry((*i, from.clone(), lane.clone()))
            .or_default()
            .push(word);
    }
    for ((i, from, lane), words) in &order {
        let expected: Vec<&str> = sent
            .iter()
            .filter(|s| s.to == *i && nodes[s.from].name == *from && s.lane == *lane)
            .map(|s| s.word.as_str())
            .collect();
        let mut at = 0;
        for w in words {
            match expected[at..].iter().position(|e| e == w) {
                Some(k) => at += k + 1,
                None => {
                    return Err(format!(
                        "{} ran {from}/{lane} out of order: {words:?} (sent {expected:?})",
                        nodes[*i].name
                    ))
                }
            }
        }
    }
    // Every command its sender still knows ends with one result: ok with its
    // output (then it ran), or interrupted; on streams whose two ends never lost
    // their store, ok and ran.
    for s in sent {
        let strict = !nodes[s.from].lost && !nodes[s.to].lost;
        if s.forgotten {
            continue;
        }
        let store = nodes[s.from].node.as_ref().unwrap().store();
        let job = store
            .job(s.job)
            .map_err(|e| e.to_string())?
            .filter(|j| j.summary == s.word)
            .ok_or_else(|| format!("{}: job of {} is gone", nodes[s.from].name, s.word))?;
        let t = &job.targets[0];
        let r = t.result.as_ref().ok_or_else(|| {
            format!(
                "{} ({} -> {} {}#{}) has no result: {}{}",
                s.word,
                nodes[s.from].name,
                nodes[s.to].name,
                s.lane,
                t.seq,
                t.state,
                describe(nodes).unwrap_or_default()
            )
        })?;
        let ran_it = ran.contains(s.word.as_str());
        if s.cancelled {
            trace!("final {}: {:?} {:?}", s.word, r.status, r.reason);
        }
        let ok = match r.status {
            Status::Ok => r.stdout == s.word.as_bytes() && ran_it,
            // Stopped while it ran, or caught before it started: then it never ran.
            Status::Cancelled if s.cancelled => {
                let place = CAUGHT
                    .iter()
                    .position(|(words, _)| r.reason.contains(words))
                    .unwrap_or(CAUGHT.len() - 1);
                CAUGHT[place].1.fetch_add(1, Ordering::Relaxed);
                r.reason.contains("while it ran") == ran_it
            }
            // A restart interrupts what runs; only a lost store may lose more.
            Status::Interrupted => !strict || !r.reason.contains("store"),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "{}: bad result for {} ({} -> {}, strict {strict}): {r:?}",
                nodes[s.from].name, s.word, nodes[s.from].name, nodes[s.to].name
            ));
        }
    }
    for n in nodes {
        let store = n.node.as_ref().unwrap().store();
        store.integrity_check().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Where no store was lost, both files arrived whole and both transfers say so.
fn check_files(nodes: &[SimNode], pushed: &[u8], shared: &[u8]) -> Result<(), String> {
    if nodes.iter().any(|n| n.lost) {
        return Ok(());
    }
    let dir = nodes[0].db.parent().unwrap();
    for (who, path, want) in [
        ("n1", dir.join("n1-files/central/pushed.bin"), pushed),
        ("n2", dir.join("n2-files/central/shared.bin"), shared),
    ] {
        let got = std::fs::read(&path).map_err(|e| {
            let states: Vec<String> = nodes
                .iter()
                .flat_map(|n| {
                    let ts = n
                        .node
                        .as_ref()
                        .unwrap()
                        .store()
                        .transfers(100)
                        .unwrap_or_default();
                    ts.into_iter()
                        .map(|t| {
                            format!(
                                "{}: {} {} {} {}",
                                n.name, t.direction, t.file_id, t.state, t.reason
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            format!("{who}: {}: {e}; transfers {states:?}", path.display())
        })?;
        if got != want {
            return Err(format!(
                "{who}: {} differs from what was sent",
                path.display()
            ));
        }
    }
    for n in nodes {
        for t in n
            .node
            .as_ref()
            .unwrap()
            .store()
            .transfers(100)
            .map_err(|e| e.to_string())?
        {
            if t.state != "done" {
                return Err(format!(
                    "{}: transfer {} of {} is {} ({})",
                    n.name, t.id, t.file_id, t.state, t.reason
                ));
            }
        }
    }
    Ok(())
}

fn sim_dir() -> PathBuf {
    // tmpfs when there is one: the simulation is about logic, not the disk.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("outpost-sim-{}", std::process::id()))
}

#[test]
fn simulated_faults_never_lose_duplicate_or_reorder_commands_and_results() {
    let base = sim_dir();
    let seeds: Vec<u64> = match std::env::var("OUTPOST_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("OUTPOST_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("OUTPOST_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            (1..=n).collect()
        }
    };
    let threads = std::thread::available_parallelism()
        .map(std::num::NonZero::get)
        .unwrap_or(1)
        .min(4);
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let base = &base;
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|&seed| {
                            run_seed(seed, base)
                                .err()
                                .map(|e| format!("seed {seed}: {e}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let _ = std::fs::remove_dir_all(&base);
    let caught: Vec<(&str, usize)> = CAUGHT
        .iter()
        .map(|(w, n)| (*w, n.load(Ordering::Relaxed)))
        .collect();
    eprintln!("cancels caught, by place: {caught:?}");
    if seeds.len() >= 500 {
        for (place, n) in &caught[..4] {
            assert!(*n > 0, "no cancel was caught {place:?}: {caught:?}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed (rerun one with OUTPOST_SIM_SEED=N):\n{}",
        failures.len(),
        seeds.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
