//! Scenario 7, the satellite profile: 1,000 ordered commands and a 1 MiB file to a
//! node whose link has 300 ms of latency each way, 256 kbit/s each way and a 20 s
//! cut every 60 s; how long until everything is through, and what it cost on the
//! wire.
//!
//! The link is the rig's fault proxy between the node and the broker:
//! `set_delay(300 ms)` holds every chunk 300 ms in each direction, and
//! `set_rate(32,000 B/s)` paces each direction on its own (every connection has one
//! pump thread and one pacer per direction), so up and down each get 256 kbit/s, as
//! on a symmetric satellite channel. A cutter thread is the outage schedule: 40 s up,
//! then `Mode::Refuse` (live connections shut, new ones closed on accept) for 20 s,
//! repeating from the first enqueue. There is no baseline system here: the figures
//! stand alone.
//!
//! The agents use the satellite row of boards/README.md's link profiles,
//! `--keepalive 300s --backoff-cap 30m`, and the README's 16 KiB `--chunk-size`
//! ("small suits satellite links"; also the default, passed so the run says so).
//! The node trusts the central with `exec` and `files` (pushing a file needs
//! `files`), which is why this module starts its own pair instead of
//! [`Pair::start`].

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use outpost::control::Request;

use crate::report::{Figure, Report};
use crate::rig::{exec, Pair, LONG};
use crate::support::broker::Broker;
use crate::support::outpost::Agent;
use crate::support::proxy::{Mode, Proxy};
use crate::support::wait_until;
use crate::Opts;

const SCENARIO: &str = "7 satellite";
/// Latency the proxy adds to each direction.
const ONE_WAY: Duration = Duration::from_millis(300);
/// 256 kbit/s, per direction.
const RATE: u64 = 32_000;
/// The outage schedule: this long up, then this long down, from the first enqueue.
const UP: Duration = Duration::from_secs(40);
const DOWN: Duration = Duration::from_secs(20);
/// The pushed file: 1 MiB of pseudo-random bytes (incompressible, not that outpost
/// compresses), under this id.
const FILE_SIZE: usize = 1 << 20;
const FILE_ID: &str = "satellite.bin";
/// The ordered lane the commands go on.
const LANE: &str = "ordered";
/// boards/README.md, "Link profiles", satellite; README, `chunk_size`.
const FLAGS: &[&str] = &[
    "--keepalive",
    "300s",
    "--backoff-cap",
    "30m",
    "--chunk-size",
    "16KiB",
];

/// Runs the workload once over the satellite link and reports its cost.
pub fn run(r: &mut Report, o: &Opts) {
    let n = o.count(1000);
    let pair = start_pair();
    let file = write_file(pair.tmp.path());
    let (run, cuts) = thread::scope(|s| {
        let (stop, stopped) = mpsc::channel::<()>();
        pair.proxy.reset_counters();
        let accepted_before = pair.proxy.accepted();
        let t0 = Instant::now();
        let proxy = &pair.proxy;
        let cutter = s.spawn(move || cut_schedule(proxy, t0, stopped));
        // On a panic below, `stop` is dropped while unwinding, which ends the cutter
        // too, so the scope can join it.
        let run = run_workload(&pair, &file, n, t0, accepted_before);
        drop(stop);
        let cuts = cutter.join().expect("cutter thread");
        (run, cuts)
    });
    let results = check_results(&pair.central, &run.jobs);
    check_file(&pair, &file, run.transfer);
    report(r, n, &file, &run, &cuts, &results, &pair.node.dir);
}

/// A central on the broker and a node behind the proxy, which already has the
/// satellite delay and rate, so the node's first connection crosses the same link.
fn start_pair() -> Pair {
    let broker = Broker::start_stock("");
    let proxy = Proxy::start(broker.addr());
    proxy.set_delay(ONE_WAY);
    proxy.set_rate(Some(RATE));
    let node_url = proxy.url();
    Pair::assemble(broker, proxy, "exec,files", FLAGS, &node_url, &[])
}

