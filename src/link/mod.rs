//! The MQTT link: one outbound MQTT 3.1.1 session to the broker, kept up forever.
//!
//! Invariant: only `link/` knows rumqttc and tokio. The rest of the agent runs on
//! smol and sees only [`Link`] (a cheap handle) and a `smol::channel` of
//! [`LinkEvent`]s.
//!
//! [`Link::start`] spawns one std thread, `outpost-link`, that runs a current-thread
//! tokio runtime driving rumqttc's `EventLoop` (rumqttc panics when polled from
//! smol). The session is persistent (`clean_session = false`), everything is QoS 1,
//! and incoming messages are acknowledged by hand ([`Link::ack`]) only once the
//! caller has committed them, so the broker redelivers whatever was not.
//!
//! The link never buffers the caller's data while offline: [`Link::publish`] fails
//! fast with [`LinkError::NotConnected`] and the caller's SQLite store keeps the
//! frame. When a connection is lost, the publishes rumqttc still held for it (sent
//! but not PUBACKed, or queued but not sent) are dropped, not retransmitted: the
//! sender resends unacknowledged frames from its store on every reconnect anyway, so
//! a rumqttc retransmission would only spend metered bytes twice, and dropping keeps
//! memory flat (at most `INFLIGHT` + `REQUEST_CAPACITY` publishes ever). A
//! `Published` event therefore only ever refers to a publish of the current
//! connection.
//!
//! Backpressure: publishes and acks share rumqttc's bounded request queue; a full
//! queue (or 100 publishes in flight, which stops rumqttc draining it) makes
//! `publish` return [`LinkError::Busy`]. Events go out through a bounded channel;
//! when it is full the link thread waits (and stops reading the socket, so TCP pushes
//! back on the broker) rather than dropping anything. That cannot deadlock: no
//! `Link` method waits for the link thread. Incoming messages are bounded anyway by
//! the broker's in-flight window, since we hold their PUBACKs.
//!
//! Reconnects use capped exponential backoff with jitter. After a failure to reach
//! the broker at all (refused, unreachable, timed out) a cheap TCP probe runs about
//! once a second during a long backoff, so the link is back within about a second
//! of the broker; after a rejection (TLS, CONNACK refused) the full backoff is
//! honoured. A half-dead link is found by keepalive: rumqttc pings every
//! `keepalive` and gives up when the previous ping is still unanswered, so within
//! two keepalive periods.
//!
//! An on-demand link (the agent's `link = "on-demand"`) hangs up when told to
//! ([`Link::go_idle`]: a farewell message, then a clean DISCONNECT, so the broker
//! keeps the persistent session and holds what is published to us meanwhile) and
//! connects again when woken ([`Link::wake`]); the rest is the same link.

mod meter;
mod run;
mod tls;

pub use meter::LinkUsage;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

/// Outgoing QoS 1 publishes rumqttc keeps in flight before it stops taking requests.
const INFLIGHT: u16 = 100;
/// Requests (publishes, acks) queued for the link thread before `publish` says Busy.
const REQUEST_CAPACITY: usize = 64;
/// Events queued for the caller before the link thread waits for it.
const EVENT_CAPACITY: usize = 256;

/// Where the broker is: `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl FromStr for BrokerUrl {
    type Err = LinkError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| LinkError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected mqtt://host[:port] or mqtts://host[:port]"))?;
        let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" => (false, 1883),
            "mqtts" => (true, 8883),
            _ => return Err(bad("unsupported scheme, expected mqtt:// or mqtts://")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad("unexpected path or query after host:port"));
        }
        if authority.contains('@') {
            return Err(bad("credentials go in the config, not in the url"));
        }
        // A bracketed IPv6 literal may contain colons of its own.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(bad("unexpected text after ']'")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            None => default_port,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("port must be a number from 1 to 65535")),
                Ok(port) => port,
            },
        };
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// PEM files for `mqtts://`; the CA file is required (no system roots are built in).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub versions: TlsVersions,
}

/// Which TLS versions the link offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// 1.3, and 1.2 for brokers without it.
    #[default]
    Any,
    /// 1.2 only: its resumed handshakes are smaller (a TLS 1.3 server sends new
    /// session tickets after every handshake), which a link that connects for
    /// every poll pays each time.
    Only12,
    Only13,
}

impl FromStr for TlsVersions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.replace(' ', "").as_str() {
            "1.2,1.3" | "1.3,1.2" | "any" => Ok(TlsVersions::Any),
            "1.2" => Ok(TlsVersions::Only12),
            "1.3" => Ok(TlsVersions::Only13),
            _ => Err(format!(
                "unknown TLS versions {s:?} (expected \"1.2,1.3\", \"1.2\" or \"1.3\")"
            )),
        }
    }
}

