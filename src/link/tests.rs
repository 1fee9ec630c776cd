//! Link unit tests: the pure parts, with no thread, file or socket. Everything that
//! goes through `Link::start` (config checks, TLS files, a real mosquitto, the fault
//! proxy, test certificates) is in `tests/it/link.rs`, on the shared test support.

use super::*;

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
fn error_words_start_lower_case_but_acronyms_keep_theirs() {
    use super::tls::lower_first;
    assert_eq!(lower_first("Connection refused"), "connection refused");
    assert_eq!(lower_first("TLS: I/O error"), "TLS: I/O error");
    assert_eq!(lower_first(""), "");
}
