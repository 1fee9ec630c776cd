//! Compression of payloads (issue 14, README "Compression"), measured on real command
//! outputs of this machine:
//!
//! - `ratios` (library core): each output as one result payload in wire form
//!   (`frame::compact` of its `Result` frame) and all of them together in one batch,
//!   deflated (miniz_oxide, levels 1, 6, 9), lz4 (lz4_flex block) and zstd (levels 3
//!   and 19, and level 3 with a 16 KiB dictionary trained on *other* outputs of this
//!   machine, so it is not tested on what it learned), as compressed / plain; then
//!   what trying costs on a 16 KiB random file chunk, with and without the entropy
//!   check `compress::shrink` makes first.
//! - `exec` (the real binaries, a real mosquitto): 100 `exec` results of typical
//!   commands, ten commands ten times over, once with compression (the default) and
//!   once with `compress = false` in the node's and central's configuration; the
//!   payload bytes each way (seen by a subscriber on both inboxes) and the bytes
//!   on the node's TCP link (a counting proxy in front of the broker).
//!
//!   cargo bench --bench codecs               # both
//!   cargo bench --bench codecs -- ratios     # one
//!
//! Prints Markdown tables; asserts only that shipped payloads restore exactly and
//! that every exec came back ok.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use outpost::compress;
use outpost::frame::{self, Body, CmdResult, Envelope, Name, Status};
use support::broker::Broker;
use support::mqtt::Capture;
use support::outpost::{introduce, Agent};
use support::proxy::Proxy;
use support::{wait_until, TempDir};

const LONG: Duration = Duration::from_secs(300);
/// The agent's default `output_cap`: what of an output a result carries (the tail).
const OUTPUT_CAP: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if want("ratios") {
        ratios();
    }
    if want("exec") {
        exec();
    }
}

/// The commands whose outputs are measured: what an operator asks a node for.
/// `journalctl` has no journal on this machine; the dpkg log stands in for syslog.
fn typical() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("uptime", vec!["uptime"]),
        ("free -m", vec!["free", "-m"]),
        ("df -h", vec!["df", "-h"]),
        ("ip a", vec!["ip", "a"]),
        ("ps aux", vec!["ps", "aux"]),
        ("dmesg", vec!["dmesg"]),
        (
            "syslog tail -n 200",
            vec!["tail", "-n", "200", "/var/log/dpkg.log"],
        ),
        ("ls -l /usr/bin", vec!["ls", "-l", "/usr/bin"]),
        ("cat /proc/cpuinfo", vec!["cat", "/proc/cpuinfo"]),
        ("cat /proc/meminfo", vec!["cat", "/proc/meminfo"]),
    ]
}

/// Outputs the dictionary learns from: the same kinds of text, other commands.
fn training() -> Vec<Vec<&'static str>> {
    vec![
        vec!["ps", "-ef"],
        vec!["ps", "-eo", "pid,ppid,user,rss,vsz,stat,etime,comm"],
        vec!["df", "-k"],
        vec!["df", "-i"],
        vec!["ip", "-s", "link"],
        vec!["ip", "route"],
        vec!["ip", "-6", "a"],
        vec!["ls", "-l", "/etc", "/usr/lib", "/usr/sbin", "/var/lib"],
        vec![
            "cat",
            "/proc/mounts",
            "/proc/vmstat",
            "/proc/stat",
            "/proc/interrupts",
        ],
        vec!["head", "-n", "2000", "/var/log/dpkg.log"],
        vec!["cat", "/proc/self/status", "/proc/self/maps"],
        vec!["ss", "-tan"],
        vec!["mount"],
        vec!["uname", "-a"],
    ]
}

fn run(argv: &[&str]) -> Vec<u8> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let mut stdout = out.stdout;
    if stdout.len() > OUTPUT_CAP {
        stdout.drain(..stdout.len() - OUTPUT_CAP);
    }
    stdout
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// The frame of a result carrying `stdout`, as ship1 would send it to central.
fn result_frame(seq: u64, stdout: Vec<u8>, now_ms: u64) -> Vec<u8> {
    let env = Envelope {
        from: name("ship1"),
        to: name("central"),
        lane: frame::default_lane(),
        seq,
        created_ms: now_ms - 3,
        ttl_s: None,
        body: Body::Result(CmdResult {
            exit_code: Some(0),
            stdout,
            duration_ms: 12,
            ..CmdResult::without_run(seq, Status::Ok, "", now_ms - 15)
        }),
    };
    frame::encode(&env).unwrap()
}

