//! Scenarios 3, 4 and 5: durable enqueue rate through the control socket, online
//! latency of `exec true`, and the footprint of an idle agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost::control::{Client, CommandSpec, Request};

use crate::report::{Figure, Report, Target};
use crate::rig::{exec, sample, to_node, Pair, LONG};
use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent, BIN};
use crate::support::{wait_until, KillOnDrop, TempDir};
use crate::Opts;

const CALL: Duration = Duration::from_secs(60);

/// Scenario 3: commands queued per second by one local client that sends a
/// `ping` and waits for the agent's reply before sending the next, so every reply
/// means the command is committed to the store at that durability. The node is
/// offline: nothing leaves, this is the store and the socket alone.
pub fn enqueue(r: &mut Report, o: &Opts) {
    for durability in ["full", "normal"] {
        let n = o.count(if durability == "full" { 5_000 } else { 20_000 });
        let pair = Pair::start(&["--durability", durability]);
        pair.link_down();
        let mut client = Client::connect(&pair.central.dir).expect("control socket");
        let send = to_node(CommandSpec::Ping);
        // A few to warm the caches and the statement cache; not counted.
        for _ in 0..50 {
            client.call(&send, CALL).expect("send");
        }
        let before = sample(pair.central.pid());
        let t = Instant::now();
        for _ in 0..n {
            client.call(&send, CALL).expect("send");
        }
        let secs = t.elapsed().as_secs_f64();
        let after = sample(pair.central.pid());
        r.add(Figure::new(
            "3 enqueue",
            &format!("durability {durability}: commands queued per second (one client, {n} pings)"),
            n as f64 / secs,
            "cmd/s",
        ));
        r.add(Figure::new(
            "3 enqueue",
            &format!("durability {durability}: bytes written to disk per queued command"),
            (after.write_bytes - before.write_bytes) as f64 / n as f64,
            "B",
        ));
        let queued = Pair::outbox(&pair.central);
        assert!(
            queued >= n as u64,
            "the central's outbox holds {queued} frames after {n} sends"
        );
    }
}

/// Scenario 4: `exec true` from the central to the node through a local broker
/// (no proxy), one at a time: time from the send request until the result is at
/// the central. outpost's share is that minus the time this process needs to
/// spawn `true` the way the agent does (own process group, piped output) and
/// collect it.
pub fn latency(r: &mut Report, o: &Opts) {
    let n = o.count(1_000);
    let spawn = percentiles(spawn_times(n));
    r.add(Figure::new(
        "4 latency",
        "spawn and reap `true` (the part that is not outpost), p50",
        ms(spawn.0),
        "ms",
    ));
    for durability in ["full", "normal"] {
        let pair = Pair::start_direct(&["--durability", durability]);
        let mut client = Client::connect(&pair.central.dir).expect("control socket");
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let t = Instant::now();
            let id = pair.send_on(&mut client, "ordered", exec(&["true"]));
            wait_result(&mut client, id);
            // The first 20 warm up the connection, caches and page cache.
            if i >= 20 {
                times.push(t.elapsed());
            }
        }
        let (p50, p99) = percentiles(times);
        let label = format!("durability {durability}");
        r.add(Figure::new(
            "4 latency",
            &format!("{label}: exec true round trip p50"),
            ms(p50),
            "ms",
        ));
        r.add(Figure::new(
            "4 latency",
            &format!("{label}: exec true round trip p99"),
            ms(p99),
            "ms",
        ));
        r.add(
            Figure::new(
                "4 latency",
                &format!("{label}: outpost's part of p50 (round trip minus spawn)"),
                ms(p50.saturating_sub(spawn.0)),
                "ms",
            )
            .target(Target::AtMost(5.0)),
        );
    }
}

