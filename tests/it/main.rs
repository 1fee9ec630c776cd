//! The single integration-test binary: every module here drives real code — the
//! library's protocol core in `sim`, real processes (mosquitto, the outpost binary)
//! through the helpers in `support` everywhere else.

// Helpers shared across this crate's modules are `pub` to each other only.
#![allow(unreachable_pub)]

mod agent;
mod budget;
mod cancel;
mod cli;
mod compress;
mod errors;
mod facts;
mod faults;
mod files;
mod link;
mod ondemand;
mod output;
mod retention;
mod security;
mod sim;
mod support;
mod support_selftest;
mod tls;
