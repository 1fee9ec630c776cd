//! A fault-injecting TCP proxy that stands in for the satellite/GSM link between
//! an agent and the broker.
//!
//! One listener thread accepts; each connection gets two pump threads, one per
//! direction. A pump reads whatever arrives, stamps it with the time it may leave
//! (now + the one-way delay) and keeps reading while earlier chunks wait, so a
//! delay adds latency without cutting throughput; chunks leave in order, throttled
//! to the configured rate. A throttled pump stops reading while it writes, so a
//! slow link pushes back on the sender through TCP as a real one would.
//!
//! Faults: [`Proxy::cut`] shuts both sockets of every live connection (both peers
//! see the connection end); [`Mode::Refuse`] also closes new connections as soon
//! as they are accepted; [`Mode::Blackhole`] keeps connections open but drops
//! every byte, and hides a peer's close from the other side, so a client only
//! notices through its keepalive. [`Proxy::blackhole_live`] does that to the live
//! connections only, for good, while new ones are handled by the mode: a half-dead
//! link that the client finds by keepalive and leaves by reconnecting.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
// usize, not u64: 32-bit mips has no 64-bit atomics and runs these under qemu.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::try_wait_for;

/// Bytes a pump holds back for the delay before it stops reading.
const QUEUE_CAP: usize = 4 << 20;
/// Longest a pump blocks without looking at its connection's state again.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// How long a new connection may take to reach the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link does with connections and bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes (subject to delay and rate).
    Pass,
    /// Close new connections right after accepting them and cut existing ones.
    Refuse,
    /// Keep connections open but silently drop every byte in both directions.
    Blackhole,
}

/// A TCP proxy on 127.0.0.1 forwarding to one upstream; stops on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    /// Signalled when the mode changes, for pumps holding back a close.
    mode_changed: Condvar,
    delay: Mutex<Duration>,
    rate: Mutex<Option<u64>>,
    bytes_up: AtomicUsize,
    bytes_down: AtomicUsize,
    bytes_discarded: AtomicUsize,
    accepted: AtomicUsize,
    /// Live connections by id. The listener registers a connection under this
    /// lock after checking the mode, so `set_mode(Refuse)` cannot miss one.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// One thread per connection (it joins its second pump before finishing).
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
}

