//! Scenario 2, bytes on the wire: what the node's link carries, counted by the proxy in
//! front of the node at the TCP level (`bytes_up + bytes_down`, MQTT framing
//! included), for outpost and for the same exchanges carried the way thin-edge.io
//! documents its command API, both measured in the same run on the same broker:
//!
//! - (a) one `exec uptime` round trip, alone: from the command leaving the operator
//!   side until the result, every acknowledgement and (for JSON) the clearing message
//!   have crossed the link and the counters stopped moving;
//! - (b) per command, when N queued `exec uptime` commands and their results are
//!   replayed after an outage: counters reset while the link is down, then
//!   everything from the reconnection (MQTT CONNECT, and the TLS handshake over
//!   TLS, included) until every result is at the operator side and all is quiet,
//!   divided by N;
//!
//! once over plain TCP and once through a TLS listener (TLS records and handshakes
//! included), plus the bytes outpost adds to an empty command (`ping`): its MQTT
//! PUBLISH on the node's link, split into MQTT framing, sealing and frame, measured
//! and cross-checked against the sizes the real encoders produce.
//!
//! The JSON baseline is two rumqttc clients: a device behind its own counting proxy
//! that runs the real `uptime`, and an operator connected to the broker directly.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{
    Client, Connection, Event, MqttOptions, Packet, QoS, RecvTimeoutError, TlsConfiguration,
    Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use x25519_dalek::{PublicKey, StaticSecret};

use outpost::control::CommandSpec;
use outpost::frame::{self, Body, Envelope, Lane, Name};
use outpost::seal::{self, Header};

use crate::report::{Figure, Report, Target};
use crate::rig::{exec, Gate, Pair, LONG};
use crate::support::broker::Broker;
use crate::support::outpost::Agent;
use crate::support::pki::{self, Ca, Issued};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{free_port, wait_for, wait_until, TempDir};
use crate::Opts;

const SCENARIO: &str = "2 wire";
/// Long enough that no keepalive ping lands in a measurement window; the JSON
/// clients use the same.
const KEEPALIVE_S: u64 = 600;
/// How long the counters must stay unchanged before a window counts as finished:
/// well above outpost's 50 ms ack batching and any broker turnaround on loopback.
const QUIET: Duration = Duration::from_secs(1);
/// Pause before a JSON client retries a refused connection (its reconnect backoff).
const RETRY: Duration = Duration::from_millis(250);
/// How long the JSON exchange may make no progress before the run fails.
const STALLED: Duration = Duration::from_secs(120);
/// Ratio targets from issue 7.
const TARGET_ONE: f64 = 0.5;
const TARGET_REPLAY: f64 = 0.25;

/// thin-edge.io's command status topics for the main device, for a command of type
/// `command` (the type the Cumulocity mapper gives shell commands, `c8y_Command`).
const TE_COMMAND: &str = "te/device/main///cmd/command";
/// What the real tedge-agent subscribes to: every command of the main device.
const TE_FILTER: &str = "te/device/main///cmd/+/+";
/// The baseline device's client id: as long as outpost's node name (`node`).
const TE_DEVICE_ID: &str = "edge";
const TE_OPERATOR_ID: &str = "operator";

pub fn run(r: &mut Report, o: &Opts) {
    let n = o.count(1000);
    let pki = Pki::new();
    let plain = measure(LinkKind::Plain, n, &pki);
    let tls = measure(LinkKind::Tls, n, &pki);
    for m in [&plain, &tls] {
        report_pair(r, m, n);
    }
    if let Some(p) = &plain.ping {
        report_ping(r, p);
    }
    r.note(format!(
        "2 wire: JSON baseline payloads (thin-edge.io command API, minimal shape): init {} B \
         `{}`, executing {} B, successful {} B with uptime's output as \"result\", clear 0 B \
         (empty retained); topics `{TE_COMMAND}/<id>` ({} B plus the decimal id, counted from \
         1), all QoS 1 retained; device client id `{TE_DEVICE_ID}` (4 characters, like outpost's node \
         `node`), clean session, keepalive {KEEPALIVE_S} s for both systems",
        plain.sizes.init,
        plain.sizes.init_text,
        plain.sizes.executing,
        plain.sizes.successful,
        TE_COMMAND.len() + 1,
    ));
    r.note(format!(
        "2 wire: split up/down, plain: outpost (a) {} / {} B, JSON (a) {} / {} B; outpost (b) \
         {} / {} B, JSON (b) {} / {} B for {n} commands",
        plain.outpost.one.up,
        plain.outpost.one.down,
        plain.json.one.up,
        plain.json.one.down,
        plain.outpost.replay.up,
        plain.outpost.replay.down,
        plain.json.replay.up,
        plain.json.replay.down,
    ));
    r.note(
        "2 wire: TLS = a mosquitto TLS listener (server certificate only, P-256 ECDSA, no \
         client certificate); outpost's node and the JSON device both use rustls (ring) \
         through their proxies, so (b) includes a full handshake on reconnection for both",
    );
}

