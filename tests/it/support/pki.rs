//! Test certificates made with the openssl CLI: a CA per [`Ca`] that issues broker
//! and client certificates into its directory, with P-256 PKCS#8 keys by default,
//! RSA and SEC1 keys on request, and certificates that have already expired.
//!
//! The one certificate maker of the integration tests and the compare benchmark.
//! Everything is valid for two days from now unless it is issued expired, so a
//! test never depends on the calendar.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::find_program;

/// A certificate and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The form of a freshly made private key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    /// P-256 in PKCS#8 (`BEGIN PRIVATE KEY`), what openssl makes by default.
    Pkcs8,
    /// RSA 2048 in PKCS#1 (`BEGIN RSA PRIVATE KEY`).
    Rsa,
    /// P-256 in SEC1 (`BEGIN EC PRIVATE KEY`).
    Sec1,
}

/// A self-signed CA whose files live in one directory, with what it issues.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    /// Creates `{name}.key` and `{name}.crt` (subject `CN=outpost test {name}`) in
    /// `dir`; certificates it issues are named `{name}-{cn}.*` there.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let ca = Ca {
            dir: dir.to_owned(),
            name: name.to_owned(),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        let subject = format!("/CN=outpost test {name}");
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
                &subject,
                "-keyout",
                path_str(&ca.key),
                "-out",
                path_str(&ca.cert),
            ],
        );
        ca
    }

    /// The CA certificate: what a client or broker trusts.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// Issues a certificate with common name `cn` (and `san`, e.g.
    /// `IP:127.0.0.1,DNS:localhost`) for a fresh P-256 PKCS#8 key.
    pub fn issue(&self, cn: &str, san: Option<&str>) -> Issued {
        self.issue_with_key(cn, san, KeyForm::Pkcs8)
    }

    /// As [`Ca::issue`], for a fresh key of the given form.
    pub fn issue_with_key(&self, cn: &str, san: Option<&str>, form: KeyForm) -> Issued {
        let issued = self.issued(cn);
        new_key(&self.dir, &issued.key, form);
        let csr = self.request(cn, &issued.key);
        let ext = self.extensions(cn, san);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                path_str(&csr),
                "-CA",
                path_str(&self.cert),
                "-CAkey",
                path_str(&self.key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                path_str(&ext),
                "-out",
                path_str(&issued.cert),
            ],
        );
        issued
    }

    /// Issues a certificate (P-256 PKCS#8 key) that was valid only on 1 January
    /// 2020, made with `openssl ca`, since `openssl x509 -req` cannot backdate.
    pub fn issue_expired(&self, cn: &str, san: Option<&str>) -> Issued {
        let issued = self.issued(cn);
        new_key(&self.dir, &issued.key, KeyForm::Pkcs8);
        let csr = self.request(cn, &issued.key);
        let base = self.dir.join(format!("{}-ca", self.name));
        let index = base.with_extension("index");
        if !index.exists() {
            fs::write(&index, "").unwrap_or_else(|e| panic!("write {}: {e}", index.display()));
        }
        let mut ext = String::from("basicConstraints=CA:FALSE\n");
        if let Some(san) = san {
            ext += &format!("subjectAltName={san}\n");
        }
        let cnf = base.with_extension("cnf");
        let text = format!(
            "[ca]\ndefault_ca=test\n[test]\ndatabase={}\nnew_certs_dir={}\nserial={}\n\
             default_md=sha256\npolicy=any\nunique_subject=no\ncopy_extensions=none\n\
             x509_extensions=ext\n[any]\ncommonName=supplied\n[ext]\n{ext}",
            index.display(),
            self.dir.display(),
            base.with_extension("serial").display(),
        );
        fs::write(&cnf, text).unwrap_or_else(|e| panic!("write {}: {e}", cnf.display()));
        openssl(
            &self.dir,
            &[
                "ca",
                "-batch",
                "-create_serial",
                "-config",
                path_str(&cnf),
                "-cert",
                path_str(&self.cert),
                "-keyfile",
                path_str(&self.key),
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
                "-in",
                path_str(&csr),
                "-out",
                path_str(&issued.cert),
            ],
        );
        issued
    }

    fn issued(&self, cn: &str) -> Issued {
        let base = format!("{}-{cn}", self.name);
        Issued {
            cert: self.dir.join(format!("{base}.crt")),
            key: self.dir.join(format!("{base}.key")),
        }
    }

    /// A certificate signing request for `key` with subject `CN={cn}`.
    fn request(&self, cn: &str, key: &Path) -> PathBuf {
        let csr = self.dir.join(format!("{}-{cn}.csr", self.name));
        let subject = format!("/CN={cn}");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                path_str(key),
                "-subj",
                &subject,
                "-out",
                path_str(&csr),
            ],
        );
        csr
    }

    /// The extensions file for an end-entity certificate.
    fn extensions(&self, cn: &str, san: Option<&str>) -> PathBuf {
        let ext = self.dir.join(format!("{}-{cn}.ext", self.name));
        let mut text = String::from("basicConstraints=CA:FALSE\n");
        if let Some(san) = san {
            text += &format!("subjectAltName={san}\n");
        }
        fs::write(&ext, text).unwrap_or_else(|e| panic!("write {}: {e}", ext.display()));
        ext
    }
}

/// mosquitto listener options that serve `server` over TLS and, with
/// `require_client_cert`, accept only clients with a certificate from `ca`.
///
/// They apply to the `listener` line before them (the broker's main listener when
/// given to [`super::broker::Broker::start_with_config`] alone).
pub fn mosquitto_tls(ca: &Ca, server: &Issued, require_client_cert: bool) -> String {
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n{}",
        ca.cert().display(),
        server.cert.display(),
        server.key.display(),
        if require_client_cert {
            "require_certificate true\n"
        } else {
            ""
        }
    )
}

fn new_key(dir: &Path, key: &Path, form: KeyForm) {
    let key = path_str(key);
    let p256 = "ec_paramgen_curve:P-256";
    let args: &[&str] = match form {
        KeyForm::Pkcs8 => &["genpkey", "-algorithm", "ec", "-pkeyopt", p256, "-out", key],
        KeyForm::Rsa => &["genrsa", "-traditional", "-out", key, "2048"],
        KeyForm::Sec1 => &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            key,
        ],
    };
    openssl(dir, args);
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Runs the openssl CLI in `dir` and returns its stdout; panics with its stderr if
/// it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let bin = find_program("openssl").unwrap_or_else(|| {
        panic!(
            "openssl not found in PATH; the TLS tests make their certificates with it: \
             install it with `apt-get install openssl` (Debian/Ubuntu)"
        )
    });
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
