//! The link thread: drives rumqttc's event loop on tokio and reconnects forever
//! (or, for the on-demand link, until it is told to go idle: `Thread::idle`).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Disconnect, Event, EventLoop, Outgoing,
    Packet, Publish, QoS, Request, StateError, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use tokio::time::{sleep_until, timeout, Instant};

use super::meter::Packet as Metered;
use super::tls::{self, lower_first};
use super::{
    connect_size, publish_size, subscribe_size, AckToken, LinkConfig, LinkEvent, Retained, Shared,
};
use crate::{error, info, warn};

/// First reconnect delay; doubles up to `backoff_cap`.
const BACKOFF_START: Duration = Duration::from_millis(300);
/// A connection that lived this long resets the backoff; a shorter one (a broker
/// that accepts and then kicks us) keeps it growing.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Closes right after connecting, this many within [`TAKEOVER_WINDOW`], are
/// reported as another client using our client id.
const TAKEOVERS: usize = 3;
const TAKEOVER_WINDOW: Duration = Duration::from_secs(120);
/// How often a long backoff is cut short by a TCP probe, and how long one may take.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);
/// Time allowed for TCP + TLS + CONNACK, and for any flush; satellite RTTs are long.
const CONNECT_TIMEOUT_SECS: u64 = 20;
/// How long `stop` waits for the DISCONNECT packet to go out.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) struct Thread {
    pub cfg: LinkConfig,
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub shared: Arc<Shared>,
    pub events: smol::channel::Sender<LinkEvent>,
    pub acks: smol::channel::Receiver<AckToken>,
    pub stop: smol::channel::Receiver<()>,
    pub demand: smol::channel::Receiver<Demand>,
}

/// What the on-demand link asks of the thread ([`super::Link::go_idle`],
/// [`super::Link::wake`]).
#[derive(Debug)]
pub(super) enum Demand {
    /// Publish these retained, disconnect cleanly, stay down.
    Idle(Vec<Retained>),
    Wake,
}

/// Why a connection ended, in words, and whether probing may cut the backoff short.
struct Failure {
    reason: String,
    /// The broker could not be reached at all, so a TCP probe tells when it is back.
    /// Anything that got as far as TLS or CONNACK waits out the full backoff.
    unreachable: bool,
}

impl Thread {
    pub(super) async fn run(mut self) {
        let mut network = self.eventloop.network_options();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        // Without it, Nagle holds a PUBLISH back while an earlier small write (a
        // PUBACK) waits for the peer's delayed ACK: about 40 ms per exchange on
        // Linux. Frames are already batched into payloads, so little is lost.
        network.set_tcp_nodelay(true);
        self.eventloop.set_network_options(network);
        let forwarder = tokio::spawn(forward_acks(
            self.client.clone(),
            self.acks.clone(),
            self.shared.clone(),
        ));
        self.drive().await;
        forwarder.abort();
        self.set_down();
        // Dropping self closes the event channel: the caller's signal that we are gone.
    }

