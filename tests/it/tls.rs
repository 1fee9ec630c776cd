//! Agents through a mosquitto TLS listener (mutual TLS), with a test PKI from
//! `support::pki`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::agent::{introduce, Agent};
use crate::support::broker::Broker;
use crate::support::pki::{self, Ca, Issued};
use crate::support::{free_port, scaled, try_wait_for, TempDir};

const LONG: Duration = Duration::from_secs(120);

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
            "listener {port} 127.0.0.1\n{}",
            pki::mosquitto_tls(&ca, &server, true)
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
        let flags = [
            "--ca-file",
            self.ca.cert().to_str().expect("utf-8 temp path"),
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
