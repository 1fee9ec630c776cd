//! The MQTT link through its public API (`outpost::link`) against a real mosquitto
//! per test, with `mosquitto_pub` and a capturing `mosquitto_sub` as the other
//! side, the fault proxy for cuts and half-dead links, and test certificates from
//! `support::pki`. The link's pure parsing and wording tests stay beside it in
//! `src/link/tests.rs`.

use std::time::{Duration, Instant};

use smol::channel::Receiver;

use outpost::link::{AckToken, Link, LinkConfig, LinkError, LinkEvent, Retained, TlsFiles};

use crate::support::broker::Broker;
use crate::support::mqtt::{publish, publish_retained, Capture};
use crate::support::pki::{self, Ca, KeyForm};
use crate::support::proxy::Proxy;
use crate::support::{free_port, scaled, wait_until, TempDir};

/// Generous: this runs on a loaded two-core machine (and is scaled by
/// `OUTPOST_TEST_SLOW`).
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn start_rejects_bad_config_and_tls_files_up_front() {
    let dir = TempDir::new();
    let mut cfg = config("bad", "mqtts://127.0.0.1:1");
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("needs a ca_file"), "{e}");

    cfg.tls.ca_file = Some(dir.path().join("missing.pem"));
    let e = Link::start(cfg.clone()).err().unwrap().to_string();
    assert!(
        e.contains("missing.pem") && e.contains("no such file"),
        "{e}"
    );

    std::fs::write(dir.path().join("empty.pem"), "not a pem\n").unwrap();
    cfg.tls.ca_file = Some(dir.path().join("empty.pem"));
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

/// `Link::start` loads the TLS files before it spawns anything, so it succeeding
/// is the client configuration accepting the key.
#[test]
fn tls_keys_load_in_pkcs8_rsa_and_sec1_form() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    let client = ca.issue("node1", None);
    let url = format!("mqtts://127.0.0.1:{}", free_port());
    for (name, form) in [("rsa", KeyForm::Rsa), ("sec1", KeyForm::Sec1)] {
        let issued = ca.issue_with_key(name, None, form);
        let pem = std::fs::read_to_string(&issued.key).unwrap();
        assert!(
            pem.contains(if name == "rsa" {
                "RSA PRIVATE KEY"
            } else {
                "EC PRIVATE KEY"
            }),
            "{pem}"
        );
        let mut cfg = config("node1", &url);
        cfg.tls = TlsFiles {
            ca_file: Some(ca.cert().to_owned()),
            client_cert: Some(issued.cert),
            client_key: Some(issued.key),
            ..TlsFiles::default()
        };
        let (link, events) = Link::start(cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        link.stop();
        wait_closed(&events);
    }
    // The generated client key is PKCS#8.
    let pem = std::fs::read_to_string(&client.key).unwrap();
    assert!(pem.contains("BEGIN PRIVATE KEY"), "{pem}");
}

