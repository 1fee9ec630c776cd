//! outpost: a store-and-forward agent for remote Linux nodes.
//!
//! # Layout
//!
//! - [`frame`]: envelope types, encode/decode, CRC, payload packing; pure, no I/O.
//! - [`store`]: the SQLite store (outbox, inbox, journal, results, jobs, quarantine);
//!   the only module that knows SQL.
//! - [`compress`]: payload compression before sealing (deflate when it pays), bounded
//!   inflating; pure.
//! - [`delivery`]: per-stream sequencing, acks and resend decisions; pure, takes `now`.
//! - [`node`]: store and delivery wired into one synchronous protocol core.
//! - [`exec`]: running processes: timeouts, process groups, output caps.
//! - [`facts`]: facts about a node, when a change is worth sending, the change;
//!   [`facts::collect`] reads them from the system and `facts_dir`.
//! - [`files`]: file ids, landing paths, chunked reads and writes, verification.
//! - [`link`]: the MQTT connection to the broker (kept up, or idle between polls
//!   for an on-demand link); the only module that knows rumqttc and tokio.
//! - [`seal`]: sealed payloads (X25519, HKDF, ChaCha20-Poly1305) and the replay
//!   window; pure.
//! - [`session`]: per-peer store epochs, opening and sealing, replay windows; pure.
//! - [`trust`]: key files, the trust file and per-sender authorisation.
//! - [`control`]: the local unix-socket protocol used by the CLI.
//! - [`agent`]: the event loop that wires node, link, exec and the control socket;
//!   `agent/demand.rs` decides when an on-demand link connects and hangs up.
//! - [`demo`]: `outpost demo`, the whole system on one machine.
//! - [`config`]: the validated configuration (file, then flags).
//! - [`cli`]: argh flag structs; no I/O.
//! - [`log`]: the one logger (ours and our dependencies' lines), to stderr.

pub mod log;

pub mod agent;
pub mod budget;
pub mod cli;
pub mod compress;
pub mod config;
pub mod control;
pub mod delivery;
pub mod demo;
pub mod exec;
pub mod facts;
pub mod files;
pub mod frame;
pub mod link;
pub mod node;
pub mod seal;
pub mod session;
pub mod store;
pub mod trust;
