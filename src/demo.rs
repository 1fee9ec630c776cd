//! `outpost demo`: a broker, a `central` and two nodes on this machine, one of them
//! behind a link that goes down and comes back, to show store-and-forward at work.
//!
//! Everything lives in a temporary directory and is stopped at the end. The agents
//! are this same binary, started as child processes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{Client, CommandSpec};
use crate::frame::{Method, Name};
use crate::trust;

/// Children killed when the demo ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(keep: bool) -> Result<(), String> {
    let mosquitto = find_mosquitto().ok_or(
        "mosquitto is not installed; install it with `sudo apt-get install -y mosquitto` (Debian/Ubuntu) and run the demo again",
    )?;
    let dir = std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(&dir, &mosquitto);
    if keep {
        println!("demo files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(dir: &Path, mosquitto: &Path) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut procs = Procs(Vec::new());

    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    // As root, mosquitto drops to its own user and could not read our directory.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}"),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("mosquitto.log")).map_err(|e| e.to_string())?;
    procs.0.push(
        Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start mosquitto: {e}"))?,
    );
    wait(
        "the broker to accept connections",
        Duration::from_secs(10),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    )?;
    println!("1. broker: mosquitto on 127.0.0.1:{port}");

    // node-b reaches the broker through a link we can cut.
    let link = FlakyLink::start(port)?;
    let broker = format!("mqtt://127.0.0.1:{port}");
    let flaky = format!("mqtt://127.0.0.1:{}", link.port);
    introduce(dir)?;
    for (name, url) in [
        ("central", &broker),
        ("node-a", &broker),
        ("node-b", &flaky),
    ] {
        let state = dir.join(name);
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        procs.0.push(
            Command::new(&me)
                .args([
                    "agent",
                    "--name",
                    name,
                    "--broker",
                    url,
                    "--backoff-cap",
                    "2s",
                    "--durability",
                    "normal",
                ])
                .arg("--state-dir")
                .arg(&state)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start agent {name}: {e}"))?,
        );
    }
    let central = dir.join("central");
    wait(
        "central to see both nodes online",
        Duration::from_secs(30),
        || {
            online(&central)
                .is_ok_and(|o| o.contains(&"node-a".into()) && o.contains(&"node-b".into()))
        },
    )?;
    println!("2. agents: central, node-a (direct) and node-b (behind a flaky link) are online");

    link.set_up(false);
    wait(
        "central to see node-b offline",
        Duration::from_secs(30),
        || online(&central).is_ok_and(|o| !o.contains(&"node-b".into())),
    )?;
    println!("3. node-b's link is down; sending 5 ordered commands to both nodes");
    let mut jobs = Vec::new();
    for i in 1..=5 {
        let argv = vec![
            "sh".into(),
            "-c".into(),
            format!("echo step {i} on $(hostname) at $(date +%T.%N | cut -c1-12)"),
        ];
        let spec = CommandSpec::Exec {
            argv,
            env: vec![],
            cwd: None,
            stdin: String::new(),
            timeout_ms: None,
            rerun: false,
        };
        let reply = Client::connect(&central)?.send("node-a,node-b", None, None, spec)?;
        jobs.push(reply.job);
    }
    wait("node-a's results", Duration::from_secs(30), || {
        results_for(&central, &jobs, "node-a").is_ok_and(|r| r.len() == 5)
    })?;
    for line in results_for(&central, &jobs, "node-a")? {
        println!("   node-a: {line}");
    }
    println!("   node-b: (nothing yet: its 5 commands wait in central's outbox)");
    for o in Client::connect(&central)?.status()?.outbox {
        println!("   central outbox to {}: {} frames", o.peer, o.frames);
    }

    println!("4. node-b's link comes back");
    link.set_up(true);
    wait("node-b's results", Duration::from_secs(60), || {
        results_for(&central, &jobs, "node-b").is_ok_and(|r| r.len() == 5)
    })?;
    for line in results_for(&central, &jobs, "node-b")? {
        println!("   node-b: {line}");
    }
    println!(
        "5. every command ran exactly once, in order, and every result came back; cleaning up"
    );
    drop(procs);
    Ok(())
}

/// Key pairs for everyone; the nodes let central run exec, central takes their results.
fn introduce(dir: &Path) -> Result<(), String> {
    let mut public = Vec::new();
    for name in ["central", "node-a", "node-b"] {
        public.push(*trust::generate(&dir.join(name), true)?.as_bytes());
    }
    let name = |s: &str| Name::new(s).expect("valid name");
    for (i, node) in ["node-a", "node-b"].into_iter().enumerate() {
        let allow = vec![Method::Exec];
        let central = trust::Peer {
            allow,
            ..trust::Peer::new(name("central"), public[0])
        };
        trust::upsert(&dir.join(node), central)?;
        let peer = trust::Peer::new(name(node), public[i + 1]);
        trust::upsert(&dir.join("central"), peer)?;
    }
    Ok(())
}

fn online(state: &Path) -> Result<Vec<String>, String> {
    let s = Client::connect(state)?.status()?;
    Ok(s.peers
        .into_iter()
        .filter(|p| p.online)
        .map(|p| p.name)
        .collect())
}

fn results_for(state: &Path, jobs: &[i64], node: &str) -> Result<Vec<String>, String> {
    let mut c = Client::connect(state)?;
    let mut out = Vec::new();
    for id in jobs {
        for t in c.job(*id)?.targets {
            if let (true, Some(r)) = (t.node == node, &t.result) {
                out.push(r.stdout.trim().to_string());
            }
        }
    }
    Ok(out)
}

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn find_mosquitto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// A TCP relay to the broker that can be taken down (live connections cut, new ones
/// refused) and brought back.
struct FlakyLink {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl FlakyLink {
    fn start(upstream: u16) -> Result<FlakyLink, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut list = conns2.lock().unwrap();
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        list.push(c);
                    }
                }
                pump(&client, &server);
                pump(&server, &client);
            }
        });
        Ok(FlakyLink { port, up, conns })
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
