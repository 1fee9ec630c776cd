//! `outpost batch`: many `send` requests from a file, queued a few thousand per
//! commit instead of one commit each.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use super::send::print_json;
use super::{client_args, Common};
use crate::control::reply::Queued;
use crate::control::{Request, MAX_BATCH, MAX_REQUEST};

/// Requests per `batch` request: the agent's limit.
const PER_BATCH: usize = MAX_BATCH;

/// Bytes of requests per `batch` request, well inside the control socket's 1 MiB
/// line.
const BATCH_BYTES: usize = MAX_REQUEST / 2;

client_args! {
    /// queue many commands at once, each line of FILE (or stdin) one send request
    /// as the control socket takes it, e.g.
    /// {"to":"ship1","command":{"exec":{"argv":["uptime"]}}}; prints one job id
    /// per line (blank lines and lines starting with # are skipped)
    #[argh(subcommand, name = "batch")]
    pub struct BatchArgs {
        /// the requests, one JSON object per line (default: stdin)
        #[argh(positional)]
        pub file: Option<PathBuf>,
    }
}

/// One request read: its line number and the request.
struct Line {
    no: usize,
    req: Request,
    size: usize,
}

pub(super) fn run(args: BatchArgs) -> Result<ExitCode, String> {
    let common = args.common(Common::default());
    let input: Box<dyn Read> = match &args.file {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        _ => Box::new(std::io::stdin()),
    };
    // Everything is read and checked first: a mistake on line 900 queues nothing.
    let lines = read(input)?;
    if lines.is_empty() {
        return Err("no requests: give one JSON send request per line".into());
    }
    let mut client = common.client()?;
    let mut refused = 0usize;
    let mut rest = &lines[..];
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(chunk_len(rest));
        rest = after;
        let reply = client.batch(chunk.iter().map(|l| l.req.clone()).collect())?;
        if reply.replies.len() != chunk.len() {
            return Err(format!(
                "the agent answered {} of {} requests",
                reply.replies.len(),
                chunk.len()
            ));
        }
        for (line, item) in chunk.iter().zip(reply.replies) {
            match (item.sent, item.error) {
                (Some(sent), _) => {
                    for note in &sent.notes {
                        eprintln!("outpost: line {}: {note}", line.no);
                    }
                    if common.json {
                        print_json(&Outcome {
                            line: line.no,
                            job: Some(sent.job),
                            targets: &sent.targets,
                            error: None,
                        })?;
                    } else {
                        println!("{}", sent.job);
                    }
                }
                (None, error) => {
                    refused += 1;
                    let error = error.unwrap_or_else(|| "refused".into());
                    if common.json {
                        print_json(&Outcome {
                            line: line.no,
                            job: None,
                            targets: &[],
                            error: Some(&error),
                        })?;
                    } else {
                        eprintln!("outpost: line {}: {error}", line.no);
                    }
                }
            }
        }
    }
    if refused > 0 {
        eprintln!("outpost: {refused} of {} requests refused", lines.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Outcome<'a> {
    line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<i64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    targets: &'a [Queued],
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Parses every line into a `send` request (`"op"` may be left out).
fn read(input: impl Read) -> Result<Vec<Line>, String> {
    let mut out = Vec::new();
    for (i, line) in BufReader::new(input).lines().enumerate() {
        let no = i + 1;
        let line = line.map_err(|e| format!("line {no}: {e}"))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let req = parse(text).map_err(|e| format!("line {no}: {e}"))?;
        out.push(Line {
            no,
            req,
            size: text.len(),
        });
    }
    Ok(out)
}

fn parse(text: &str) -> Result<Request, String> {
    let mut v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    match obj.get("op") {
        None => {
            obj.insert("op".into(), Value::from("send"));
        }
        Some(op) if op == "send" => {}
        Some(op) => return Err(format!("only send requests can be batched, not {op}")),
    }
    serde_json::from_value(v).map_err(|e| format!("not a send request: {e}"))
}

/// How many of `lines` go in the next batch request.
fn chunk_len(lines: &[Line]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for l in lines.iter().take(PER_BATCH) {
        bytes += l.size + 1;
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_send_requests_and_mistakes_name_their_line() {
        let text = "# a comment\n\n{\"to\":\"ship1\",\"command\":\"ping\"}\n\
                    {\"op\":\"send\",\"to\":\"ship2\",\"lane\":\"x\",\"command\":{\"exec\":{\"argv\":[\"uptime\"]}}}\n";
        let lines = read(text.as_bytes()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].no, 3);
        assert!(
            matches!(&lines[1].req, Request::Send { to, lane: Some(l), .. } if to == "ship2" && l == "x")
        );

        let bad = "{\"to\":\"ship1\",\"command\":\"ping\"}\n{\"op\":\"status\"}\n";
        let e = read(bad.as_bytes()).err().unwrap();
        assert!(e.starts_with("line 2: only send requests"), "{e}");
        let e = read("{\"to\":\"a\"}\n".as_bytes()).err().unwrap();
        assert!(e.starts_with("line 1: not a send request"), "{e}");
        let e = read("[1]\n".as_bytes()).err().unwrap();
        assert!(e.contains("not a JSON object"), "{e}");
    }

    #[test]
    fn chunks_stay_under_the_request_limit() {
        let line = |size| Line {
            no: 1,
            req: Request::Status,
            size,
        };
        let big: Vec<Line> = (0..4).map(|_| line(BATCH_BYTES / 2)).collect();
        assert_eq!(chunk_len(&big), 1);
        let small: Vec<Line> = (0..PER_BATCH + 5).map(|_| line(10)).collect();
        assert_eq!(chunk_len(&small), PER_BATCH);
        // One line larger than a batch still goes (the agent judges it).
        assert_eq!(chunk_len(&[line(BATCH_BYTES * 2)]), 1);
    }
}