/// The sockets of one proxied connection, kept so they can be cut from outside.
struct Conn {
    client: TcpStream,
    upstream: Mutex<Option<TcpStream>>,
    cut: AtomicBool,
    /// Set by [`Proxy::blackhole_live`]: this connection drops everything, whatever
    /// the mode.
    blackholed: AtomicBool,
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `upstream`, in [`Mode::Pass`] with no delay and no rate limit.
    ///
    /// Spawns a listener thread and two threads per connection.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("proxy bind");
        let addr = listener.local_addr().expect("proxy local_addr");
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Pass),
            mode_changed: Condvar::new(),
            delay: Mutex::new(Duration::ZERO),
            rate: Mutex::new(None),
            bytes_up: AtomicUsize::new(0),
            bytes_down: AtomicUsize::new(0),
            bytes_discarded: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let listener = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("proxy-{}", addr.port()))
                .spawn(move || accept_loop(&shared, listener))
                .expect("spawn proxy listener")
        };
        Proxy {
            addr,
            shared,
            listener: Some(listener),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.addr.port())
    }

    pub fn mode(&self) -> Mode {
        *lock(&self.shared.mode)
    }

    /// Switches the mode; [`Mode::Refuse`] also cuts every live connection.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
        self.shared.mode_changed.notify_all();
        if mode == Mode::Refuse {
            self.cut();
        }
    }

    /// Closes every live connection now, on both sides; the mode is unchanged,
    /// so new connections are handled as before. Bytes still held back by the
    /// delay are lost, as on a real link.
    pub fn cut(&self) {
        for conn in lock(&self.shared.conns).values() {
            conn.cut();
        }
    }

    /// Black-holes every live connection, as [`Mode::Blackhole`] would, until it
    /// is cut; connections accepted later are handled by the mode as before.
    pub fn blackhole_live(&self) {
        for conn in lock(&self.shared.conns).values() {
            conn.blackholed.store(true, Ordering::SeqCst);
        }
        self.shared.mode_changed.notify_all();
    }

    /// Latency added to each direction, for bytes read from now on.
    pub fn set_delay(&self, one_way: Duration) {
        *lock(&self.shared.delay) = one_way;
    }

    /// Throttles each direction to `bytes_per_sec` (`None`: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        assert_ne!(bytes_per_sec, Some(0), "a rate of 0 is Mode::Blackhole");
        *lock(&self.shared.rate) = bytes_per_sec;
    }

    /// Client-to-upstream bytes written to the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst) as u64
    }

    /// Upstream-to-client bytes written to the client so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst) as u64
    }

    /// Bytes read in either direction and dropped by [`Mode::Blackhole`] or
    /// [`Proxy::blackhole_live`].
    pub fn bytes_discarded(&self) -> u64 {
        self.shared.bytes_discarded.load(Ordering::SeqCst) as u64
    }

    /// Zeroes the byte counters (`bytes_up`, `bytes_down`, `bytes_discarded`).
    pub fn reset_counters(&self) {
        self.shared.bytes_up.store(0, Ordering::SeqCst);
        self.shared.bytes_down.store(0, Ordering::SeqCst);
        self.shared.bytes_discarded.store(0, Ordering::SeqCst);
    }

    /// Connections accepted and not yet finished in both directions.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Connections accepted since start, including those closed by
    /// [`Mode::Refuse`].
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst) as u64
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            // The listener blocks in accept(); a connection of our own wakes it.
            // Repeat in case a connect got lost (a full backlog drops SYNs).
            while !listener.is_finished() {
                let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
                try_wait_for(Duration::from_millis(200), || {
                    listener.is_finished().then_some(())
                });
            }
            let _ = listener.join();
        }
        self.cut();
        self.shared.mode_changed.notify_all();
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or an aborted handshake: nothing to
                // forward; don't spin on a persistent error.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);

        let conn = {
            let mut conns = lock(&shared.conns);
            if *lock(&shared.mode) == Mode::Refuse {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let conn = Arc::new(Conn {
                client,
                upstream: Mutex::new(None),
                cut: AtomicBool::new(false),
                blackholed: AtomicBool::new(false),
            });
            next_id += 1;
            conns.insert(next_id, conn.clone());
            conn
        };
        let id = next_id;
        let shared2 = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("proxy-conn-{id}"))
            .spawn(move || run_conn(&shared2, id, &conn));
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                if let Some(conn) = lock(&shared.conns).remove(&id) {
                    conn.cut();
                }
            }
        }
    }
}

/// Connects one accepted client to the upstream and pumps both directions
/// until both have finished.
fn run_conn(shared: &Arc<Shared>, id: u64, conn: &Arc<Conn>) {
    let finish = || {
        lock(&shared.conns).remove(&id);
    };
    let upstream = match TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            // Upstream down: the client sees its connection closed.
            conn.cut();
            return finish();
        }
    };
    let _ = upstream.set_nodelay(true);
    let sockets = (|| {
        Some((
            conn.client.try_clone().ok()?,
            conn.client.try_clone().ok()?,
            upstream.try_clone().ok()?,
            upstream.try_clone().ok()?,
        ))
    })();
    let Some((client_r, client_w, up_r, up_w)) = sockets else {
        conn.cut();
        return finish();
    };
    if !conn.set_upstream(upstream) {
        return finish();
    }
    let down = {
        let (shared, conn) = (shared.clone(), conn.clone());
        thread::Builder::new()
            .name(format!("proxy-down-{id}"))
            .spawn(move || pump(&shared, &conn, Dir::Down, up_r, client_w))
    };
    match down {
        Ok(down) => {
            pump(shared, conn, Dir::Up, client_r, up_w);
            let _ = down.join();
        }
        Err(_) => conn.cut(),
    }
    finish();
}

