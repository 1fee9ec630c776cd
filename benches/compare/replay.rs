//! Scenario 1, replay after an outage; scenario 6, flash wear during it; and the node's
//! RSS during it for scenario 5.
//!
//! outpost (a): results pile up in the NODE's outbox while its link (the proxy) is
//! refused, then the link returns and we time until the node's outbox is empty, that
//! is until the central has stored and acknowledged every result. Then we check at
//! the central that every result arrived exactly once and in order.
//!
//! Raw ceiling (b): a rumqttc publisher sends the same number of QoS 1 messages of
//! the size of one sealed outpost payload carrying one such result, through the same
//! kind of proxy to the same mosquitto, to a subscriber connected directly. No storage.
//!
//! mosquitto bridge (c): a local mosquitto with persistence and a `cleansession false`
//! bridge to the central mosquitto, behind a proxy. Messages are published locally
//! while the proxy refuses; then the proxy passes and we count what reaches a
//! subscriber on the central broker, with the local queue limits at mosquitto's
//! defaults and raised.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

use outpost::control::{self, CommandSpec, Request};
use outpost::frame::{self, Body, CmdResult, Envelope, Lane, Name, Status};
use outpost::seal::{self, Header};

use crate::report::{short, Figure, Report, Target};
use crate::rig::{exec, sample, to_node, Gate, Pair, LONG};
use crate::support::broker::Broker;
use crate::support::outpost::Agent;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{wait_until, TempDir};
use crate::Opts;

const REPLAY: &str = "1 replay";
const WEAR: &str = "6 flash wear";
const FOOTPRINT: &str = "5 footprint";

/// Broker config that lifts mosquitto's per-client queue limit (stock: 1000 messages).
const RAISED: &str = "max_queued_messages 0\nmax_queued_bytes 0\n";

/// How long the bridge's subscriber may see nothing new before we call the rest lost.
const QUIET: Duration = Duration::from_secs(30);

/// The topic the raw and bridge runs count; probes use another one.
const DATA_TOPIC: &str = "bench/data";
const PROBE_TOPIC: &str = "bench/probe";

/// In-flight QoS 1 publishes for rumqttc clients: outpost's link uses the same.
const INFLIGHT: u16 = 100;

pub fn run(r: &mut Report, o: &Opts) {
    let pings = o.count(100_000);
    let echoes = o.count(10_000);

    // The raw ceiling first, on a stock broker: if mosquitto's queue limit cuts it
    // short, every run below (outpost included) gets the raised limit.
    let ping_size = sealed_result_size(Kind::Ping, pings);
    let mut broker_extra = "";
    let mut broker = Broker::start_stock(broker_extra);
    let mut raw_ping = raw_ceiling(&broker, pings, ping_size);
    if raw_ping.lost() > 0 {
        r.note(format!(
            "raw rumqttc run lost {} of {pings} QoS 1 messages on a stock mosquitto \
             (max_queued_messages 1000 for the slow subscriber); every broker in this \
             scenario (outpost's, raw's, the bridge's central) then runs with \
             `max_queued_messages 0`, `max_queued_bytes 0`",
            raw_ping.lost()
        ));
        broker_extra = RAISED;
        broker = Broker::start_stock(broker_extra);
        raw_ping = raw_ceiling(&broker, pings, ping_size);
    }
    check_raw(&raw_ping, "ping-sized");

    let normal = outpost_replay(broker, "normal", Kind::Ping, pings);
    let full = outpost_replay(Broker::start_stock(broker_extra), "full", Kind::Ping, pings);
    let bridge_ping_default = bridge(broker_extra, false, pings, ping_size);
    let bridge_ping_raised = bridge(broker_extra, true, pings, ping_size);

    let echo_size = sealed_result_size(Kind::Echo, echoes);
    let broker = Broker::start_stock(broker_extra);
    let raw_echo = raw_ceiling(&broker, echoes, echo_size);
    check_raw(&raw_echo, "echo-sized");
    let echo = outpost_replay(broker, "normal", Kind::Echo, echoes);
    let bridge_echo_default = bridge(broker_extra, false, echoes, echo_size);
    let bridge_echo_raised = bridge(broker_extra, true, echoes, echo_size);

    let ping_label = format!("{} ping results ({ping_size} B)", short(pings as f64));
    let echo_label = format!("{} exec echo results ({echo_size} B)", short(echoes as f64));
    report_replay(
        r,
        &ping_label,
        &normal,
        &raw_ping,
        [&bridge_ping_default, &bridge_ping_raised],
        true,
    );
    r.add(
        Figure::new(
            REPLAY,
            &format!("{ping_label}, durability full, msgs/s"),
            full.rate(),
            "msgs/s",
        )
        .against("raw rumqttc QoS 1", raw_ping.rate()),
    );
    report_replay(
        r,
        &echo_label,
        &echo,
        &raw_echo,
        [&bridge_echo_default, &bridge_echo_raised],
        false,
    );
    report_wear(r, &ping_label, &normal, &full);
    report_rss(r, &ping_label, &normal);
    report_notes(r, [&normal, &full, &echo], ping_size, echo_size);
    for b in [
        &bridge_ping_default,
        &bridge_ping_raised,
        &bridge_echo_default,
        &bridge_echo_raised,
    ] {
        r.note(b.describe());
    }
}