/// Which listener the node's proxy forwards to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LinkKind {
    Plain,
    Tls,
}

impl LinkKind {
    fn label(self) -> &'static str {
        match self {
            LinkKind::Plain => "plain TCP",
            LinkKind::Tls => "TLS",
        }
    }
}

/// Bytes counted by a proxy over one window.
#[derive(Clone, Copy, Debug, Default)]
struct Counted {
    up: u64,
    down: u64,
}

impl Counted {
    fn read(proxy: &Proxy) -> Counted {
        Counted {
            up: proxy.bytes_up(),
            down: proxy.bytes_down(),
        }
    }

    fn total(self) -> u64 {
        self.up + self.down
    }
}

/// One system's figures on one kind of link.
struct SystemBytes {
    /// (a): one round trip.
    one: Counted,
    /// (b): the whole replay of N commands.
    replay: Counted,
}

/// Sizes of the JSON payloads the baseline exchanged, for the note.
#[derive(Clone, Default)]
struct JsonSizes {
    init: usize,
    init_text: String,
    executing: usize,
    successful: usize,
}

struct Measured {
    link: LinkKind,
    outpost: SystemBytes,
    json: SystemBytes,
    sizes: JsonSizes,
    ping: Option<PingOverhead>,
}

/// Runs outpost, then the JSON baseline, on one broker with the node's proxy on
/// `link`; the empty-command overhead only over plain TCP (TLS adds nothing
/// command-specific to it).
fn measure(link: LinkKind, n: usize, pki: &Pki) -> Measured {
    eprintln!("  {}: outpost", link.label());
    let (broker, tls_addr) = pki.broker();
    let plain_addr = broker.addr();
    let pair = match link {
        LinkKind::Plain => Pair::start_on(broker, &["--keepalive", &format!("{KEEPALIVE_S}s")]),
        LinkKind::Tls => tls_pair(broker, tls_addr, pki),
    };
    let one = outpost_round_trip(&pair);
    let ping = (link == LinkKind::Plain).then(|| ping_overhead(&pair));
    let replay = outpost_replay(&pair, n);
    let outpost = SystemBytes { one, replay };

    eprintln!("  {}: JSON baseline", link.label());
    let upstream = match link {
        LinkKind::Plain => plain_addr,
        LinkKind::Tls => tls_addr,
    };
    let proxy = Proxy::start(upstream);
    let operator = TeOperator::start(plain_addr);
    let tls = (link == LinkKind::Tls).then(|| pki.client_config());
    let device = TeDevice::start(proxy.addr(), tls);
    let one = json_round_trip(&proxy, &operator, &device);
    let replay = json_replay(&proxy, &operator, &device, n);
    let sizes = device.sizes(&operator);
    drop(device);
    drop(operator);
    drop(pair);
    Measured {
        link,
        outpost,
        json: SystemBytes { one, replay },
        sizes,
        ping,
    }
}

fn report_pair(r: &mut Report, m: &Measured, n: usize) {
    let link = m.link.label();
    r.add(
        Figure::new(
            SCENARIO,
            &format!("(a) one exec uptime round trip, bytes on the node's link ({link})"),
            m.outpost.one.total() as f64,
            "B",
        )
        .against("thin-edge.io JSON", m.json.one.total() as f64)
        .target(Target::AtMost(TARGET_ONE)),
    );
    r.add(
        Figure::new(
            SCENARIO,
            &format!(
                "(b) per command, {n} exec uptime replayed after an outage, bytes on the \
                 node's link ({link})"
            ),
            m.outpost.replay.total() as f64 / n as f64,
            "B/command",
        )
        .against("thin-edge.io JSON", m.json.replay.total() as f64 / n as f64)
        .target(Target::AtMost(TARGET_REPLAY)),
    );
}

