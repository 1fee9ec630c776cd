//! Link tests: pure parsing and config checks, then a real mosquitto started per test
//! on a free port (killed on drop), with mosquitto_pub/mosquitto_sub as the other side.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Generous: this runs on a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(20);

// ---- pure -----------------------------------------------------------------------

#[test]
fn broker_url_parses_schemes_and_default_ports() {
    let url: BrokerUrl = "mqtt://broker.example".parse().unwrap();
    assert_eq!(
        (url.host.as_str(), url.port, url.tls),
        ("broker.example", 1883, false)
    );
    let url: BrokerUrl = "mqtts://10.0.0.1:8884".parse().unwrap();
    assert_eq!(
        (url.host.as_str(), url.port, url.tls),
        ("10.0.0.1", 8884, true)
    );
    assert_eq!(url.to_string(), "mqtts://10.0.0.1:8884");
    let url: BrokerUrl = "mqtts://[::1]".parse().unwrap();
    assert_eq!((url.host.as_str(), url.port), ("::1", 8883));
    assert_eq!(url.to_string(), "mqtts://[::1]:8883");
    let url: BrokerUrl = "MQTT://h:1/".parse().unwrap();
    assert_eq!(url.to_string(), "mqtt://h:1");
}

#[test]
fn broker_url_rejects_other_schemes_and_bad_ports() {
    for (url, expect) in [
        ("http://h", "unsupported scheme"),
        ("ws://h:80", "unsupported scheme"),
        ("broker:1883", "expected mqtt://"),
        ("mqtt://h:0", "port must be"),
        ("mqtt://h:65536", "port must be"),
        ("mqtt://h:x", "port must be"),
        ("mqtt://", "missing host"),
        ("mqtt://h:1883/topic", "unexpected path"),
        ("mqtt://u:p@h", "credentials"),
    ] {
        let e = url.parse::<BrokerUrl>().unwrap_err().to_string();
        assert!(e.contains(expect), "{url}: {e}");
    }
}

#[test]
fn tls_errors_read_clearly() {
    use rustls::{AlertDescription, CertificateError, Error};
    let cases = [
        (
            Error::InvalidCertificate(CertificateError::Expired),
            "broker certificate has expired",
        ),
        (
            Error::InvalidCertificate(CertificateError::NotValidForName),
            "not valid for the broker's host name",
        ),
        (
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "unknown ca",
        ),
        (
            Error::AlertReceived(AlertDescription::UnknownCA),
            "broker rejected the client certificate (unknown ca)",
        ),
        (
            Error::AlertReceived(AlertDescription::CertificateRequired),
            "requires a client certificate",
        ),
    ];
    for (e, expect) in cases {
        let text = tls::describe(&e);
        assert!(text.contains(expect), "{e:?}: {text}");
    }
}

#[test]
fn start_rejects_bad_config_and_tls_files_up_front() {
    let dir = TempDir::new();
    let mut cfg = config("bad", "mqtts://127.0.0.1:1");
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("needs a ca_file"), "{e}");

    cfg.tls.ca_file = Some(dir.path.join("missing.pem"));
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(
        e.contains("missing.pem") && e.contains("no such file"),
        "{e}"
    );

    std::fs::write(dir.path.join("empty.pem"), "not a pem\n").unwrap();
    cfg.tls.ca_file = Some(dir.path.join("empty.pem"));
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("no pem certificate"), "{e}");

    let mut cfg = config("", "mqtt://127.0.0.1:1");
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("client_id"), "{e}");
    cfg.client_id = "x".into();
    cfg.keepalive = Duration::from_millis(500);
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("keepalive"), "{e}");
    cfg.keepalive = Duration::from_secs(5);
    cfg.subscriptions = vec!["a/#/b".into()];
    assert!(matches!(Link::start(cfg), Err(LinkError::InvalidTopic(_))));
}