fn wire(frames: &[Vec<u8>], now_ms: u64) -> Vec<u8> {
    let packed = frame::pack(frames.iter().map(Vec::as_slice));
    frame::compact(&packed, &name("ship1"), &name("central"), now_ms).unwrap()
}

type Compress = Box<dyn Fn(&[u8]) -> Vec<u8>>;
type Codec = (&'static str, Compress);

fn codecs(dict: &[u8]) -> Vec<Codec> {
    let dict = dict.to_vec();
    let deflate = |level: u8| -> Compress {
        Box::new(move |b: &[u8]| miniz_oxide::deflate::compress_to_vec(b, level))
    };
    vec![
        ("deflate 1", deflate(1)),
        ("deflate 6", deflate(6)),
        ("deflate 9", deflate(9)),
        ("lz4", Box::new(|b: &[u8]| lz4_flex::block::compress(b))),
        (
            "zstd 3",
            Box::new(|b: &[u8]| zstd::bulk::compress(b, 3).unwrap()),
        ),
        (
            "zstd 19",
            Box::new(|b: &[u8]| zstd::bulk::compress(b, 19).unwrap()),
        ),
        (
            "zstd 3 + dict",
            Box::new(move |b: &[u8]| {
                let mut c = zstd::bulk::Compressor::with_dictionary(3, &dict).unwrap();
                c.compress(b).unwrap()
            }),
        ),
    ]
}

fn ratios() {
    let now_ms = outpost::agent::now_ms();
    let outputs: Vec<(&str, Vec<u8>)> = typical()
        .into_iter()
        .map(|(label, argv)| (label, run(&argv)))
        .collect();
    // Training samples: the other outputs, cut into pieces of about a result's
    // size, wrapped as results are (so frame bytes are learnt too).
    let mut samples = Vec::new();
    for (i, argv) in training().iter().enumerate() {
        let out = run(argv);
        for (j, piece) in out.chunks(2048).enumerate() {
            samples.push(wire(
                &[result_frame(
                    (i * 100 + j) as u64 + 1,
                    piece.to_vec(),
                    now_ms,
                )],
                now_ms,
            ));
        }
    }
    let dict = zstd::dict::from_samples(&samples, 16 * 1024).expect("train a zstd dictionary");
    let codecs = codecs(&dict);
    println!(
        "## Compressed / plain, one result payload each (wire form); dictionary: {} bytes from {} samples\n",
        dict.len(),
        samples.len()
    );
    print!("| output | plain bytes |");
    for (n, _) in &codecs {
        print!(" {n} |");
    }
    println!(" shipped (`shrink`) |");
    println!("|---|---:|{}---:|", "---:|".repeat(codecs.len()));
    let mut totals = vec![0usize; codecs.len() + 1];
    let mut plain_total = 0;
    let mut frames = Vec::new();
    for (i, (label, out)) in outputs.iter().enumerate() {
        let f = result_frame(i as u64 + 1, out.clone(), now_ms);
        let w = wire(std::slice::from_ref(&f), now_ms);
        frames.push(f);
        plain_total += w.len();
        print!("| {label} | {} |", w.len());
        for (k, (_, c)) in codecs.iter().enumerate() {
            let n = c(&w).len() + 1;
            totals[k] += n;
            print!(" {:.3} |", n as f64 / w.len() as f64);
        }
        let shipped = compress::shrink(w.clone());
        assert_eq!(compress::restore(&shipped).unwrap(), w);
        totals[codecs.len()] += shipped.len();
        println!(" {:.3} |", shipped.len() as f64 / w.len() as f64);
    }
    print!("| **all, one payload each** | {plain_total} |");
    for t in &totals {
        print!(" **{:.3}** |", *t as f64 / plain_total as f64);
    }
    println!();
    let batch = wire(&frames, now_ms);
    print!("| **all in one batch** | {} |", batch.len());
    for (_, c) in &codecs {
        print!(
            " **{:.3}** |",
            (c(&batch).len() + 1) as f64 / batch.len() as f64
        );
    }
    let shipped = compress::shrink(batch.clone());
    println!(" **{:.3}** |", shipped.len() as f64 / batch.len() as f64);
    // The measured row through the library: 100 results of the ten commands in
    // order, packed as `Node::poll_out` packs them (at most 64 KiB a payload, a
    // larger frame alone), each codec applied per payload under shrink's rule
    // (kept only when it saves 1/32 and 8 bytes; payloads under 128 bytes plain).
    let mut payloads: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut size = 0;
    for i in 0..100 {
        let f = result_frame(i as u64 + 1, outputs[i % outputs.len()].1.clone(), now_ms);
        let need = frame::packed_len(f.len());
        if size > 0 && size + need > 64 * 1024 {
            payloads.push(Vec::new());
            size = 0;
        }
        size += need;
        payloads.last_mut().unwrap().push(f);
    }
    let wires: Vec<Vec<u8>> = payloads.iter().map(|p| wire(p, now_ms)).collect();
    let plain: usize = wires.iter().map(Vec::len).sum();
    print!("| **100 results, {} payloads** | {plain} |", wires.len());
    for (_, c) in &codecs {
        let sent: usize = wires
            .iter()
            .map(|w| {
                let n = c(w).len() + 1;
                if w.len() < compress::MIN_LEN || n + w.len() / 32 + 8 > w.len() {
                    w.len()
                } else {
                    n
                }
            })
            .sum();
        print!(" **{:.3}** |", sent as f64 / plain as f64);
    }
    let sent: usize = wires
        .iter()
        .map(|w| compress::shrink(w.clone()).len())
        .sum();
    println!(" **{:.3}** |", sent as f64 / plain as f64);
    println!("\n(each compressed size counts the one byte that says it is compressed)\n");

    // Speed on a batch of text, and the cost of trying on random bytes.
    let mut chunk = vec![0u8; 16 * 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut chunk))
        .unwrap();
    let chunk_wire = {
        let env = Envelope {
            from: name("ship1"),
            to: name("central"),
            lane: frame::Lane::new("bulk").unwrap(),
            seq: 7,
            created_ms: now_ms,
            ttl_s: None,
            body: Body::FileChunk {
                id: "firmware.bin".into(),
                index: 3,
                data: chunk,
            },
        };
        wire(&[frame::encode(&env).unwrap()], now_ms)
    };
    println!("## Time per payload on this machine (x86_64), mean of repeated runs\n");
    println!(
        "| codec | text batch, {} bytes: µs | MB/s | 16 KiB random chunk: µs | its ratio |",
        batch.len()
    );
    println!("|---|---:|---:|---:|---:|");
    for (n, c) in &codecs {
        let t_text = time(|| c(&batch).len());
        let t_rand = time(|| c(&chunk_wire).len());
        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {:.3} |",
            t_text * 1e6,
            batch.len() as f64 / t_text / 1e6,
            t_rand * 1e6,
            (c(&chunk_wire).len() + 1) as f64 / chunk_wire.len() as f64
        );
    }
    let t_shrink = time(|| compress::shrink(chunk_wire.clone()).len());
    let t_copy = time(|| chunk_wire.clone().len());
    let sent = compress::shrink(chunk_wire.clone());
    println!(
        "| `shrink` (entropy check, then deflate 6) | {:.0} | {:.0} | {:.1} (of which {:.1} copying the payload) | {:.3} (sent {}) |",
        time(|| compress::shrink(batch.clone()).len()) * 1e6,
        batch.len() as f64 / time(|| compress::shrink(batch.clone()).len()) / 1e6,
        t_shrink * 1e6,
        t_copy * 1e6,
        sent.len() as f64 / chunk_wire.len() as f64,
        if sent == chunk_wire { "plain" } else { "deflated" }
    );
    println!();
}