// ---------------------------------------------------------------------------------
// outpost

/// Waits until nothing is left to send on either side and the node's link is quiet.
fn wait_idle(pair: &Pair) {
    loop {
        wait_until("both outboxes are empty", LONG, || {
            Pair::outbox(&pair.central) == 0 && Pair::outbox(&pair.node) == 0
        });
        settle(&pair.proxy);
        if Pair::outbox(&pair.central) == 0 && Pair::outbox(&pair.node) == 0 {
            return;
        }
    }
}

/// (a) for outpost: one `exec uptime` from the central and its result, with every
/// acknowledgement in both directions.
fn outpost_round_trip(pair: &Pair) -> Counted {
    wait_idle(pair);
    pair.proxy.reset_counters();
    let job = pair.send("ordered", exec(&["uptime"]));
    let status = wait_for("the uptime result reaches the central", LONG, || {
        result_status(&pair.central, job)
    });
    assert_eq!(status, "ok", "exec uptime: {}", pair.central.job(job));
    wait_idle(pair);
    Counted::read(&pair.proxy)
}

/// The status of job `id`'s result, once the central has it.
fn result_status(central: &Agent, id: i64) -> Option<String> {
    let job = central.job(id);
    job["targets"][0]["result"]["status"]
        .as_str()
        .map(str::to_string)
}

/// (b) for outpost: `n` commands queued on the ordered lane while the link is down,
/// then the link returns; every byte from the reconnection until all results are in
/// and acknowledged.
fn outpost_replay(pair: &Pair, n: usize) -> Counted {
    wait_idle(pair);
    pair.link_down();
    let jobs: Vec<i64> = (0..n)
        .map(|_| pair.send("ordered", exec(&["uptime"])))
        .collect();
    pair.proxy.reset_counters();
    pair.link_up();
    // Commands acked (central outbox), run (node inbox), results acked (node outbox)
    // and recorded (central inbox): all four empty means every result is in.
    wait_until("every replayed result reaches the central", LONG, || {
        Pair::outbox(&pair.central) == 0
            && Pair::inbox(&pair.node) == 0
            && Pair::outbox(&pair.node) == 0
            && Pair::inbox(&pair.central) == 0
    });
    wait_idle(pair);
    let counted = Counted::read(&pair.proxy);
    check_results(&pair.central, &jobs);
    counted
}

/// Panics unless every job in `jobs` has an `ok` result with output, recorded in the
/// order the commands were queued.
fn check_results(central: &Agent, jobs: &[i64]) {
    let results = central.results(jobs.len() as u32);
    let ids: Vec<i64> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        ids,
        jobs,
        "outpost lost results: {} of {} replayed commands have one",
        results.len(),
        jobs.len()
    );
    for (job, _, status, stdout) in &results {
        assert!(
            status == "ok" && !stdout.is_empty(),
            "job {job}: status {status}, stdout {stdout:?}"
        );
    }
    let in_order = results.windows(2).all(|w| w[0].1 < w[1].1);
    assert!(
        in_order,
        "outpost recorded the replayed results out of order"
    );
}

/// The bytes outpost adds to an empty command, measured and computed.
struct PingOverhead {
    /// bytes_down while the ping crossed the link (its PUBLISH and one PUBACK).
    measured: Counted,
    /// MQTT PUBLISH size of the ping, computed from the real encoders.
    publish: usize,
    /// ... of which MQTT framing: fixed header, topic with its length, packet id.
    mqtt: usize,
    /// ... sealing: clear header and AEAD tag.
    seal: usize,
    /// ... the frame in its wire form (`frame::compact`: no names, deltas, no CRC),
    /// with the payload's version byte.
    frame: usize,
    /// The same frame as stored (version, postcard envelope, CRC), for comparison.
    stored: usize,
    /// The node's PUBLISH acknowledging the ping (the Ack frame), computed.
    ack_publish: usize,
}

