//! Agents through a mosquitto TLS listener (mutual TLS), with a test PKI made by
//! the openssl CLI (the same approach as the link's unit tests in
//! `src/link/tests.rs`, which test code cannot import).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::agent::{introduce, Agent};
use crate::support::broker::Broker;
use crate::support::{find_program, free_port, scaled, try_wait_for, TempDir};

const LONG: Duration = Duration::from_secs(120);

/// A certificate and its private key, both PEM files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

/// A self-signed CA in `dir` that issues certificates into the same directory.
struct Ca {
    dir: PathBuf,
    name: String,
}

impl Ca {
    /// Creates `{name}.key` and `{name}.crt` in `dir`.
    fn new(dir: &Path, name: &str) -> Ca {
        let ca = Ca {
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        let subject = format!("/CN=outpost test {name}");
        let (key, crt) = (ca.file("key"), ca.file("crt"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &subject,
                "-keyout",
                &key,
                "-out",
                &crt,
            ],
        );
        ca
    }

    /// `{dir}/{name}.{ext}` as a string, for openssl's arguments.
    fn file(&self, ext: &str) -> String {
        let path = self.dir.join(format!("{}.{ext}", self.name));
        path.to_str().expect("utf-8 temp path").to_owned()
    }

    /// Issues a certificate with common name `cn` (and `san`, e.g.
    /// `IP:127.0.0.1`) for a fresh P-256 key; files are named `{ca}-{cn}.*`.
    fn issue(&self, cn: &str, san: Option<&str>) -> Issued {
        let base = self.dir.join(format!("{}-{cn}", self.name));
        let path = |ext: &str| format!("{}.{ext}", base.display());
        let (key, csr, ext, crt) = (path("key"), path("csr"), path("ext"), path("crt"));
        let dir = &self.dir;
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &key,
            ],
        );
        let subject = format!("/CN={cn}");
        openssl(
            dir,
            &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr],
        );
        let mut extensions = String::from("basicConstraints=CA:FALSE\n");
        if let Some(san) = san {
            extensions += &format!("subjectAltName={san}\n");
        }
        fs::write(&ext, extensions).unwrap_or_else(|e| panic!("write {ext}: {e}"));
        let (ca_crt, ca_key) = (self.file("crt"), self.file("key"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        Issued {
            cert: crt.into(),
            key: key.into(),
        }
    }
}

/// Runs the openssl CLI in `dir`; panics with its stderr if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let bin = find_program("openssl").unwrap_or_else(|| {
        panic!(
            "openssl not found in PATH; the TLS tests make their certificates with it: \
             install it with `apt-get install openssl` (Debian/Ubuntu)"
        )
    });
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker with a second listener that speaks TLS and requires a client
/// certificate from `ca`, plus the files agents need to use it.
struct TlsBroker {
    broker: Broker,
    ca: Ca,
    url: String,
}

impl TlsBroker {
    /// Makes a CA and a server certificate for 127.0.0.1 and localhost in `dir`,
    /// then starts mosquitto with the mutual-TLS listener on a free port.
    fn start(dir: &Path) -> TlsBroker {
        let ca = Ca::new(dir, "ca");
        let server = ca.issue("broker", Some("IP:127.0.0.1,DNS:localhost"));
        // Another process could take this port before mosquitto binds it; the
        // broker helper retries only its own port, so that (rare) clash fails
        // the test with mosquitto's log.
        let port = free_port();
        // Without `per_listener_settings` the main listener's `allow_anonymous
        // true` covers this one too: the client certificate is the only check.
        let broker = Broker::start_with_config(&format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\n",
            ca.file("crt"),
            server.cert.display(),
            server.key.display(),
        ));
        TlsBroker {
            broker,
            ca,
            url: format!("mqtts://127.0.0.1:{port}"),
        }
    }

    /// Starts agent `name` on the TLS listener, trusting our CA and presenting
    /// `client`.
    fn agent(&self, name: &str, base: &Path, client: &Issued) -> Agent {
        let ca = self.ca.file("crt");
        let flags = [
            "--ca-file",
            &ca,
            "--client-cert",
            client.cert.to_str().expect("utf-8 temp path"),
            "--client-key",
            client.key.to_str().expect("utf-8 temp path"),
        ];
        Agent::start_with(name, &self.url, base, &flags)
    }

    /// Waits until `cond` returns `Some`; at the deadline panics with the logs of
    /// the broker and of `agents`.
    #[track_caller]
    fn wait_for<T>(&self, what: &str, agents: &[&Agent], cond: impl FnMut() -> Option<T>) -> T {
        if let Some(v) = try_wait_for(LONG, cond) {
            return v;
        }
        let mut logs = self.broker.log();
        for agent in agents {
            logs += &agent_log(agent);
        }
        panic!("timed out after {:?}: {what}\n{logs}", scaled(LONG));
    }
}

/// Everything `agent` logged, over all its starts.
fn agent_log(agent: &Agent) -> String {
    agent.full_log()
}

fn link(agent: &Agent) -> Value {
    agent.status()["link"].clone()
}

/// Whether the agent's process is alive (not exited, not a zombie).
fn is_running(agent: &Agent) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", agent.pid())).is_ok_and(|stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|s| !s.starts_with('Z'))
    })
}

#[test]
fn agents_exchange_commands_through_a_mutual_tls_listener() {
    let tmp = TempDir::new();
    let tls = TlsBroker::start(tmp.path());
    introduce(tmp.path(), "central", "ship1", "exec");
    let central = tls.agent("central", tmp.path(), &tls.ca.issue("central", None));
    let ship = tls.agent("ship1", tmp.path(), &tls.ca.issue("ship1", None));

    tls.wait_for("central sees ship1 online", &[&central, &ship], || {
        central.sees_online("ship1").then_some(())
    });
    assert_eq!(link(&central)["connected"], true);
    assert_eq!(link(&ship)["connected"], true);
    let out = central.cli(&["send", "--to", "ship1", "exec", "--", "echo", "over-tls"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ship1: over-tls\n");
}

#[test]
fn client_certificate_from_another_ca_is_refused_and_the_error_says_so() {
    let tmp = TempDir::new();
    let tls = TlsBroker::start(tmp.path());
    let rogue_ca = Ca::new(tmp.path(), "rogue");
    let rogue = tls.agent("rogue1", tmp.path(), &rogue_ca.issue("rogue1", None));
    // The listener itself works: an agent with a certificate from its CA gets on.
    let good = tls.agent("ship1", tmp.path(), &tls.ca.issue("ship1", None));
    tls.wait_for("ship1 connected over tls", &[&good], || {
        (link(&good)["connected"] == true).then_some(())
    });

    let error = tls.wait_for("rogue1 reports a link error", &[&rogue], || {
        link(&rogue)["last_error"].as_str().map(str::to_owned)
    });
    assert!(
        error
            .to_lowercase()
            .contains("broker rejected the client certificate (unknown ca)"),
        "the error says the broker did not know the certificate's ca: {error}"
    );
    // It keeps retrying (with backoff) and never gets on: the broker refuses
    // another handshake after the error was reported, and the agent is still up
    // and still disconnected.
    let refusals = || {
        let log = tls.broker.log();
        log.matches("certificate verify failed").count()
    };
    let seen = refusals();
    tls.wait_for("the agent retries and is refused again", &[&rogue], || {
        (refusals() > seen).then_some(())
    });
    assert!(is_running(&rogue), "the agent keeps running");
    assert_eq!(link(&rogue)["connected"], false, "{}", agent_log(&rogue));
}
