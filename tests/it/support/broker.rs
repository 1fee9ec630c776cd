//! A real mosquitto per test, on its own port, config and log.
//!
//! Each [`Broker`] owns a [`TempDir`] holding its config and one log file per
//! incarnation (`mosquitto-0.log`, `mosquitto-1.log` after a restart, ...), so a
//! failure message can show everything the broker said. Persistence is off: a
//! restart is a broker that lost every session, queue and retained message, the
//! worst case outpost's delivery must survive.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{find_program, free_port, scaled, try_wait_for, TempDir};

/// How long a broker may take to open its port (scaled by `slow_factor`).
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A mosquitto process listening on 127.0.0.1; killed on drop.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    extra: String,
    /// Whether the test defaults (no persistence, queue limit raised) are written.
    test_defaults: bool,
    /// Incarnations started so far; names the next log file.
    n_starts: u32,
    dir: TempDir,
}

impl Broker {
    /// Starts a broker with the default test config; see [`Broker::start_with_config`].
    pub fn start() -> Broker {
        Broker::start_with_config("")
    }

    /// Starts a broker on a free port with `extra` appended to its config (for
    /// example TLS listeners), and returns once the port accepts connections.
    ///
    /// Panics if mosquitto is missing or does not come up; the panic message
    /// carries the broker's log.
    pub fn start_with_config(extra: &str) -> Broker {
        Broker::start_inner(extra, true)
    }

    /// Starts a broker whose config is only the listener, logging and `extra`:
    /// mosquitto's own defaults for persistence and queue limits (benchmarks
    /// compare against a stock mosquitto).
    pub fn start_stock(extra: &str) -> Broker {
        Broker::start_inner(extra, false)
    }