/// MQTT 3.1.1 PUBACK: fixed header, remaining length, packet id.
const PUBACK: u64 = 4;

/// A `ping` command delivered to the node while a gate command holds the ordered
/// lane, so the ping is stored and acknowledged but neither run nor answered: the
/// node's link then carries only the ping's PUBLISH and the broker's PUBACK (down),
/// the node's PUBACK and its Ack frame (up).
fn ping_overhead(pair: &Pair) -> PingOverhead {
    let gate = Gate::new(pair.tmp.path());
    let gate_job = pair.send("ordered", gate.command());
    // After a second the node announces the running command (Started frame); let
    // that exchange finish before the window opens.
    wait_until("the gate command is reported running", LONG, || {
        pair.central.job(gate_job)["targets"][0]["state"] == "running"
    });
    wait_idle(pair);
    pair.proxy.reset_counters();
    let ping = pair.send("ordered", CommandSpec::Ping);
    wait_idle(pair);
    let measured = Counted::read(&pair.proxy);

    let job = pair.central.job(ping);
    let seq = job["targets"][0]["seq"].as_u64().expect("ping seq");
    let created_ms = job["created_ms"].as_u64().expect("ping created_ms");
    gate.open();
    for id in [gate_job, ping] {
        let status = wait_for("the gate and the ping finish", LONG, || {
            result_status(&pair.central, id)
        });
        assert_eq!(status, "ok", "job {id}: {}", pair.central.job(id));
    }
    wait_idle(pair);

    let command = Envelope {
        from: name("central"),
        to: name("node"),
        lane: Lane::new("ordered").expect("lane"),
        seq,
        created_ms,
        ttl_s: None,
        body: Body::Command(frame::Command::Ping),
    };
    let sizes = sealed_publish(&command);
    let ack = Envelope {
        from: name("node"),
        to: name("central"),
        lane: Lane::new("ordered").expect("lane"),
        seq: 0,
        created_ms,
        ttl_s: None,
        body: Body::Ack { upto: seq },
    };
    PingOverhead {
        measured,
        ack_publish: sealed_publish(&ack).publish,
        ..sizes
    }
}

fn name(s: &str) -> Name {
    Name::new(s).expect("node name")
}

/// The sizes of the MQTT PUBLISH that carries `env` alone, as the agent builds it:
/// `frame::encode`, `frame::pack`, `frame::compact` (sent the moment it was
/// created), `seal::seal` for the receiver, QoS 1 PUBLISH to the receiver's inbox
/// topic (default prefix `outpost`, src/config.rs).
fn sealed_publish(env: &Envelope) -> PingOverhead {
    let encoded = frame::encode(env).expect("encode frame");
    let packed = frame::compact(
        &frame::pack([encoded.as_slice()]),
        &env.from,
        &env.to,
        env.created_ms,
    )
    .expect("compact frame");
    // Steady state: the receiver knows the sender's epoch, so the header omits it.
    let header = Header {
        sender_epoch: None,
        receiver_hint: seal::hint(0x21),
        sender: env.from.clone(),
        receiver: env.to.clone(),
        counter: 1,
    };
    let sealed = seal::seal(&throwaway_key(&env.from, &env.to), &header, &packed);
    let mut publish = rumqttc::Publish::new(
        format!("outpost/{}/in", env.to),
        QoS::AtLeastOnce,
        sealed.clone(),
    );
    publish.pkid = 1;
    let size = publish.size();
    PingOverhead {
        measured: Counted::default(),
        publish: size,
        mqtt: size - sealed.len(),
        seal: sealed.len() - packed.len(),
        frame: packed.len(),
        stored: encoded.len(),
        ack_publish: 0,
    }
}

/// A sealing key from fixed secrets: sizes do not depend on the key.
fn throwaway_key(sender: &Name, receiver: &Name) -> seal::DirectionKey {
    let (ours, theirs) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let (our_pub, their_pub) = (PublicKey::from(&ours), PublicKey::from(&theirs));
    let ends = seal::Ends {
        sender,
        receiver,
        sender_public: &our_pub,
        receiver_public: &their_pub,
        sender_epoch: 0x11,
        receiver_epoch: 0x21,
    };
    seal::derive(&ours, &their_pub, &ends).expect("derive")
}