#[test]
fn publish_fails_fast_and_first_failure_is_reported_when_broker_is_down() {
    let port = free_port();
    let (link, events) = Link::start(config("down", &format!("mqtt://127.0.0.1:{port}"))).unwrap();
    let error = wait_event(&events, |e| match e {
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
    let broker = Broker::start();
    publish_retained(&broker, "node1/in", b"first", broker.dir());
    let mut cfg = config("node1", &broker.url());
    cfg.subscriptions = vec!["node1/in".into()];
    let (link, events) = Link::start(cfg).unwrap();
    let session_present = wait_event(&events, |e| match e {
        LinkEvent::Connected { session_present } => Some(session_present),
        _ => None,
    });
    assert!(!session_present);
    // The retained message proves the subscription is active.
    let ack = expect_message(&events, "node1/in", b"first");
    link.ack(ack);
    publish(&broker, "node1/in", b"second", broker.dir());
    let ack = expect_message(&events, "node1/in", b"second");
    link.ack(ack);

    let mut sub = Capture::start(&broker, "node2/in");
    link.publish("node2/in", b"hello".to_vec()).unwrap();
    expect_next(&mut sub, "node2/in hello");
    wait_event(&events, |e| matches!(e, LinkEvent::Published).then_some(()));
    link.stop();
    wait_closed(&events);
}

#[test]
fn presence_online_on_connect_and_will_offline_when_link_is_cut() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let mut sub = Capture::start(&broker, "node1/presence");
    let mut cfg = config("node1", &proxy.url());
    cfg.will = Some(retained("node1/presence", "offline"));
    cfg.on_connect = vec![retained("node1/presence", "online")];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    expect_next(&mut sub, "node1/presence online");

    // Closing the broker side without DISCONNECT is what makes the broker send the will.
    proxy.cut();
    expect_next(&mut sub, "node1/presence offline");
    let error = wait_event(&events, |e| match e {
        LinkEvent::Disconnected { error } => Some(error),
        _ => None,
    });
    assert!(
        error.contains("closed") || error.contains("reset"),
        "{error}"
    );
    wait_connected(&events);
    expect_next(&mut sub, "node1/presence online");
    // Our own on_connect PUBACK is not the caller's `Published`.
    link.publish("x", b"1".to_vec()).unwrap();
    wait_event(&events, |e| match e {
        LinkEvent::Published => Some(()),
        LinkEvent::Message { .. } | LinkEvent::Connected { .. } => None,
        other => panic!("unexpected {other:?}"),
    });
    link.stop();
    wait_closed(&events);
}

#[test]
fn stop_disconnects_cleanly_so_the_will_is_not_sent() {
    let broker = Broker::start();
    let mut sub = Capture::start_topics(&broker, &["node1/presence", "marker"]);
    let mut cfg = config("node1", &broker.url());
    cfg.will = Some(retained("node1/presence", "offline"));
    cfg.on_connect = vec![retained("node1/presence", "online")];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    expect_next(&mut sub, "node1/presence online");
    link.stop();
    wait_closed(&events);
    assert!(!link.is_connected());
    publish(&broker, "marker", b"after-stop", broker.dir());
    expect_next(&mut sub, "marker after-stop");
}

#[test]
fn go_idle_says_farewell_hangs_up_cleanly_and_wake_fetches_what_was_queued() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let mut sub = Capture::start_topics(&broker, &["node1/presence", "marker"]);
    let mut cfg = config("node1", &proxy.url());
    cfg.subscriptions = vec!["node1/in".into()];
    cfg.will = Some(retained("node1/presence", "offline every=60"));
    cfg.on_connect = vec![retained("node1/presence", "online")];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    expect_next(&mut sub, "node1/presence online");

    link.go_idle(vec![retained("node1/presence", "offline next=9 every=60")]);
    wait_event(&events, |e| matches!(e, LinkEvent::Idle).then_some(()));
    expect_next(&mut sub, "node1/presence offline next=9 every=60");
    assert!(!link.is_connected());
    assert!(matches!(
        link.publish("x", b"1".to_vec()),
        Err(LinkError::NotConnected)
    ));
    wait_until("the connection is closed", WAIT, || {
        proxy.connections() == 0
    });
    // A clean DISCONNECT: the broker keeps the session and sends no will, so
    // the marker is the next thing the capture sees.
    publish(&broker, "node1/in", b"while-idle", broker.dir());
    publish(&broker, "marker", b"m", broker.dir());
    expect_next(&mut sub, "marker m");
    assert_eq!(proxy.accepted(), 1, "an idle link stays down");

    link.wake();
    let session_present = wait_event(&events, |e| match e {
        LinkEvent::Connected { session_present } => Some(session_present),
        _ => None,
    });
    assert!(session_present);
    expect_next(&mut sub, "node1/presence online");
    link.ack(expect_message(&events, "node1/in", b"while-idle"));
    // Waking a link that is up does nothing.
    link.wake();
    link.publish("node1/out", b"after".to_vec()).unwrap();
    wait_event(&events, |e| matches!(e, LinkEvent::Published).then_some(()));
    assert_eq!(proxy.accepted(), 2);
    link.stop();
    wait_closed(&events);
}