/// A retained QoS 1 message: the last will, or one published on every connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Everything the link needs; validated by [`Link::start`].
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub client_id: String,
    pub broker: BrokerUrl,
    pub tls: TlsFiles,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Whole seconds, at least 1 (or zero for none); a dead link is found within two.
    pub keepalive: Duration,
    /// Reconnect backoff ceiling.
    pub backoff_cap: Duration,
    /// Subscribed with QoS 1 on every connect (the inbox). More can be added and
    /// dropped while running with [`Link::set_extra_subscriptions`].
    pub subscriptions: Vec<String>,
    /// Last will, retained, QoS 1.
    pub will: Option<Retained>,
    /// Published retained with QoS 1 right after each connect, e.g. presence "online".
    pub on_connect: Vec<Retained>,
    /// Largest MQTT packet sent or accepted, in bytes.
    pub max_packet: usize,
}

/// What the link tells the rest of the agent.
#[derive(Debug)]
pub enum LinkEvent {
    Connected {
        session_present: bool,
    },
    /// When the link goes down (also when the first connect fails), and again
    /// whenever the reason it stays down changes.
    Disconnected {
        error: String,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
        ack: AckToken,
    },
    /// The broker acknowledged one of the caller's QoS 1 publishes on this connection.
    Published,
    /// The broker sent a packet larger than max_packet, which ended the connection.
    /// The link reconnects once with a clean session and only the fixed
    /// subscriptions (no extra ones until the link is started again), so such a
    /// message costs one reconnect, not all of them.
    Poisoned {
        size: usize,
    },
    /// The link hung up because [`Link::go_idle`] asked, and stays down until
    /// [`Link::wake`].
    Idle,
}

/// Permission to PUBACK one received message; only valid on the connection it came on.
#[derive(Debug)]
pub struct AckToken {
    epoch: u32,
    pkid: u16,
}

/// Errors the caller branches on; messages in lower case.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link is not connected")]
    NotConnected,
    #[error("link request queue is full")]
    Busy,
    #[error("publish of {size} bytes exceeds max_packet of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    #[error("invalid broker url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{path}: {reason}")]
    TlsFile { path: PathBuf, reason: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("invalid link config: {0}")]
    Config(String),
    #[error("cannot start the link thread: {0}")]
    Thread(std::io::Error),
}

/// Handle to the link thread; clone freely.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: AsyncClient,
    shared: Arc<Shared>,
    acks: smol::channel::Sender<AckToken>,
    stop: smol::channel::Sender<()>,
    /// Idle and wake requests of the on-demand link.
    demand: smol::channel::Sender<run::Demand>,
    max_packet: usize,
}

/// State the link thread publishes to the handles.
struct Shared {
    connected: AtomicBool,
    /// Bumped on every connect and every loss, so acks from an old connection are void.
    /// Only compared for equality: 32 bits, which 32-bit MIPS has as an atomic.
    epoch: AtomicU32,
    /// Subscriptions beyond the fixed ones, kept across reconnects.
    extra: std::sync::Mutex<Vec<String>>,
    /// An oversized message cut the link: extra subscriptions are off.
    poisoned: AtomicBool,
    /// Bytes on the wire (see `meter.rs`).
    meter: std::sync::Mutex<meter::Meter>,
    /// What the broker's session holds subscribed, as far as we asked for it.
    subscribed: std::sync::Mutex<Vec<String>>,
}

