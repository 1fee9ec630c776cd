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
    Cancel(CancelReply),
    Queue(QueueReply),
    Purge(PurgeReply),
    Nodes(NodesReply),
    Node(NodeReply),
    Errors(ErrorsReply),
    Usage(UsageReply),
    Release(ReleaseReply),
    Batch(BatchReply),
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
            Reply::Cancel(r) => ok(r),
            Reply::Queue(r) => ok(r),
            Reply::Purge(r) => ok(r),
            Reply::Nodes(r) => ok(r),
            Reply::Node(r) => ok(r),
            Reply::Errors(r) => ok(r),
            Reply::Usage(r) => ok(r),
            Reply::Release(r) => ok(r),
            Reply::Batch(r) => ok(r),
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

/// `usage`: bytes on the wire by category, budgets, what they hold back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReply {
    /// Read from the kernel (`TCP_INFO`), not estimated from packets.
    pub measured: bool,
    /// Connections made since the agent started.
    pub connects: u64,
    pub categories: Vec<UsageCategory>,
    pub budgets: Vec<crate::budget::BudgetView>,
    pub held: Vec<crate::budget::HeldView>,
    /// Budgets and windows are lifted until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_until_ms: Option<u64>,
}

/// Bytes on the wire of one category, up (sent) and down (received).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCategory {
    pub category: crate::budget::Category,
    pub hour_up: u64,
    pub hour_down: u64,
    pub day_up: u64,
    pub day_down: u64,
    pub month_up: u64,
    pub month_down: u64,
}

/// `release`: budgets and windows are lifted until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReply {
    pub until_ms: u64,
}

/// `errors`: what nodes reported, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorsReply {
    pub errors: Vec<ErrorView>,
}

/// One entry of the error log: a (node, kind, text) with how often and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    /// Goes up with every change; `after` in the request is one of these.
    pub seq: u64,
    pub node: String,
    pub kind: String,
    pub text: String,
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// `batch`: one entry per request, in order: what `send` would have replied, or
/// why that request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReply {
    pub replies: Vec<BatchItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<SendReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `send`: the job and where each target's command was queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    pub job: i64,
    pub targets: Vec<Queued>,
    /// Targets not online, and the like: for the operator, not errors.
    pub notes: Vec<String>,
    /// Jobs whose command this one superseded (`key`), per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<Superseded>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superseded {
    pub node: String,
    pub job: i64,
}

/// `cancel`: what became of each target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    pub job: i64,
    pub targets: Vec<CancelView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelView {
    pub node: String,
    /// `withdrawn` (it was still here: it never runs), `cancel-sent` (the node
    /// answers where it caught it), `cancelling` (sent before), `finished`
    /// (nothing changed).
    pub outcome: String,
    /// The target's state now.
    pub state: String,
}

/// `queue`: what waits between this agent and one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReply {
    pub node: String,
    /// To the node: unfinished jobs, then other frames not yet acknowledged.
    pub to: Vec<QueueItem>,
    /// From the node: frames received and not yet taken.
    pub from: Vec<QueueItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<i64>,
    pub lane: String,
    pub seq: u64,
    pub state: String,
    pub what: String,
    pub age_ms: u64,
}

/// `purge`: the unfinished jobs for a node, cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReply {
    pub node: String,
    /// Withdrawn here or with a cancel sent.
    pub cancelled: usize,
    pub jobs: Vec<i64>,
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
    pub traffic: TrafficStatus,
}

/// Bytes on the wire today and this month (UTC), budgets, what they hold back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficStatus {
    pub today_up: u64,
    pub today_down: u64,
    pub month_up: u64,
    pub month_down: u64,
    pub budgets: Vec<crate::budget::BudgetView>,
    pub held: Vec<crate::budget::HeldView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_until_ms: Option<u64>,
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
    /// `always` or `on-demand`.
    pub mode: String,
    /// An on-demand link that hung up: when it polls next, at the latest.
    pub next_poll_ms: Option<u64>,
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
    /// What retention keeps and what it last pruned.
    pub retention: RetentionStatus,
}

