//! Replies on the control socket, as types: the agent builds them, the CLI and
//! local programs read them, and serde writes exactly the JSON the README's
//! "Control socket protocol" documents (pinned by the snapshot tests below).
//!
//! Every reply line is `{"ok":true, ...fields of the reply}` or
//! `{"ok":false,"error":"..."}`; [`Reply::to_line`] writes one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::frame::Method;

/// One reply, for any request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Send(SendReply),
    Jobs(JobsReply),
    Job(JobReply),
    Wait(WaitReply),
    Status(Box<StatusReply>),
    FilesPut(FilesPutReply),
    FilesGet(FilesGetReply),
    FilesList(FilesListReply),
    Transfer(TransferReply),
    FilesRm(FilesRmReply),
    Error(String),
}

#[derive(Serialize)]
struct Ok<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct Failed<'a> {
    ok: bool,
    error: &'a str,
}

impl Reply {
    pub fn error(msg: impl std::fmt::Display) -> Reply {
        Reply::Error(msg.to_string())
    }

    /// The reply as one line of JSON, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        fn ok<T: Serialize>(body: &T) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(&Ok { ok: true, body })
        }
        let bytes = match self {
            Reply::Send(r) => ok(r),
            Reply::Jobs(r) => ok(r),
            Reply::Job(r) => ok(r),
            Reply::Wait(r) => ok(r),
            Reply::Status(r) => ok(r.as_ref()),
            Reply::FilesPut(r) => ok(r),
            Reply::FilesGet(r) => ok(r),
            Reply::FilesList(r) => ok(r),
            Reply::Transfer(r) => ok(r),
            Reply::FilesRm(r) => ok(r),
            Reply::Error(e) => serde_json::to_vec(&Failed {
                ok: false,
                error: e,
            }),
        };
        // Serializing these types cannot fail (string keys, no maps with other keys).
        let mut line = bytes.unwrap_or_else(|e| {
            format!(r#"{{"ok":false,"error":"cannot write the reply: {e}"}}"#).into_bytes()
        });
        line.push(b'\n');
        line
    }
}

/// `send`: the job and where each target's command was queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    pub job: i64,
    pub targets: Vec<Queued>,
    /// Targets not online, and the like: for the operator, not errors.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub node: String,
    pub lane: String,
    pub seq: u64,
}

/// `jobs`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsReply {
    pub jobs: Vec<JobView>,
}

/// `job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReply {
    pub job: JobView,
}

/// `wait`: the job, or `timeout` when nothing changed in time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WaitReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timeout: bool,
}

/// The README's JOB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: i64,
    pub created_ms: u64,
    pub method: Method,
    pub summary: String,
    pub targets: Vec<TargetView>,
}

impl JobView {
    /// Targets with a result so far.
    pub fn results(&self) -> usize {
        self.targets.iter().filter(|t| t.result.is_some()).count()
    }

    /// Every target has a result.
    pub fn done(&self) -> bool {
        self.targets.iter().all(|t| t.result.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetView {
    pub node: String,
    pub lane: String,
    pub seq: u64,
    /// `queued`, `delivered`, or the result's status.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultView>,
    /// Numbers results in arrival order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_id: Option<i64>,
}

/// A command's result as the control socket shows it (output as text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultView {
    pub status: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
    pub started_ms: u64,
    pub duration_ms: u64,
    pub reason: String,
    /// Ping only: from queueing to the result's arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// http-get only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_headers: Option<Vec<(String, String)>>,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub node: String,
    pub version: String,
    pub broker: String,
    pub link: LinkStatus,
    pub store: StoreStatus,
    pub outbox: Vec<OutboxStatus>,
    pub inbox: Vec<InboxStatus>,
    pub running: Vec<RunningStatus>,
    pub peers: Vec<PeerStatus>,
    pub security: SecurityStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub since_ms: u64,
    pub for_s: u64,
    pub last_error: Option<String>,
    /// `on`, or `off` after an oversized message (see `poisoned`).
    pub presence: String,
    pub poisoned: Option<Poisoned>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poisoned {
    pub at_ms: u64,
    pub size: usize,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub used: u64,
    pub quota: u64,
    pub quarantined: u64,
    pub events: u64,
    /// The store's epoch, 16 hex digits.
    pub epoch: String,
    /// When and why the store last found it had lost committed state.
    pub lost: Option<StoreLost>,
    /// Since when and why the store refuses writes.
    pub failing: Option<StoreFailing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLost {
    pub at_ms: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFailing {
    pub since_ms: u64,
    pub for_s: u64,
    pub error: String,
    pub unrecorded_results: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStatus {
    pub peer: String,
    pub lane: String,
    pub frames: u64,
    pub oldest_unacked_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxStatus {
    pub peer: String,
    pub lane: String,
    pub frames: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningStatus {
    pub peer: String,
    pub lane: String,
    pub seq: u64,
    pub method: Method,
    pub for_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub online: bool,
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityStatus {
    pub public_key: String,
    pub trusted: Vec<TrustedStatus>,
    /// Payloads dropped, by kind.
    pub rejected: BTreeMap<String, u64>,
    /// The latest of each kind, in words.
    pub last_rejected: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedStatus {
    pub name: String,
    pub allow: Vec<Method>,
}

/// `files-put`: the file's id and one transfer per target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesPutReply {
    pub id: String,
    pub transfers: Vec<TransferStarted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStarted {
    pub node: String,
    pub transfer: i64,
}

/// `files-get`: the transfer that will receive the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesGetReply {
    pub id: String,
    pub transfer: i64,
}

/// `files-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesListReply {
    pub transfers: Vec<TransferView>,
    pub files: Vec<HeldView>,
}

/// `transfer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReply {
    pub transfer: TransferView,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This node sends.
    Out,
    /// This node receives.
    In,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    pub transfer: i64,
    pub direction: Direction,
    pub peer: String,
    pub id: String,
    pub size: u64,
    pub bytes: u64,
    pub percent: u64,
    /// Bytes per second over the transfer's life (until it finished).
    pub rate_bps: u64,
    pub state: String,
    pub reason: String,
    pub finished: bool,
    pub path: PathBuf,
    pub expires_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldView {
    pub source: String,
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub received_ms: u64,
    pub expires_ms: Option<u64>,
}

/// `files-rm`: `SOURCE/ID` of each file removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesRmReply {
    pub removed: Vec<String>,
}