impl Link {
    /// Validates the config, loads TLS files and spawns the link thread.
    ///
    /// The thread runs until [`Link::stop`], until every `Link` is dropped, or until
    /// the event receiver is dropped; the event channel closes when it has exited.
    pub fn start(cfg: LinkConfig) -> Result<(Link, smol::channel::Receiver<LinkEvent>), LinkError> {
        let options = mqtt_options(&cfg)?;
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LinkError::Thread)?;
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            extra: std::sync::Mutex::new(Vec::new()),
            poisoned: AtomicBool::new(false),
            meter: Default::default(),
            subscribed: Default::default(),
        });
        let (event_tx, event_rx) = smol::channel::bounded(EVENT_CAPACITY);
        // Unbounded but small: we hold at most the broker's in-flight window of
        // unacked messages, so there are never more tokens than that.
        let (ack_tx, ack_rx) = smol::channel::unbounded();
        let (stop_tx, stop_rx) = smol::channel::bounded(1);
        let (demand_tx, demand_rx) = smol::channel::unbounded();
        let max_packet = cfg.max_packet;
        let thread = run::Thread {
            cfg,
            eventloop,
            client: client.clone(),
            shared: shared.clone(),
            events: event_tx,
            acks: ack_rx,
            stop: stop_rx,
            demand: demand_rx,
        };
        std::thread::Builder::new()
            .name("outpost-link".into())
            .spawn(move || runtime.block_on(thread.run()))
            .map_err(LinkError::Thread)?;
        let inner = Inner {
            client,
            shared,
            acks: ack_tx,
            stop: stop_tx,
            demand: demand_tx,
            max_packet,
        };
        Ok((
            Link {
                inner: Arc::new(inner),
            },
            event_rx,
        ))
    }

    /// Queues a QoS 1, non-retained publish; `Ok` means queued, not delivered.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        self.send(topic, payload, false)
    }

    /// Queues a QoS 1 retained publish.
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        self.send(topic, payload, true)
    }

    fn send(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), LinkError> {
        check_topic(topic)?;
        // rumqttc drops the whole connection on an oversized packet: refuse it here.
        let size = publish_size(topic, payload.len());
        if size > self.inner.max_packet {
            return Err(LinkError::TooLarge {
                size,
                max: self.inner.max_packet,
            });
        }
        if !self.is_connected() {
            return Err(LinkError::NotConnected);
        }
        // The only other failure, a closed queue, means the thread is gone, and
        // then is_connected was already false.
        self.inner
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|_| LinkError::Busy)?;
        run::lock(&self.inner.shared.meter).packet(meter::Packet::Other, true, size as u64);
        Ok(())
    }

    /// What the link has cost since it started: bytes on the wire, connects,
    /// keepalive, presence (see [`LinkUsage`]).
    pub fn usage(&self) -> LinkUsage {
        run::lock(&self.inner.shared.meter).usage()
    }

    /// Sends the PUBACK for a committed message; stale tokens are dropped silently.
    pub fn ack(&self, token: AckToken) {
        // QoS 0 deliveries have nothing to acknowledge; old connections' tokens are void.
        if token.pkid == 0 || token.epoch != self.inner.shared.epoch.load(Ordering::Acquire) {
            return;
        }
        // Straight into rumqttc's queue when there is room, so an ack goes out before
        // anything published after it; otherwise the link thread waits for room.
        let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::new());
        publish.pkid = token.pkid;
        if self.inner.client.try_ack(&publish).is_err() {
            let _ = self.inner.acks.try_send(token);
        }
    }

    pub fn is_connected(&self) -> bool {
        self.inner.shared.connected.load(Ordering::Acquire)
    }

    /// Replaces the extra subscriptions (QoS 1): subscribed now when connected,
    /// and on every reconnect. Filters that are not valid are skipped. Off after
    /// [`LinkEvent::Poisoned`].
    pub fn set_extra_subscriptions(&self, filters: Vec<String>) {
        let filters: Vec<String> = filters
            .into_iter()
            .filter(|f| check_filter(f).is_ok())
            .collect();
        let mut extra = run::lock(&self.inner.shared.extra);
        let added: Vec<String> = filters
            .iter()
            .filter(|f| !extra.contains(f))
            .cloned()
            .collect();
        let removed: Vec<String> = extra
            .iter()
            .filter(|f| !filters.contains(f))
            .cloned()
            .collect();
        *extra = filters;
        drop(extra);
        if !self.is_connected() || self.inner.shared.poisoned.load(Ordering::Acquire) {
            return;
        }
        // A full request queue only loses these until the next reconnect, which
        // (un)subscribes what the broker's session lacks.
        let mut held = run::lock(&self.inner.shared.subscribed);
        for f in removed {
            if self.inner.client.try_unsubscribe(f.clone()).is_ok() {
                held.retain(|h| *h != f);
            }
        }
        if !added.is_empty() {
            let sent = self.inner.client.try_subscribe_many(
                added
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            );
            if sent.is_ok() {
                held.extend(added);
            }
        }
    }

    /// Whether an oversized message turned the extra subscriptions off.
    pub fn is_poisoned(&self) -> bool {
        self.inner.shared.poisoned.load(Ordering::Acquire)
    }

    /// Disconnects cleanly (the broker discards the will) and ends the thread.
    pub fn stop(&self) {
        let _ = self.inner.stop.try_send(());
    }

    /// Hangs up (the on-demand link): publishes `farewell` retained with QoS 1
    /// (the presence that says when this node is back), waits a few seconds at
    /// most for the broker to take it and everything else in flight, then sends
    /// DISCONNECT: the broker keeps the persistent session and queues what is
    /// published to us, and discards the will. Messages that arrive meanwhile
    /// are not acknowledged, so the broker hands them over again on the next
    /// connect. The link then stays down ([`LinkEvent::Idle`]; `publish` fails
    /// fast) until [`Link::wake`]. A link that is down anyway just stays down.
    pub fn go_idle(&self, farewell: Vec<Retained>) {
        let farewell = farewell
            .into_iter()
            .filter(|r| check_topic(&r.topic).is_ok())
            .filter(|r| publish_size(&r.topic, r.payload.len()) <= self.inner.max_packet)
            .collect();
        let _ = self.inner.demand.try_send(run::Demand::Idle(farewell));
    }

    /// Connects again after [`Link::go_idle`]; does nothing to a link that is up
    /// or connecting.
    pub fn wake(&self) {
        let _ = self.inner.demand.try_send(run::Demand::Wake);
    }
}