/// `status.store.retention`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionStatus {
    /// Finished history older than this goes.
    pub keep_s: u64,
    /// Of each kind, at most this many finished rows stay.
    pub keep_rows: u64,
    /// When the last pass ended, and what it pruned.
    pub last_pass_ms: Option<u64>,
    pub last: PrunedCounts,
    /// Everything pruned since the agent started.
    pub since_start: PrunedCounts,
    /// Pages of `store.db`: in use, and free (reused by the next writes; the
    /// file does not shrink).
    pub pages_used: u64,
    pub pages_free: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedCounts {
    pub jobs: u64,
    pub results: u64,
    pub journal: u64,
    pub events: u64,
    pub quarantine: u64,
    pub transfers: u64,
    /// Entries of the error log nodes reported.
    pub errors: u64,
}

impl From<&crate::store::Pruned> for PrunedCounts {
    fn from(p: &crate::store::Pruned) -> Self {
        PrunedCounts {
            jobs: p.jobs,
            results: p.results,
            journal: p.journal,
            events: p.events,
            quarantine: p.quarantine,
            transfers: p.transfers,
            errors: p.errors,
        }
    }
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

/// `nodes`: trusted nodes by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesReply {
    pub nodes: Vec<NodeView>,
}

/// `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReply {
    pub node: NodeView,
}

/// Whether a node is up, as its presence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    #[serde(rename = "online")]
    Online,
    #[serde(rename = "offline")]
    Offline,
    /// No presence, payload or facts from it, ever.
    #[serde(rename = "never seen")]
    NeverSeen,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Offline => "offline",
            NodeState::NeverSeen => "never seen",
        }
    }
}

/// The README's NODE: one trusted node as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    /// Since when its presence says what `state` says.
    pub since_ms: Option<u64>,
    /// Its last authenticated payload.
    pub last_seen_ms: Option<u64>,
    /// When its facts last changed here.
    pub facts_ms: Option<u64>,
    /// What waits here for it, per lane.
    pub outbox: Vec<LaneQueue>,
    /// Commands this node sent it that it reported running.
    pub running: u64,
    /// The latest event about it (a lost or discarded frame).
    pub last_error: Option<NodeError>,
    /// How it polls, when its presence said it is on an on-demand link.
    pub poll: Option<PollView>,
    pub facts: BTreeMap<String, String>,
}