// ---------------------------------------------------------------------------------
// What gets replayed

/// The kind of result replayed: `ping` (answered by the agent itself, `pong\n`) or
/// `exec echo I` (a real child process, `I\n`).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ping,
    Echo,
}

impl Kind {
    /// The command numbered `i` (from 1).
    fn command(self, i: usize) -> CommandSpec {
        match self {
            Kind::Ping => CommandSpec::Ping,
            Kind::Echo => exec(&["echo", &i.to_string()]),
        }
    }

    /// The stdout its result must carry.
    fn stdout(self, i: usize) -> String {
        match self {
            Kind::Ping => "pong\n".into(),
            Kind::Echo => format!("{i}\n"),
        }
    }
}

/// Bytes of the MQTT payload outpost would publish for ONE result of `kind` numbered
/// `n` (the largest of the run, so its varints are the longest): a real result frame
/// from `node` to `central` on `ordered`, alone in a payload in wire form
/// (`frame::compact`) and sealed with a real key.
/// outpost packs several frames into one publish when it can; the raw and bridge
/// runs send one message per result.
fn sealed_result_size(kind: Kind, n: usize) -> usize {
    let now = now_ms();
    let mut result = CmdResult::without_run(n as u64, Status::Ok, "", now);
    result.stdout = kind.stdout(n).into_bytes();
    if let Kind::Echo = kind {
        result.exit_code = Some(0);
        // An echo takes a few milliseconds: a one-byte varint, as in the real run.
        result.duration_ms = 3;
    }
    let node = Name::new("node").unwrap();
    let central = Name::new("central").unwrap();
    let env = Envelope {
        from: node.clone(),
        to: central.clone(),
        lane: Lane::new("ordered").unwrap(),
        seq: n as u64,
        created_ms: now,
        ttl_s: None,
        body: Body::Result(result),
    };
    let bytes = frame::encode(&env).expect("encode a result frame");
    let plain = frame::compact(&frame::pack([bytes.as_slice()]), &node, &central, now)
        .expect("compact a result frame");
    let a = x25519_dalek::StaticSecret::from([7u8; 32]);
    let b = x25519_dalek::StaticSecret::from([9u8; 32]);
    let (pa, pb) = (
        x25519_dalek::PublicKey::from(&a),
        x25519_dalek::PublicKey::from(&b),
    );
    let ends = seal::Ends {
        sender: &node,
        receiver: &central,
        sender_public: &pa,
        receiver_public: &pb,
        sender_epoch: 0x11,
        receiver_epoch: 0x21,
    };
    let key = seal::derive(&a, &pb, &ends).expect("derive a key");
    // Steady state: the receiver knows the sender's epoch, so the header omits it.
    let header = Header {
        sender_epoch: None,
        receiver_hint: seal::hint(0x21),
        sender: node,
        receiver: central,
        counter: n as u64,
    };
    seal::seal(&key, &header, &plain).len()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------
// (a) outpost

/// One outpost replay and what the processes did during it.
struct Replay {
    n: usize,
    /// From `link_up` until the node's outbox is empty.
    secs: f64,
    /// From `link_up` until the node's new connection is through the proxy.
    reconnect_secs: f64,
    /// Node, from `gate.open()` (results start being stored) until the replay ends.
    node_write_bytes: u64,
    node_wchar: u64,
    /// The part of `node_write_bytes` written while running the commands and storing
    /// their results (gate open until every result is queued), before the replay.
    node_store_write_bytes: u64,
    /// Central, from just before `link_up` until the replay ends.
    central_write_bytes: u64,
    central_wchar: u64,
    /// Node RSS with every result queued, just before `link_up`.
    rss_before_kib: u64,
    /// Node peak RSS (VmHWM) over the whole scenario, read after the replay.
    hwm_kib: u64,
    /// Node-link bytes (TCP payload at the proxy) during the replay.
    bytes_up: u64,
    bytes_down: u64,
}

impl Replay {
    fn rate(&self) -> f64 {
        self.n as f64 / self.secs
    }

    /// Messages per second once reconnected.
    fn drain_rate(&self) -> f64 {
        self.n as f64 / (self.secs - self.reconnect_secs)
    }
}

/// Queues `n` results of `kind` in the node's outbox while its link is down, then
/// replays them; panics if any result is lost, duplicated or out of order.
fn outpost_replay(broker: Broker, durability: &str, kind: Kind, n: usize) -> Replay {
    eprintln!("  outpost: {n} {kind:?} results, durability {durability}");
    let pair = Pair::start_on(broker, &["--durability", durability]);
    let gate = Gate::new(pair.tmp.path());
    let t = Instant::now();
    let (gate_job, jobs) = enqueue(&pair.central, &gate, kind, n);
    pair.wait_delivered();
    pair.link_down();
    eprintln!(
        "    queued and delivered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let node_pid = pair.node.pid();
    let at_open = sample(node_pid);
    let t = Instant::now();
    gate.open();
    wait_until("the node has run every command", LONG, || {
        node_idle(&pair.node.status())
    });
    eprintln!("    run and stored in {:.1} s", t.elapsed().as_secs_f64());
    let queued = Pair::outbox(&pair.node);
    assert!(
        queued > n as u64,
        "the node's outbox holds {queued} frames, expected every one of {n} results and the gate's"
    );

    let node_before = sample(node_pid);
    let central_before = sample(pair.central.pid());
    pair.proxy.reset_counters();
    let last_job = *jobs.last().expect("at least one command");
    let started = Instant::now();
    pair.link_up();
    let ((), reconnect_secs) = with_reconnect_time(&pair.proxy, started, || {
        wait_result(&pair.central, last_job, started);
        poll_until("the node's outbox is empty", started, || {
            Pair::outbox(&pair.node) == 0
        });
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!("    replayed in {secs:.1} s (reconnect {reconnect_secs:.2} s)");
    let node_after = sample(node_pid);
    let central_after = sample(pair.central.pid());
    let (bytes_up, bytes_down) = (pair.proxy.bytes_up(), pair.proxy.bytes_down());

    check_results(&pair.central, gate_job, &jobs, kind);
    Replay {
        n,
        secs,
        reconnect_secs,
        node_write_bytes: node_after.write_bytes - at_open.write_bytes,
        node_wchar: node_after.wchar - at_open.wchar,
        node_store_write_bytes: node_before.write_bytes - at_open.write_bytes,
        central_write_bytes: central_after.write_bytes - central_before.write_bytes,
        central_wchar: central_after.wchar - central_before.wchar,
        rss_before_kib: node_before.rss_kib,
        hwm_kib: node_after.hwm_kib,
        bytes_up,
        bytes_down,
    }
}

/// Sends the gate command, then `n` commands of `kind` on lane `ordered` in
/// batches of 1,000, through one control connection; returns the gate's job id and
/// the others' in order.
fn enqueue(central: &Agent, gate: &Gate, kind: Kind, n: usize) -> (i64, Vec<i64>) {
    let mut client = control::Client::connect(&central.dir).expect("central control socket");
    let send = to_node;
    let mut batch = |requests: Vec<Request>| -> Vec<i64> {
        let reply = client
            .batch(requests)
            .unwrap_or_else(|e| panic!("batch: {e}"));
        reply
            .replies
            .into_iter()
            .map(|r| match (r.sent, r.error) {
                (Some(sent), _) => sent.job,
                (None, e) => panic!("send refused: {e:?}"),
            })
            .collect()
    };
    let gate_job = batch(vec![send(gate.command())])[0];
    let mut jobs = Vec::with_capacity(n);
    for first in (1..=n).step_by(1000) {
        let last = (first + 999).min(n);
        jobs.extend(batch(
            (first..=last).map(|i| send(kind.command(i))).collect(),
        ));
    }
    (gate_job, jobs)
}

/// Nothing left in the node's inbox and nothing running.
fn node_idle(status: &Value) -> bool {
    let inbox: u64 = status["inbox"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|e| e["frames"].as_u64()).sum());
    let running = status["running"].as_array().map_or(0, std::vec::Vec::len);
    inbox == 0 && running == 0
}

/// Blocks (no polling: the control socket's `wait`) until the central has a result
/// for job `id`. Results arrive in order, so for the last job that is the last one.
fn wait_result(central: &Agent, id: i64, since: Instant) {
    let mut client = control::Client::connect(&central.dir).expect("central control socket");
    loop {
        let req = Request::Wait {
            id,
            seen: 0,
            timeout_ms: 600_000,
        };
        let reply = client
            .call(&req, Duration::from_secs(630))
            .unwrap_or_else(|e| panic!("wait for job {id}: {e}"));
        if !reply["job"].is_null() {
            return;
        }
        assert!(
            since.elapsed() < LONG,
            "timed out after {LONG:?}: the result of job {id} at the central"
        );
    }
}

/// Polls `cond` every 10 ms until it holds (deadline [`LONG`] after `since`). Used
/// only for the last moments of a replay (the node learning of the final ack), so
/// the polling does not load the agent while it works.
fn poll_until(what: &str, since: Instant, mut cond: impl FnMut() -> bool) {
    while !cond() {
        assert!(since.elapsed() < LONG, "timed out after {LONG:?}: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `body` while another thread watches `proxy` for a live connection (refused
/// ones never count): returns what `body` returned and the seconds from `since` to
/// the moment the client behind the proxy had reconnected (its TCP connection).
fn with_reconnect_time<T>(proxy: &Proxy, since: Instant, body: impl FnOnce() -> T) -> (T, f64) {
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        let watcher = s.spawn(|| {
            while proxy.connections() == 0 && !done.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            since.elapsed().as_secs_f64()
        });
        let out = body();
        done.store(true, Ordering::SeqCst);
        (out, watcher.join().expect("reconnect watcher"))
    })
}

/// Checks at the central that the gate and every job got exactly one result, in
/// order (result ids increase with job ids), with the expected output.
fn check_results(central: &Agent, gate_job: i64, jobs: &[i64], kind: Kind) {
    let mut client = control::Client::connect(&central.dir).expect("central control socket");
    let limit = (jobs.len() + 1) as u32;
    let reply = client
        .call(
            &Request::Jobs { limit: Some(limit) },
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("jobs: {e}"));
    let mut rows: Vec<(i64, i64, String, String)> = reply["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .map(|j| {
            let targets = j["targets"].as_array().expect("targets");
            assert_eq!(targets.len(), 1, "job {} has one target", j["id"]);
            let t = &targets[0];
            let id = j["id"].as_i64().expect("job id");
            assert!(
                !t["result"].is_null(),
                "outpost lost the result of job {id}"
            );
            (
                id,
                t["result_id"].as_i64().expect("result id"),
                t["result"]["status"].as_str().unwrap_or("").to_string(),
                t["result"]["stdout"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    let expected: Vec<i64> = std::iter::once(gate_job)
        .chain(jobs.iter().copied())
        .collect();
    let got: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(got, expected, "outpost: jobs with results at the central");
    for w in rows.windows(2) {
        assert!(
            w[1].1 > w[0].1,
            "outpost recorded results out of order: job {} has result {} after job {} with {}",
            w[1].0,
            w[1].1,
            w[0].0,
            w[0].1
        );
    }
    for (i, row) in rows[1..].iter().enumerate() {
        let want = kind.stdout(i + 1);
        assert!(
            row.2 == "ok" && row.3 == want,
            "job {}: result {} {:?}, expected ok {want:?}",
            row.0,
            row.2,
            row.3
        );
    }
}

// ---------------------------------------------------------------------------------
// MQTT clients for (b) and (c)

/// What a subscriber received on [`DATA_TOPIC`]: payloads start with their sequence
/// number (u64 LE, from 0).
struct Tally {
    seen: Vec<bool>,
    distinct: usize,
    duplicates: usize,
    /// Messages whose number is below one received before them (duplicates excluded).
    out_of_order: usize,
    highest: Option<u64>,
    /// The first message that came after a higher one: (its number, the highest).
    first_reordered: Option<(u64, u64)>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    /// Messages on [`PROBE_TOPIC`].
    probes: usize,
    errors: Vec<String>,
}

impl Tally {
    fn new(n: usize) -> Tally {
        Tally {
            seen: vec![false; n],
            distinct: 0,
            duplicates: 0,
            out_of_order: 0,
            highest: None,
            first_reordered: None,
            first_at: None,
            last_at: None,
            probes: 0,
            errors: Vec::new(),
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let seq = u64::from_le_bytes(payload[..8].try_into().expect("8-byte sequence number"));
        let slot = &mut self.seen[seq as usize];
        if *slot {
            self.duplicates += 1;
            return;
        }
        *slot = true;
        self.distinct += 1;
        if let Some(h) = self.highest.filter(|&h| seq < h) {
            self.out_of_order += 1;
            self.first_reordered.get_or_insert((seq, h));
        }
        self.highest = self.highest.max(Some(seq));
        let now = Instant::now();
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
    }
}

/// A rumqttc client subscribed (QoS 1) to `bench/#` on one broker, counting what it
/// receives on its own thread.
struct Subscriber {
    client: Option<Client>,
    thread: Option<JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

impl Subscriber {
    /// Connects and returns once the broker acknowledged the subscription.
    fn start(addr: SocketAddr, id: &str, n: usize) -> Subscriber {
        let mut opts = MqttOptions::new(id, "127.0.0.1", addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 64);
        client
            .subscribe("bench/#", QoS::AtLeastOnce)
            .expect("subscribe");
        let tally = Arc::new(Mutex::new(Tally::new(n)));
        let (subscribed, on_suback) = mpsc::channel();
        let t = tally.clone();
        let thread = thread::spawn(move || {
            for event in conn.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut t = t.lock().unwrap();
                        if p.topic == DATA_TOPIC {
                            t.record(&p.payload);
                        } else {
                            t.probes += 1;
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        t.lock().unwrap().errors.push(e.to_string());
                        break;
                    }
                }
            }
        });
        on_suback
            .recv_timeout(LONG)
            .unwrap_or_else(|_| panic!("subscriber {id}: no SUBACK"));
        Subscriber {
            client: Some(client),
            thread: Some(thread),
            tally,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&self.tally.lock().unwrap())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // The event loop keeps a request sender of its own, so dropping the client
        // does not end it: send DISCONNECT, whose outgoing event ends the thread.
        if let Some(c) = self.client.take() {
            if c.disconnect().is_err() {
                return; // the thread already ended on an error
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A rumqttc client publishing at QoS 1, counting PUBACKs on its own thread.
struct Publisher {
    client: Option<Client>,
    thread: Option<JoinHandle<()>>,
    acks: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Publisher {
    fn connect(addr: SocketAddr, id: &str) -> Publisher {
        let mut opts = MqttOptions::new(id, "127.0.0.1", addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(INFLIGHT);
        let (client, mut conn) = Client::new(opts, 64);
        let acks = Arc::new(AtomicUsize::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (a, f) = (acks.clone(), failure.clone());
        let thread = thread::spawn(move || {
            for event in conn.iter() {
                match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        *f.lock().unwrap() = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        Publisher {
            client: Some(client),
            thread: Some(thread),
            acks,
            failure,
        }
    }

    fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .as_ref()
            .unwrap()
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap_or_else(|e| panic!("publish: {e}; {:?}", self.failure.lock().unwrap()));
    }

    /// Publishes messages `0..n` of `size` bytes on [`DATA_TOPIC`].
    fn publish_numbered(&self, n: usize, size: usize) {
        for i in 0..n {
            let mut payload = vec![0u8; size.max(8)];
            payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
            self.publish(DATA_TOPIC, payload);
        }
    }

    /// Waits until the broker acknowledged `n` publishes.
    fn wait_acked(&self, n: usize) {
        wait_until(&format!("{n} PUBACKs"), LONG, || {
            if let Some(e) = self.failure.lock().unwrap().as_ref() {
                panic!("publisher connection failed: {e}");
            }
            self.acks.load(Ordering::SeqCst) >= n
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // As for [`Subscriber`]: DISCONNECT ends the event loop's thread.
        if let Some(c) = self.client.take() {
            if c.disconnect().is_err() {
                return;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What arrived at a counting subscriber.
struct Delivered {
    n: usize,
    size: usize,
    /// From the start of the timed phase to the last message received.
    secs: f64,
    /// From the start of the timed phase to the first message received.
    first_secs: f64,
    distinct: usize,
    duplicates: usize,
    out_of_order: usize,
    first_reordered: Option<(u64, u64)>,
    errors: Vec<String>,
}

impl Delivered {
    fn lost(&self) -> usize {
        self.n - self.distinct
    }

    fn rate(&self) -> f64 {
        self.distinct as f64 / self.secs
    }

    /// Waits until `sub` has all `n` messages or nothing new arrived for [`QUIET`],
    /// then reads its tally; `secs` runs from `started` to the last arrival.
    fn collect(sub: &Subscriber, n: usize, size: usize, started: Instant) -> Delivered {
        let mut last = (0, Instant::now());
        wait_until(&format!("{n} messages or {QUIET:?} of quiet"), LONG, || {
            let got = sub.with(|t| t.distinct);
            if got != last.0 {
                last = (got, Instant::now());
            }
            got >= n || last.1.elapsed() >= QUIET
        });
        let since = |at: Option<Instant>| {
            at.map_or(f64::NAN, |at| at.duration_since(started).as_secs_f64())
        };
        sub.with(|t| Delivered {
            n,
            size,
            secs: since(t.last_at),
            first_secs: since(t.first_at),
            distinct: t.distinct,
            duplicates: t.duplicates,
            out_of_order: t.out_of_order,
            first_reordered: t.first_reordered,
            errors: t.errors.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------
// (b) raw ceiling

/// `n` QoS 1 messages of `size` bytes from a publisher behind a proxy to a subscriber
/// on `broker` directly; timed from the first publish to the last arrival.
fn raw_ceiling(broker: &Broker, n: usize, size: usize) -> Delivered {
    eprintln!("  raw rumqttc: {n} messages of {size} B");
    let sub = Subscriber::start(broker.addr(), "bench-raw-sub", n);
    let proxy = Proxy::start(broker.addr());
    let publisher = Publisher::connect(proxy.addr(), "bench-raw-pub");
    let started = Instant::now();
    publisher.publish_numbered(n, size);
    publisher.wait_acked(n);
    Delivered::collect(&sub, n, size, started)
}

/// The ceiling must be whole, in order, and clean, or the comparison means nothing.
fn check_raw(d: &Delivered, what: &str) {
    assert!(
        d.lost() == 0 && d.out_of_order == 0 && d.errors.is_empty(),
        "raw {what} run: {} lost, {} out of order, errors {:?}",
        d.lost(),
        d.out_of_order,
        d.errors
    );
}

// ---------------------------------------------------------------------------------
// (c) mosquitto bridge

/// One bridge run: what arrived, and what the local mosquitto logged about it.
struct BridgeRun {
    raised: bool,
    delivered: Delivered,
    /// From link up until the bridge's new connection is through the proxy.
    reconnect_secs: f64,
    /// Local broker log lines that say it dropped messages.
    drop_lines: usize,
}

impl BridgeRun {
    /// Messages per second once reconnected.
    fn drain_rate(&self) -> f64 {
        self.delivered.distinct as f64 / (self.delivered.secs - self.reconnect_secs)
    }

    fn describe(&self) -> String {
        let d = &self.delivered;
        let reordered = match d.first_reordered {
            Some((seq, after)) => format!(" (first: #{seq} after #{after})"),
            None => String::new(),
        };
        format!(
            "mosquitto bridge, {} queue limits, {} messages of {} B: {} arrived ({} lost, \
             {} out of order{reordered}, {} duplicates) at {:.0} msgs/s over {:.2} s from \
             link up; reconnected after {:.2} s, first arrival after {:.2} s, {:.0} \
             msgs/s once reconnected; the local broker logged {} lines about dropping \
             messages",
            if self.raised { "raised" } else { "default" },
            d.n,
            d.size,
            d.distinct,
            d.lost(),
            d.out_of_order,
            d.duplicates,
            d.rate(),
            d.secs,
            self.reconnect_secs,
            d.first_secs,
            self.drain_rate(),
            self.drop_lines
        )
    }
}

/// A local mosquitto L (persistence on) bridged with `cleansession false` through a
/// proxy to a central mosquitto C (config `central_extra`, as outpost's broker).
/// The bridge connects once, the proxy then refuses, `n` messages are published to
/// L, the proxy passes again and a subscriber on C (connected throughout) counts.
///
/// mosquitto 2.0 keeps a bridge's local session from its first connection; connecting
/// once first makes the outage the same as outpost's (an established link that drops).
/// `restart_timeout 1 1` (backoff from 1 s capped at 1 s): mosquitto 2.0.11 given a
/// single value still retried after 6 to 13 s (its default 5 s backoff base, by its
/// log), far from outpost's 1 s backoff cap.
fn bridge(central_extra: &str, raised: bool, n: usize, size: usize) -> BridgeRun {
    let limits = if raised { "raised" } else { "default" };
    eprintln!("  mosquitto bridge, {limits} limits: {n} messages of {size} B");
    let central = Broker::start_stock(central_extra);
    let sub = Subscriber::start(central.addr(), "bench-bridge-sub", n);
    let proxy = Proxy::start(central.addr());
    let store = TempDir::new();
    let local = Broker::start_stock(&format!(
        "persistence true\n\
         persistence_location {}/\n\
         {}\
         connection central\n\
         address 127.0.0.1:{}\n\
         remote_clientid bench-bridge\n\
         cleansession false\n\
         restart_timeout 1 1\n\
         topic bench/# out 1\n",
        store.path().display(),
        if raised { RAISED } else { "" },
        proxy.port()
    ));
    let publisher = Publisher::connect(local.addr(), "bench-bridge-pub");

    // Up once: a probe published locally reaches the central subscriber.
    let mut probes = 0;
    wait_until("the bridge forwards a probe", LONG, || {
        probes += 1;
        publisher.publish(PROBE_TOPIC, b"probe".to_vec());
        publisher.wait_acked(probes);
        sub.with(|t| t.probes > 0)
    });
    // Down: wait until L noticed (it logs a new connection attempt).
    let attempts = |log: &str| log.matches("Connecting bridge").count();
    let before = attempts(&local.log());
    proxy.set_mode(Mode::Refuse);
    wait_until("the local broker notices the bridge is down", LONG, || {
        attempts(&local.log()) > before
    });
    publisher.publish_numbered(n, size);
    publisher.wait_acked(probes + n);

    let started = Instant::now();
    proxy.set_mode(Mode::Pass);
    let (delivered, reconnect_secs) = with_reconnect_time(&proxy, started, || {
        Delivered::collect(&sub, n, size, started)
    });
    let drop_lines = local
        .log()
        .lines()
        .filter(|l| l.contains("dropped"))
        .count();
    BridgeRun {
        raised,
        delivered,
        reconnect_secs,
        drop_lines,
    }
}

// ---------------------------------------------------------------------------------
// Figures

fn report_replay(
    r: &mut Report,
    label: &str,
    a: &Replay,
    raw: &Delivered,
    [bridge_default, bridge_raised]: [&BridgeRun; 2],
    small: bool,
) {
    let mut vs_raw = Figure::new(
        REPLAY,
        &format!("{label}, durability normal, msgs/s"),
        a.rate(),
        "msgs/s",
    )
    .against("raw rumqttc QoS 1", raw.rate());
    if small {
        vs_raw = vs_raw.target(Target::AtLeast(0.5));
    }
    r.add(vs_raw);
    r.add(
        Figure::new(
            REPLAY,
            &format!("{label}, durability normal, msgs/s"),
            a.rate(),
            "msgs/s",
        )
        .against(
            "mosquitto bridge, limits raised",
            bridge_raised.delivered.rate(),
        ),
    );
    r.add(
        Figure::new(
            REPLAY,
            &format!("{label}, msgs/s once reconnected"),
            a.drain_rate(),
            "msgs/s",
        )
        .against(
            "mosquitto bridge, limits raised",
            bridge_raised.drain_rate(),
        ),
    );
    r.add(
        Figure::new(REPLAY, &format!("{label}, replay time"), a.secs, "s")
            .against("raw rumqttc QoS 1", raw.secs),
    );
    r.add(
        Figure::new(
            REPLAY,
            &format!("{label}, reconnect after link up"),
            a.reconnect_secs,
            "s",
        )
        .against(
            "mosquitto bridge, limits raised",
            bridge_raised.reconnect_secs,
        ),
    );
    for b in [bridge_default, bridge_raised] {
        let limits = if b.raised { "raised" } else { "default" };
        r.add(
            Figure::new(REPLAY, &format!("{label}, messages lost"), 0.0, "msgs").against(
                &format!("mosquitto bridge, {limits} limits"),
                b.delivered.lost() as f64,
            ),
        );
    }
}

fn report_wear(r: &mut Report, label: &str, normal: &Replay, full: &Replay) {
    for (a, durability) in [(normal, "normal"), (full, "full")] {
        let per = |bytes: u64| bytes as f64 / a.n as f64;
        let mut node = Figure::new(
            WEAR,
            &format!("{label}, durability {durability}: node write_bytes per message"),
            per(a.node_write_bytes),
            "B",
        );
        if durability == "normal" {
            node = node.target(Target::AtMost(4096.0));
        }
        r.add(node);
        r.add(Figure::new(
            WEAR,
            &format!("{label}, durability {durability}: node wchar per message"),
            per(a.node_wchar),
            "B",
        ));
        r.add(Figure::new(
            WEAR,
            &format!("{label}, durability {durability}: central write_bytes per message"),
            per(a.central_write_bytes),
            "B",
        ));
        r.add(Figure::new(
            WEAR,
            &format!("{label}, durability {durability}: central wchar per message"),
            per(a.central_wchar),
            "B",
        ));
    }
}

fn report_rss(r: &mut Report, label: &str, a: &Replay) {
    r.add(Figure::new(
        FOOTPRINT,
        &format!("node RSS with {label} queued, before replay"),
        a.rss_before_kib as f64,
        "KiB",
    ));
    r.add(Figure::new(
        FOOTPRINT,
        &format!("node peak RSS (VmHWM) over the {label} replay scenario"),
        a.hwm_kib as f64,
        "KiB",
    ));
}

fn report_notes(
    r: &mut Report,
    [ping, full, echo]: [&Replay; 3],
    ping_size: usize,
    echo_size: usize,
) {
    let per = |bytes: u64, a: &Replay| bytes as f64 / a.n as f64;
    r.note(format!(
        "replay: raw and bridge messages are the size of one sealed outpost payload \
         carrying one result frame (encoded with outpost::frame, sealed with \
         outpost::seal): {ping_size} B for a ping result, {echo_size} B for an echo \
         result. outpost packs several frames per publish: its node link carried {:.1} B \
         up and {:.1} B down per ping result, {:.1} B up and {:.1} B down per echo \
         result, MQTT framing included",
        per(ping.bytes_up, ping),
        per(ping.bytes_down, ping),
        per(echo.bytes_up, echo),
        per(echo.bytes_down, echo),
    ));
    r.note(
        "replay: outpost's time runs from link up until the node's outbox is empty (every \
         result stored and acknowledged by the central; the central's `wait` on the last \
         job, then the node's status every 10 ms) and includes the reconnect (agents run \
         with --backoff-cap 1s, the bridge with `restart_timeout 1 1`: mosquitto 2.0.11 \
         given `restart_timeout 1` still retried every 6 to 13 s); raw: first publish \
         to last arrival; bridge: link up to last arrival. `once reconnected`: the same \
         count over that time minus the time until the client's new TCP connection was \
         through the proxy. The bridge connects once before the outage, as an installed \
         bridge would have",
    );
    r.note(format!(
        "flash wear: node from gate open (commands run, results stored) to replay end, \
         of which {:.0} B/msg (normal) and {:.0} B/msg (full) before the link returned; \
         central during the replay. write_bytes is /proc/PID/io (page cache the process \
         dirtied, i.e. what reaches the disk), wchar the bytes passed to write(2)",
        per(ping.node_store_write_bytes, ping),
        per(full.node_store_write_bytes, full),
    ));
}
