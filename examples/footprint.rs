//! Footprint probe: links every feature the finished agent will carry (SQLite store,
//! frames, exec, MQTT over rustls/ring, ureq GET, TOML and JSON) so that
//! `cross/build-all.sh` can measure a realistic binary size per target before
//! `src/main.rs` wires them, and `cross/qemu-check.sh` can prove each one runs.
//!
//! Every feature sits behind a runtime branch so link-time optimisation cannot drop
//! it. Delete this file once the real binary carries all of them.
//!
//! Usage: `footprint [DIR] [--broker HOST:PORT] [--tls-ca FILE] [--get URL]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;

use outpost::exec::{self, Outcome, Spec};
use outpost::frame::{self, Body, Envelope, Name};
use outpost::store::{Store, StoreConfig};

#[derive(serde::Deserialize)]
struct Conf {
    name: String,
    durability: outpost::store::Durability,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("footprint: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dir = match args.first().filter(|a| !a.starts_with("--")) {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("footprint-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;

    let conf: Conf = toml::from_str("name = \"probe\"\ndurability = \"normal\"\n")?;
    let me = Name::new(&conf.name)?;
    let cfg = StoreConfig {
        durability: conf.durability,
        ..StoreConfig::default()
    };
    let store = Store::open(&dir.join("store.db"), &me, &cfg)?;
    store.integrity_check()?;
    println!("sqlite ok: {:?}", store.counts()?);

    let env = Envelope {
        from: me.clone(),
        to: me.clone(),
        lane: frame::default_lane(),
        seq: 0,
        created_ms: 1,
        ttl_s: None,
        body: Body::Ack { upto: 0x0102_0304_0506_0708 },
    };
    let bytes = frame::encode(&env)?;
    if frame::decode(&bytes)? != env {
        return Err("frame round trip differs".into());
    }
    println!("frame ok: {} bytes", bytes.len());

    let out = smol::block_on(exec::run(Spec {
        argv: vec!["echo".into(), "exec".into(), "ok".into()],
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout: Duration::from_secs(10),
        output_cap: 4096,
    }));
    if out.outcome != Outcome::Exited(0) {
        return Err(format!("exec: {:?}", out.outcome).into());
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "json: {}",
        serde_json::to_string(&serde_json::json!({"exit": 0, "ms": out.duration_ms}))?
    );

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let _ = rustls::crypto::CryptoProvider::install_default((*provider).clone());
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = flag("--tls-ca") {
        let pem = std::fs::read(&ca)?;
        let ders = rustls::pki_types::CertificateDer::pem_slice_iter(&pem);
        for der in ders {
            roots.add(der?)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    println!("tls ok: {} cipher suites", tls.crypto_provider().cipher_suites.len());

    if let Some(broker) = flag("--broker") {
        mqtt_round_trip(&broker, flag("--tls-ca").map(|_| tls))?;
    }
    if let Some(url) = flag("--get") {
        let body = ureq::get(&url).call()?.body_mut().read_to_string()?;
        println!("http ok: {} bytes", body.len());
    }
    drop(store);
    if args.first().is_none_or(|a| a.starts_with("--")) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("footprint ok");
    Ok(())
}

/// Subscribes to a topic, publishes to it and waits for the message to come back.
fn mqtt_round_trip(
    broker: &str,
    tls: Option<rustls::ClientConfig>,
) -> Result<(), Box<dyn std::error::Error>> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

    let (host, port) = broker.rsplit_once(':').ok_or("--broker wants HOST:PORT")?;
    let id = format!("footprint-{}", std::process::id());
    let mut opts = MqttOptions::new(&id, host, port.parse()?);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(tls) = tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    let (client, mut conn) = Client::new(opts, 10);
    let topic = format!("outpost/{id}/in");
    client.subscribe(&topic, QoS::AtLeastOnce)?;
    client.publish(&topic, QoS::AtLeastOnce, false, b"ping".to_vec())?;
    for event in conn.iter().take(50) {
        if let Event::Incoming(Packet::Publish(p)) = event? {
            println!("mqtt ok: {:?}", String::from_utf8_lossy(&p.payload));
            client.disconnect()?;
            return Ok(());
        }
    }
    Err("no message back from the broker".into())
}
