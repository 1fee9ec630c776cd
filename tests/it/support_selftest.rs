//! Tests of the test helpers themselves: if these fail, nothing else in this
//! binary can be trusted.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::broker::Broker;
use crate::support::mqtt::{publish, Capture};
use crate::support::pki::{openssl, Ca, KeyForm};
use crate::support::proxy::{Mode, Proxy};
use crate::support::{find_program, scaled, wait_exit, wait_until, KillOnDrop, TempDir};

const DEADLINE: Duration = Duration::from_secs(10);

/// A TCP echo server counting the bytes it received; stops accepting on drop.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stopping) = (received.clone(), stopping.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let received = received.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 8192];
                        loop {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    received.fetch_add(n, Ordering::SeqCst);
                                    if stream.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = stream.shutdown(std::net::Shutdown::Write);
                    });
                }
            })
        };
        Echo {
            addr,
            received,
            stopping,
            thread: Some(thread),
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst) as u64
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).expect("connect to proxy");
    stream.set_read_timeout(Some(scaled(DEADLINE))).unwrap();
    stream
}

/// Sends `msg` and reads the echo back.
fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).expect("write to proxy");
    let mut back = vec![0u8; msg.len()];
    stream
        .read_exact(&mut back)
        .expect("read echo through proxy");
    assert_eq!(back, msg);
}

/// Asserts the peer closed or reset `stream` (within the read timeout).
fn expect_closed(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(scaled(DEADLINE))).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected a closed connection, read {n} bytes"),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            panic!("connection still open after {:?}", scaled(DEADLINE))
        }
        Err(_) => {} // reset
    }
}

#[test]
fn proxy_forwards_both_ways_and_counts_exact_bytes() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut stream = connect(&proxy);

    const N: usize = 300_000;
    let data: Vec<u8> = (0..N).map(|i| (i * 7 % 251) as u8).collect();
    // Write from another thread: the echo comes back while we are still sending.
    let writer = {
        let (mut w, data) = (stream.try_clone().unwrap(), data.clone());
        thread::spawn(move || w.write_all(&data).unwrap())
    };
    let mut back = vec![0u8; N];
    stream.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == data,
        "echo through the proxy differs from what was sent"
    );

    // The client may read a byte before the proxy has counted it.
    wait_until("proxy counts every forwarded byte", DEADLINE, || {
        proxy.bytes_up() == N as u64 && proxy.bytes_down() == N as u64
    });
    assert_eq!(echo.received(), N as u64);
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.connections(), 1);

    proxy.reset_counters();
    assert_eq!((proxy.bytes_up(), proxy.bytes_down()), (0, 0));
    round_trip(&mut stream, b"abc");
    wait_until("counters restart from zero", DEADLINE, || {
        proxy.bytes_up() == 3 && proxy.bytes_down() == 3
    });

    drop(stream);
    wait_until("closed connection leaves the proxy", DEADLINE, || {
        proxy.connections() == 0
    });
}

#[test]
fn cut_closes_live_connections_and_new_ones_still_work() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut a = connect(&proxy);
    let mut b = connect(&proxy);
    round_trip(&mut a, b"a");
    round_trip(&mut b, b"b");
    assert_eq!(proxy.connections(), 2);

    proxy.cut();
    expect_closed(&mut a);
    expect_closed(&mut b);
    wait_until("cut connections leave the proxy", DEADLINE, || {
        proxy.connections() == 0
    });

    let mut c = connect(&proxy);
    round_trip(&mut c, b"after the cut");
    assert_eq!(proxy.accepted(), 3);
    assert_eq!(proxy.mode(), Mode::Pass);
}

#[test]
fn refuse_closes_new_and_live_connections_until_pass() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut live = connect(&proxy);
    round_trip(&mut live, b"up");

    proxy.set_mode(Mode::Refuse);
    expect_closed(&mut live);
    for _ in 0..3 {
        let mut refused = connect(&proxy);
        // A write may still succeed; nothing must come back but the close.
        let _ = refused.write_all(b"anyone?");
        expect_closed(&mut refused);
    }
    assert_eq!(proxy.accepted(), 4);
    wait_until("no live connections while refusing", DEADLINE, || {
        proxy.connections() == 0
    });
    assert_eq!(echo.received(), 2, "refused bytes must not reach upstream");

    proxy.set_mode(Mode::Pass);
    let mut again = connect(&proxy);
    round_trip(&mut again, b"back");
}