/// Forwards `from` to `to` until `from` ends or the connection is cut, then
/// passes the end on: a close as a half-close, a reset as a cut.
fn pump(shared: &Shared, conn: &Conn, dir: Dir, mut from: TcpStream, mut to: TcpStream) {
    let forwarded = match dir {
        Dir::Up => &shared.bytes_up,
        Dir::Down => &shared.bytes_down,
    };
    // Chunks held back by the delay, with the time each may leave.
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut n_queued = 0usize;
    let mut last_due = Instant::now();
    let mut pacer = Pacer::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Set once `from` has ended: true for a clean close, false for an error.
    let mut ended: Option<bool> = None;

    let clean = loop {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, chunk) = queue.pop_front().expect("front exists");
            n_queued -= chunk.len();
            if send(shared, conn, &mut pacer, forwarded, &mut to, &chunk).is_err() {
                return conn.cut();
            }
        }
        if conn.is_cut() {
            return;
        }
        let until_due = queue.front().map_or(MAX_WAIT, |(due, _)| {
            due.saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), MAX_WAIT)
        });
        if let Some(clean) = ended {
            if queue.is_empty() {
                break clean;
            }
            thread::sleep(until_due);
            continue;
        }
        if n_queued >= QUEUE_CAP {
            thread::sleep(until_due);
            continue;
        }
        // The timeout wakes us when the oldest held-back chunk is due.
        let _ = from.set_read_timeout(Some(until_due));
        let read = from.read(&mut buf);
        if conn.is_cut() {
            return;
        }
        match read {
            Ok(0) => ended = Some(true),
            Ok(n) => {
                if conn.is_blackholed(shared) {
                    shared.bytes_discarded.fetch_add(n, Ordering::SeqCst);
                    continue;
                }
                let delay = *lock(&shared.delay);
                if delay.is_zero() && queue.is_empty() {
                    if send(shared, conn, &mut pacer, forwarded, &mut to, &buf[..n]).is_err() {
                        return conn.cut();
                    }
                    continue;
                }
                // A delay shortened mid-stream must not reorder chunks.
                last_due = last_due.max(Instant::now() + delay);
                queue.push_back((last_due, buf[..n].to_vec()));
                n_queued += n;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => ended = Some(false),
        }
    };

    // A blackholed link carries no close either: hold it back until the link
    // is restored or cut, so the other peer only learns of it then.
    let mut mode = lock(&shared.mode);
    while (*mode == Mode::Blackhole || conn.blackholed.load(Ordering::SeqCst)) && !conn.is_cut() {
        mode = shared
            .mode_changed
            .wait_timeout(mode, MAX_WAIT)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
    drop(mode);
    if clean {
        let _ = to.shutdown(Shutdown::Write);
    } else {
        conn.cut();
    }
}

/// Writes `bytes` to `to` at the configured rate, or drops them on a black-holed
/// connection; counts what was written.
fn send(
    shared: &Shared,
    conn: &Conn,
    pacer: &mut Pacer,
    forwarded: &AtomicUsize,
    to: &mut TcpStream,
    bytes: &[u8],
) -> io::Result<()> {
    if conn.is_blackholed(shared) {
        shared
            .bytes_discarded
            .fetch_add(bytes.len(), Ordering::SeqCst);
        return Ok(());
    }
    let mut rest = bytes;
    while !rest.is_empty() {
        if conn.is_cut() {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        let rate = *lock(&shared.rate);
        let n = match rate {
            // Slices of about 50 ms of traffic keep the pacing smooth and each
            // wait short enough to notice a cut.
            Some(rate) => rest.len().min((rate / 20).clamp(1, 16 * 1024) as usize),
            None => rest.len(),
        };
        if let Some(rate) = rate {
            pacer.wait(rate, n);
        }
        to.write_all(&rest[..n])?;
        forwarded.fetch_add(n, Ordering::SeqCst);
        rest = &rest[n..];
    }
    Ok(())
}

/// Spaces writes so that they average a given rate; idle time earns no credit.
struct Pacer {
    next: Instant,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            next: Instant::now(),
        }
    }

    /// Sleeps until `n` more bytes may go out at `rate` bytes per second.
    fn wait(&mut self, rate: u64, n: usize) {
        let now = Instant::now();
        if self.next > now {
            thread::sleep(self.next - now);
        }
        self.next = self.next.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
    }
}

impl Conn {
    /// Shuts both sockets; the pumps see their reads end and stop.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(upstream) = &*lock(&self.upstream) {
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Whether bytes read on this connection are dropped: by the mode, or since
    /// [`Proxy::blackhole_live`].
    fn is_blackholed(&self, shared: &Shared) -> bool {
        self.blackholed.load(Ordering::SeqCst) || *lock(&shared.mode) == Mode::Blackhole
    }

    /// Records the upstream socket so `cut` reaches it; false (and the socket
    /// shut) if the connection was cut while connecting.
    fn set_upstream(&self, upstream: TcpStream) -> bool {
        let mut slot = lock(&self.upstream);
        // `cut` sets the flag before taking this lock, so either it sees the
        // socket stored here or we see the flag.
        if self.is_cut() {
            let _ = upstream.shutdown(Shutdown::Both);
            return false;
        }
        *slot = Some(upstream);
        true
    }
}

/// Locks a mutex, ignoring poisoning: a panicked pump must not take the test's
/// view of the proxy down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