    async fn drive(&mut self) {
        let mut backoff = Backoff::new(BACKOFF_START, self.cfg.backoff_cap, seed());
        let mut up_since: Option<Instant> = None;
        let mut outage: Option<(Instant, String)> = None;
        // When the broker closed a link that had just come up: several in a row
        // mean another client uses this client id (MQTT's session takeover).
        let mut taken_over: std::collections::VecDeque<Instant> = Default::default();
        // Our own on_connect publishes: their PUBACKs are not the caller's `Published`.
        let mut n_untagged_own = 0;
        let mut own_pkids: Vec<u16> = Vec::new();
        loop {
            let polled = tokio::select! {
                biased;
                _ = self.stop.recv() => break,
                demand = self.demand.recv() => match demand {
                    Ok(Demand::Idle(farewell)) => {
                        let was_up = up_since.take().is_some();
                        if !self.idle(farewell, was_up).await {
                            break;
                        }
                        outage = None;
                        continue;
                    }
                    Ok(Demand::Wake) => continue,
                    Err(_) => break,
                },
                polled = self.eventloop.poll() => polled,
            };
            let event = match polled {
                Ok(event) => event,
                Err(e) => {
                    let was_up = up_since.take();
                    lock(&self.shared.meter).disconnected();
                    self.set_down();
                    if let Some(size) = oversized(&e) {
                        // The message sits in our broker session (or is retained on
                        // a topic we subscribe to) and would cut us off again on
                        // every reconnect: start a clean session with the inbox
                        // alone (the store, not the broker, holds what matters).
                        self.shared.poisoned.store(true, Ordering::Release);
                        self.eventloop.mqtt_options.set_clean_session(true);
                        error!(
                            "the broker sent a message of {size} bytes, more than max_packet; reconnecting with a clean session, and without presence until restart"
                        );
                        if self
                            .events
                            .send(LinkEvent::Poisoned { size })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    // See the module doc: the caller's store resends, not rumqttc.
                    self.eventloop.pending.clear();
                    own_pkids.clear();
                    n_untagged_own = 0;
                    if was_up.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                        backoff.reset();
                    }
                    let mut failure = describe(&e, was_up.is_some());
                    let closed_soon = failure.reason == "connection closed by the broker"
                        && was_up.is_some_and(|t| t.elapsed() < STABLE_AFTER);
                    if closed_soon {
                        taken_over.push_back(Instant::now());
                        while taken_over.len() > TAKEOVERS {
                            taken_over.pop_front();
                        }
                    } else if was_up.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                        taken_over.clear();
                    }
                    if taken_over.len() >= TAKEOVERS
                        && taken_over
                            .front()
                            .is_some_and(|t| t.elapsed() < TAKEOVER_WINDOW)
                    {
                        failure.reason = format!(
                            "the broker keeps closing the connection right after it is made: another client is using this node's name ({}) on the broker; two agents with one name take the connection from each other",
                            self.cfg.client_id
                        );
                    }
                    let delay = backoff.next();
                    match &mut outage {
                        None => {
                            warn!(
                                "link down: {} (retrying in {})",
                                failure.reason,
                                human(delay)
                            );
                            outage = Some((Instant::now(), failure.reason.clone()));
                            let lost = LinkEvent::Disconnected {
                                error: failure.reason.clone(),
                            };
                            if self.events.send(lost).await.is_err() {
                                break;
                            }
                        }
                        // Log a change of reason once, not every retry.
                        Some((_, last)) if *last != failure.reason => {
                            warn!(
                                "link still down: {} (retrying in {})",
                                failure.reason,
                                human(delay)
                            );
                            *last = failure.reason.clone();
                            let changed = LinkEvent::Disconnected {
                                error: failure.reason.clone(),
                            };
                            if self.events.send(changed).await.is_err() {
                                break;
                            }
                        }
                        Some(_) => {}
                    }
                    let host = self.cfg.broker.host.clone();
                    let probe = failure
                        .unreachable
                        .then_some((host.as_str(), self.cfg.broker.port));
                    tokio::select! {
                        biased;
                        _ = self.stop.recv() => break,
                        Ok(Demand::Idle(_)) = self.demand.recv() => {
                            // Down anyway: no farewell can go.
                            if !self.idle(Vec::new(), false).await {
                                break;
                            }
                            outage = None;
                            continue;
                        }
                        _ = wait_for_retry(delay, probe) => continue,
                    }
                }
            };
            let out = match event {
                Event::Incoming(Packet::ConnAck(connack)) => {
                    self.shared.epoch.fetch_add(1, Ordering::AcqRel);
                    self.shared.connected.store(true, Ordering::Release);
                    up_since = Some(Instant::now());
                    lock(&self.shared.meter).connected(
                        self.cfg.broker.port,
                        connect_size(&self.cfg) as u64,
                        4,
                    );
                    n_untagged_own = self.queue_on_connect(connack.session_present);
                    own_pkids.clear();
                    // The clean session was for this connect only.
                    self.eventloop.mqtt_options.set_clean_session(false);
                    match outage.take() {
                        Some((since, _)) => info!(
                            "link up: {} after {}",
                            self.cfg.broker,
                            human(since.elapsed())
                        ),
                        None => info!("link up: {}", self.cfg.broker),
                    }
                    Some(LinkEvent::Connected {
                        session_present: connack.session_present,
                    })
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    let n = publish_size(&publish.topic, publish.payload.len());
                    self.count(Metered::Other, false, n);
                    Some(LinkEvent::Message {
                        topic: publish.topic,
                        payload: publish.payload.into(),
                        ack: AckToken {
                            epoch: self.shared.epoch.load(Ordering::Acquire),
                            pkid: publish.pkid,
                        },
                    })
                }
                Event::Incoming(Packet::PubAck(puback)) => {
                    match own_pkids.iter().position(|&p| p == puback.pkid) {
                        Some(i) => {
                            own_pkids.swap_remove(i);
                            self.count(Metered::Presence, false, 4);
                            None
                        }
                        None => {
                            self.count(Metered::Other, false, 4);
                            Some(LinkEvent::Published)
                        }
                    }
                }
                Event::Incoming(Packet::PingResp) => {
                    self.count(Metered::Ping, false, 2);
                    None
                }
                Event::Outgoing(Outgoing::PingReq) => {
                    self.count(Metered::Ping, true, 2);
                    None
                }
                Event::Outgoing(Outgoing::PubAck(_)) => {
                    self.count(Metered::Other, true, 4);
                    None
                }
                Event::Incoming(Packet::SubAck(suback)) => {
                    self.count(Metered::Subscribe, false, 4 + suback.return_codes.len());
                    if suback.return_codes.contains(&SubscribeReasonCode::Failure) {
                        warn!(
                            "broker refused a subscription among {:?}",
                            self.cfg.subscriptions
                        );
                    }
                    None
                }
                // Our on_connect publishes are queued first, so they are the first
                // publishes rumqttc sends on a connection.
                Event::Outgoing(Outgoing::Publish(pkid)) if n_untagged_own > 0 => {
                    n_untagged_own -= 1;
                    own_pkids.push(pkid);
                    None
                }
                _ => None,
            };
            lock(&self.shared.meter).sample();
            if let Some(out) = out {
                // Waits when the caller is slow; see the module doc.
                if self.events.send(out).await.is_err() {
                    break;
                }
            }
        }
        if self.shared.connected.load(Ordering::Acquire) {
            self.disconnect().await;
        }
        lock(&self.shared.meter).disconnected();
        info!("link stopped");
    }

    /// Queues subscriptions and on_connect messages ahead of anything the caller
    /// queued; returns how many publishes that is. When the broker kept our
    /// session it kept its subscriptions too: only what changed since is
    /// (un)subscribed, which spares the SUBSCRIBE and the retained messages it
    /// would bring again (a reconnect's largest part after the handshakes).
    fn queue_on_connect(&mut self, session_present: bool) -> usize {
        let poisoned = self.shared.poisoned.load(Ordering::Acquire);
        let pending = &mut self.eventloop.pending;
        let mut own = 0;
        if poisoned {
            // A retained message on our own inbox would come back with every
            // subscribe: clear it (outpost never publishes one there).
            for topic in self
                .cfg
                .subscriptions
                .iter()
                .filter(|t| !t.contains(['+', '#']))
            {
                let mut clear = Publish::new(topic.clone(), QoS::AtLeastOnce, Vec::new());
                clear.retain = true;
                pending.push_back(Request::Publish(clear));
                own += 1;
            }
        }
        let mut wanted: Vec<String> = self.cfg.subscriptions.clone();
        if !poisoned {
            wanted.extend(lock(&self.shared.extra).iter().cloned());
        }
        let mut held = lock(&self.shared.subscribed);
        if !session_present || poisoned {
            held.clear();
        }
        let gone: Vec<String> = held
            .iter()
            .filter(|f| !wanted.contains(f))
            .cloned()
            .collect();
        let filters: Vec<String> = wanted.into_iter().filter(|f| !held.contains(f)).collect();
        if !gone.is_empty() {
            let mut unsubscribe = rumqttc::Unsubscribe::new(String::new());
            unsubscribe.topics = gone.clone();
            pending.push_back(Request::Unsubscribe(unsubscribe));
            held.retain(|f| !gone.contains(f));
        }
        if !filters.is_empty() {
            let n = subscribe_size(filters.iter().map(String::as_str));
            lock(&self.shared.meter).packet(Metered::Subscribe, true, n as u64);
            held.extend(filters.iter().cloned());
            let filters = filters
                .into_iter()
                .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
            pending.push_back(Request::Subscribe(Subscribe::new_many(filters)));
        }
        drop(held);
        for retained in &self.cfg.on_connect {
            let mut publish = Publish::new(
                retained.topic.clone(),
                QoS::AtLeastOnce,
                retained.payload.clone(),
            );
            publish.retain = true;
            pending.push_back(Request::Publish(publish));
            let n = publish_size(&retained.topic, retained.payload.len());
            lock(&self.shared.meter).packet(Metered::Presence, true, n as u64);
        }
        own + self.cfg.on_connect.len()
    }

    /// Sends DISCONNECT so the broker discards our will, waiting a little for it.
    async fn disconnect(&mut self) {
        self.set_down();
        self.eventloop
            .pending
            .push_front(Request::Disconnect(Disconnect));
        let sent = timeout(STOP_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if sent.is_err() {
            warn!("link stopped without a clean disconnect");
        }
    }

    /// Counts one MQTT packet (the wire is read after every event).
    fn count(&self, kind: Metered, up: bool, n: usize) {
        lock(&self.shared.meter).packet(kind, up, n as u64);
    }

    /// The on-demand link's hang-up (see [`super::Link::go_idle`]): the farewell
    /// and whatever else is in flight are given [`STOP_TIMEOUT`] to be taken by
    /// the broker, then DISCONNECT; what rumqttc still holds is dropped (the
    /// caller's store resends it, as after a lost connection). Waits to be woken;
    /// false when the link is to stop instead.
    async fn idle(&mut self, farewell: Vec<Retained>, connected: bool) -> bool {
        // Publishes fail fast from now on, and acks of this connection are void.
        self.set_down();
        if connected {
            for retained in farewell {
                let mut publish = Publish::new(retained.topic, QoS::AtLeastOnce, retained.payload);
                publish.retain = true;
                self.eventloop.pending.push_back(Request::Publish(publish));
            }
            let taken = timeout(STOP_TIMEOUT, async {
                loop {
                    let state = &self.eventloop.state;
                    if self.eventloop.pending.is_empty() && state.inflight() == 0 {
                        return true;
                    }
                    // Incoming messages stay unacknowledged: the broker
                    // redelivers them on the next connect.
                    if self.eventloop.poll().await.is_err() {
                        return false;
                    }
                }
            })
            .await;
            if taken == Ok(true) {
                self.disconnect().await;
            } else {
                warn!("link hung up before the broker took the farewell");
            }
        }
        lock(&self.shared.meter).disconnected();
        self.eventloop.clean();
        self.eventloop.pending.clear();
        info!("link idle: down until there is something to send or the next poll");
        if self.events.send(LinkEvent::Idle).await.is_err() {
            return false;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.stop.recv() => return false,
                demand = self.demand.recv() => match demand {
                    Ok(Demand::Wake) => return true,
                    Ok(Demand::Idle(_)) => {}
                    Err(_) => return false,
                },
            }
        }
    }

    fn set_down(&self) {
        self.shared.connected.store(false, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Hands PUBACKs to rumqttc, waiting for room in its queue rather than failing.
async fn forward_acks(
    client: AsyncClient,
    acks: smol::channel::Receiver<AckToken>,
    shared: Arc<Shared>,
) {
    while let Ok(token) = acks.recv().await {
        // A token from an earlier connection: the broker redelivers that message.
        if token.epoch != shared.epoch.load(Ordering::Acquire) {
            continue;
        }
        let mut publish = Publish::new("", QoS::AtLeastOnce, Vec::new());
        publish.pkid = token.pkid;
        if client.ack(&publish).await.is_err() {
            return;
        }
    }
}

/// Sleeps `delay`, returning early once a TCP probe to `probe` succeeds.
async fn wait_for_retry(delay: Duration, probe: Option<(&str, u16)>) {
    let deadline = Instant::now() + delay;
    let Some(addr) = probe else {
        return sleep_until(deadline).await;
    };
    loop {
        let next_probe = Instant::now() + PROBE_EVERY;
        if next_probe >= deadline {
            return sleep_until(deadline).await;
        }
        sleep_until(next_probe).await;
        if let Ok(Ok(_)) = timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            return;
        }
    }
}

/// Capped exponential backoff with ±20% jitter; pure apart from its seeded PRNG.
pub(super) struct Backoff {
    start: Duration,
    cap: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(super) fn new(start: Duration, cap: Duration, seed: u64) -> Backoff {
        Backoff {
            start: start.min(cap),
            cap,
            next: start.min(cap),
            rng: seed | 1,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = self.start;
    }

    pub(super) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        // xorshift64: plenty to keep a fleet from reconnecting in lockstep.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(0.8 + 0.4 * unit).min(self.cap)
    }
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// The size of an incoming packet that exceeded max_packet, if that is what ended
/// the connection.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// A poisoned lock only means a panic elsewhere; the list is still sound.
pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Puts a connection error into lower-case words and classifies it.
fn describe(e: &ConnectionError, was_up: bool) -> Failure {
    let protocol = |reason: String| Failure {
        reason,
        unreachable: false,
    };
    if let Some(tls_error) = find_rustls_error(e) {
        return protocol(tls::describe(tls_error));
    }
    let reason = match e {
        ConnectionError::Io(e) => io_reason(e),
        ConnectionError::NetworkTimeout => "timed out connecting to the broker".into(),
        ConnectionError::FlushTimeout => "timed out writing to the broker".into(),
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorised",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "mqtt 3.1.1 not supported",
                ConnectReturnCode::Success => "no reason given",
            };
            format!("broker refused the connection: {why}")
        }
        ConnectionError::MqttState(state) => match state {
            StateError::AwaitPingResp => "no ping response within keepalive".into(),
            StateError::ConnectionAborted => "connection closed by the broker".into(),
            StateError::Io(e) | StateError::Deserialization(rumqttc::Error::Io(e)) => io_reason(e),
            StateError::Deserialization(rumqttc::Error::PayloadSizeLimitExceeded(n)) => {
                format!("broker sent a packet of {n} bytes, more than max_packet")
            }
            e => lower_first(&e.to_string()),
        },
        e => lower_first(&e.to_string()),
    };
    // Only a failed connect attempt that never got a TCP connection is worth
    // probing for; everything else waits out its backoff.
    let unreachable =
        !was_up && matches!(e, ConnectionError::Io(_) | ConnectionError::NetworkTimeout);
    Failure {
        reason,
        unreachable,
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::TimedOut => "connection timed out".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        io::ErrorKind::BrokenPipe => "connection broken".into(),
        io::ErrorKind::UnexpectedEof => "connection closed by the broker".into(),
        _ => lower_first(&e.to_string()),
    }
}