#[test]
fn tls_keys_load_in_pkcs8_rsa_and_sec1_form() {
    let dir = TempDir::new();
    let certs = Certs::generate(&dir.path);
    for name in ["rsa", "sec1"] {
        let key = dir.path.join(format!("{name}.key"));
        let key_path = key.to_str().unwrap();
        if name == "rsa" {
            openssl(
                &dir.path,
                &["genrsa", "-traditional", "-out", key_path, "2048"],
            );
        } else {
            let curve = ["-name", "prime256v1"];
            openssl(
                &dir.path,
                &[
                    &["ecparam", "-genkey", "-noout", "-out", key_path][..],
                    &curve,
                ]
                .concat(),
            );
        }
        let crt = dir.path.join(format!("{name}.crt"));
        certs.sign(&dir.path, &key, &crt, "ca", "client", None);
        let files = TlsFiles {
            ca_file: Some(certs.ca.clone()),
            client_cert: Some(crt),
            client_key: Some(key.clone()),
        };
        let pem = std::fs::read_to_string(&key).unwrap();
        assert!(
            pem.contains(if name == "rsa" {
                "RSA PRIVATE KEY"
            } else {
                "EC PRIVATE KEY"
            }),
            "{pem}"
        );
        tls::client_config(&files).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The generated client key is PKCS#8.
    let pem = std::fs::read_to_string(&certs.client_key).unwrap();
    assert!(pem.contains("BEGIN PRIVATE KEY"), "{pem}");
}

#[test]
fn publish_fails_fast_and_first_failure_is_reported_when_broker_is_down() {
    let port = free_port();
    let (link, events) = Link::start(config("down", &format!("mqtt://127.0.0.1:{port}"))).unwrap();
    let error = wait_for(&events, WAIT, |e| match e {
        LinkEvent::Disconnected { error } => Some(error),
        _ => None,
    });
    // qemu-user 7.2 hands getsockopt(SO_ERROR) through without translating the
    // errno, so on mips (ECONNREFUSED = 146) a refused connect arrives as the
    // host's 111 (`qemu-mips-static -strace` shows it). cross/test-qemu.sh says
    // when the tests run under such an emulator; real hardware gets 146.
    let untranslated = std::env::var_os("OUTPOST_QEMU_SO_ERROR_UNTRANSLATED").is_some()
        && error.ends_with("(os error 111)");
    if !untranslated {
        assert_eq!(error, "connection refused");
    }
    assert!(!link.is_connected());
    assert!(matches!(
        link.publish("t", b"x".to_vec()),
        Err(LinkError::NotConnected)
    ));
    assert!(matches!(
        link.publish("t", vec![0; 2000]),
        Err(LinkError::TooLarge { .. })
    ));
    assert!(matches!(
        link.publish("a/+", b"x".to_vec()),
        Err(LinkError::InvalidTopic(_))
    ));
    link.stop();
    wait_closed(&events);
}

// ---- against mosquitto ----------------------------------------------------------

#[test]
fn receives_acks_and_publishes_through_mosquitto() {
    let broker = Broker::start("");
    mosquitto_pub(broker.port, "node1/in", "first", true);
    let mut cfg = config("node1", &broker.url());
    cfg.subscriptions = vec!["node1/in".into()];
    let (link, events) = Link::start(cfg).unwrap();
    let session_present = wait_for(&events, WAIT, |e| match e {
        LinkEvent::Connected { session_present } => Some(session_present),
        _ => None,
    });
    assert!(!session_present);
    // The retained message proves the subscription is active.
    let ack = expect_message(&events, "node1/in", b"first");
    link.ack(ack);
    mosquitto_pub(broker.port, "node1/in", "second", false);
    let ack = expect_message(&events, "node1/in", b"second");
    link.ack(ack);

    let sub = Sub::start(broker.port, &["node2/in"]);
    link.publish("node2/in", b"hello".to_vec()).unwrap();
    sub.expect("node2/in hello");
    wait_for(&events, WAIT, |e| {
        matches!(e, LinkEvent::Published).then_some(())
    });
    link.stop();
    wait_closed(&events);
}

#[test]
fn presence_online_on_connect_and_will_offline_when_link_is_cut() {
    let broker = Broker::start("");
    let proxy = Proxy::start(broker.port);
    let sub = Sub::start(broker.port, &["node1/presence"]);
    let mut cfg = config("node1", &format!("mqtt://127.0.0.1:{}", proxy.port));
    cfg.will = Some(retained("node1/presence", "offline"));
    cfg.on_connect = vec![retained("node1/presence", "online")];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    sub.expect("node1/presence online");

    // Closing the broker side without DISCONNECT is what makes the broker send the will.
    proxy.cut();
    sub.expect("node1/presence offline");
    let error = wait_for(&events, WAIT, |e| match e {
        LinkEvent::Disconnected { error } => Some(error),
        _ => None,
    });
    assert!(
        error.contains("closed") || error.contains("reset"),
        "{error}"
    );
    wait_connected(&events);
    sub.expect("node1/presence online");
    // Our own on_connect PUBACK is not the caller's `Published`.
    link.publish("x", b"1".to_vec()).unwrap();
    wait_for(&events, WAIT, |e| match e {
        LinkEvent::Published => Some(()),
        LinkEvent::Message { .. } | LinkEvent::Connected { .. } => None,
        other => panic!("unexpected {other:?}"),
    });
    link.stop();
    wait_closed(&events);
}

#[test]
fn stop_disconnects_cleanly_so_the_will_is_not_sent() {
    let broker = Broker::start("");
    let sub = Sub::start(broker.port, &["node1/presence", "marker"]);
    let mut cfg = config("node1", &broker.url());
    cfg.will = Some(retained("node1/presence", "offline"));
    cfg.on_connect = vec![retained("node1/presence", "online")];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    sub.expect("node1/presence online");
    link.stop();
    wait_closed(&events);
    assert!(!link.is_connected());
    mosquitto_pub(broker.port, "marker", "after-stop", false);
    assert_eq!(sub.next_line(), "marker after-stop");
}

#[test]
fn half_dead_link_is_detected_by_keepalive_and_reconnected() {
    let broker = Broker::start("");
    let proxy = Proxy::start(broker.port);
    let mut cfg = config("node1", &format!("mqtt://127.0.0.1:{}", proxy.port));
    cfg.keepalive = Duration::from_secs(1);
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    let started = Instant::now();
    proxy.blackhole();
    let error = wait_for(&events, WAIT, |e| match e {
        LinkEvent::Disconnected { error } => Some(error),
        _ => None,
    });
    assert_eq!(error, "no ping response within keepalive");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    wait_connected(&events);
    assert!(link.is_connected());
    link.stop();
    wait_closed(&events);
}

#[test]
fn reconnects_within_seconds_of_broker_restart_after_long_backoff() {
    let mut broker = Broker::start("");
    let mut cfg = config("node1", &broker.url());
    cfg.backoff_cap = Duration::from_secs(30);
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    broker.kill();
    wait_for(&events, WAIT, |e| {
        matches!(e, LinkEvent::Disconnected { .. }).then_some(())
    });
    // Let the backoff grow well past the probe interval (0.3+0.6+1.2+2.4+4.8 s).
    std::thread::sleep(Duration::from_secs(10));
    broker.restart();
    let restarted = Instant::now();
    wait_connected(&events);
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(3), "reconnect took {took:?}");
    // One Disconnected for the whole outage.
    assert!(events.is_empty(), "{:?}", events.try_recv());
    link.stop();
    wait_closed(&events);
}

