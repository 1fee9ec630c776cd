//! Shared files through the real binary, a real broker and the fault proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use outpost::control::Request;

use crate::agent::{introduce, Agent};
use crate::support::broker::Broker;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(300);

/// `central` on the broker, `ship1` behind a proxy that counts its bytes.
struct Rig {
    tmp: TempDir,
    _broker: Broker,
    proxy: Proxy,
    central: Agent,
    ship: Agent,
}

impl Rig {
    fn new(extra: &[&str]) -> Rig {
        let tmp = TempDir::new();
        introduce(tmp.path(), "central", "ship1", "exec,files");
        let broker = Broker::start();
        let proxy = Proxy::start(broker.addr());
        let central = Agent::start_with("central", &broker.url(), tmp.path(), extra);
        let ship = Agent::start_with("ship1", &proxy.url(), tmp.path(), extra);
        wait_until("central sees ship1 online", LONG, || {
            central.sees_online("ship1")
        });
        Rig {
            tmp,
            _broker: broker,
            proxy,
            central,
            ship,
        }
    }

    fn put(&self, src: &Path, id: &str) -> i64 {
        let req = Request::FilesPut {
            to: "ship1".into(),
            path: src.to_str().unwrap().into(),
            id: Some(id.into()),
            ttl_s: None,
        };
        self.central.call(&req)["transfers"][0]["transfer"]
            .as_i64()
            .unwrap()
    }

    fn transfer(&self, agent: &Agent, id: i64) -> Value {
        agent.call(&Request::Transfer { id })["transfer"].clone()
    }

    fn wait_finished(&self, id: i64) -> Value {
        wait_for("the transfer finishes", LONG, || {
            let t = self.transfer(&self.central, id);
            (t["finished"] == true).then_some(t)
        })
    }

    fn received(&self, id: &str) -> PathBuf {
        self.ship.dir.join("files").join("central").join(id)
    }
}

/// Deterministic pseudo-random bytes (incompressible, like firmware).
fn random_file(path: &Path, size: usize) {
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ size as u64;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        data.extend_from_slice(&seed.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, data).unwrap();
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    outpost::files::sha256_file(a).unwrap() == outpost::files::sha256_file(b).unwrap()
}

#[test]
fn twenty_mib_put_survives_ten_cuts_and_a_receiver_kill_with_little_overhead() {
    let mut rig = Rig::new(&["--durability", "normal"]);
    let src = rig.tmp.path().join("firmware.bin");
    let size = 20 * 1024 * 1024;
    random_file(&src, size);
    rig.proxy.reset_counters();
    let t = rig.put(&src, "firmware.bin");
    let progress = |rig: &Rig| {
        let v = rig.transfer(&rig.central, t);
        v["bytes"].as_u64().unwrap_or(0)
    };
    let mut cuts = 0;
    let mut killed = false;
    while rig.transfer(&rig.central, t)["finished"] != true {
        let before = progress(&rig);
        // Let some bytes through, then cut (or, once, kill the receiver instead).
        let step = size as u64 / 14;
        let moved = crate::support::try_wait_for(LONG, || {
            (progress(&rig) >= before + step || rig.transfer(&rig.central, t)["finished"] == true)
                .then_some(())
        });
        assert!(moved.is_some(), "no progress after {cuts} cuts");
        if cuts == 5 && !killed {
            rig.ship.kill9_and_restart();
            killed = true;
        } else {
            rig.proxy.cut();
            cuts += 1;
        }
    }
    let v = rig.wait_finished(t);
    assert_eq!(v["state"], "done", "{v}");
    assert!(cuts >= 10, "only {cuts} cuts happened during the transfer");
    assert!(killed);
    assert!(
        same_bytes(&src, &rig.received("firmware.bin")),
        "the received file differs"
    );
    let wire = rig.proxy.bytes_up() + rig.proxy.bytes_down();
    eprintln!(
        "20 MiB put: {wire} bytes crossed the node's link ({:.3}x), {cuts} cuts, 1 kill",
        wire as f64 / size as f64
    );
    assert!(
        wire as f64 <= 1.10 * size as f64,
        "{wire} bytes on the wire for {size}"
    );

    // The same put again sends no chunks. Chunks of the first put still waiting
    // for their ack (and maybe resent) are the first put's bytes: let them drain.
    wait_until("the first put's chunks are acknowledged", LONG, || {
        rig.central.status()["outbox"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["lane"] != "bulk")
    });
    rig.proxy.reset_counters();
    let t2 = rig.put(&src, "firmware.bin");
    let v = rig.wait_finished(t2);
    assert_eq!(v["state"], "skipped", "{v}");
    let wire = rig.proxy.bytes_up() + rig.proxy.bytes_down();
    eprintln!("repeated put: {wire} bytes on the wire");
    assert!(
        wire < 4096,
        "{wire} bytes for a file the node already holds"
    );
}