/// rustls errors reach us wrapped in io::Error (tokio-rustls) inside rumqttc's
/// errors; io::Error hides its payload from `source()`, so look inside by hand.
fn find_rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls_error) = err.downcast_ref::<rustls::Error>() {
            return Some(tls_error);
        }
        if let Some(inner) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(300), Duration::from_secs(5), 42);
        let mut base = Duration::from_millis(300);
        for _ in 0..10 {
            let d = backoff.next();
            assert!(
                d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                "{d:?} vs {base:?}"
            );
            assert!(d <= Duration::from_secs(5));
            base = (base * 2).min(Duration::from_secs(5));
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(360));
    }

    #[test]
    fn rustls_error_is_found_inside_io_errors() {
        let tls_error = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let e = ConnectionError::MqttState(StateError::Deserialization(rumqttc::Error::Io(
            io::Error::new(io::ErrorKind::InvalidData, tls_error),
        )));
        let failure = describe(&e, false);
        assert_eq!(failure.reason, "broker certificate has expired");
        assert!(!failure.unreachable);
    }

    #[test]
    fn refused_tcp_connect_is_probed_but_refused_connack_is_not() {
        let refused = ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        let failure = describe(&refused, false);
        assert_eq!(failure.reason, "connection refused");
        assert!(failure.unreachable);
        let denied = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        let failure = describe(&denied, false);
        assert_eq!(
            failure.reason,
            "broker refused the connection: not authorised"
        );
        assert!(!failure.unreachable);
    }
}
