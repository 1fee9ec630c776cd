//! Plain MQTT clients in tests: a capture of what the broker carries, publishing
//! arbitrary (hostile) payloads with `mosquitto_pub`, and a flood publisher.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::broker::Broker;
use super::{find_program, scaled, try_wait_for, KillOnDrop};

const LONG: Duration = Duration::from_secs(120);

/// (topic, payload) pairs seen by a capture.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Every message published on its topics, as (topic, payload bytes) in the order
/// the broker delivered them, from a subscriber (QoS 1) started before anything
/// is sent.
pub struct Capture {
    _proc: KillOnDrop,
    seen: Seen,
    /// How many of `seen` [`Capture::next_message`] has handed out.
    n_read: usize,
}

impl Capture {
    /// Subscribes to `topic` (a filter) and returns once the broker has added the
    /// subscription.
    pub fn start(broker: &Broker, topic: &str) -> Capture {
        Capture::start_topics(broker, &[topic])
    }

    /// Subscribes to every filter of `topics` in one client, so messages on them
    /// are seen in the one order the broker sent them.
    pub fn start_topics(broker: &Broker, topics: &[&str]) -> Capture {
        // Unique per capture, so two on one broker do not take over each other's
        // session.
        static N: AtomicUsize = AtomicUsize::new(0);
        let sub = find_program("mosquitto_sub")
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let client_id = format!(
            "capture-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut child = Command::new(sub)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port().to_string(),
                "-i",
                &client_id,
                "-q",
                "1",
                "-v",
            ])
            .args(topics.iter().flat_map(|&topic| ["-t", topic]))
            .args(["-F", "%t %x"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some((t, hex)) = line.split_once(' ') {
                    let bytes = (0..hex.len() / 2)
                        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                        .collect();
                    sink.lock().unwrap().push((t.to_string(), bytes));
                }
            }
        });
        for topic in topics {
            broker.wait_for_log(&format!("{client_id} 1 {topic}"), LONG);
        }
        Capture {
            _proc: KillOnDrop(child),
            seen,
            n_read: 0,
        }
    }

    /// The first message that no earlier call returned, waiting up to `timeout`
    /// (scaled by `slow_factor`) for it; panics with what was seen at the deadline.
    #[track_caller]
    pub fn next_message(&mut self, timeout: Duration) -> (String, Vec<u8>) {
        let n = self.n_read;
        let Some(message) = try_wait_for(timeout, || self.seen.lock().unwrap().get(n).cloned())
        else {
            let seen: Vec<_> = self
                .all()
                .into_iter()
                .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(&p)))
                .collect();
            panic!(
                "timed out after {:?}: message {} on the capture; seen: {seen:?}",
                scaled(timeout),
                n + 1,
            );
        };
        self.n_read += 1;
        message
    }

    pub fn payloads(&self, topic: &str) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<(String, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }
}

/// Publishes `payload` once (QoS 1) on `topic`, with the real `mosquitto_pub`.
pub fn publish(broker: &Broker, topic: &str, payload: &[u8], dir: &Path) {
    publish_with(broker, topic, payload, dir, false);
}

/// Publishes `payload` as the retained message of `topic`.
pub fn publish_retained(broker: &Broker, topic: &str, payload: &[u8], dir: &Path) {
    publish_with(broker, topic, payload, dir, true);
}

fn publish_with(broker: &Broker, topic: &str, payload: &[u8], dir: &Path, retain: bool) {
    let file = dir.join(format!("payload-{}", rand_tag()));
    std::fs::write(&file, payload).unwrap();
    let publisher =
        find_program("mosquitto_pub").expect("mosquitto_pub (apt-get install mosquitto-clients)");
    let st = Command::new(publisher)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-f",
        ])
        .arg(&file)
        .args(retain.then_some("-r"))
        .status()
        .unwrap();
    assert!(st.success());
}

fn rand_tag() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) as u64
}

/// Publishes many messages fast from one plain client (rumqttc, QoS 0), as
/// (topic, payload) pairs; returns once the client has handed them all to the
/// broker (a final QoS 1 publish acknowledged after them).
pub fn flood(broker: &Broker, messages: impl Iterator<Item = (String, Vec<u8>)>) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(
        format!("flood-{}", std::process::id()),
        "127.0.0.1",
        broker.port(),
    );
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut conn) = Client::new(opts, 1024);
    let pump = std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Err(e) => panic!("flood client: {e}"),
                _ => {}
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .unwrap();
    }
    client
        .publish("outpost-flood/done", QoS::AtLeastOnce, false, b"x".to_vec())
        .unwrap();
    pump.join().unwrap();
}

/// Everything captured on inbox topics, as (sender, sender epoch, receiver,
/// counter) nonces: panics if one nonce sealed two different payloads, or if an
/// inbox payload is not sealed at all. Returns how many payloads it read.
///
/// A header says its sender's epoch until the receiver knows it, and the epoch
/// changes only with a new store, whose first payloads always say it.
pub fn assert_no_nonce_reused(capture: &Capture) -> usize {
    use std::collections::BTreeMap;
    let mut by_nonce: BTreeMap<(String, u64, String, u64), Vec<u8>> = BTreeMap::new();
    let mut epochs: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0;
    for (topic, bytes) in capture.all() {
        let Some(receiver) = topic
            .strip_suffix("/in")
            .and_then(|t| t.rsplit('/').next())
            .map(|r| outpost::frame::Name::new(r).unwrap())
        else {
            continue;
        };
        let (h, _) = outpost::seal::Header::parse(&bytes, &receiver)
            .unwrap_or_else(|e| panic!("{topic}: unsealed payload on the broker: {e}"));
        if let Some(e) = h.sender_epoch {
            epochs.insert(h.sender.to_string(), e);
        }
        let key = (
            h.sender.to_string(),
            epochs[h.sender.as_str()],
            receiver.to_string(),
            h.counter,
        );
        if let Some(prev) = by_nonce.insert(key.clone(), bytes.clone()) {
            assert_eq!(prev, bytes, "nonce {key:?} sealed two different payloads");
        }
        n += 1;
    }
    n
}