/// Mean seconds of `f` over about half a second of runs.
fn time(mut f: impl FnMut() -> usize) -> f64 {
    let mut sink = f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_millis(500) {
        sink = sink.wrapping_add(f());
        n += 1;
    }
    std::hint::black_box(sink);
    start.elapsed().as_secs_f64() / n as f64
}

/// Bytes of one run of 100 exec results.
struct Run {
    /// Payload bytes (sealed, as published) to central's inbox: the results.
    to_central: usize,
    /// To ship1's: the commands, acks.
    to_ship: usize,
    /// On ship1's TCP link, both ways, MQTT framing included.
    link: u64,
    payloads: usize,
}

fn exec() {
    let on = exec_run(true);
    let off = exec_run(false);
    println!("## 100 exec results of typical commands, real binaries (central and ship1 through mosquitto)\n");
    println!("| | compressed | `compress = false` | ratio |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, a: u64, b: u64| {
        println!("| {what} | {a} | {b} | {:.3} |", a as f64 / b as f64);
    };
    row(
        "result payloads, ship1 → central (bytes)",
        on.to_central as u64,
        off.to_central as u64,
    );
    row(
        "command payloads, central → ship1 (bytes)",
        on.to_ship as u64,
        off.to_ship as u64,
    );
    row("ship1's TCP link, both ways (bytes)", on.link, off.link);
    println!(
        "\npayloads to central: {} compressed, {} not\n",
        on.payloads, off.payloads
    );
}