/// Scenario 5: binary size, and an idle connected node agent's RSS and CPU time
/// over a 60 s window (10 s with --quick, scaled to a minute), with the product's
/// default keepalive (60 s). For the native build the benchmark runs and, when
/// `cross/build-all.sh x86_64` has built it, the static musl binary that ships.
pub fn run(r: &mut Report, o: &Opts) {
    let window = Duration::from_secs(if o.quick { 10 } else { 60 });
    let mut bins = vec![("native", PathBuf::from(BIN))];
    let musl =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dist/x86_64-unknown-linux-musl/outpost");
    if musl.is_file() {
        bins.push(("static musl", musl));
    } else {
        r.note(format!(
            "no static musl binary at {}: run `cross/build-all.sh x86_64` to measure what ships",
            musl.display()
        ));
    }
    for (label, bin) in bins {
        let size = std::fs::metadata(&bin).expect("binary").len();
        let kind = file_kind(&bin);
        r.add(Figure::new(
            "5 footprint",
            &format!("{label} binary size ({kind})"),
            size as f64 / 1e6,
            "MB",
        ));
        let (rss_kib, cpu_s) = idle(&bin, window);
        r.add(
            Figure::new(
                "5 footprint",
                &format!("{label}: idle node agent RSS"),
                rss_kib as f64 * 1024.0 / 1e6,
                "MB",
            )
            .target(Target::AtMost(5.0)),
        );
        r.add(
            Figure::new(
                "5 footprint",
                &format!(
                    "{label}: idle node agent CPU per minute (over {} s)",
                    window.as_secs()
                ),
                cpu_s * 60.0 / window.as_secs_f64(),
                "s",
            )
            .target(Target::AtMost(0.05)),
        );
    }
}

/// RSS (kB) at the end of an idle window, and CPU seconds used during it, of a
/// node agent running `bin`, connected to a broker with a central on it.
fn idle(bin: &Path, window: Duration) -> (u64, f64) {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "node", "exec,ping");
    let broker = Broker::start_stock("");
    let central = Agent::start_with(
        "central",
        &broker.url(),
        tmp.path(),
        &["--log-level", "info", "--keepalive", "60s"],
    );
    let log = std::fs::File::create(tmp.path().join("node.log")).unwrap();
    let node = KillOnDrop(
        Command::new(bin)
            .args(["agent", "--name", "node", "--broker", &broker.url()])
            .arg("--state-dir")
            .arg(tmp.path().join("node"))
            .args(["--keepalive", "60s", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node agent"),
    );
    wait_until("the central sees the node online", LONG, || {
        central.sees_online("node")
    });
    // One exchange, so the idle agent has done real work before it idles.
    let id = central.send_exec("node", "ordered", &["true"], None);
    wait_until("the node answers", LONG, || {
        !central.job(id)["targets"][0]["result"].is_null()
    });
    let pid = node.0.id();
    let before = sample(pid);
    // The window is the measurement: the agent must sleep through it.
    std::thread::sleep(window);
    let after = sample(pid);
    (after.rss_kib, after.cpu_s - before.cpu_s)
}

/// What `file` says about linking and stripping.
fn file_kind(bin: &Path) -> String {
    let out = Command::new("file").arg("-b").arg(bin).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    let text = text.unwrap_or_default();
    let link = if text.contains("statically linked") || text.contains("static-pie") {
        "static"
    } else {
        "dynamic"
    };
    let strip = if text.contains("not stripped") {
        "not stripped"
    } else {
        "stripped"
    };
    format!("{link}, {strip}")
}

/// Times of spawning `true` as the agent spawns commands, and reading its output.
fn spawn_times(n: usize) -> Vec<Duration> {
    use std::os::unix::process::CommandExt;
    (0..n + 20)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new("true")
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("spawn true");
            assert!(out.status.success());
            t.elapsed()
        })
        .skip(20)
        .collect()
}

/// Waits (through the control socket's `wait`) until job `id` has its result.
fn wait_result(client: &mut Client, id: i64) {
    let deadline = Instant::now() + LONG;
    loop {
        let req = Request::Wait {
            id,
            seen: 0,
            timeout_ms: 60_000,
        };
        let v = client.call(&req, CALL + CALL).expect("wait");
        let result = &v["job"]["targets"][0]["result"];
        if !result.is_null() {
            assert_eq!(result["status"], "ok", "exec true failed: {v}");
            return;
        }
        assert!(Instant::now() < deadline, "no result for job {id}: {v}");
    }
}

fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