#[test]
fn unacked_message_is_redelivered_after_reconnect() {
    let broker = Broker::start("");
    let proxy = Proxy::start(broker.port);
    mosquitto_pub(broker.port, "node1/sync", "sync", true);
    let mut cfg = config("node1", &format!("mqtt://127.0.0.1:{}", proxy.port));
    cfg.subscriptions = vec!["node1/in".into(), "node1/sync".into()];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    link.ack(expect_message(&events, "node1/sync", b"sync"));

    mosquitto_pub(broker.port, "node1/in", "m1", false);
    let stale = expect_message(&events, "node1/in", b"m1");
    proxy.cut();
    let session_present = wait_for(&events, WAIT, |e| match e {
        LinkEvent::Connected { session_present } => Some(session_present),
        _ => None,
    });
    assert!(session_present);
    // A token from the old connection is dropped; the broker redelivers m1.
    link.ack(stale);
    let ack = expect_message(&events, "node1/in", b"m1");
    link.ack(ack);
    // Acks and publishes share one queue: once this publish is acknowledged, so
    // is m1.
    link.publish("node1/out", b"after-ack".to_vec()).unwrap();
    wait_for(&events, WAIT, |e| {
        matches!(e, LinkEvent::Published).then_some(())
    });

    // Once acked it stays acked: after another reconnect the next message is m2.
    proxy.cut();
    wait_connected(&events);
    mosquitto_pub(broker.port, "node1/in", "m2", false);
    link.ack(expect_message(&events, "node1/in", b"m2"));
    link.stop();
    wait_closed(&events);
}