fn report_ping(r: &mut Report, p: &PingOverhead) {
    let parts = [
        (
            "empty command (ping): MQTT framing (fixed header, topic, packet id)",
            p.mqtt,
        ),
        ("empty command (ping): sealing (header + tag)", p.seal),
        (
            "empty command (ping): frame in wire form (compact, with the payload's version byte)",
            p.frame,
        ),
        (
            "empty command (ping): the same frame as stored (for comparison, not sent)",
            p.stored,
        ),
        ("empty command (ping): PUBLISH, computed", p.publish),
    ];
    for (what, bytes) in parts {
        r.add(Figure::new(SCENARIO, what, bytes as f64, "B"));
    }
    let measured = p.measured.down.saturating_sub(PUBACK);
    r.add(Figure::new(
        SCENARIO,
        "empty command (ping): PUBLISH measured (bytes_down minus one 4 B PUBACK)",
        measured as f64,
        "B",
    ));
    let expected_up = p.ack_publish as u64 + PUBACK;
    if measured == p.publish as u64 && p.measured.up == expected_up {
        r.note(format!(
            "2 wire: the ping's bytes on the wire match the encoders: down {} B = PUBLISH {} \
             + PUBACK 4; up {} B = the node's Ack PUBLISH {} + PUBACK 4",
            p.measured.down, p.publish, p.measured.up, p.ack_publish
        ));
    } else {
        r.note(format!(
            "2 wire: the ping's bytes on the wire differ from the encoders: down {} B \
             (expected PUBLISH {} + PUBACK 4), up {} B (expected Ack PUBLISH {} + PUBACK 4)",
            p.measured.down, p.publish, p.measured.up, p.ack_publish
        ));
    }
}

/// A pair whose node reaches the broker's TLS listener through the proxy
/// (`mqtts://`, trusting the benchmark CA); the central stays on plain TCP.
fn tls_pair(broker: Broker, tls_addr: SocketAddr, pki: &Pki) -> Pair {
    tls_pair_with(broker, tls_addr, pki, &format!("{KEEPALIVE_S}s"))
}

/// As [`tls_pair`] with another keepalive.
pub fn tls_pair_with(broker: Broker, tls_addr: SocketAddr, pki: &Pki, keepalive: &str) -> Pair {
    tls_pair_flags(broker, tls_addr, pki, &["--keepalive", keepalive], &[])
}

/// As [`tls_pair`] with `flags` for both agents and `node_flags` for the node.
pub fn tls_pair_flags(
    broker: Broker,
    tls_addr: SocketAddr,
    pki: &Pki,
    flags: &[&str],
    node_flags: &[&str],
) -> Pair {
    let proxy = Proxy::start(tls_addr);
    let ca = pki.ca.cert().to_str().expect("utf-8 path");
    let node_url = format!("mqtts://127.0.0.1:{}", proxy.port());
    Pair::assemble(
        broker,
        proxy,
        crate::rig::ALLOW,
        flags,
        &node_url,
        &[&["--ca-file", ca][..], node_flags].concat(),
    )
}

/// Waits until `proxy`'s counters have not moved for [`QUIET`].
fn settle(proxy: &Proxy) {
    let total = || proxy.bytes_up() + proxy.bytes_down();
    let mut last = (total(), Instant::now());
    wait_until("the link's byte counters stop moving", LONG, || {
        let now = total();
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= QUIET
    });
}

// ---------------------------------------------------------------------------------
// The JSON baseline: thin-edge.io's command API.
//
// Based on thin-edge.io's documentation (github.com/thin-edge/thin-edge.io):
// - docs/src/references/agent/device-management-api.md: command status topics
//   `te/<identifier>/cmd/<operation>/<cmd_id>`; the requester publishes a retained
//   message with `"status": "init"` and the data to proceed; the agent republishes
//   it (retained, same topic) with `"executing"` ("the content is the same as for
//   init"), then `"successful"` with the outcome; the requester finally clears the
//   topic with an empty retained message. The agent subscribes to its command topics.
// - docs/src/operate/c8y/supported-operations.md: a shell command (`c8y_Command`) is
//   the command type `command` on `te/device/<name>///cmd/command/c8y-mapper-<id>`
//   with `{"status": "init", "text": "echo helloworld", "c8y-mapper": {...}}`, and
//   is reported as `{"status": "successful", ..., "result": "helloworld"}`.
// We keep the minimal shape: `{"status":"init","text":"uptime"}`, no mapper fragment,
// numeric ids instead of `c8y-mapper-<id>`: the smallest the documented API allows.

