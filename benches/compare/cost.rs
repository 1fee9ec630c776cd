//! Scenario 8, what the link costs (issue 14), in bytes on the wire as a packet
//! capture on loopback sees them (tcpdump, installed with apt-get where missing):
//! every IP packet on the node's connection, TCP/IP headers included, counted
//! from the capture file's original lengths less the link-layer header.
//!
//! - an idle node with `link = "always"`, per day: the bytes of one keepalive
//!   exchange (PINGREQ, PINGRESP, ACK; measured over 20 exchanges with a 2 s
//!   keepalive), times the exchanges a day holds at the default keepalive, plus
//!   the facts an idle node sends a day (one full set; measured: its first set),
//!   plain and TLS, and the same for other keepalive settings;
//! - an idle node with `link = "on-demand"` polling every 30 minutes, per day: the
//!   bytes of one poll (connect, presence, hang-up; measured over 5 polls at a
//!   10 s poll), times 48, plus the facts of a day;
//! - 100 `exec` results of typical commands (`ps aux`, `df -h`, `dmesg`, `ip a`,
//!   ...) on the node's link, compressed against `compress = false`;
//! - one reconnect after a cut: TCP, TLS (resumed: rustls keeps the session
//!   within the process), CONNECT, SUBSCRIBE, presence, until the link is quiet;
//! - a 1 MiB/day budget while a 5 MiB file is fetched from the node and urgent
//!   commands run: bytes of the node's link that day over the budget (the
//!   capture starts before the node does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use outpost::control::Request;

use crate::report::{Figure, Report, Target};
use crate::rig::{Pair, LONG};
use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::proxy::Proxy;
use crate::support::{wait_for, wait_until, TempDir};
use crate::Opts;

const SCENARIO: &str = "8 cost";
/// The agent's default keepalive (src/config.rs).
const DEFAULT_KEEPALIVE_S: u64 = 300;

pub fn run(r: &mut Report, _opts: &Opts) {
    if !ensure_tcpdump() {
        r.note("8 cost: skipped, tcpdump is missing and could not be installed");
        return;
    }
    let pki = crate::wire::Pki::new();
    for tls in [false, true] {
        idle(r, tls, &pki);
        on_demand(r, tls, &pki, &[]);
        reconnect(r, tls, &pki);
    }
    // An on-demand link offers TLS 1.2 alone by default; what 1.3 would cost.
    on_demand(r, true, &pki, &["--tls-versions", "1.2,1.3"]);
    compression(r);
    budget(r);
}

/// Packets and IP bytes of a capture.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    packets: u64,
    bytes: u64,
}

/// tcpdump on loopback for one TCP port, writing a pcap file.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(port: u16, dir: &Path) -> Capture {
        let file = dir.join(format!("cap-{port}-{}.pcap", std::process::id()));
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-nn", "-U", "-s", "128", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("tcpdump listening");
        Capture { child, file }
    }

    fn stop(mut self) -> Traffic {
        // SIGINT: tcpdump flushes and exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).expect("read capture");
        match std::env::var_os("OUTPOST_KEEP_PCAP") {
            // For reading a capture packet by packet (tcpdump -r FILE).
            Some(dir) => {
                let keep = Path::new(&dir).join(self.file.file_name().expect("a file name"));
                let _ = std::fs::rename(&self.file, &keep);
                eprintln!("capture kept: {}", keep.display());
            }
            None => {
                let _ = std::fs::remove_file(&self.file);
            }
        }
        parse_pcap(&bytes)
    }
}

/// Packets and bytes above the link layer in a pcap file.
fn parse_pcap(b: &[u8]) -> Traffic {
    let u32_at = |at: usize, swap: bool| {
        let v = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if swap {
            v.swap_bytes()
        } else {
            v
        }
    };
    let magic = u32_at(0, false);
    let swap = matches!(magic, 0xd4c3b2a1 | 0x4d3cb2a1);
    let link = u32_at(20, swap);
    let header = match link {
        1 => 14,   // Ethernet (Linux loopback)
        113 => 16, // Linux cooked
        276 => 20, // Linux cooked v2
        0 => 4,    // BSD loopback
        _ => 0,
    };
    let mut t = Traffic::default();
    let mut at = 24;
    while at + 16 <= b.len() {
        let incl = u32_at(at + 8, swap) as usize;
        let orig = u64::from(u32_at(at + 12, swap));
        t.packets += 1;
        t.bytes += orig.saturating_sub(header);
        at += 16 + incl;
    }
    t
}

fn ensure_tcpdump() -> bool {
    let have = || Command::new("tcpdump").arg("--version").output().is_ok();
    if have() {
        return true;
    }
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "tcpdump"])
        .stdout(Stdio::null())
        .status();
    have()
}

/// Waits until the node's link carried nothing for `quiet` (by the proxy).
fn settle(proxy: &Proxy, quiet: Duration) {
    let total = || proxy.bytes_up() + proxy.bytes_down();
    let mut last = (total(), Instant::now());
    wait_until("the link to go quiet", LONG, || {
        let now = total();
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= quiet
    });
}

