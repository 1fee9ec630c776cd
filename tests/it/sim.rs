//! Deterministic simulation of the store-and-forward core.
//!
//! Three nodes, each a real [`Node`] (real SQLite store in a temporary directory,
//! real delivery state machine), connected by a simulated network that drops,
//! duplicates, reorders, delays and disconnects, with nodes restarted at random
//! points (store closed and reopened, all in-memory state gone). Everything is driven
//! by one seeded PRNG and a virtual clock, so a seed reproduces a run exactly.
//!
//! `OUTPOST_SIM_SEEDS=N` runs N seeds (default 1000); `OUTPOST_SIM_SEED=S` runs one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use outpost::delivery::DeliveryConfig;
use outpost::frame::{Body, CmdResult, Command, Exec, Lane, LaneClass, Name, Status};
use outpost::node::{Node, NodeConfig};
use outpost::store::{Durability, Inbound, Outgoing, StoreConfig};

/// splitmix64: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

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
}

/// A command the test submitted: who sent it where, and its unique word.
#[derive(Debug, Clone)]
struct Sent {
    from: usize,
    to: usize,
    lane: Lane,
    seq: u64,
    word: String,
}

fn cfg() -> NodeConfig {
    NodeConfig {
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
        },
        // Small payloads so batching splits often.
        max_payload: 700,
        parallel: 3,
    }
}

fn open(n: &SimNode, now: u64) -> Result<Node, String> {
    Node::open(&n.db, &n.name, cfg(), now).map_err(|e| format!("open {}: {e}", n.name))
}

fn word_of(inbound: &Inbound) -> String {
    match &inbound.env.body {
        Body::Command(Command::Exec(e)) => e.argv[1].clone(),
        other => panic!("not an exec: {other:?}"),
    }
}