/// What the JSON clients saw, shared with their event-loop threads.
#[derive(Default)]
struct TeState {
    connected: AtomicBool,
    /// Device: `init` commands received.
    inits: AtomicU64,
    /// Device: its own `executing` and `successful` echoes (it is subscribed to them).
    echoes: AtomicU64,
    /// Device: empty retained messages received (the operator's clears).
    clears: AtomicU64,
    /// Operator: PUBACKs received (for its inits and clears).
    pubacks: AtomicU64,
    /// Operator: `successful` results by command id.
    results: Mutex<Vec<(u64, String)>>,
    /// Payload sizes seen last, for the note.
    init_len: AtomicUsize,
    executing_len: AtomicUsize,
    successful_len: AtomicUsize,
}

/// A rumqttc client with its event loop on its own thread.
struct TeClient {
    client: Client,
    state: Arc<TeState>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TeClient {
    fn options(id: &str, addr: SocketAddr, tls: Option<Arc<ClientConfig>>) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(KEEPALIVE_S))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some(config) = tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
        }
        o
    }

    /// Drives `connection` on a thread, calling `on_event` for every event, and
    /// subscribing to `filter` on every (re)connection.
    fn spawn(
        options: MqttOptions,
        filter: &'static str,
        on_event: impl FnMut(&Client, &TeState, Event) + Send + 'static,
    ) -> TeClient {
        let (client, connection) = Client::new(options, 100_000);
        let state = Arc::new(TeState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, state, stop) = (client.clone(), state.clone(), stop.clone());
            thread::spawn(move || event_loop(connection, &client, &state, &stop, filter, on_event))
        };
        wait_until("a JSON client subscribed", LONG, || {
            state.connected.load(Ordering::SeqCst)
        });
        TeClient {
            client,
            state,
            stop,
            threads: vec![thread],
        }
    }
}