#[test]
fn blackhole_drops_bytes_but_keeps_connection_open() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut stream = connect(&proxy);
    round_trip(&mut stream, b"ping");
    wait_until("round trip counted", DEADLINE, || proxy.bytes_down() == 4);
    proxy.reset_counters();

    proxy.set_mode(Mode::Blackhole);
    stream.write_all(&[1u8; 1000]).unwrap();
    wait_until("proxy reads and drops the bytes", DEADLINE, || {
        proxy.bytes_discarded() == 1000
    });
    assert_eq!((proxy.bytes_up(), proxy.bytes_down()), (0, 0));
    assert_eq!(echo.received(), 4, "blackholed bytes reached upstream");

    // Absence can only be shown over a while: the connection neither closes nor
    // delivers anything for 300 ms.
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("blackholed connection should stay silent and open, got {other:?}"),
    }
    assert_eq!(proxy.connections(), 1);

    // A new connection is accepted and also swallowed.
    let mut late = connect(&proxy);
    late.write_all(b"xyz").unwrap();
    wait_until("new connection's bytes dropped", DEADLINE, || {
        proxy.bytes_discarded() == 1003
    });
    assert_eq!(echo.received(), 4);

    proxy.cut();
    expect_closed(&mut stream);
    expect_closed(&mut late);
}

#[test]
fn blackhole_hides_a_close_until_the_link_is_restored() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut stream = connect(&proxy);
    round_trip(&mut stream, b"ping");

    proxy.set_mode(Mode::Blackhole);
    // Our half-close reaches the echo only once the link is back; then the
    // echo closes too and we see EOF.
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(stream.read(&mut buf), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
        "close passed through a blackhole"
    );
    proxy.set_mode(Mode::Pass);
    expect_closed(&mut stream);
    wait_until("connection finished", DEADLINE, || proxy.connections() == 0);
}

#[test]
fn blackhole_live_silences_live_connections_while_new_ones_pass() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    let mut dark = connect(&proxy);
    round_trip(&mut dark, b"ping");
    wait_until("round trip counted", DEADLINE, || proxy.bytes_down() == 4);

    proxy.blackhole_live();
    assert_eq!(proxy.mode(), Mode::Pass);
    dark.write_all(&[1u8; 100]).unwrap();
    wait_until("proxy reads and drops the bytes", DEADLINE, || {
        proxy.bytes_discarded() == 100
    });
    assert_eq!(echo.received(), 4, "blackholed bytes reached upstream");

    // A connection made afterwards works.
    let mut fresh = connect(&proxy);
    round_trip(&mut fresh, b"fresh");

    // The dark one hides its close too: nothing comes back for 300 ms.
    dark.shutdown(std::net::Shutdown::Write).unwrap();
    dark.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(dark.read(&mut buf), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
        "close passed through a blackholed connection"
    );
    assert_eq!(echo.received(), 9);
    proxy.cut();
    expect_closed(&mut dark);
    expect_closed(&mut fresh);
}

#[test]
fn delay_adds_latency_in_each_direction() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    proxy.set_delay(Duration::from_millis(200));
    let mut stream = connect(&proxy);

    let started = Instant::now();
    round_trip(&mut stream, b"ping");
    let rtt = started.elapsed();
    assert!(rtt >= Duration::from_millis(400), "round trip took {rtt:?}");

    // Chunks written back to back are held in a queue, not serialised behind
    // one another's delay, and arrive in order.
    let started = Instant::now();
    let writer = {
        let mut w = stream.try_clone().unwrap();
        thread::spawn(move || {
            for i in 0..20u8 {
                w.write_all(&[i; 100]).unwrap();
            }
        })
    };
    let mut back = vec![0u8; 2000];
    stream.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    let expected: Vec<u8> = (0..20u8).flat_map(|i| [i; 100]).collect();
    assert!(back == expected, "delayed chunks arrived out of order");
    assert!(started.elapsed() >= Duration::from_millis(400));

    proxy.set_delay(Duration::ZERO);
    round_trip(&mut stream, b"fast again");
}

