//! rustls client configuration from PEM files, and rustls errors in plain words.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use super::{LinkError, TlsFiles, TlsVersions};

static ONLY_12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
static ONLY_13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Builds the client config with the ring provider; file problems are reported now,
/// not at the first connect.
pub(super) fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, LinkError> {
    let Some(ca_file) = &files.ca_file else {
        return Err(LinkError::Tls(
            "mqtts:// needs a ca_file (this build carries no system root certificates)".into(),
        ));
    };
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| file_error(ca_file, describe(&e)))?;
    }

    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(match files.versions {
                TlsVersions::Any => rustls::DEFAULT_VERSIONS,
                TlsVersions::Only12 => ONLY_12,
                TlsVersions::Only13 => ONLY_13,
            })
            .map_err(|e| LinkError::Tls(describe(&e)))?
            .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let certs = read_certs(cert_file)?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
                pem::Error::NoItemsFound => file_error(
                    key_file,
                    "no private key found (expected a pkcs#8, rsa or sec1 pem key)".into(),
                ),
                e => file_error(key_file, pem_reason(&e)),
            })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                LinkError::Tls(format!(
                    "client certificate {} and key {} cannot be used: {}",
                    cert_file.display(),
                    key_file.display(),
                    describe_own(&e)
                ))
            })?
        }
        _ => {
            return Err(LinkError::Tls(
                "client_cert and client_key must be given together".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(std::iter::Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| file_error(path, pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(file_error(path, "no pem certificate found".into()));
    }
    Ok(certs)
}

fn file_error(path: &Path, reason: String) -> LinkError {
    LinkError::TlsFile {
        path: path.to_path_buf(),
        reason,
    }
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(e) => lower_first(&e.to_string()),
        pem::Error::NoItemsFound => "no pem item found".into(),
        e => format!("bad pem: {}", lower_first(&format!("{e:?}"))),
    }
}

/// Says what went wrong in a TLS handshake in words an operator can act on.
pub(super) fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(e) => describe_certificate(e),
        rustls::Error::AlertReceived(alert) => describe_alert(*alert),
        rustls::Error::NoCertificatesPresented => "broker presented no certificate".into(),
        rustls::Error::PeerIncompatible(e) => {
            format!(
                "broker's tls is incompatible: {}",
                lower_first(&format!("{e:?}"))
            )
        }
        e => format!("tls error: {}", lower_first(&e.to_string())),
    }
}

/// Why our own certificate and key were refused, before any connection: the
/// words of [`describe`] are about the broker's and would blame the wrong one.
fn describe_own(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if format!("{other:?}").contains("UnsupportedCertVersion") =>
        {
            "it is an X.509 version 1 certificate, which rustls does not accept; issue it again as version 3 (with extensions, e.g. openssl x509 -req ... -extfile)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
            "the certificate is malformed".into()
        }
        rustls::Error::InvalidCertificate(e) => {
            format!("the certificate is not usable: {}", lower_first(&format!("{e:?}")))
        }
        rustls::Error::InconsistentKeys(_) => "the key does not belong to the certificate".into(),
        e => lower_first(&e.to_string()),
    }
}

fn describe_certificate(e: &CertificateError) -> String {
    match e {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "broker certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "broker certificate is not valid yet (check the clock)".into()
        }
        CertificateError::NotValidForName => {
            "broker certificate is not valid for the broker's host name".into()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "broker certificate is not valid for host name {} (it is for {})",
            expected.to_str(),
            if presented.is_empty() {
                "no names".to_string()
            } else {
                presented
                    .iter()
                    .map(|name| bare_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        CertificateError::UnknownIssuer => {
            "broker certificate is signed by an unknown ca (not in ca_file)".into()
        }
        CertificateError::BadSignature => "broker certificate has a bad signature".into(),
        CertificateError::Revoked => "broker certificate is revoked".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "broker certificate is not for server authentication".into()
        }
        CertificateError::BadEncoding => "broker certificate is malformed".into(),
        e => format!(
            "broker certificate is invalid: {}",
            lower_first(&format!("{e:?}"))
        ),
    }
}

/// An alert from the broker during the handshake; with TLS 1.3 a rejected client
/// certificate only shows up as such an alert, after our side thought it was done.
fn describe_alert(alert: AlertDescription) -> String {
    let rejected = |why: &str| format!("broker rejected the client certificate ({why})");
    match alert {
        AlertDescription::UnknownCA => rejected("unknown ca"),
        AlertDescription::BadCertificate => rejected("bad certificate"),
        AlertDescription::CertificateUnknown => rejected("certificate unknown"),
        AlertDescription::UnsupportedCertificate => rejected("unsupported certificate"),
        AlertDescription::CertificateExpired => rejected("expired"),
        AlertDescription::CertificateRevoked => rejected("revoked"),
        AlertDescription::AccessDenied => rejected("access denied"),
        AlertDescription::CertificateRequired => {
            "broker requires a client certificate (set client_cert and client_key)".into()
        }
        AlertDescription::HandshakeFailure => {
            "tls handshake failure reported by the broker (check certificates and tls versions)"
                .into()
        }
        AlertDescription::ProtocolVersion => "broker does not accept tls 1.2 or 1.3".into(),
        alert => format!(
            "tls alert from the broker: {}",
            lower_first(&format!("{alert:?}"))
        ),
    }
}

/// rustls reports presented names as `DnsName("host")` or `IpAddress(..)`.
fn bare_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .unwrap_or(name)
}

/// `Connection refused` → `connection refused`; an acronym (`TLS: I/O`) stays.
pub(super) fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    let acronym = s.chars().nth(1).is_some_and(char::is_uppercase);
    match chars.next() {
        Some(c) if !acronym => c.to_lowercase().chain(chars).collect(),
        Some(_) => s.to_string(),
        None => String::new(),
    }
}