#[test]
fn half_dead_link_is_detected_by_keepalive_and_reconnected() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    let mut cfg = config("node1", &proxy.url());
    cfg.keepalive = Duration::from_secs(1);
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    let started = Instant::now();
    // Only the live connection goes dark: the reconnect gets through.
    proxy.blackhole_live();
    let error = wait_event(&events, |e| match e {
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
    let mut broker = Broker::start();
    let mut cfg = config("node1", &broker.url());
    cfg.backoff_cap = Duration::from_secs(30);
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    broker.stop();
    wait_event(&events, |e| {
        matches!(e, LinkEvent::Disconnected { .. }).then_some(())
    });
    // Let the backoff grow well past the probe interval (0.3+0.6+1.2+2.4+4.8 s).
    // Not a wait for anything: the time passing is what the test is about, and
    // the link reports nothing while it backs off.
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
    let broker = Broker::start();
    let proxy = Proxy::start(broker.addr());
    publish_retained(&broker, "node1/sync", b"sync", broker.dir());
    let mut cfg = config("node1", &proxy.url());
    cfg.subscriptions = vec!["node1/in".into(), "node1/sync".into()];
    let (link, events) = Link::start(cfg).unwrap();
    wait_connected(&events);
    link.ack(expect_message(&events, "node1/sync", b"sync"));

    publish(&broker, "node1/in", b"m1", broker.dir());
    let stale = expect_message(&events, "node1/in", b"m1");
    proxy.cut();
    let session_present = wait_event(&events, |e| match e {
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
    wait_event(&events, |e| matches!(e, LinkEvent::Published).then_some(()));

    // Once acked it stays acked: after another reconnect the next message is m2.
    proxy.cut();
    wait_connected(&events);
    publish(&broker, "node1/in", b"m2", broker.dir());
    link.ack(expect_message(&events, "node1/in", b"m2"));
    link.stop();
    wait_closed(&events);
}

#[test]
fn mutual_tls_connects_and_bad_certificates_are_reported() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("server", Some("IP:127.0.0.1,DNS:localhost"));
    let client = ca.issue("node1", None);
    let rogue_ca = Ca::new(dir.path(), "rogue");
    let rogue_client = rogue_ca.issue("node1", None);
    // The TLS options apply to the broker's only listener: it speaks TLS.
    let broker = Broker::start_with_config(&pki::mosquitto_tls(&ca, &server, true));
    let good = TlsFiles {
        ca_file: Some(ca.cert().to_owned()),
        client_cert: Some(client.cert.clone()),
        client_key: Some(client.key.clone()),
        ..TlsFiles::default()
    };
    let tls_config = |host: &str, files: &TlsFiles| {
        let mut cfg = config("node1", &format!("mqtts://{host}:{}", broker.port()));
        cfg.tls = files.clone();
        cfg.subscriptions = vec!["node1/in".into()];
        cfg
    };

    // Either version alone connects as well.
    let only12 = TlsFiles {
        versions: outpost::link::TlsVersions::Only12,
        ..good.clone()
    };
    let only13 = TlsFiles {
        versions: outpost::link::TlsVersions::Only13,
        ..good.clone()
    };
    for (host, files) in [
        ("127.0.0.1", &good),
        ("localhost", &good),
        ("127.0.0.1", &only12),
        ("127.0.0.1", &only13),
    ] {
        let (link, events) = Link::start(tls_config(host, files)).unwrap();
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
                client_cert: Some(rogue_client.cert.clone()),
                client_key: Some(rogue_client.key.clone()),
                ..good.clone()
            },
            "broker rejected the client certificate",
        ),
        (
            "127.0.0.1",
            TlsFiles {
                ca_file: Some(rogue_ca.cert().to_owned()),
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
        let error = wait_event(&events, |e| match e {
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
    let ca = Ca::new(dir.path(), "ca");
    let other = ca.issue("other", Some("DNS:broker.example"));
    let expired = ca.issue_expired("expired", Some("IP:127.0.0.1,DNS:localhost"));

    for (server, expect) in [
        (
            &other,
            "not valid for host name 127.0.0.1 (it is for broker.example)",
        ),
        (&expired, "broker certificate has expired"),
    ] {
        let broker = Broker::start_with_config(&pki::mosquitto_tls(&ca, server, false));
        let mut cfg = config("node1", &format!("mqtts://127.0.0.1:{}", broker.port()));
        cfg.tls.ca_file = Some(ca.cert().to_owned());
        let (link, events) = Link::start(cfg).unwrap();
        let error = wait_event(&events, |e| match e {
            LinkEvent::Disconnected { error } => Some(error),
            _ => None,
        });
        assert!(error.contains(expect), "{expect}: {error}");
        link.stop();
        wait_closed(&events);
    }
}

// ---- helpers --------------------------------------------------------------------

#[test]
fn a_client_certificate_rustls_cannot_use_is_named_with_the_reason_in_words() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    // `x509 -req` without extensions writes an X.509 version 1 certificate.
    pki::openssl(
        dir.path(),
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=v1",
            "-keyout",
            "v1.key",
            "-out",
            "v1.csr",
        ],
    );
    pki::openssl(
        dir.path(),
        &[
            "x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-days", "2", "-out", "v1.crt",
        ],
    );
    let mut cfg = config("v1", "mqtts://127.0.0.1:1");
    cfg.tls = TlsFiles {
        ca_file: Some(ca.cert().to_path_buf()),
        client_cert: Some(dir.path().join("v1.crt")),
        client_key: Some(dir.path().join("v1.key")),
        ..TlsFiles::default()
    };
    let e = Link::start(cfg).err().unwrap().to_string();
    assert!(
        e.contains("client certificate") && e.contains("v1.crt"),
        "{e}"
    );
    assert!(e.contains("X.509 version 1"), "{e}");
    assert!(
        !e.contains("broker certificate") && !e.contains("OtherError"),
        "{e}"
    );
}

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

/// The next event from `events`: `Some(None)` once the link thread has exited
/// (the channel is closed), `None` if `deadline` passes first.
fn next_event(events: &Receiver<LinkEvent>, deadline: Instant) -> Option<Option<LinkEvent>> {
    smol::block_on(smol::future::or(
        async { Some(events.recv().await.ok()) },
        async {
            smol::Timer::at(deadline).await;
            None
        },
    ))
}

/// Waits for the first event `pick` accepts, skipping the others; panics at the
/// deadline ([`WAIT`], scaled) or when the link thread has exited.
#[track_caller]
fn wait_event<T>(events: &Receiver<LinkEvent>, mut pick: impl FnMut(LinkEvent) -> Option<T>) -> T {
    let deadline = Instant::now() + scaled(WAIT);
    loop {
        match next_event(events, deadline) {
            None => panic!("no matching link event within {:?}", scaled(WAIT)),
            Some(None) => panic!("link event channel closed"),
            Some(Some(event)) => {
                if let Some(found) = pick(event) {
                    return found;
                }
            }
        }
    }
}

#[track_caller]
fn wait_connected(events: &Receiver<LinkEvent>) {
    wait_event(events, |e| {
        matches!(e, LinkEvent::Connected { .. }).then_some(())
    });
}

#[track_caller]
fn expect_message(events: &Receiver<LinkEvent>, topic: &str, payload: &[u8]) -> AckToken {
    wait_event(events, |e| match e {
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
#[track_caller]
fn wait_closed(events: &Receiver<LinkEvent>) {
    let deadline = Instant::now() + scaled(WAIT);
    loop {
        match next_event(events, deadline) {
            None => panic!("link thread did not exit"),
            Some(None) => return,
            Some(Some(_)) => {}
        }
    }
}

/// Asserts the capture's next message, as `topic payload`, is `want`.
#[track_caller]
fn expect_next(sub: &mut Capture, want: &str) {
    let (topic, payload) = sub.next_message(WAIT);
    let got = format!("{topic} {}", String::from_utf8_lossy(&payload));
    assert_eq!(got, want);
}