/// Writes [`FILE_SIZE`] bytes of xorshift output to `dir` and returns its path and
/// contents.
fn write_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(FILE_SIZE);
    while bytes.len() < FILE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(FILE_SIZE);
    let path = dir.join(FILE_ID);
    std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    (path, bytes)
}

/// One outage: when the link went down and how many TCP connections the proxy
/// accepted (and closed at once) while it was down.
struct Cut {
    at: Instant,
    refused: u64,
}

/// The emulated link's schedule, not synchronisation: up for [`UP`], down
/// ([`Mode::Refuse`]) for [`DOWN`], repeating from `t0`, until `stop` is signalled
/// or dropped; leaves the link up.
fn cut_schedule(proxy: &Proxy, t0: Instant, stop: Receiver<()>) -> Vec<Cut> {
    // Absolute deadlines, so the schedule does not drift with the work done in it.
    let until = |deadline: Instant| {
        let left = deadline.saturating_duration_since(Instant::now());
        !matches!(stop.recv_timeout(left), Err(RecvTimeoutError::Timeout))
    };
    let mut cuts = Vec::new();
    let mut start = t0;
    loop {
        if until(start + UP) {
            return cuts;
        }
        let before = proxy.accepted();
        let at = Instant::now();
        proxy.set_mode(Mode::Refuse);
        let stopped = until(start + UP + DOWN);
        proxy.set_mode(Mode::Pass);
        cuts.push(Cut {
            at,
            refused: proxy.accepted() - before,
        });
        if stopped {
            return cuts;
        }
        start += UP + DOWN;
    }
}

/// What the workload queued and when it was all through.
struct Run {
    jobs: Vec<i64>,
    transfer: i64,
    /// First enqueue to the end condition of [`run_workload`].
    elapsed: Duration,
    /// First enqueue to the last command's enqueue reply.
    enqueued: Duration,
    finished: Instant,
    bytes_up: u64,
    bytes_down: u64,
    /// TCP connections the proxy accepted during the run.
    accepted: u64,
}

/// Queues the file and `n` commands at `t0`, then waits until every result is at
/// the central, the node holds the file, and both outboxes are empty; reads the
/// proxy's counters at that moment.
fn run_workload(
    pair: &Pair,
    file: &(PathBuf, Vec<u8>),
    n: usize,
    t0: Instant,
    accepted0: u64,
) -> Run {
    let transfer = files_put(&pair.central, &file.0);
    let jobs: Vec<i64> = (0..n)
        .map(|i| pair.send(LANE, exec(&["echo", &i.to_string()])))
        .collect();
    let enqueued = t0.elapsed();
    let last = *jobs.last().expect("at least one command");
    wait_until("every result, the file, empty outboxes", LONG, || {
        assert_alive(&pair.central);
        assert_alive(&pair.node);
        has_result(&pair.central, last)
            && holds_file(&pair.node)
            && Pair::outbox(&pair.central) == 0
            && Pair::outbox(&pair.node) == 0
    });
    let finished = Instant::now();
    Run {
        jobs,
        transfer,
        elapsed: finished - t0,
        enqueued,
        finished,
        bytes_up: pair.proxy.bytes_up(),
        bytes_down: pair.proxy.bytes_down(),
        accepted: pair.proxy.accepted() - accepted0,
    }
}

/// Panics with the end of its log if `agent` has exited (a control call would only
/// say that nothing listens on its socket).
fn assert_alive(agent: &Agent) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if matches!(state, None | Some("Z" | "X")) {
        panic!(
            "satellite: agent {} exited; its log ends:\n{}",
            agent.name,
            agent.log()
        );
    }
}

/// Offers the file to the node; returns the central's transfer id.
fn files_put(central: &Agent, path: &Path) -> i64 {
    let reply = central.call(&Request::FilesPut {
        to: "node".into(),
        path: path.to_str().expect("utf-8 temp path").into(),
        id: Some(FILE_ID.into()),
        ttl_s: None,
    });
    reply["transfers"][0]["transfer"]
        .as_i64()
        .unwrap_or_else(|| panic!("files-put: {reply}"))
}