#[test]
fn node_to_node_share_lands_under_the_sender() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "node-a", "node-b", "files");
    let broker = Broker::start();
    let a = Agent::start_with("node-a", &broker.url(), tmp.path(), &[]);
    let b = Agent::start_with("node-b", &broker.url(), tmp.path(), &[]);
    wait_until("a sees b", LONG, || a.sees_online("node-b"));
    let src = tmp.path().join("notes.txt");
    std::fs::write(&src, b"shared from a\n").unwrap();
    let out = a.cli(&["files", "put", "--to", "node-b", src.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node-b: notes.txt done"),
        "{out:?}"
    );
    let list = b.call(&Request::FilesList);
    let f = &list["files"][0];
    assert_eq!(
        (f["source"].as_str(), f["id"].as_str()),
        (Some("node-a"), Some("notes.txt"))
    );
    assert_eq!(
        std::fs::read(b.dir.join("files/node-a/notes.txt")).unwrap(),
        b"shared from a\n"
    );
}

#[test]
fn an_exec_sent_after_a_large_file_finishes_before_the_file() {
    let rig = Rig::new(&["--durability", "normal"]);
    let src = rig.tmp.path().join("big.bin");
    random_file(&src, 8 * 1024 * 1024);
    // A slow link, so the file takes a while.
    rig.proxy.set_rate(Some(1024 * 1024));
    let t = rig.put(&src, "big.bin");
    wait_until("the transfer is under way", LONG, || {
        rig.transfer(&rig.central, t)["bytes"].as_u64().unwrap_or(0) > 0
    });
    let job = rig
        .central
        .send_exec("ship1", "ordered", &["echo", "ahead"], None);
    let j = wait_for("the exec result", LONG, || {
        let j = rig.central.job(job);
        (!j["targets"][0]["result"].is_null()).then_some(j)
    });
    assert_eq!(j["targets"][0]["result"]["stdout"], "ahead\n");
    assert_ne!(
        rig.transfer(&rig.central, t)["finished"],
        true,
        "the exec overtook the file"
    );
    rig.proxy.set_rate(None);
    assert_eq!(rig.wait_finished(t)["state"], "done");
}

#[test]
fn hostile_ids_and_planted_symlinks_write_nothing_outside_the_files_directory() {
    let rig = Rig::new(&[]);
    let src = rig.tmp.path().join("payload");
    std::fs::write(&src, b"owned").unwrap();
    for id in ["../../etc/passwd", "/abs", "a/b", ".."] {
        let req = Request::FilesPut {
            to: "ship1".into(),
            path: src.to_str().unwrap().into(),
            id: Some(id.into()),
            ttl_s: None,
        };
        let err = outpost::control::Client::connect(&rig.central.dir)
            .unwrap()
            .call(&req, Duration::from_secs(30));
        assert!(err.unwrap_err().contains("invalid file id"), "{id}");
    }
    // A symlink planted where the source's directory would be: refused by the node.
    let outside = rig.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let files_dir = rig.ship.dir.join("files");
    std::fs::create_dir_all(&files_dir).unwrap();
    std::os::unix::fs::symlink(&outside, files_dir.join("central")).unwrap();
    let t = rig.put(&src, "innocent");
    let v = rig.wait_finished(t);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("symlink"), "{v}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written through the symlink"
    );
}