/// Size of a QoS 1 PUBLISH packet as rumqttc encodes it (fixed header included).
pub fn publish_size(topic: &str, n_payload: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + n_payload;
    1 + length_bytes(remaining) + remaining
}

/// Bytes of an MQTT remaining-length field.
fn length_bytes(remaining: usize) -> usize {
    match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Size of our CONNECT packet (MQTT 3.1.1).
fn connect_size(cfg: &LinkConfig) -> usize {
    // Protocol name, level, flags, keepalive; client id.
    let mut remaining = 10 + 2 + cfg.client_id.len();
    if let Some(will) = &cfg.will {
        remaining += 2 + will.topic.len() + 2 + will.payload.len();
    }
    if cfg.username.is_some() || cfg.password.is_some() {
        remaining += 2 + cfg.username.as_ref().map_or(0, String::len);
        remaining += 2 + cfg.password.as_ref().map_or(0, String::len);
    }
    1 + length_bytes(remaining) + remaining
}

/// Size of a SUBSCRIBE packet for `filters` (QoS 1 each).
fn subscribe_size<'a>(filters: impl Iterator<Item = &'a str>) -> usize {
    let remaining = 2 + filters.map(|f| 2 + f.len() + 1).sum::<usize>();
    1 + length_bytes(remaining) + remaining
}

fn check_topic(topic: &str) -> Result<(), LinkError> {
    if topic.is_empty() || topic.len() > 65_535 || topic.contains(['+', '#', '\0']) {
        return Err(LinkError::InvalidTopic(topic.to_string()));
    }
    Ok(())
}

fn check_filter(filter: &str) -> Result<(), LinkError> {
    let bad = || LinkError::InvalidTopic(filter.to_string());
    if filter.is_empty() || filter.len() > 65_535 || filter.contains('\0') {
        return Err(bad());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" {
            return Err(bad());
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(bad());
        }
    }
    Ok(())
}

/// Builds rumqttc's options, checking everything rumqttc would otherwise panic on.
fn mqtt_options(cfg: &LinkConfig) -> Result<MqttOptions, LinkError> {
    let config = |msg: &str| Err(LinkError::Config(msg.to_string()));
    if cfg.client_id.is_empty() {
        return config("client_id is empty (a persistent session needs one)");
    }
    let keepalive = cfg.keepalive;
    if !keepalive.is_zero()
        && (keepalive < Duration::from_secs(1) || keepalive.as_secs() > u16::MAX as u64)
    {
        return config("keepalive must be zero or from 1 s to 65535 s");
    }
    if cfg.max_packet < 128 {
        return config("max_packet is too small");
    }
    if cfg.backoff_cap.is_zero() {
        return config("backoff_cap must be positive");
    }
    for filter in &cfg.subscriptions {
        check_filter(filter)?;
    }
    for retained in cfg.will.iter().chain(&cfg.on_connect) {
        check_topic(&retained.topic)?;
        if publish_size(&retained.topic, retained.payload.len()) > cfg.max_packet {
            return config("a will or on_connect message exceeds max_packet");
        }
    }

    // rumqttc formats "{host}:{port}" itself, so an IPv6 literal needs its brackets.
    let host = if cfg.broker.host.contains(':') {
        format!("[{}]", cfg.broker.host)
    } else {
        cfg.broker.host.clone()
    };
    let mut options = MqttOptions::new(cfg.client_id.clone(), host, cfg.broker.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(INFLIGHT)
        .set_request_channel_capacity(REQUEST_CAPACITY)
        .set_max_packet_size(cfg.max_packet, cfg.max_packet)
        .set_keep_alive(Duration::from_secs(keepalive.as_secs()));
    if cfg.username.is_some() || cfg.password.is_some() {
        options.set_credentials(
            cfg.username.clone().unwrap_or_default(),
            cfg.password.clone().unwrap_or_default(),
        );
    }
    if let Some(will) = &cfg.will {
        options.set_last_will(LastWill::new(
            will.topic.clone(),
            will.payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    if cfg.broker.tls {
        let config = tls::client_config(&cfg.tls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    } else if cfg.tls.ca_file.is_some() || cfg.tls.client_cert.is_some() {
        return config("tls files given for a plain mqtt:// broker (use mqtts://)");
    }
    Ok(options)
}
