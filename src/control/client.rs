//! A blocking client for the control socket, typed by request: each method sends
//! one request and returns its reply type (mini-redis's `clients/client.rs`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::reply::{
    BatchReply, CancelReply, FilesGetReply, FilesListReply, FilesPutReply, FilesRmReply, JobReply,
    JobView, JobsReply, NodeReply, NodeView, NodesReply, PurgeReply, QueueReply, ReleaseReply,
    SendReply, StatusReply, TransferReply, TransferView, UsageReply, WaitReply,
};
use super::{socket_path, CommandSpec, Request};

/// Which of the nodes a request names it is for: fact selectors (`KEY=VALUE`,
/// `KEY!=VALUE`) and online only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Select {
    pub where_: Vec<String>,
    pub online: bool,
}

/// How long a plain request may take to be answered.
const CALL: Duration = Duration::from_secs(60);

/// One connection to an agent's control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Client {
    pub fn connect(state_dir: &Path) -> Result<Client, String> {
        let path = socket_path(state_dir);
        let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {} (or its directory): the agent's socket is for the user the agent runs as; run this as that user (or root)",
                path.display()
            ),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no agent running for state directory {} (cannot connect to {}: {e}); start one with `outpost agent --state-dir {}`",
                state_dir.display(),
                path.display(),
                state_dir.display()
            ),
            _ => format!("cannot connect to the agent at {}: {e}", path.display()),
        })?;
        Ok(Client {
            reader: BufReader::new(stream),
            path,
        })
    }

    pub fn send(
        &mut self,
        to: &str,
        lane: Option<&str>,
        ttl_s: Option<u32>,
        command: CommandSpec,
    ) -> Result<SendReply, String> {
        self.send_selected(to, &Select::default(), lane, ttl_s, command)
    }

    /// As [`Client::send`], to the nodes `to` names that `select` also matches.
    pub fn send_selected(
        &mut self,
        to: &str,
        select: &Select,
        lane: Option<&str>,
        ttl_s: Option<u32>,
        command: CommandSpec,
    ) -> Result<SendReply, String> {
        let req = Request::Send {
            to: to.into(),
            lane: lane.map(Into::into),
            ttl_s,
            key: None,
            output: None,
            command,
            where_: select.where_.clone(),
            online: select.online,
        };
        self.submit(&req)
    }

    /// A `send` with every option: `req` must be a [`Request::Send`].
    pub fn submit(&mut self, req: &Request) -> Result<SendReply, String> {
        self.typed(req, CALL)
    }

    /// Several `send` requests queued in one commit; one reply each, in order.
    pub fn batch(&mut self, requests: Vec<Request>) -> Result<BatchReply, String> {
        self.typed(&Request::Batch { requests }, 10 * CALL)
    }

    /// Cancels job `id` (for `node` only, if given).
    pub fn cancel(&mut self, id: i64, node: Option<&str>) -> Result<CancelReply, String> {
        let req = Request::Cancel {
            id,
            node: node.map(Into::into),
        };
        self.typed(&req, CALL)
    }

    /// What waits between this agent and `node`.
    pub fn queue(&mut self, node: &str, limit: Option<u32>) -> Result<QueueReply, String> {
        let req = Request::Queue {
            node: node.into(),
            limit,
        };
        self.typed(&req, CALL)
    }

    /// Bytes the link spent by category, budgets, what they hold back.
    pub fn usage(&mut self) -> Result<UsageReply, String> {
        self.typed(&Request::Usage, CALL)
    }

    /// Lifts budgets and link windows for `for_s` (default: to the period's end).
    pub fn release(&mut self, for_s: Option<u64>) -> Result<ReleaseReply, String> {
        self.typed(&Request::Release { for_s }, CALL)
    }

    /// Cancels every unfinished job for `node` (on `lane`, if given).
    pub fn purge(&mut self, node: &str, lane: Option<&str>) -> Result<PurgeReply, String> {
        let req = Request::Purge {
            node: node.into(),
            lane: lane.map(Into::into),
        };
        self.typed(&req, CALL)
    }

    /// Trusted nodes `pattern` names (all without one) that `select` matches.
    pub fn nodes(
        &mut self,
        pattern: Option<&str>,
        select: &Select,
    ) -> Result<Vec<NodeView>, String> {
        let req = Request::Nodes {
            pattern: pattern.map(Into::into),
            where_: select.where_.clone(),
            online: select.online,
        };
        let r: NodesReply = self.typed(&req, CALL)?;
        Ok(r.nodes)
    }

    pub fn node(&mut self, name: &str) -> Result<NodeView, String> {
        let r: NodeReply = self.typed(&Request::Node { name: name.into() }, CALL)?;
        Ok(r.node)
    }

    pub fn jobs(&mut self, limit: Option<u32>) -> Result<Vec<JobView>, String> {
        let r: JobsReply = self.typed(&Request::Jobs { limit }, CALL)?;
        Ok(r.jobs)
    }

    pub fn job(&mut self, id: i64) -> Result<JobView, String> {
        let r: JobReply = self.typed(&Request::Job { id }, CALL)?;
        Ok(r.job)
    }

    /// The job once it has more than `seen` results or is done; `None` if that
    /// did not happen within `timeout`.
    pub fn wait(
        &mut self,
        id: i64,
        seen: usize,
        timeout: Duration,
    ) -> Result<Option<JobView>, String> {
        let req = Request::Wait {
            id,
            seen,
            timeout_ms: timeout.as_millis() as u64,
        };
        let r: WaitReply = self.typed(&req, timeout + CALL)?;
        Ok(r.job)
    }

    pub fn status(&mut self) -> Result<StatusReply, String> {
        self.typed(&Request::Status, CALL)
    }

    /// The error log, changed after `after`, of `node` if given, newest last.
    pub fn errors(
        &mut self,
        node: Option<&str>,
        after: u64,
        limit: Option<u32>,
    ) -> Result<Vec<super::reply::ErrorView>, String> {
        let req = Request::Errors {
            node: node.map(Into::into),
            after: Some(after),
            limit,
        };
        let r: super::reply::ErrorsReply = self.typed(&req, CALL)?;
        Ok(r.errors)
    }

    pub fn files_put(
        &mut self,
        to: &str,
        path: &Path,
        id: Option<String>,
        ttl_s: Option<u64>,
    ) -> Result<FilesPutReply, String> {
        let req = Request::FilesPut {
            to: to.into(),
            path: path.to_string_lossy().into_owned(),
            id,
            ttl_s,
        };
        // Hashing a large file takes a while.
        self.typed(&req, 10 * CALL)
    }

    pub fn files_get(&mut self, from: &str, path: &str) -> Result<FilesGetReply, String> {
        let req = Request::FilesGet {
            from: from.into(),
            path: path.into(),
        };
        self.typed(&req, CALL)
    }

    pub fn files_list(&mut self) -> Result<FilesListReply, String> {
        self.typed(&Request::FilesList, CALL)
    }

    pub fn transfer(&mut self, id: i64) -> Result<TransferView, String> {
        let r: TransferReply = self.typed(&Request::Transfer { id }, CALL)?;
        Ok(r.transfer)
    }

    pub fn files_rm(&mut self, id: &str) -> Result<Vec<String>, String> {
        let r: FilesRmReply = self.typed(&Request::FilesRm { id: id.into() }, CALL)?;
        Ok(r.removed)
    }

    fn typed<R: DeserializeOwned>(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<R, String> {
        let v = self.call(req, timeout)?;
        serde_json::from_value(v).map_err(|e| format!("unexpected reply from the agent: {e}"))
    }

    /// Sends a request and returns the reply as JSON, as any local program sees it;
    /// `{"ok": false}` replies become `Err`.
    pub fn call(&mut self, req: &Request, timeout: Duration) -> Result<Value, String> {
        let stream = self.reader.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "the agent did not answer within {} s ({})",
                    timeout.as_secs(),
                    self.path.display()
                )
            } else {
                format!("{}: {e}", self.path.display())
            }
        })?;
        if n == 0 {
            return Err("the agent closed the connection (did it stop?)".into());
        }
        let v: Value =
            serde_json::from_str(&reply).map_err(|e| format!("bad reply from agent: {e}"))?;
        if v["ok"] == Value::Bool(true) {
            Ok(v)
        } else {
            Err(v["error"].as_str().unwrap_or("unknown error").to_string())
        }
    }
}