fn label(tls: bool) -> &'static str {
    if tls {
        "TLS"
    } else {
        "plain"
    }
}

fn pair(tls: bool, pki: &crate::wire::Pki, keepalive: &str) -> Pair {
    if tls {
        let (broker, addr) = pki.broker();
        crate::wire::tls_pair_with(broker, addr, pki, keepalive)
    } else {
        Pair::start(&["--keepalive", keepalive])
    }
}

/// Bytes the node's link spent on facts so far, as its accounting says.
fn facts_bytes(node: &Agent) -> u64 {
    let u = node.call(&Request::Usage);
    u["categories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["category"] == "facts")
        .map(|c| c["day_up"].as_u64().unwrap_or(0) + c["day_down"].as_u64().unwrap_or(0))
        .sum()
}

fn idle(r: &mut Report, tls: bool, pki: &crate::wire::Pki) {
    const EXCHANGES: u64 = 20;
    let p = pair(tls, pki, "2s");
    // Facts go at connect: let them and the handshake finish first.
    settle(&p.proxy, Duration::from_millis(1500));
    let cap = Capture::start(p.proxy.port(), p.tmp.path());
    let start = Instant::now();
    wait_until("20 keepalive exchanges", LONG, || {
        start.elapsed() >= Duration::from_secs(2 * EXCHANGES)
    });
    let t = cap.stop();
    let per_ping = t.bytes as f64 / EXCHANGES as f64;
    let facts = facts_bytes(&p.node) as f64;
    let per_day = |k: u64| 86_400.0 / k as f64 * per_ping + facts;
    let f = Figure::new(
        SCENARIO,
        &format!(
            "idle node, link always, keepalive {DEFAULT_KEEPALIVE_S} s, per day ({})",
            label(tls)
        ),
        per_day(DEFAULT_KEEPALIVE_S) / 1000.0,
        "KB",
    )
    // Anchors: cloudflared 19-26 MB a day, Simple IoT 2 MB.
    .target(Target::AtMost(150.0));
    r.add(f);
    r.note(format!(
        "8 cost ({}): one keepalive exchange {:.0} B on the wire ({} packets in {EXCHANGES}); \
         facts {:.0} B a day; idle per day at keepalive 60 s {:.0} KB, 300 s {:.0} KB, \
         600 s {:.0} KB, 1200 s {:.0} KB",
        label(tls),
        per_ping,
        t.packets,
        facts,
        per_day(60) / 1000.0,
        per_day(300) / 1000.0,
        per_day(600) / 1000.0,
        per_day(1200) / 1000.0
    ));
}

fn on_demand(r: &mut Report, tls: bool, pki: &crate::wire::Pki, more: &[&str]) {
    const POLLS: u64 = 5;
    let flags = ["--keepalive", "600s"];
    let mut node_flags = vec!["--link", "on-demand", "--poll", "10s", "--linger", "1s"];
    node_flags.extend_from_slice(more);
    let what = if more.is_empty() {
        label(tls).to_string()
    } else {
        format!("{}, {}", label(tls), more.join(" "))
    };
    let p = if tls {
        let (broker, addr) = pki.broker();
        crate::wire::tls_pair_flags(broker, addr, pki, &flags, &node_flags)
    } else {
        let broker = Broker::start_stock("");
        let proxy = Proxy::start(broker.addr());
        let url = proxy.url();
        Pair::assemble(broker, proxy, crate::rig::ALLOW, &flags, &url, &node_flags)
    };
    // The first connect (facts, the handshake) is not an idle poll.
    wait_until("the node to hang up", LONG, || p.proxy.connections() == 0);
    let cap = Capture::start(p.proxy.port(), p.tmp.path());
    let first = p.proxy.accepted();
    wait_until("5 idle polls", LONG, || {
        p.proxy.accepted() >= first + POLLS && p.proxy.connections() == 0
    });
    let t = cap.stop();
    let polls = p.proxy.accepted() - first;
    let per_poll = t.bytes as f64 / polls as f64;
    let facts = facts_bytes(&p.node) as f64;
    r.add(
        Figure::new(
            SCENARIO,
            &format!("idle node, link on-demand, polling every 30 min, per day ({what})"),
            (48.0 * per_poll + facts) / 1000.0,
            "KB",
        )
        // Anchor: Mender's 30-minute polling.
        .target(Target::AtMost(100.0)),
    );
    r.note(format!(
        "8 cost ({what}): one idle poll {:.0} B on the wire ({} packets in {polls} polls)",
        per_poll, t.packets
    ));
}

/// Typical command outputs: what operators ask nodes for.
const TYPICAL: &[&[&str]] = &[
    &["uptime"],
    &["free", "-m"],
    &["df", "-h"],
    &["ip", "a"],
    &["ps", "aux"],
    &["dmesg"],
    &["tail", "-n", "200", "/var/log/dpkg.log"],
    &["ls", "-l", "/usr/bin"],
    &["cat", "/proc/cpuinfo"],
    &["cat", "/proc/meminfo"],
];

fn compression(r: &mut Report) {
    let on = exec_100(true);
    let off = exec_100(false);
    r.add(
        Figure::new(
            SCENARIO,
            "100 exec results of typical commands, bytes on the node's link (plain)",
            on.bytes as f64,
            "B",
        )
        .against("compress = false", off.bytes as f64)
        .target(Target::AtMost(0.6)),
    );
    r.note(format!(
        "8 cost: 100 typical exec results: {} B in {} packets compressed, {} B in {} packets with compress = false",
        on.bytes, on.packets, off.bytes, off.packets
    ));
}

/// Bytes on the node's link while central sends 100 typical commands and they
/// answer, the handshake before excluded.
fn exec_100(compress: bool) -> Traffic {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "node", "exec");
    let config = tmp.path().join("outpost.toml");
    std::fs::write(&config, format!("compress = {compress}\n")).unwrap();
    let flags = ["--config", config.to_str().unwrap(), "--keepalive", "600s"];
    let broker = Broker::start_stock("");
    let proxy = Proxy::start(broker.addr());
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &flags);
    let node = Agent::start_with("node", &proxy.url(), tmp.path(), &flags);
    wait_until("central sees the node", LONG, || {
        central.sees_online("node")
    });
    let first = central.send_exec("node", "ordered", &["true"], None);
    wait_until("the first result", LONG, || {
        !central.job(first)["targets"][0]["result"].is_null()
    });
    settle(&proxy, Duration::from_secs(1));
    let cap = Capture::start(proxy.port(), tmp.path());
    let jobs: Vec<i64> = (0..100)
        .map(|i| central.send_exec("node", "ordered", TYPICAL[i % TYPICAL.len()], None))
        .collect();
    wait_until("100 results", LONG, || {
        jobs.iter()
            .all(|j| !central.job(*j)["targets"][0]["result"].is_null())
    });
    settle(&proxy, Duration::from_secs(1));
    let t = cap.stop();
    drop(node);
    t
}