impl Drop for TeClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Polls the connection until stopped; retries refused connections after [`RETRY`].
/// `connected` is set once the subscription is acknowledged.
fn event_loop(
    mut connection: Connection,
    client: &Client,
    state: &TeState,
    stop: &AtomicBool,
    filter: &str,
    mut on_event: impl FnMut(&Client, &TeState, Event),
) {
    while !stop.load(Ordering::SeqCst) {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(event)) => {
                match &event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        state.connected.store(true, Ordering::SeqCst);
                    }
                    _ => {}
                }
                on_event(client, state, event);
            }
            Ok(Err(_)) => {
                state.connected.store(false, Ordering::SeqCst);
                thread::sleep(RETRY);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The device side, as tedge-agent does it for a `command` operation: subscribed to
/// its command topics; on `init` publishes `executing`, runs the command (the real
/// `uptime`), publishes `successful` with its output. Commands run one at a time.
struct TeDevice {
    inner: TeClient,
}

impl TeDevice {
    fn start(addr: SocketAddr, tls: Option<Arc<ClientConfig>>) -> TeDevice {
        let (tx, rx) = mpsc::channel::<(String, Value)>();
        let options = TeClient::options(TE_DEVICE_ID, addr, tls);
        let mut inner = TeClient::spawn(options, TE_FILTER, move |_, state, event| {
            let Event::Incoming(Packet::Publish(p)) = event else {
                return;
            };
            if p.payload.is_empty() {
                state.clears.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let msg: Value = serde_json::from_slice(&p.payload).expect("JSON command");
            if msg["status"] == "init" {
                state.inits.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send((p.topic.clone(), msg));
            } else {
                state.echoes.fetch_add(1, Ordering::SeqCst);
            }
        });
        let worker = {
            let (client, state) = (inner.client.clone(), inner.state.clone());
            thread::spawn(move || {
                for (topic, init) in rx {
                    run_command(&client, &state, &topic, init);
                }
            })
        };
        inner.threads.push(worker);
        TeDevice { inner }
    }

    fn state(&self) -> &TeState {
        &self.inner.state
    }

    /// The payload sizes both sides used.
    fn sizes(&self, operator: &TeOperator) -> JsonSizes {
        JsonSizes {
            init: operator.inner.state.init_len.load(Ordering::SeqCst),
            init_text: init_payload().to_string(),
            executing: self.state().executing_len.load(Ordering::SeqCst),
            successful: self.state().successful_len.load(Ordering::SeqCst),
        }
    }
}

/// Executes one `init` command: `executing`, the real process, `successful`.
fn run_command(client: &Client, state: &TeState, topic: &str, mut msg: Value) {
    msg["status"] = json!("executing");
    let executing = msg.to_string();
    state.executing_len.store(executing.len(), Ordering::SeqCst);
    client
        .publish(topic, QoS::AtLeastOnce, true, executing)
        .expect("publish executing");
    let program = msg["text"].as_str().expect("command text").to_string();
    let out = Command::new(&program)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program}: {out:?}");
    msg["status"] = json!("successful");
    msg["result"] = json!(String::from_utf8_lossy(&out.stdout));
    let successful = msg.to_string();
    state
        .successful_len
        .store(successful.len(), Ordering::SeqCst);
    client
        .publish(topic, QoS::AtLeastOnce, true, successful)
        .expect("publish successful");
}

fn init_payload() -> Value {
    json!({ "status": "init", "text": "uptime" })
}

/// The operator side (the mapper, in thin-edge.io): creates commands with a retained
/// `init`, and clears each with an empty retained message once it is `successful`.
struct TeOperator {
    inner: TeClient,
    next_id: AtomicU64,
}

impl TeOperator {
    fn start(broker: SocketAddr) -> TeOperator {
        let options = TeClient::options(TE_OPERATOR_ID, broker, None);
        let filter: &'static str = "te/device/main///cmd/command/+";
        let inner = TeClient::spawn(options, filter, |client, state, event| match event {
            Event::Incoming(Packet::PubAck(_)) => {
                state.pubacks.fetch_add(1, Ordering::SeqCst);
            }
            Event::Incoming(Packet::Publish(p)) if !p.payload.is_empty() => {
                let msg: Value = serde_json::from_slice(&p.payload).expect("JSON status");
                if msg["status"] == "failed" {
                    panic!("the JSON device reports a failed command: {msg}");
                }
                if msg["status"] != "successful" {
                    return;
                }
                let id = p.topic.rsplit('/').next().and_then(|s| s.parse().ok());
                let id: u64 = id.expect("numeric command id");
                let result = msg["result"].as_str().unwrap_or("").to_string();
                state.results.lock().unwrap().push((id, result));
                client
                    .try_publish(p.topic.clone(), QoS::AtLeastOnce, true, Vec::new())
                    .expect("queue the clear");
            }
            _ => {}
        });
        TeOperator {
            inner,
            next_id: AtomicU64::new(1),
        }
    }

    fn state(&self) -> &TeState {
        &self.inner.state
    }

    /// Publishes a new command (`init`, retained) and returns its id.
    fn init(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let payload = init_payload().to_string();
        self.state().init_len.store(payload.len(), Ordering::SeqCst);
        self.inner
            .client
            .publish(
                format!("{TE_COMMAND}/{id}"),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .expect("publish init");
        id
    }
}

/// A snapshot of the counters both JSON clients keep.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TeCounts {
    inits: u64,
    echoes: u64,
    clears: u64,
    pubacks: u64,
    results: u64,
}

impl TeCounts {
    fn read(op: &TeOperator, dev: &TeDevice) -> TeCounts {
        let (o, d) = (op.state(), dev.state());
        TeCounts {
            inits: d.inits.load(Ordering::SeqCst),
            echoes: d.echoes.load(Ordering::SeqCst),
            clears: d.clears.load(Ordering::SeqCst),
            pubacks: o.pubacks.load(Ordering::SeqCst),
            results: o.results.lock().unwrap().len() as u64,
        }
    }

    /// `self` plus the full exchange of `n` commands: the device got n inits, its 2n
    /// echoes and n clears; the operator got n results and 2n PUBACKs.
    fn after(self, n: u64) -> TeCounts {
        TeCounts {
            inits: self.inits + n,
            echoes: self.echoes + 2 * n,
            clears: self.clears + n,
            pubacks: self.pubacks + 2 * n,
            results: self.results + n,
        }
    }
}

/// Waits until the JSON exchange reached `want`, then until the link is quiet.
fn wait_json_done(proxy: &Proxy, op: &TeOperator, dev: &TeDevice, want: TeCounts) {
    // A broker that drops messages (a full queue) would leave the counts short for
    // ever: fail after a while without progress rather than at the long deadline.
    let mut last = (TeCounts::read(op, dev), Instant::now());
    wait_until(
        "the JSON exchange completes (results, clears, echoes)",
        LONG,
        || {
            let now = TeCounts::read(op, dev);
            if now != last.0 {
                last = (now, Instant::now());
            }
            assert!(
                last.1.elapsed() < STALLED,
                "the JSON exchange stalled at {now:?}, want {want:?}"
            );
            now == want
        },
    );
    settle(proxy);
    let now = TeCounts::read(op, dev);
    assert_eq!(now, want, "the JSON exchange went on after it was complete");
}

/// (a) for the JSON baseline: one command, from `init` to the clear's echo.
fn json_round_trip(proxy: &Proxy, op: &TeOperator, dev: &TeDevice) -> Counted {
    settle(proxy);
    let before = TeCounts::read(op, dev);
    proxy.reset_counters();
    let id = op.init();
    wait_json_done(proxy, op, dev, before.after(1));
    let counted = Counted::read(proxy);
    check_json_results(op, &[id]);
    counted
}

/// (b) for the JSON baseline: `n` retained `init`s published while the device is
/// cut off; counters reset; the device reconnects, resubscribes, gets the retained
/// commands, runs and reports each; the operator clears each.
fn json_replay(proxy: &Proxy, op: &TeOperator, dev: &TeDevice, n: usize) -> Counted {
    settle(proxy);
    proxy.set_mode(Mode::Refuse);
    wait_until("the JSON device sees the link down", LONG, || {
        !dev.state().connected.load(Ordering::SeqCst)
    });
    let before = TeCounts::read(op, dev);
    let ids: Vec<u64> = (0..n).map(|_| op.init()).collect();
    wait_until("the broker has every init", LONG, || {
        op.state().pubacks.load(Ordering::SeqCst) == before.pubacks + n as u64
    });
    let want = before.after(n as u64);
    proxy.reset_counters();
    proxy.set_mode(Mode::Pass);
    wait_json_done(proxy, op, dev, want);
    let counted = Counted::read(proxy);
    check_json_results(op, &ids);
    counted
}

/// Panics unless every command in `ids` came back `successful` with output.
fn check_json_results(op: &TeOperator, ids: &[u64]) {
    let results = op.state().results.lock().unwrap();
    for id in ids {
        let found = results.iter().find(|r| r.0 == *id);
        assert!(
            found.is_some_and(|r| !r.1.is_empty()),
            "JSON command {id}: no successful result with output"
        );
    }
}

// ---------------------------------------------------------------------------------
// TLS material

/// A CA and a server certificate for 127.0.0.1 from the tests' `support::pki`.
pub struct Pki {
    _dir: TempDir,
    ca: Ca,
    server: Issued,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new();
        let ca = Ca::new(dir.path(), "ca");
        let server = ca.issue("broker", Some("IP:127.0.0.1"));
        Pki {
            _dir: dir,
            ca,
            server,
        }
    }

    /// A stock mosquitto with a second listener speaking TLS (server certificate
    /// only), and that listener's address.
    pub fn broker(&self) -> (Broker, SocketAddr) {
        let port = free_port();
        let broker = Broker::start_stock(&format!(
            "listener {port} 127.0.0.1\n{}",
            pki::mosquitto_tls(&self.ca, &self.server, false)
        ));
        (broker, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// rustls with the ring provider trusting our CA, as src/link/tls.rs builds it.
    fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca.cert()).expect("read ca") {
            roots.add(cert.expect("ca pem")).expect("add ca");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}