#[test]
fn mutual_tls_connects_and_bad_certificates_are_reported() {
    let dir = TempDir::new();
    let certs = Certs::generate(&dir.path);
    let broker = Broker::start(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        certs.ca.display(),
        certs.server_cert.display(),
        certs.server_key.display()
    ));
    let good = TlsFiles {
        ca_file: Some(certs.ca.clone()),
        client_cert: Some(certs.client_cert.clone()),
        client_key: Some(certs.client_key.clone()),
    };
    let tls_config = |host: &str, files: &TlsFiles| {
        let mut cfg = config("node1", &format!("mqtts://{host}:{}", broker.port));
        cfg.tls = files.clone();
        cfg.subscriptions = vec!["node1/in".into()];
        cfg
    };

    for host in ["127.0.0.1", "localhost"] {
        let (link, events) = Link::start(tls_config(host, &good)).unwrap();
        wait_connected(&events);
        link.publish("node1/in", b"over tls".to_vec()).unwrap();
        link.ack(expect_message(&events, "node1/in", b"over tls"));
        link.stop();
        wait_closed(&events);
    }

    let cases = [
        (
            "127.0.0.1",
            TlsFiles {
                client_cert: Some(certs.rogue_client_cert.clone()),
                client_key: Some(certs.rogue_client_key.clone()),
                ..good.clone()
            },
            "broker rejected the client certificate",
        ),
        (
            "127.0.0.1",
            TlsFiles {
                ca_file: Some(certs.rogue_ca.clone()),
                ..good.clone()
            },
            "signed by an unknown ca",
        ),
        (
            "127.0.0.1",
            TlsFiles {
                client_cert: None,
                client_key: None,
                ..good.clone()
            },
            "requires a client certificate",
        ),
    ];
    for (host, files, expect) in cases {
        let (link, events) = Link::start(tls_config(host, &files)).unwrap();
        let error = wait_for(&events, WAIT, |e| match e {
            LinkEvent::Disconnected { error } => Some(error),
            LinkEvent::Connected { .. } => panic!("connected with {files:?}"),
            _ => None,
        });
        assert!(error.contains(expect), "{expect}: {error}");
        link.stop();
        wait_closed(&events);
    }
}

#[test]
fn wrong_host_name_and_expired_broker_certificates_are_reported() {
    let dir = TempDir::new();
    let certs = Certs::generate(&dir.path);
    let other_key = dir.path.join("other.key");
    let other_crt = dir.path.join("other.crt");
    openssl(
        &dir.path,
        &[
            "genpkey",
            "-algorithm",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            other_key.to_str().unwrap(),
        ],
    );
    certs.sign(
        &dir.path,
        &other_key,
        &other_crt,
        "ca",
        "other",
        Some("DNS:broker.example"),
    );
    let expired_crt = dir.path.join("expired.crt");
    certs.sign_expired(&dir.path, &certs.server_key, &expired_crt);

    for (crt, key, expect) in [
        (
            &other_crt,
            &other_key,
            "not valid for host name 127.0.0.1 (it is for broker.example)",
        ),
        (
            &expired_crt,
            &certs.server_key,
            "broker certificate has expired",
        ),
    ] {
        let broker = Broker::start(&format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            certs.ca.display(),
            crt.display(),
            key.display()
        ));
        let mut cfg = config("node1", &format!("mqtts://127.0.0.1:{}", broker.port));
        cfg.tls.ca_file = Some(certs.ca.clone());
        let (link, events) = Link::start(cfg).unwrap();
        let error = wait_for(&events, WAIT, |e| match e {
            LinkEvent::Disconnected { error } => Some(error),
            _ => None,
        });
        assert!(error.contains(expect), "{expect}: {error}");
        link.stop();
        wait_closed(&events);
    }
}

// ---- helpers --------------------------------------------------------------------