fn has_result(central: &Agent, job: i64) -> bool {
    !central.job(job)["targets"][0]["result"].is_null()
}

/// The node's record of the file from the central, once it is verified and renamed
/// into place.
fn held_file(node: &Agent) -> Option<Value> {
    let list = node.call(&Request::FilesList);
    list["files"]
        .as_array()?
        .iter()
        .find(|f| f["source"] == "central" && f["id"] == FILE_ID)
        .cloned()
}

fn holds_file(node: &Agent) -> bool {
    held_file(node).is_some()
}

/// One command's result as the central recorded it.
struct Outcome {
    stdout: String,
}

/// Checks that every job has exactly one `ok` result with stdout `"{i}\n"`, that the
/// results reached the central in job order (result ids increase) and that the node
/// started them in job order (`started_ms` never decreases); panics otherwise.
fn check_results(central: &Agent, jobs: &[i64]) -> Vec<Outcome> {
    let limit = u32::try_from(jobs.len() + 16).expect("job count");
    let listed = central.call(&Request::Jobs { limit: Some(limit) });
    let mut by_id: Vec<&Value> = listed["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .filter(|j| jobs.contains(&j["id"].as_i64().unwrap_or(-1)))
        .collect();
    by_id.sort_by_key(|j| j["id"].as_i64());
    assert_eq!(
        by_id.len(),
        jobs.len(),
        "satellite: the central lists {} of the {} jobs",
        by_id.len(),
        jobs.len()
    );
    let mut last_result = i64::MIN;
    let mut last_started = 0u64;
    let mut out = Vec::with_capacity(jobs.len());
    for (i, (job, &id)) in by_id.iter().zip(jobs).enumerate() {
        let targets = job["targets"].as_array().expect("targets");
        assert_eq!(
            targets.len(),
            1,
            "satellite: job {id} has {} targets",
            targets.len()
        );
        let t = &targets[0];
        let result = &t["result"];
        assert!(
            !result.is_null(),
            "satellite: job {id} (command {i}) has no result: LOST"
        );
        assert_eq!(result["status"], "ok", "satellite: job {id}: {result}");
        let stdout = result["stdout"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            stdout,
            format!("{i}\n"),
            "satellite: job {id} (command {i}) stdout"
        );
        let result_id = t["result_id"].as_i64().expect("result_id");
        assert!(
            result_id > last_result,
            "satellite: result of command {i} (id {result_id}) arrived before an earlier \
             one (id {last_result}): REORDERED"
        );
        let started = result["started_ms"].as_u64().expect("started_ms");
        assert!(
            started >= last_started,
            "satellite: command {i} started at {started} ms, before command {} ({last_started} \
             ms): run out of order",
            i.saturating_sub(1)
        );
        last_result = result_id;
        last_started = started;
        out.push(Outcome { stdout });
    }
    out
}

/// Checks that the node holds the file byte for byte where received files land
/// (`files_dir/SOURCE/ID`, files_dir defaulting to `STATE_DIR/files`) and that the
/// central's transfer is `done`; panics otherwise.
fn check_file(pair: &Pair, file: &(PathBuf, Vec<u8>), transfer: i64) {
    let landing = pair.node.dir.join("files").join("central").join(FILE_ID);
    let held = held_file(&pair.node).expect("the node holds the file");
    assert_eq!(
        Path::new(held["path"].as_str().unwrap_or_default()),
        landing,
        "satellite: the node records the file elsewhere"
    );
    let got = std::fs::read(&landing)
        .unwrap_or_else(|e| panic!("satellite: read {}: {e}", landing.display()));
    assert!(
        got == file.1,
        "satellite: the node's copy differs ({} bytes, sent {})",
        got.len(),
        file.1.len()
    );
    let t = &pair.central.call(&Request::Transfer { id: transfer })["transfer"];
    assert_eq!(t["state"], "done", "satellite: the central's transfer: {t}");
}

/// Figures and notes. Payload bytes are what an application asked to move:
/// the file's bytes, plus every command's argv bytes (the sum of each argument's
/// UTF-8 length, no separators: `echo` and the decimal index), plus every result's
/// stdout bytes as the central recorded them (the index and a newline). Everything
/// else on the wire (MQTT, sealing, frames, acks, presence, offers, reconnections,
/// keepalives, resends) is overhead.
fn report(
    r: &mut Report,
    n: usize,
    file: &(PathBuf, Vec<u8>),
    run: &Run,
    cuts: &[Cut],
    results: &[Outcome],
    node_dir: &Path,
) {
    let argv: usize = (0..n).map(|i| "echo".len() + i.to_string().len()).sum();
    let stdout: usize = results.iter().map(|o| o.stdout.len()).sum();
    let payload = (file.1.len() + argv + stdout) as f64;
    let wire = (run.bytes_up + run.bytes_down) as f64;
    let during: Vec<&Cut> = cuts.iter().filter(|c| c.at < run.finished).collect();
    let refused: u64 = during.iter().map(|c| c.refused).sum();
    let secs = run.elapsed.as_secs_f64();
    let down_s: f64 = during
        .iter()
        .map(|c| (run.finished - c.at).min(DOWN).as_secs_f64())
        .sum();

    let what = format!("{n} ordered commands + 1 MiB file");
    r.add(Figure::new(
        SCENARIO,
        &format!("{what}: total time"),
        secs,
        "s",
    ));
    r.add(Figure::new(
        SCENARIO,
        "bytes on the wire (up + down)",
        wire,
        "bytes",
    ));
    r.add(Figure::new(SCENARIO, "payload bytes", payload, "bytes"));
    r.add(Figure::new(
        SCENARIO,
        "payload / wire",
        payload / wire,
        "ratio",
    ));
    r.add(Figure::new(
        SCENARIO,
        "link cuts survived",
        during.len() as f64,
        "cuts",
    ));
    r.note(format!(
        "satellite: link 300 ms each way, {RATE} B/s each way, down {} s every {} s \
         (starting {} s after the first enqueue); flags {}",
        DOWN.as_secs(),
        (UP + DOWN).as_secs(),
        UP.as_secs(),
        FLAGS.join(" ")
    ));
    r.note(format!(
        "satellite: queuing took {:.1} s; {} B down (to the node), {} B up; the down \
         direction alone needs {:.0} s at {RATE} B/s, and the link was up {:.0} of the {:.0} s",
        run.enqueued.as_secs_f64(),
        run.bytes_down,
        run.bytes_up,
        run.bytes_down as f64 / RATE as f64,
        secs - down_s,
        secs
    ));
    r.note(format!(
        "satellite: payload = file {} B + argv {argv} B + stdout {stdout} B; wire = TCP \
         payload bytes the proxy forwarded (MQTT framing included, TCP/IP headers not; \
         bytes held in the delay line when a cut hit are not counted)",
        file.1.len()
    ));
    r.note(format!(
        "satellite: the proxy accepted {} TCP connections during the run, {refused} of them \
         while the link was down (closed at once: reconnect attempts and probes), {} while \
         it was up (reconnections; the first connection predates the run); the node's \
         outages, cut to CONNACK, from its log: {}",
        run.accepted,
        run.accepted - refused,
        outages(&node_log(node_dir)).join(", ")
    ));
}

/// The node agent's log (the test support keeps `NAME.agent-1.log` for the first
/// start beside the state directory).
fn node_log(node_dir: &Path) -> String {
    let name = node_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = node_dir.with_file_name(format!("{name}.agent-1.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// How long each outage lasted as the agent saw it, from its `link up: URL after
/// DURATION` lines (whole seconds from 10 s up).
fn outages(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("link up: "))
        .filter_map(|l| l.rsplit_once(" after ").map(|(_, d)| d.trim().to_string()))
        .collect()
}