fn reconnect(r: &mut Report, tls: bool, pki: &crate::wire::Pki) {
    let p = pair(tls, pki, "600s");
    settle(&p.proxy, Duration::from_secs(1));
    let cap = Capture::start(p.proxy.port(), p.tmp.path());
    let accepted = p.proxy.accepted();
    p.proxy.cut();
    wait_until("the node to reconnect", LONG, || {
        p.proxy.accepted() > accepted && p.node.status()["link"]["connected"] == true
    });
    settle(&p.proxy, Duration::from_secs(1));
    let t = cap.stop();
    r.add(
        Figure::new(
            SCENARIO,
            &format!(
                "one reconnect, TCP+TLS+MQTT+resubscribe+presence ({})",
                label(tls)
            ),
            t.bytes as f64,
            "B",
        )
        // Anchor: one TLS+MQTT connect costs about 6.5 kB.
        .target(Target::AtMost(3_000.0)),
    );
    r.note(format!(
        "8 cost ({}): the reconnect was {} packets, {} B, from the cut until quiet",
        label(tls),
        t.packets,
        t.bytes
    ));
}

fn budget(r: &mut Report) {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "node", "exec,files");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    let data: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(share.join("big.bin"), &data).unwrap();
    let broker = Broker::start_stock("");
    let proxy = Proxy::start(broker.addr());
    let cap = Capture::start(proxy.port(), tmp.path());
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let node = Agent::start_with(
        "node",
        &proxy.url(),
        tmp.path(),
        &[
            "--share-dir",
            share.to_str().unwrap(),
            "--budget",
            "1MiB/day",
        ],
    );
    wait_until("central sees the node", LONG, || {
        central.sees_online("node")
    });
    let get = central.call(&Request::FilesGet {
        from: "node".into(),
        path: "big.bin".into(),
    });
    let transfer = get["transfer"].as_i64().expect("transfer");
    wait_for("the node to hold its bulk traffic", LONG, || {
        node.status()["traffic"]["held"]
            .as_array()?
            .iter()
            .any(|h| h["class"] == "bulk")
            .then_some(())
    });
    let mut answered = 0;
    for i in 0..20 {
        let out = central.cli(&[
            "send",
            "--to",
            "node",
            "--priority",
            "urgent",
            "exec",
            "--",
            "echo",
            &format!("urgent {i}"),
        ]);
        answered += usize::from(out.status.success());
    }
    settle(&proxy, Duration::from_secs(2));
    let t = cap.stop();
    let tr: Value = central.call(&Request::Transfer { id: transfer })["transfer"].clone();
    let over = t.bytes.saturating_sub(1 << 20);
    r.add(
        Figure::new(
            SCENARIO,
            "budget 1 MiB/day, 5 MiB file and 20 urgent commands: bytes over the budget",
            over as f64,
            "B",
        )
        .target(Target::AtMost(0.0)),
    );
    r.note(format!(
        "8 cost: under a 1 MiB/day budget the node's link carried {} B that day ({:.0}% of it), \
         {} of 5 MiB of the file went ({}), {answered}/20 urgent commands answered while bulk was held",
        t.bytes,
        t.bytes as f64 * 100.0 / f64::from(1u32 << 20),
        tr["bytes"],
        tr["state"]
    ));
}