#[test]
fn rate_limit_throttles_each_direction() {
    let echo = Echo::start();
    let proxy = Proxy::start(echo.addr);
    proxy.set_rate(Some(100_000));
    let mut stream = connect(&proxy);

    const N: usize = 100_000;
    let started = Instant::now();
    let writer = {
        let mut w = stream.try_clone().unwrap();
        thread::spawn(move || w.write_all(&[7u8; N]).unwrap())
    };
    let mut back = vec![0u8; N];
    stream.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    let took = started.elapsed();
    // 100 kB at 100 kB/s takes about a second; allow for the first slice.
    assert!(took >= Duration::from_millis(800), "took {took:?}");
    wait_until("throttled bytes counted", DEADLINE, || {
        proxy.bytes_up() == N as u64 && proxy.bytes_down() == N as u64
    });
}

#[test]
fn temp_dir_is_unique_and_removed_on_drop() {
    let a = TempDir::new();
    let b = TempDir::new();
    assert_ne!(a.path(), b.path());
    assert!(a.path().is_dir());
    let path = a.path().to_owned();
    std::fs::write(path.join("f"), b"x").unwrap();
    drop(a);
    if std::env::var_os("OUTPOST_KEEP_TEST_DIRS").is_none() {
        assert!(!path.exists());
    }
}

/// A child's stdout and stderr, collected by reader threads as they arrive.
struct Captured {
    readers: Vec<JoinHandle<Vec<u8>>>,
}

impl Captured {
    fn start(child: &mut Child) -> Captured {
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|mut pipe| {
                thread::spawn(move || {
                    let mut out = Vec::new();
                    let _ = pipe.read_to_end(&mut out);
                    out
                })
            })
            .collect();
        Captured { readers }
    }

    /// Stdout then stderr, once the child has exited and closed both pipes.
    fn finish(self) -> String {
        let mut out = String::new();
        for r in self.readers {
            out.push_str(&String::from_utf8_lossy(&r.join().unwrap()));
        }
        out
    }
}

fn mosquitto_client(name: &str) -> Command {
    let bin = find_program(name).unwrap_or_else(|| {
        panic!("{name} not found; install it with `apt-get install mosquitto-clients`")
    });
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Subscribes with `mosquitto_sub -C 1`, publishes once it is subscribed, and
/// checks the subscriber got the message; both clients go through `port`.
fn exchange(broker: &Broker, port: u16, topic: &str, msg: &str) {
    let port = port.to_string();
    static N_SUBS: AtomicUsize = AtomicUsize::new(0);
    let id = format!(
        "selftest-sub-{}-{}",
        std::process::id(),
        N_SUBS.fetch_add(1, Ordering::Relaxed)
    );
    let mut sub = mosquitto_client("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", topic, "-i", &id])
        .args(["-C", "1", "-q", "1"])
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    // Its stdout is block-buffered into our pipe, so ask the broker instead.
    let out = Captured::start(&mut sub);
    broker.wait_for_log(&format!("{id} 1 {topic}"), DEADLINE);

    let mut publisher = mosquitto_client("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", topic, "-m", msg])
        .args(["-q", "1"])
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let pub_out = Captured::start(&mut publisher);
    let status = wait_exit(&mut publisher, "mosquitto_pub exits", DEADLINE);
    assert!(
        status.success(),
        "mosquitto_pub: {status}\n{}\nbroker:\n{}",
        pub_out.finish(),
        broker.log()
    );

    let status = wait_exit(&mut sub, "mosquitto_sub receives one message", DEADLINE);
    let out = out.finish();
    assert!(
        status.success() && out.lines().any(|l| l == msg),
        "mosquitto_sub: {status}\n{out}\nbroker:\n{}",
        broker.log()
    );
}

#[test]
fn broker_exchanges_messages_through_proxy_and_restarts_on_same_port() {
    let mut broker = Broker::start();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
    let proxy = Proxy::start(broker.addr());
    exchange(&broker, proxy.port(), "selftest/a", "hello before restart");
    assert!(proxy.bytes_up() > 0 && proxy.bytes_down() > 0);

    // Leave a connection of the old broker in TIME_WAIT on its port: the broker
    // closes first (killed), we close after.
    let mut idle = TcpStream::connect(broker.addr()).unwrap();
    let port = broker.port();
    broker.stop();
    assert!(!broker.is_running());
    expect_closed(&mut idle);
    drop(idle);

    broker.restart();
    assert_eq!(broker.port(), port);
    assert!(broker.is_running());
    exchange(&broker, proxy.port(), "selftest/b", "hello after restart");

    // restart() also works on a running broker.
    broker.restart();
    exchange(&broker, broker.port(), "selftest/c", "direct");
    let log = broker.log();
    assert_eq!(log.matches(" running").count(), 3, "{log}");
}

