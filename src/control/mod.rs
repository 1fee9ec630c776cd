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

pub use client::{Client, Select};
pub use reply::Reply;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// Most requests one `batch` may hold.
pub const MAX_BATCH: usize = 10_000;

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
        /// Supersedes: an earlier command with this key to the same node that has
        /// not started is cancelled by this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        command: CommandSpec,
        /// Fact selectors, `KEY=VALUE` or `KEY!=VALUE`: only the nodes `to` names
        /// whose facts match every one.
        #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
        where_: Vec<String>,
        /// Only the nodes whose presence says online.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        online: bool,
        /// The agent writes each target's result into this directory as it arrives.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<output::OutputSpec>,
    },
    /// Cancel job `id` everywhere it is (for `node` only, if given).
    Cancel {
        id: i64,
        #[serde(default)]
        node: Option<String>,
    },
    /// What waits to go to `node` and what waits here from it.
    Queue {
        node: String,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Cancel every unfinished job for `node` (on `lane` only, if given).
    Purge {
        node: String,
        #[serde(default)]
        lane: Option<String>,
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
    /// The registry: every trusted node, or those `pattern` (a glob) names, whose
    /// facts match every `where` selector, online ones only with `online`.
    Nodes {
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default, rename = "where")]
        where_: Vec<String>,
        #[serde(default)]
        online: bool,
    },
    /// One trusted node, everything the registry knows of it.
    Node {
        name: String,
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
    /// Bytes the link spent per category (this hour, today, this month), the
    /// budgets and what they hold back.
    Usage,
    /// Several `send` requests in one commit (one fsync with durability full):
    /// each is queued or refused on its own, as if sent alone, and none is
    /// answered before all are on disk. Nothing but `send` may be batched.
    Batch {
        requests: Vec<Request>,
    },
    /// Lift budgets and link windows for `for_s` seconds (default: until the
    /// end of the current period of the tightest budget, or an hour).
    Release {
        #[serde(default)]
        for_s: Option<u64>,
    },
}

impl Request {
    /// The request's `op`, as the protocol spells it.
    pub fn op(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v["op"].as_str().map(String::from))
            .unwrap_or_default()
    }
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
    fn nodes_node_and_selected_sends_parse_as_documented() {
        assert_eq!(
            parse_request(br#"{"op":"nodes","pattern":"ship*","where":["arch=mips","os!=debian"],"online":true}"#)
                .unwrap(),
            Request::Nodes {
                pattern: Some("ship*".into()),
                where_: vec!["arch=mips".into(), "os!=debian".into()],
                online: true,
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"nodes"}"#).unwrap(),
            Request::Nodes {
                pattern: None,
                where_: vec![],
                online: false
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"node","name":"ship1"}"#).unwrap(),
            Request::Node {
                name: "ship1".into()
            }
        );
        let r = parse_request(
            br#"{"op":"send","to":"ship*","where":["os=openwrt"],"online":true,"command":"ping"}"#,
        )
        .unwrap();
        assert!(
            matches!(r, Request::Send { ref where_, online: true, .. } if where_ == &["os=openwrt"]),
            "{r:?}"
        );
        // Written without the selectors when there are none, as before.
        let plain = serde_json::to_string(&Request::Send {
            to: "a".into(),
            lane: None,
            ttl_s: None,
            key: None,
            output: None,
            command: CommandSpec::Ping,
            where_: vec![],
            online: false,
        })
        .unwrap();
        assert_eq!(
            plain,
            r#"{"op":"send","to":"a","lane":null,"ttl_s":null,"command":"ping"}"#
        );
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