#[test]
fn a_transfer_whose_ttl_lapses_is_swept_on_both_sides() {
    let rig = Rig::new(&[]);
    let src = rig.tmp.path().join("late.bin");
    random_file(&src, 512 * 1024);
    rig.proxy.set_mode(Mode::Blackhole);
    let req = Request::FilesPut {
        to: "ship1".into(),
        path: src.to_str().unwrap().into(),
        id: Some("late.bin".into()),
        ttl_s: Some(2),
    };
    let t = rig.central.call(&req)["transfers"][0]["transfer"]
        .as_i64()
        .unwrap();
    let v = rig.wait_finished(t);
    assert_eq!(v["state"], "expired", "{v}");
    rig.proxy.set_mode(Mode::Pass);
    rig.proxy.cut();
    // The node swept its side too: no file, no partial file, and if the offer
    // reached it, its transfer says expired.
    wait_until("the node is connected again", LONG, || {
        rig.ship.status()["link"]["connected"] == true
    });
    let list = rig.ship.call(&Request::FilesList);
    assert!(list["files"].as_array().unwrap().is_empty());
    for t in list["transfers"].as_array().unwrap() {
        wait_until("the node's transfer is swept", LONG, || {
            let v = rig.ship.call(&Request::Transfer {
                id: t["transfer"].as_i64().unwrap(),
            })["transfer"]
                .clone();
            v["state"] == "expired" || v["state"] == "failed"
        });
    }
    assert!(!rig.received("late.bin").exists());
    assert!(!rig.ship.dir.join("files/central/.late.bin.part").exists());
}

/// Writes `size` pseudo-random bytes without holding them in memory.
fn random_file_streamed(path: &Path, size: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0;
    while written < size {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        f.write_all(&seed.to_le_bytes()).unwrap();
        written += 8;
    }
    f.flush().unwrap();
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn receiving_two_hundred_mib_keeps_memory_flat() {
    let rig = Rig::new(&["--durability", "normal"]);
    let src = rig.tmp.path().join("image.bin");
    random_file_streamed(&src, 200 * 1024 * 1024);
    // Idle, after a warm-up exchange has touched every code path once.
    let warm = rig.tmp.path().join("warm.bin");
    random_file(&warm, 256 * 1024);
    assert_eq!(
        rig.wait_finished(rig.put(&warm, "warm.bin"))["state"],
        "done"
    );
    let idle = rss_kib(rig.ship.pid(), "VmRSS:");
    let t = rig.put(&src, "image.bin");
    let v = wait_for("the 200 MiB transfer", Duration::from_secs(900), || {
        let v = rig.transfer(&rig.central, t);
        (v["finished"] == true).then_some(v)
    });
    assert_eq!(v["state"], "done", "{v}");
    let peak = rss_kib(rig.ship.pid(), "VmHWM:");
    eprintln!("200 MiB receive: idle RSS {idle} KiB, peak RSS {peak} KiB");
    assert!(same_bytes(&src, &rig.received("image.bin")));
    assert!(
        peak <= idle + 6 * 1024,
        "peak {peak} KiB against idle {idle} KiB"
    );
}

#[test]
fn files_get_fetches_only_from_share_directories() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "files");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("app.log"), b"log line\n").unwrap();
    std::fs::write(tmp.path().join("secret"), b"not shared").unwrap();
    let broker = Broker::start();
    let central = Agent::start_with("central", &broker.url(), tmp.path(), &[]);
    let ship = Agent::start_with(
        "ship1",
        &broker.url(),
        tmp.path(),
        &["--share-dir", share.to_str().unwrap()],
    );
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let _ = &ship;
    let dest = tmp.path().join("fetched.log");
    let out = central.cli(&[
        "files",
        "get",
        "--from",
        "ship1",
        "app.log",
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"log line\n");
    // Outside the share directory, by traversal or by absolute path: refused.
    for path in ["../secret", tmp.path().join("secret").to_str().unwrap()] {
        let out = central.cli(&["files", "get", "--from", "ship1", path]);
        assert!(!out.status.success(), "{path}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("not a file in this node's share directories"),
            "{out:?}"
        );
    }
}