#[test]
fn capture_sees_several_topics_in_order_beside_another_capture() {
    let broker = Broker::start();
    // Two captures on one broker: each needs its own client id, or the second
    // would take the first one's session over.
    let mut both = Capture::start_topics(&broker, &["selftest/a", "selftest/b"]);
    let mut only_b = Capture::start(&broker, "selftest/b");
    for (topic, payload) in [
        ("selftest/a", "1"),
        ("selftest/b", "2"),
        ("selftest/a", "3"),
    ] {
        publish(&broker, topic, payload.as_bytes(), broker.dir());
    }
    for (topic, payload) in [
        ("selftest/a", "1"),
        ("selftest/b", "2"),
        ("selftest/a", "3"),
    ] {
        assert_eq!(
            both.next_message(DEADLINE),
            (topic.to_string(), payload.as_bytes().to_vec())
        );
    }
    assert_eq!(
        only_b.next_message(DEADLINE),
        ("selftest/b".to_string(), b"2".to_vec())
    );
    assert_eq!(only_b.all().len(), 1);
}

/// `openssl verify`'s verdict on `cert` against `ca` alone: Ok, or its output.
fn verify(ca: &Ca, cert: &Path) -> Result<(), String> {
    let out = Command::new(find_program("openssl").expect("openssl"))
        .arg("verify")
        .arg("-CAfile")
        .arg(ca.cert())
        .arg(cert)
        .output()
        .expect("run openssl verify");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains(": OK") {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn pki_issues_certificates_in_every_key_form_and_expired_ones() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    let rogue = Ca::new(dir.path(), "rogue");

    let broker = ca.issue("broker", Some("IP:127.0.0.1,DNS:localhost"));
    verify(&ca, &broker.cert).unwrap();
    let cert = broker.cert.to_str().unwrap();
    let text = openssl(
        dir.path(),
        &[
            "x509",
            "-in",
            cert,
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(text.contains("CN = broker"), "{text}");
    assert!(
        text.contains("IP Address:127.0.0.1") && text.contains("DNS:localhost"),
        "{text}"
    );
    let err = verify(&rogue, &broker.cert).unwrap_err();
    assert!(
        err.contains("unable to get local issuer certificate"),
        "{err}"
    );

    for (form, header) in [
        (KeyForm::Pkcs8, "-----BEGIN PRIVATE KEY-----"),
        (KeyForm::Rsa, "-----BEGIN RSA PRIVATE KEY-----"),
        (KeyForm::Sec1, "-----BEGIN EC PRIVATE KEY-----"),
    ] {
        let issued = ca.issue_with_key(&format!("{form:?}"), None, form);
        let key = std::fs::read_to_string(&issued.key).unwrap();
        assert!(key.starts_with(header), "{form:?}: {key}");
        verify(&ca, &issued.cert).unwrap();
        // The certificate is for this key.
        let (cert, key) = (issued.cert.to_str().unwrap(), issued.key.to_str().unwrap());
        let cert_pub = openssl(dir.path(), &["x509", "-in", cert, "-noout", "-pubkey"]);
        let key_pub = openssl(dir.path(), &["pkey", "-in", key, "-pubout"]);
        assert_eq!(cert_pub, key_pub, "{form:?}");
    }

    let expired = ca.issue_expired("old", Some("IP:127.0.0.1"));
    let err = verify(&ca, &expired.cert).unwrap_err();
    assert!(err.contains("certificate has expired"), "{err}");
    let cert = expired.cert.to_str().unwrap();
    let dates = openssl(dir.path(), &["x509", "-in", cert, "-noout", "-dates"]);
    assert!(
        dates.contains("notBefore=Jan  1 00:00:00 2020 GMT")
            && dates.contains("notAfter=Jan  2 00:00:00 2020 GMT"),
        "{dates}"
    );
    // A second expired certificate from the same CA (its openssl ca database).
    verify(&ca, &ca.issue_expired("older", None).cert).unwrap_err();
}
