//! The control socket's server side: reads request lines, hands each to the
//! agent's loop as a [`Call`], writes the reply line. Runs as smol tasks; knows
//! nothing of what a request does.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use smol::channel::Sender;
use smol::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use smol::net::unix::{UnixListener, UnixStream};

use super::reply::WaitReply;
use super::{parse_request, socket_path, Reply, Request, MAX_REQUEST};

/// One request and where its reply goes. The agent answers every call once (a
/// `wait` maybe much later); a reply that does not come in time becomes a timeout
/// (for `wait`) or an error.
#[derive(Debug)]
pub struct Call {
    pub req: Request,
    pub reply: Sender<Reply>,
}

/// Longest a request other than `wait` may take to be answered.
const ANSWER_IN: Duration = Duration::from_secs(60);
/// Longest a `wait` is held open, whatever it asks.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Binds `control.sock` in `dir` (mode 0600). The caller holds the state
/// directory's lock, so a socket file found there is stale and is replaced.
pub fn bind(dir: &Path) -> Result<UnixListener, String> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves every client of `listener`, each in its own task, until the loop's
/// channel closes. `wrap` makes the loop's message out of a call.
pub async fn serve<M: Send + 'static>(listener: UnixListener, tx: Sender<M>, wrap: fn(Call) -> M) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                smol::spawn(serve_client(stream, tx.clone(), wrap)).detach();
            }
            Err(e) => {
                crate::warn!("control socket accept: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client<M: Send + 'static>(stream: UnixStream, tx: Sender<M>, wrap: fn(Call) -> M) {
    let mut reader = BufReader::new(stream.clone());
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let oversized = line.len() > MAX_REQUEST;
        let reply = match parse_request(&line) {
            Ok(req) => {
                let (timeout, on_timeout) = match &req {
                    Request::Wait { timeout_ms, .. } => (
                        Duration::from_millis(*timeout_ms).min(MAX_WAIT),
                        Reply::Wait(WaitReply {
                            job: None,
                            timeout: true,
                        }),
                    ),
                    _ => (
                        ANSWER_IN,
                        Reply::error("the agent did not answer in time (is it overloaded?)"),
                    ),
                };
                let (rtx, rrx) = smol::channel::bounded(1);
                if tx.send(wrap(Call { req, reply: rtx })).await.is_err() {
                    return;
                }
                smol::future::or(
                    async {
                        rrx.recv()
                            .await
                            .unwrap_or_else(|_| Reply::error("the agent is stopping"))
                    },
                    async {
                        smol::Timer::after(timeout).await;
                        on_timeout
                    },
                )
                .await
            }
            Err(e) => Reply::Error(e),
        };
        if writer.write_all(&reply.to_line()).await.is_err() {
            return;
        }
        if oversized {
            // The rest of an oversized line is not worth reading: hang up.
            return;
        }
    }
}