fn config(client_id: &str, url: &str) -> LinkConfig {
    LinkConfig {
        client_id: client_id.into(),
        broker: url.parse().unwrap(),
        tls: TlsFiles::default(),
        username: None,
        password: None,
        keepalive: Duration::from_secs(5),
        backoff_cap: Duration::from_secs(2),
        subscriptions: Vec::new(),
        will: None,
        on_connect: Vec::new(),
        max_packet: 1024,
    }
}

fn retained(topic: &str, payload: &str) -> Retained {
    Retained {
        topic: topic.into(),
        payload: payload.into(),
    }
}

/// Waits up to `within` for the first event `pick` accepts, skipping the others.
fn wait_for<T>(
    events: &smol::channel::Receiver<LinkEvent>,
    within: Duration,
    mut pick: impl FnMut(LinkEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    smol::block_on(async {
        loop {
            let next = smol::future::or(async { Some(events.recv().await) }, async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
            match next {
                None => panic!("no matching link event within {within:?}"),
                Some(Err(_)) => panic!("link event channel closed"),
                Some(Ok(event)) => {
                    if let Some(found) = pick(event) {
                        return found;
                    }
                }
            }
        }
    })
}

fn wait_connected(events: &smol::channel::Receiver<LinkEvent>) {
    wait_for(events, WAIT, |e| {
        matches!(e, LinkEvent::Connected { .. }).then_some(())
    });
}

fn expect_message(
    events: &smol::channel::Receiver<LinkEvent>,
    topic: &str,
    payload: &[u8],
) -> AckToken {
    wait_for(events, WAIT, |e| match e {
        LinkEvent::Message {
            topic: t,
            payload: p,
            ack,
        } if t == topic => {
            assert_eq!(p, payload, "on {topic}");
            Some(ack)
        }
        _ => None,
    })
}

/// Waits for the link thread to exit (it closes the channel).
fn wait_closed(events: &smol::channel::Receiver<LinkEvent>) {
    let deadline = Instant::now() + WAIT;
    smol::block_on(async {
        loop {
            let next = smol::future::or(async { Some(events.recv().await) }, async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
            match next {
                None => panic!("link thread did not exit"),
                Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mosquitto_pub(port: u16, topic: &str, payload: &str, retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ]);
    if retain {
        cmd.arg("-r");
    }
    let status = cmd.status().expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");
}

struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "outpost-link-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A mosquitto of our own on a free port.
struct Broker {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl Broker {
    fn start(listener_extra: &str) -> Broker {
        let dir = TempDir::new();
        let port = free_port();
        let conf = dir.path.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence false\nlog_dest file {}\nlog_type all\n\
                 listener {port} 127.0.0.1\nallow_anonymous true\n{listener_extra}",
                dir.path.join("mosquitto.log").display()
            ),
        )
        .unwrap();
        let mut broker = Broker {
            port,
            conf,
            child: None,
            _dir: dir,
        };
        broker.restart();
        broker
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_listening(self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// mosquitto_sub printing `topic payload` lines; ready once its SUBACK arrived.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn start(port: u16, topics: &[&str]) -> Sub {
        // stdbuf: mosquitto_sub does not flush its debug lines into a pipe.
        let mut cmd = Command::new("stdbuf");
        cmd.args([
            "-oL",
            "mosquitto_sub",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-v",
            "-d",
        ]);
        for topic in topics {
            cmd.args(["-t", topic]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mosquitto_sub");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let sub = Sub { child, lines };
        sub.wait_line(|l| l.contains("received SUBACK"));
        sub
    }

    /// The next message line (debug lines skipped).
    fn next_line(&self) -> String {
        self.wait_line(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
    }

    fn expect(&self, want: &str) {
        let got = self.next_line();
        assert_eq!(got, want);
    }

    fn wait_line(&self, mut want: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub: no expected line: {e}"),
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay in front of the broker that can cut or black-hole its connections,
/// which killing the broker cannot do (the will needs a live broker).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<Relay>>>,
}

struct Relay {
    client: TcpStream,
    broker: TcpStream,
    blackholed: Arc<AtomicBool>,
}

impl Proxy {
    fn start(broker_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Relay>>> = Arc::default();
        let registry = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)) else {
                    continue;
                };
                let blackholed = Arc::new(AtomicBool::new(false));
                for (from, to) in [(&client, &broker), (&broker, &client)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let blackholed = blackholed.clone();
                    std::thread::spawn(move || pump(from, to, &blackholed));
                }
                registry.lock().unwrap().push(Relay {
                    client,
                    broker,
                    blackholed,
                });
            }
        });
        Proxy { port, conns }
    }

    /// Closes every current connection on both sides, as a dropped link would.
    fn cut(&self) {
        for relay in self.conns.lock().unwrap().drain(..) {
            let _ = relay.broker.shutdown(Shutdown::Both);
            let _ = relay.client.shutdown(Shutdown::Both);
        }
    }

    /// Current connections stay open but every byte is lost; new ones work.
    fn blackhole(&self) {
        for relay in self.conns.lock().unwrap().iter() {
            relay.blackholed.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, blackholed: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !blackholed.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Test PKI made with the openssl CLI: a CA, a broker cert for 127.0.0.1 and
/// localhost, a client cert, and a rogue CA with its own client cert.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_ca: PathBuf,
    rogue_client_cert: PathBuf,
    rogue_client_key: PathBuf,
}

impl Certs {
    fn generate(dir: &Path) -> Certs {
        let p = |name: &str| dir.join(name);
        for ca in ["ca", "rogue"] {
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
                    &format!("/CN=outpost test {ca}"),
                    "-keyout",
                    p(&format!("{ca}.key")).to_str().unwrap(),
                    "-out",
                    p(&format!("{ca}.crt")).to_str().unwrap(),
                ],
            );
        }
        let certs = Certs {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            rogue_ca: p("rogue.crt"),
            rogue_client_cert: p("rogue-client.crt"),
            rogue_client_key: p("rogue-client.key"),
        };
        for (key, crt, ca, cn, san) in [
            (
                &certs.server_key,
                &certs.server_cert,
                "ca",
                "server",
                Some("IP:127.0.0.1,DNS:localhost"),
            ),
            (&certs.client_key, &certs.client_cert, "ca", "node1", None),
            (
                &certs.rogue_client_key,
                &certs.rogue_client_cert,
                "rogue",
                "node1",
                None,
            ),
        ] {
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    key.to_str().unwrap(),
                ],
            );
            certs.sign(dir, key, crt, ca, cn, san);
        }
        certs
    }

    /// Issues a certificate for `key` from CA `ca` ("ca" or "rogue").
    fn sign(&self, dir: &Path, key: &Path, crt: &Path, ca: &str, cn: &str, san: Option<&str>) {
        let csr = dir.join(format!("{cn}.csr"));
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                key.to_str().unwrap(),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        let ext = dir.join(format!("{cn}.ext"));
        let mut text = String::from("basicConstraints=CA:FALSE\n");
        if let Some(san) = san {
            text += &format!("subjectAltName={san}\n");
        }
        std::fs::write(&ext, text).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                dir.join(format!("{ca}.crt")).to_str().unwrap(),
                "-CAkey",
                dir.join(format!("{ca}.key")).to_str().unwrap(),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                crt.to_str().unwrap(),
            ],
        );
    }

    /// A broker certificate that expired in 2020, made with `openssl ca`.
    fn sign_expired(&self, dir: &Path, key: &Path, crt: &Path) {
        let csr = dir.join("expired.csr");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                key.to_str().unwrap(),
                "-subj",
                "/CN=expired",
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca=test\n[test]\ndatabase={}\nnew_certs_dir={}\nserial={}\n\
                 default_md=sha256\npolicy=any\nunique_subject=no\ncopy_extensions=none\n\
                 x509_extensions=ext\n[any]\ncommonName=supplied\n\
                 [ext]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
                dir.join("index.txt").display(),
                dir.display(),
                dir.join("ca.srl").display()
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                dir.join("ca.cnf").to_str().unwrap(),
                "-cert",
                self.ca.to_str().unwrap(),
                "-keyfile",
                dir.join("ca.key").to_str().unwrap(),
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
                "-in",
                csr.to_str().unwrap(),
                "-out",
                crt.to_str().unwrap(),
            ],
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
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
