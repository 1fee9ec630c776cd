//! The local control socket: how the CLI and local programs talk to the agent.
//!
//! A unix socket `control.sock` in the state directory, mode 0600. One JSON object
//! per line each way; every request gets exactly one reply line with `"ok"`. The
//! protocol is documented in the README ("Control socket protocol"). Malformed or
//! oversized requests get an error reply and the server keeps serving.
//!
//! Requests ([`Request`]) and replies ([`reply`]) are types both ways; this module
//! and the CLI are the only code that knows JSON. [`server`] reads requests and
//! hands each to the agent as a [`server::Call`]; [`Client`] is the typed client.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod client;
pub mod output;
pub mod reply;
pub mod server;

pub use client::Client;
pub use reply::Reply;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1024 * 1024;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// A request, as the `op` field says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Queue a command for every node `to` names (comma-separated names and globs).
    Send {
        to: String,
        #[serde(default)]
        lane: Option<String>,
        #[serde(default)]
        ttl_s: Option<u32>,
        command: CommandSpec,
        /// The agent writes each target's result into this directory as it arrives.
        #[serde(default)]
        output: Option<output::OutputSpec>,
    },
    /// Jobs, newest first.
    Jobs {
        #[serde(default)]
        limit: Option<u32>,
    },
    /// One job.
    Job {
        id: i64,
    },
    /// Reply when job `id` has more than `seen` results (or is done), or after
    /// `timeout_ms` with `"timeout": true`.
    Wait {
        id: i64,
        seen: usize,
        timeout_ms: u64,
    },
    Status,
    /// Offer a file to every node `to` names.
    FilesPut {
        to: String,
        path: String,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        ttl_s: Option<u64>,
    },
    /// Ask `from` to send one of its shared files.
    FilesGet {
        from: String,
        path: String,
    },
    /// Transfers and files held.
    FilesList,
    /// One transfer.
    Transfer {
        id: i64,
    },
    /// Delete received files with this id (`SOURCE/ID` for one source).
    FilesRm {
        id: String,
    },
    /// The error log: errors nodes reported, changed after `after` (a `seq`),
    /// of one node if given, newest last.
    Errors {
        #[serde(default)]
        node: Option<String>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum CommandSpec {
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        stdin: String,
        #[serde(default)]
        timeout_ms: Option<u32>,
        #[serde(default)]
        rerun: bool,
    },
    Ping,
    HttpGet {
        url: String,
        #[serde(default)]
        timeout_ms: Option<u32>,
        #[serde(default)]
        max_body: Option<u32>,
    },
}

/// Parses one request line; the error is the message to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "request of {} bytes exceeds {MAX_REQUEST}",
            line.len()
        ));
    }
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_an_error_not_a_panic() {
        let r =
            parse_request(br#"{"op":"send","to":"ship1","command":{"exec":{"argv":["uptime"]}}}"#)
                .unwrap();
        assert!(matches!(r, Request::Send { .. }));
        assert_eq!(
            parse_request(br#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        for bad in [
            &b"{"[..],
            b"null",
            b"{\"op\":\"nope\"}",
            b"\xff\xfe",
            b"{\"op\":\"job\",\"id\":\"x\"}",
        ] {
            assert!(parse_request(bad).is_err());
        }
        assert!(parse_request(&vec![b' '; MAX_REQUEST + 1])
            .unwrap_err()
            .contains("exceeds"));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_request_parser() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let sample = br#"{"op":"send","to":"a,b*","lane":"ordered","ttl_s":5,"command":{"exec":{"argv":["x"],"env":[["A","1"]]}}}"#;
        for i in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = sample.to_vec();
            let n = 1 + (seed % 4) as usize;
            for k in 0..n {
                let at = ((seed >> (8 * k)) as usize) % b.len();
                b[at] = (seed >> (3 * k)) as u8;
            }
            b.truncate(1 + (i as usize % b.len()));
            let _ = parse_request(&b);
        }
    }
}