fn run_seed(seed: u64, base: &Path) -> Result<(), String> {
    let mut rng = Rng(seed);
    let dir = base.join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let names = ["central", "n1", "n2"];
    let mut nodes: Vec<SimNode> = names
        .iter()
        .map(|s| SimNode {
            name: Name::new(s).unwrap(),
            db: dir.join(format!("{s}.db")),
            node: None,
            link_up: true,
            running: Vec::new(),
        })
        .collect();
    for n in nodes.iter_mut() {
        let mut node = open(n, 0)?;
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
            let q = node.submit(vec![item], now).map_err(|e| e.to_string())?;
            sent.push(Sent {
                from,
                to,
                lane,
                seq: q[0].seq,
                word,
            });
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
                        node.on_presence(Name::new(other).unwrap(), links[j], now);
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
                        .on_presence(name.clone(), up, now);
                }
            }
        }
        if faults && rng.chance(4) {
            let i = rng.below(3) as usize;
            nodes[i].node = None;
            nodes[i].running.clear();
            let mut node = open(&nodes[i], now)?;
            if nodes[i].link_up {
                node.on_connected(now);
                for (j, other) in names.iter().enumerate() {
                    if j != i {
                        node.on_presence(Name::new(other).unwrap(), nodes[j].link_up, now);
                    }
                }
            }
            nodes[i].node = Some(node);
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
        for m in due {
            let n = &mut nodes[m.to];
            if !n.link_up {
                continue;
            }
            let report = n
                .node
                .as_mut()
                .unwrap()
                .on_payload(&Name::new(names[m.from]).unwrap(), &m.bytes, now)
                .map_err(|e| e.to_string())?;
            if !report.rejected.is_empty() {
                return Err(format!("{} rejected frames: {:?}", n.name, report.rejected));
            }
        }

        // Executors: take what is runnable, finish what is due.
        for (i, n) in nodes.iter_mut().enumerate() {
            let node = n.node.as_mut().unwrap();
            loop {
                let (ready, corrupt) = node.runnable(now).map_err(|e| e.to_string())?;
                if !corrupt.is_empty() {
                    return Err(format!("unexpected corruption: {corrupt:?}"));
                }
                let mut progressed = false;
                for inbound in ready {
                    match &inbound.env.body {
                        Body::Command(_) => {
                            if n.running.iter().any(|(r, _)| r.env == inbound.env) {
                                continue;
                            }
                            node.start(&inbound, now).map_err(|e| e.to_string())?;
                            let e = &inbound.env;
                            exec_log.push((
                                i,
                                e.from.clone(),
                                e.lane.clone(),
                                e.seq,
                                word_of(&inbound),
                            ));
                            n.running.push((inbound, now + rng.below(60)));
                        }
                        Body::Result(_) | Body::Discarded { .. } => {
                            let id = node
                                .record_result(&inbound, now)
                                .map_err(|e| e.to_string())?;
                            if id.is_none() {
                                return Err(format!(
                                    "{}: second result for {:?}",
                                    n.name, inbound.env
                                ));
                            }
                            progressed = true;
                        }
                        Body::Started { seq } => {
                            node.store_mut()
                                .record_started(&inbound, *seq)
                                .map_err(|e| e.to_string())?;
                            progressed = true;
                        }
                        other => return Err(format!("unexpected body {other:?}")),
                    }
                }
                if !progressed {
                    break;
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
                                .on_presence(name.clone(), true, now);
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
    }
    Ok(true)
}

fn describe(nodes: &[SimNode]) -> Result<String, String> {
    let mut out = String::new();
    for n in nodes {
        let node = n.node.as_ref().unwrap();
        let c = node.store().counts().map_err(|e| e.to_string())?;
        out += &format!(
            "\n  {}: {c:?} link_up={} backlog={:?}",
            n.name,
            n.link_up,
            node.backlog()
        );
    }
    Ok(out)
}

fn check(
    nodes: &[SimNode],
    sent: &[Sent],
    exec_log: &[(usize, Name, Lane, u64, String)],
) -> Result<(), String> {
    // Every command reached its receiver's executor exactly once, in stream order.
    let mut started: BTreeMap<(usize, Name, Lane), Vec<u64>> = BTreeMap::new();
    let mut words = BTreeSet::new();
    for (i, from, lane, seq, word) in exec_log {
        if !words.insert(word.clone()) {
            return Err(format!("{word} executed twice"));
        }
        started
            .entry((*i, from.clone(), lane.clone()))
            .or_default()
            .push(*seq);
    }
    for s in sent {
        if !words.contains(&s.word) {
            return Err(format!(
                "{} ({} -> {} {}#{}) never executed",
                s.word, s.from, s.to, s.lane, s.seq
            ));
        }
    }
    for ((i, from, lane), seqs) in &started {
        // The stream also carries results, so command numbers need not be contiguous.
        let mut expected: Vec<u64> = sent
            .iter()
            .filter(|s| s.to == *i && nodes[s.from].name == *from && s.lane == *lane)
            .map(|s| s.seq)
            .collect();
        expected.sort();
        if seqs != &expected {
            return Err(format!(
                "{} executed {from}/{lane} out of order: {seqs:?}",
                nodes[*i].name
            ));
        }
    }
    // Every result reached its sender exactly once; in order on ordered lanes.
    for (i, n) in nodes.iter().enumerate() {
        let store = n.node.as_ref().unwrap().store();
        let mut streams: BTreeMap<(usize, Lane), Vec<&Sent>> = BTreeMap::new();
        for s in sent.iter().filter(|s| s.from == i) {
            streams.entry((s.to, s.lane.clone())).or_default().push(s);
        }
        for ((to, lane), cmds) in streams {
            let results = store
                .results(&nodes[to].name, &lane)
                .map_err(|e| e.to_string())?;
            let seqs: Vec<u64> = results.iter().map(|(_, r)| r.seq).collect();
            let mut sorted = seqs.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != seqs.len() || sorted.len() != cmds.len() {
                return Err(format!(
                    "{}: results from {} on {lane}: {seqs:?} for {} commands",
                    n.name,
                    nodes[to].name,
                    cmds.len()
                ));
            }
            if lane.class() == LaneClass::Ordered && sorted != seqs {
                return Err(format!(
                    "{}: results on ordered lane {lane} out of order: {seqs:?}",
                    n.name
                ));
            }
            for (_, r) in &results {
                let cmd = cmds.iter().find(|c| c.seq == r.seq).unwrap();
                let ok = match r.status {
                    Status::Ok => r.stdout == cmd.word.as_bytes(),
                    Status::Interrupted => true,
                    _ => false,
                };
                if !ok {
                    return Err(format!("{}: bad result for {}: {r:?}", n.name, cmd.word));
                }
            }
        }
        store.integrity_check().map_err(|e| e.to_string())?;
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
        .map(|n| n.get())
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