/// An on-demand node's polls, as its presence said (a hint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollView {
    pub every_s: u64,
    /// When it is next expected (its clock).
    pub next_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneQueue {
    pub lane: String,
    pub frames: u64,
    pub oldest_unacked_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeError {
    pub at_ms: u64,
    pub text: String,
}

/// Each reply's JSON, pinned: these are the README's "Control socket protocol"
/// examples, byte for byte (field order included), so the two cannot drift.
#[cfg(test)]
mod tests {
    use super::*;

    fn line(r: Reply) -> String {
        String::from_utf8(r.to_line()).unwrap()
    }

    fn exec_job() -> JobView {
        JobView {
            id: 7,
            created_ms: 1763800000000,
            method: Method::Exec,
            summary: "uptime".into(),
            targets: vec![TargetView {
                node: "ship1".into(),
                lane: "ordered".into(),
                seq: 12,
                state: "ok".into(),
                result: Some(ResultView {
                    status: "ok".into(),
                    exit_code: Some(0),
                    stdout: "...".into(),
                    stderr: String::new(),
                    truncated: false,
                    started_ms: 1763800000200,
                    duration_ms: 3,
                    reason: String::new(),
                    rtt_ms: None,
                    http_status: None,
                    http_headers: None,
                }),
                result_id: Some(31),
            }],
        }
    }

    const JOB: &str = r#"{"id":7,"created_ms":1763800000000,"method":"exec","summary":"uptime","targets":[{"node":"ship1","lane":"ordered","seq":12,"state":"ok","result":{"status":"ok","exit_code":0,"stdout":"...","stderr":"","truncated":false,"started_ms":1763800000200,"duration_ms":3,"reason":""},"result_id":31}]}"#;

    #[test]
    fn send_reply_is_the_documented_json() {
        let r = Reply::Send(SendReply {
            job: 7,
            targets: vec![Queued {
                node: "ship1".into(),
                lane: "ordered".into(),
                seq: 12,
            }],
            notes: vec![],
            superseded: vec![],
        });
        assert_eq!(
            line(r),
            "{\"ok\":true,\"job\":7,\"targets\":[{\"node\":\"ship1\",\"lane\":\"ordered\",\"seq\":12}],\"notes\":[]}\n"
        );
        let r = Reply::Send(SendReply {
            job: 8,
            targets: vec![Queued {
                node: "ship1".into(),
                lane: "ordered".into(),
                seq: 13,
            }],
            notes: vec![],
            superseded: vec![Superseded {
                node: "ship1".into(),
                job: 7,
            }],
        });
        assert_eq!(
            line(r),
            r#"{"ok":true,"job":8,"targets":[{"node":"ship1","lane":"ordered","seq":13}],"notes":[],"superseded":[{"node":"ship1","job":7}]}
"#
        );
    }

    #[test]
    fn cancel_queue_and_purge_replies_are_the_documented_json() {
        let r = Reply::Cancel(CancelReply {
            job: 7,
            targets: vec![
                CancelView {
                    node: "ship1".into(),
                    outcome: "withdrawn".into(),
                    state: "cancelled".into(),
                },
                CancelView {
                    node: "ship2".into(),
                    outcome: "cancel-sent".into(),
                    state: "cancelling".into(),
                },
            ],
        });
        assert_eq!(
            line(r),
            r#"{"ok":true,"job":7,"targets":[{"node":"ship1","outcome":"withdrawn","state":"cancelled"},{"node":"ship2","outcome":"cancel-sent","state":"cancelling"}]}
"#
        );
        let r = Reply::Queue(QueueReply {
            node: "ship1".into(),
            to: vec![
                QueueItem {
                    job: Some(7),
                    lane: "ordered".into(),
                    seq: 12,
                    state: "queued".into(),
                    what: "exec uptime".into(),
                    age_ms: 5000,
                },
                QueueItem {
                    job: None,
                    lane: "bulk".into(),
                    seq: 40,
                    state: "queued".into(),
                    what: "file chunk fw.bin#3".into(),
                    age_ms: 4000,
                },
            ],
            from: vec![],
        });
        assert_eq!(
            line(r),
            r#"{"ok":true,"node":"ship1","to":[{"job":7,"lane":"ordered","seq":12,"state":"queued","what":"exec uptime","age_ms":5000},{"lane":"bulk","seq":40,"state":"queued","what":"file chunk fw.bin#3","age_ms":4000}],"from":[]}
"#
        );
        let r = Reply::Purge(PurgeReply {
            node: "ship1".into(),
            cancelled: 2,
            jobs: vec![7, 9],
        });
        assert_eq!(
            line(r),
            r#"{"ok":true,"node":"ship1","cancelled":2,"jobs":[7,9]}
"#
        );
    }

    #[test]
    fn usage_and_release_replies_are_the_documented_json() {
        let r = Reply::Usage(UsageReply {
            measured: true,
            connects: 1,
            categories: vec![UsageCategory {
                category: crate::budget::Category::Commands,
                hour_down: 310,
                day_down: 310,
                month_down: 310,
                ..UsageCategory::default()
            }],
            budgets: vec![crate::budget::BudgetView {
                scope: "node".into(),
                budget: "5MiB/day".into(),
                limit: 5 << 20,
                spent: 2000,
                period_end_ms: 1_763_856_000_000,
            }],
            held: vec![crate::budget::HeldView {
                peer: "central".into(),
                lane: "bulk".into(),
                class: crate::budget::Class::Bulk,
                until_ms: 1_763_856_000_000,
                why: "bulk traffic may spend 80% of this node's budget 5MiB/day, and 4.0 MiB of it is spent".into(),
            }],
            released_until_ms: None,
        });
        let readme = include_str!("../../README.md");
        let usage = line(r);
        assert!(
            readme.contains(&format!("`{}`", usage.trim_end())),
            "{usage}"
        );
        let release = line(Reply::Release(ReleaseReply {
            until_ms: 1_763_807_200_000,
        }));
        assert!(
            readme.contains(&format!("`{}`", release.trim_end())),
            "{release}"
        );
    }

    #[test]
    fn job_jobs_and_wait_replies_are_the_documented_json() {
        assert_eq!(
            line(Reply::Job(JobReply { job: exec_job() })),
            format!("{{\"ok\":true,\"job\":{JOB}}}\n")
        );
        assert_eq!(
            line(Reply::Jobs(JobsReply {
                jobs: vec![exec_job()]
            })),
            format!("{{\"ok\":true,\"jobs\":[{JOB}]}}\n")
        );
        assert_eq!(
            line(Reply::Wait(WaitReply {
                job: Some(exec_job()),
                timeout: false
            })),
            format!("{{\"ok\":true,\"job\":{JOB}}}\n")
        );
        assert_eq!(
            line(Reply::Wait(WaitReply {
                job: None,
                timeout: true
            })),
            "{\"ok\":true,\"timeout\":true}\n"
        );
        // A target without a result has neither `result` nor `result_id`.
        let mut queued = exec_job();
        queued.targets[0].result = None;
        queued.targets[0].result_id = None;
        queued.targets[0].state = "queued".into();
        let v: serde_json::Value =
            serde_json::from_slice(&Reply::Job(JobReply { job: queued }).to_line()).unwrap();
        assert_eq!(v["job"]["targets"][0].as_object().unwrap().len(), 4, "{v}");
    }

    #[test]
    fn ping_and_http_results_carry_their_own_fields() {
        let mut job = exec_job();
        let r = job.targets[0].result.as_mut().unwrap();
        r.rtt_ms = Some(48);
        r.http_status = Some(200);
        r.http_headers = Some(vec![("content-type".into(), "text/plain".into())]);
        let v: serde_json::Value =
            serde_json::from_slice(&Reply::Job(JobReply { job }).to_line()).unwrap();
        let r = &v["job"]["targets"][0]["result"];
        assert_eq!(r["rtt_ms"], 48);
        assert_eq!(r["http_status"], 200);
        assert_eq!(
            r["http_headers"],
            serde_json::json!([["content-type", "text/plain"]])
        );
    }

    #[test]
    fn errors_and_files_replies_are_the_documented_json() {
        assert_eq!(
            line(Reply::error("no job 9")),
            "{\"ok\":false,\"error\":\"no job 9\"}\n"
        );
        assert_eq!(
            line(Reply::FilesPut(FilesPutReply {
                id: "fw.bin".into(),
                transfers: vec![TransferStarted {
                    node: "ship1".into(),
                    transfer: 3
                }],
            })),
            "{\"ok\":true,\"id\":\"fw.bin\",\"transfers\":[{\"node\":\"ship1\",\"transfer\":3}]}\n"
        );
        assert_eq!(
            line(Reply::FilesGet(FilesGetReply {
                id: "log.txt".into(),
                transfer: 4
            })),
            "{\"ok\":true,\"id\":\"log.txt\",\"transfer\":4}\n"
        );
        assert_eq!(
            line(Reply::Errors(ErrorsReply {
                errors: vec![ErrorView {
                    seq: 4,
                    node: "ship1".into(),
                    kind: "rejected".into(),
                    text: "replay".into(),
                    count: 3,
                    first_ms: 1763800000000,
                    last_ms: 1763800005000,
                }]
            })),
            "{\"ok\":true,\"errors\":[{\"seq\":4,\"node\":\"ship1\",\"kind\":\"rejected\",\"text\":\"replay\",\"count\":3,\"first_ms\":1763800000000,\"last_ms\":1763800005000}]}\n"
        );
        assert_eq!(
            line(Reply::FilesRm(FilesRmReply {
                removed: vec!["ship1/log.txt".into()]
            })),
            "{\"ok\":true,\"removed\":[\"ship1/log.txt\"]}\n"
        );
        let t = TransferView {
            transfer: 3,
            direction: Direction::Out,
            peer: "ship1".into(),
            id: "fw.bin".into(),
            size: 1000,
            bytes: 500,
            percent: 50,
            rate_bps: 250,
            state: "sending".into(),
            reason: String::new(),
            finished: false,
            path: "/srv/fw.bin".into(),
            expires_ms: None,
        };
        assert_eq!(
            line(Reply::Transfer(TransferReply { transfer: t.clone() })),
            "{\"ok\":true,\"transfer\":{\"transfer\":3,\"direction\":\"out\",\"peer\":\"ship1\",\"id\":\"fw.bin\",\"size\":1000,\"bytes\":500,\"percent\":50,\"rate_bps\":250,\"state\":\"sending\",\"reason\":\"\",\"finished\":false,\"path\":\"/srv/fw.bin\",\"expires_ms\":null}}\n"
        );
        let held = HeldView {
            source: "ship1".into(),
            id: "log.txt".into(),
            path: "/var/lib/outpost/files/ship1/log.txt".into(),
            size: 12,
            sha256: "ab".repeat(32),
            received_ms: 1763800000000,
            expires_ms: None,
        };
        let v: serde_json::Value = serde_json::from_slice(
            &Reply::FilesList(FilesListReply {
                transfers: vec![t],
                files: vec![held],
            })
            .to_line(),
        )
        .unwrap();
        let keys: Vec<&str> = v["files"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "expires_ms",
                "id",
                "path",
                "received_ms",
                "sha256",
                "size",
                "source"
            ]
        );
    }

    #[test]
    fn status_reply_has_the_documented_keys() {
        let s = StatusReply {
            node: "central".into(),
            version: "0.1.0".into(),
            broker: "mqtt://127.0.0.1:1883".into(),
            link: LinkStatus {
                connected: true,
                since_ms: 1,
                for_s: 2,
                last_error: None,
                presence: "on".into(),
                poisoned: None,
                mode: "always".into(),
                next_poll_ms: None,
            },
            store: StoreStatus {
                used: 10,
                quota: 20,
                quarantined: 0,
                events: 0,
                epoch: "00000000000000ab".into(),
                lost: None,
                failing: None,
                retention: RetentionStatus {
                    keep_s: 2_592_000,
                    keep_rows: 100_000,
                    last_pass_ms: Some(1_763_800_000_000),
                    last: PrunedCounts {
                        jobs: 2,
                        results: 2,
                        ..PrunedCounts::default()
                    },
                    since_start: PrunedCounts {
                        jobs: 5,
                        results: 5,
                        journal: 1,
                        ..PrunedCounts::default()
                    },
                    pages_used: 40,
                    pages_free: 8,
                },
            },
            outbox: vec![],
            inbox: vec![],
            running: vec![RunningStatus {
                peer: "central".into(),
                lane: "ordered".into(),
                seq: 4,
                method: Method::HttpGet,
                for_s: 3,
            }],
            peers: vec![],
            security: SecurityStatus {
                public_key: "00".repeat(32),
                trusted: vec![TrustedStatus {
                    name: "ship1".into(),
                    allow: vec![Method::Exec, Method::Files],
                }],
                rejected: BTreeMap::from([("replay".to_string(), 2)]),
                last_rejected: BTreeMap::new(),
            },
            traffic: TrafficStatus {
                today_up: 1200,
                today_down: 800,
                month_up: 5000,
                month_down: 3000,
                budgets: vec![crate::budget::BudgetView {
                    scope: "node".into(),
                    budget: "5MiB/day".into(),
                    limit: 5 << 20,
                    spent: 2000,
                    period_end_ms: 1_763_856_000_000,
                }],
                held: vec![],
                released_until_ms: None,
            },
        };
        let line = String::from_utf8(Reply::Status(Box::new(s)).to_line()).unwrap();
        assert!(line.starts_with("{\"ok\":true,\"node\":\"central\",\"version\":\"0.1.0\",\"broker\":\"mqtt://127.0.0.1:1883\",\"link\":{\"connected\":true,\"since_ms\":1,\"for_s\":2,\"last_error\":null,\"presence\":\"on\",\"poisoned\":null,\"mode\":\"always\",\"next_poll_ms\":null},\"store\":{\"used\":10,\"quota\":20,\"quarantined\":0,\"events\":0,\"epoch\":\"00000000000000ab\",\"lost\":null,\"failing\":null,\"retention\":{\"keep_s\":2592000,\"keep_rows\":100000,\"last_pass_ms\":1763800000000,\"last\":{\"jobs\":2,\"results\":2,\"journal\":0,\"events\":0,\"quarantine\":0,\"transfers\":0,\"errors\":0},\"since_start\":{\"jobs\":5,\"results\":5,\"journal\":1,\"events\":0,\"quarantine\":0,\"transfers\":0,\"errors\":0},\"pages_used\":40,\"pages_free\":8}},\"outbox\":[],\"inbox\":[],\"running\":[{\"peer\":\"central\",\"lane\":\"ordered\",\"seq\":4,\"method\":\"http-get\",\"for_s\":3}],\"peers\":[],\"security\":{"), "{line}");
        assert!(line.contains("\"trusted\":[{\"name\":\"ship1\",\"allow\":[\"exec\",\"files\"]}],\"rejected\":{\"replay\":2},\"last_rejected\":{}},"), "{line}");
        assert!(line.ends_with("\"traffic\":{\"today_up\":1200,\"today_down\":800,\"month_up\":5000,\"month_down\":3000,\"budgets\":[{\"scope\":\"node\",\"budget\":\"5MiB/day\",\"limit\":5242880,\"spent\":2000,\"period_end_ms\":1763856000000}],\"held\":[]}}\n"), "{line}");
    }

    const NODE: &str = r#"{"name":"ship1","state":"online","since_ms":1763800000000,"last_seen_ms":1763800300000,"facts_ms":1763800000500,"outbox":[{"lane":"ordered","frames":2,"oldest_unacked_s":30}],"running":1,"last_error":null,"poll":{"every_s":1800,"next_ms":1763802100000},"facts":{"arch":"mips","os":"openwrt","os.version":"23.05.3"}}"#;

    fn node() -> NodeView {
        NodeView {
            name: "ship1".into(),
            state: NodeState::Online,
            since_ms: Some(1763800000000),
            last_seen_ms: Some(1763800300000),
            facts_ms: Some(1763800000500),
            outbox: vec![LaneQueue {
                lane: "ordered".into(),
                frames: 2,
                oldest_unacked_s: Some(30),
            }],
            running: 1,
            last_error: None,
            poll: Some(PollView {
                every_s: 1800,
                next_ms: 1763802100000,
            }),
            facts: BTreeMap::from([
                ("arch".to_string(), "mips".to_string()),
                ("os".to_string(), "openwrt".to_string()),
                ("os.version".to_string(), "23.05.3".to_string()),
            ]),
        }
    }

    #[test]
    fn nodes_and_node_replies_are_the_documented_json() {
        assert_eq!(
            line(Reply::Nodes(NodesReply {
                nodes: vec![node()]
            })),
            format!("{{\"ok\":true,\"nodes\":[{NODE}]}}\n")
        );
        assert_eq!(
            line(Reply::Node(NodeReply { node: node() })),
            format!("{{\"ok\":true,\"node\":{NODE}}}\n")
        );
        let mut never = node();
        never.state = NodeState::NeverSeen;
        never.last_error = Some(NodeError {
            at_ms: 5,
            text: "frame control#3 from ship1 was lost: crc".into(),
        });
        let v: serde_json::Value =
            serde_json::from_slice(&Reply::Node(NodeReply { node: never }).to_line()).unwrap();
        assert_eq!(v["node"]["state"], "never seen");
        assert_eq!(v["node"]["last_error"]["at_ms"], 5);
    }

    #[test]
    fn replies_read_back_as_the_types_they_were_written_from() {
        let job = exec_job();
        let v: serde_json::Value =
            serde_json::from_slice(&Reply::Job(JobReply { job: job.clone() }).to_line()).unwrap();
        let back: JobReply = serde_json::from_value(v).unwrap();
        assert_eq!(back.job, job);
    }
}