fn exec_run(compress: bool) -> Run {
    let tmp = TempDir::new();
    let base = tmp.path();
    introduce(base, "central", "ship1", "exec");
    let config = base.join("outpost.toml");
    std::fs::write(&config, format!("compress = {compress}\n")).unwrap();
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let capture = Capture::start(&broker, "outpost/+/in");
    let flags = ["--config", config.to_str().unwrap(), "--log-level", "info"];
    let central = Agent::start_with("central", &broker.url(), base, &flags);
    let ship = Agent::start_with("ship1", &proxy.url(), base, &flags);
    wait_until("central sees ship1 online", LONG, || {
        central.sees_online("ship1")
    });
    // The handshake first, so that only the commands and results are counted.
    let first = central.send_exec("ship1", "ordered", &["true"], None);
    wait_until("the first result", LONG, || {
        !central.job(first)["targets"][0]["result"].is_null()
    });
    wait_until("ship1 settled", LONG, || {
        ship.status()["outbox"].as_array().unwrap().is_empty()
    });
    wait_until("central settled", LONG, || {
        central.status()["outbox"].as_array().unwrap().is_empty()
    });
    let skip = capture.all().len();
    proxy.reset_counters();

    let commands = typical();
    let mut jobs = Vec::new();
    for i in 0..100 {
        let (label, argv) = &commands[i % commands.len()];
        jobs.push((label, central.send_exec("ship1", "ordered", argv, None)));
    }
    wait_until("100 results", LONG, || {
        central
            .results(200)
            .iter()
            .filter(|r| jobs.iter().any(|j| j.1 == r.0))
            .count()
            == 100
    });
    wait_until("ship1 settled", LONG, || {
        ship.status()["outbox"].as_array().unwrap().is_empty()
    });
    wait_until("central settled", LONG, || {
        central.status()["outbox"].as_array().unwrap().is_empty()
    });
    let results = central.results(200);
    for (label, job) in &jobs {
        let r = results.iter().find(|r| r.0 == *job).unwrap();
        assert!(r.2 == "ok" && !r.3.is_empty(), "{label}: {r:?}");
    }
    let seen = capture.all();
    let mut run = Run {
        to_central: 0,
        to_ship: 0,
        link: proxy.bytes_up() + proxy.bytes_down(),
        payloads: 0,
    };
    for (topic, payload) in &seen[skip..] {
        if topic == "outpost/central/in" {
            run.to_central += payload.len();
            run.payloads += 1;
        } else {
            run.to_ship += payload.len();
        }
    }
    drop((ship, central));
    run
}