    fn start_inner(extra: &str, test_defaults: bool) -> Broker {
        let mut broker = Broker {
            child: None,
            port: 0,
            extra: extra.to_owned(),
            test_defaults,
            n_starts: 0,
            dir: TempDir::new(),
        };
        // free_port() races with every other process picking ports; on a clash
        // try another port rather than fail the test.
        for _ in 0..5 {
            broker.port = free_port();
            match broker.spawn() {
                Ok(()) => return broker,
                Err(e) if e.addr_in_use => continue,
                Err(e) => panic!("{}", e.message),
            }
        }
        panic!(
            "mosquitto found no free port after 5 tries:\n{}",
            broker.log()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's own directory (config, logs); a place for TLS material.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the broker process is up (started and not stopped or crashed).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the broker with SIGKILL, as a crash or power cut would, and reaps it.
    /// Does nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker and starts a fresh one on the same port, returning once
    /// the port accepts connections again.
    ///
    /// mosquitto sets SO_REUSEADDR, so connections of the old broker left in
    /// TIME_WAIT do not block the port. Should something else hold the port for
    /// a moment (an outgoing connection that happened to get it as its local
    /// port while the broker was down), this retries until the start deadline.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = None;
        let started = try_wait_for(START_TIMEOUT, || match self.spawn() {
            Ok(()) => Some(()),
            Err(e) if e.addr_in_use => {
                last = Some(e.message);
                None
            }
            Err(e) => panic!("{}", e.message),
        });
        if started.is_none() {
            panic!(
                "mosquitto could not listen on port {} again within {:?}: {}",
                self.port,
                scaled(START_TIMEOUT),
                last.unwrap_or_default()
            );
        }
    }

    /// Everything every incarnation of this broker logged (its log files, then
    /// its stdout/stderr), for failure messages.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for n in 0..self.n_starts {
            for path in [self.log_path(n), self.stderr_path(n)] {
                let text = fs::read_to_string(&path).unwrap_or_default();
                if !text.is_empty() {
                    out.push_str(&format!("==> {} <==\n{text}\n", path.display()));
                }
            }
        }
        out
    }

    /// Waits until the broker's log contains `needle`; panics with the log at
    /// the deadline (scaled by `slow_factor`).
    ///
    /// With `log_type subscribe` on, `"{client_id} {qos} {topic}"` appears once
    /// mosquitto has added the subscription; mosquitto is single-threaded, so any
    /// publish it handles after writing that line is routed to the subscriber.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        if try_wait_for(timeout, || self.log().contains(needle).then_some(())).is_none() {
            panic!(
                "timed out after {:?}: broker log to contain {needle:?}:\n{}",
                scaled(timeout),
                self.log()
            );
        }
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("mosquitto-{n}.log"))
    }

    fn stderr_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("mosquitto-{n}.stderr"))
    }

    /// Writes the config for the next incarnation, spawns mosquitto and waits
    /// until it logged that it runs and its port accepts a connection.
    ///
    /// Both, because a connection alone could reach some other process that
    /// grabbed the port while this mosquitto is about to exit on EADDRINUSE.
    fn spawn(&mut self) -> Result<(), SpawnError> {
        let bin = find_program("mosquitto").unwrap_or_else(|| {
            panic!(
                "mosquitto not found in PATH or /usr/sbin; the integration tests need a real \
                 broker: install it with `apt-get install mosquitto` (Debian/Ubuntu)"
            )
        });
        let n = self.n_starts;
        self.n_starts += 1;
        let log_path = self.log_path(n);
        let conf_path = self.dir.path().join(format!("mosquitto-{n}.conf"));
        fs::write(&conf_path, self.config(&log_path))
            .unwrap_or_else(|e| panic!("write {}: {e}", conf_path.display()));

        let stderr_path = self.stderr_path(n);
        let out = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let err = out.try_clone().expect("clone stderr file");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.child = Some(child);

        let addr = self.addr();
        let up = try_wait_for(START_TIMEOUT, || {
            let child = self.child.as_mut().expect("child just spawned");
            if let Some(status) = child.try_wait().expect("try_wait on mosquitto") {
                return Some(Err(status));
            }
            let running = fs::read_to_string(&log_path).is_ok_and(|l| l.contains(" running"));
            let accepts =
                running && TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok();
            accepts.then_some(Ok(()))
        });
        match up {
            Some(Ok(())) => Ok(()),
            Some(Err(status)) => {
                self.child = None;
                let log = self.log();
                Err(SpawnError {
                    addr_in_use: fs::read_to_string(&log_path)
                        .is_ok_and(|l| l.contains("Address already in use")),
                    message: format!(
                        "mosquitto on port {} exited at start with {status}:\n{log}",
                        self.port
                    ),
                })
            }
            None => {
                self.stop();
                Err(SpawnError {
                    addr_in_use: false,
                    message: format!(
                        "mosquitto did not accept connections on port {} within {:?}:\n{}",
                        self.port,
                        scaled(START_TIMEOUT),
                        self.log()
                    ),
                })
            }
        }
    }

    fn config(&self, log_path: &Path) -> String {
        // Started as root, mosquitto switches to the `mosquitto` user, which
        // cannot write its log into our root-owned directory; `user root` keeps
        // it as is (the option only matters when running as root). A directory
        // we created is owned by our effective uid, so its owner tells us.
        let as_root = fs::metadata(self.dir.path()).is_ok_and(|m| m.uid() == 0);
        format!(
            "# written by tests/it/support/broker.rs\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             {user}\
             {defaults}\
             set_tcp_nodelay true\n\
             log_dest file {log}\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             # \"<client id> <qos> <topic>\": tests wait on it to know a client subscribed\n\
             log_type subscribe\n\
             log_timestamp_format %H:%M:%S\n\
             connection_messages true\n\
             {extra}\n",
            port = self.port,
            user = if as_root { "user root\n" } else { "" },
            defaults = if self.test_defaults {
                "persistence false\n\
                 # the stock limit of 1000 drops messages under test load\n\
                 max_queued_messages 100000\n"
            } else {
                ""
            },
            log = log_path.display(),
            extra = self.extra,
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct SpawnError {
    addr_in_use: bool,
    message: String,
}
