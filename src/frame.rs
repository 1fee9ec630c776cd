//! Frames: the envelope, its bodies, and the exact bytes that are stored and sent.
//!
//! A frame is `[format version u8][postcard(Envelope)][crc32 LE of the preceding bytes]`.
//! The same bytes live in SQLite and travel over MQTT, so this layout is a persisted
//! API: enum variants are only ever appended, and `tests/golden.rs` pins the bytes of
//! every variant (`docs/WIRE.md` is the byte-level spec).
//! Several frames travel in one payload as `[varint length][frame]...` (see [`pack`]);
//! on the wire that payload is rewritten without what the seal header and the
//! previous frame already say ([`compact`], [`expand`]).
//!
//! This module does no I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only frame format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Largest frame accepted anywhere; bounds every allocation a decoder makes.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Version byte plus CRC.
const OVERHEAD: usize = 1 + 4;

/// Why bytes are not a frame. Decoding never panics; it returns one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated ({0} bytes)")]
    Truncated(usize),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    Oversized(usize),
    #[error("frame crc mismatch")]
    BadCrc,
    #[error("unknown frame format version {0}")]
    UnknownVersion(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// A validated name: node names and lane names share one alphabet.
///
/// `[a-z0-9][a-z0-9._-]*`, at most `N` bytes. Held inline (heapless) because every
/// envelope carries two node names and a lane.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label<const N: usize>(heapless::String<N>);

/// A node's name, at most 63 bytes.
pub type Name = Label<63>;
/// A lane's name, at most 15 bytes. See [`LaneClass`] for how a name maps to behaviour.
pub type Lane = Label<15>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid name {0:?}: use 1-{1} characters of a-z 0-9 . _ - starting with a letter or digit"
)]
pub struct NameError(pub String, pub usize);

impl<const N: usize> Label<N> {
    pub fn new(s: &str) -> Result<Self, NameError> {
        let bad = || NameError(s.to_string(), N);
        let mut bytes = s.bytes();
        match bytes.next() {
            Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
            _ => return Err(bad()),
        }
        let ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !ok {
            return Err(bad());
        }
        heapless::String::try_from(s).map(Label).map_err(|_| bad())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl<const N: usize> FromStr for Label<N> {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Label::new(s)
    }
}

impl<const N: usize> fmt::Display for Label<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for Label<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> Serialize for Label<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de, const N: usize> Deserialize<'de> for Label<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Validate on the way in: a frame with a bad name is malformed, not a name
        // that leaks into topics and file paths.
        let s = heapless::String::<N>::deserialize(d)?;
        Label::new(&s).map_err(serde::de::Error::custom)
    }
}

/// How a lane behaves, decided by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LaneClass {
    /// `control`: cancels and the like; sent before anything else.
    Control,
    /// Any other name (default `ordered`): delivered and executed one after another.
    Ordered,
    /// `parallel` or `parallel.*`: delivered in order, executed concurrently.
    Parallel,
    /// `bulk` or `bulk.*`: file chunks; lowest priority, never delays the others.
    Bulk,
}

impl<const N: usize> Label<N> {
    pub fn class(&self) -> LaneClass {
        let s = self.as_str();
        let family = s.split('.').next().unwrap_or(s);
        match family {
            "control" => LaneClass::Control,
            "parallel" => LaneClass::Parallel,
            "bulk" => LaneClass::Bulk,
            _ => LaneClass::Ordered,
        }
    }
}

/// The lane commands use unless told otherwise.
pub fn default_lane() -> Lane {
    Lane::new("ordered").expect("valid lane")
}

/// One unit of the protocol. `seq` is the per-stream number the sender assigned at
/// enqueue time; unsequenced frames (acks) carry 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: Name,
    pub to: Name,
    pub lane: Lane,
    pub seq: u64,
    /// Sender's clock, unix milliseconds.
    pub created_ms: u64,
    /// Seconds after `created_ms` past which a command must not start.
    pub ttl_s: Option<u32>,
    pub body: Body,
}

impl Envelope {
    /// CRC-32 of the body: tells two commands apart that had the same number
    /// (see [`Body::Cancel`]). Not of the creation time, which a compact payload
    /// carries as an age and the receiver puts on its own clock.
    pub fn fingerprint(&self) -> u32 {
        fingerprint(&self.body)
    }

    /// Whether this frame's deadline has passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        match self.ttl_s {
            Some(ttl) => now_ms > self.created_ms.saturating_add(u64::from(ttl) * 1000),
            None => false,
        }
    }
}

/// See [`Envelope::fingerprint`]; never 0.
pub fn fingerprint(body: &Body) -> u32 {
    let bytes = postcard::to_allocvec(body).unwrap_or_default();
    crc32fast::hash(&bytes).max(1)
}

/// What a frame carries. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Command(Command),
    Result(CmdResult),
    /// Cumulative acknowledgement: every frame of the stream (sender of this ack's
    /// `to`, receiver `from`, `lane`) up to and including `upto` is stored.
    Ack {
        upto: u64,
    },
    /// Stands in for a frame the sender found corrupt in its own store: the stream
    /// keeps flowing and the receiver learns what was lost.
    Lost {
        reason: String,
    },
    /// "Your frame `seq` on this lane was discarded by me" (corrupt on my disk).
    Discarded {
        seq: u64,
        reason: String,
    },
    /// A file the sender wants to give the receiver; chunks follow once accepted.
    FileOffer(FileOffer),
    /// One piece of an offered file, `index` counting from 0.
    FileChunk {
        id: String,
        index: u32,
        data: Vec<u8>,
    },
    /// The receiver's answer to an offer, and later its verdict on the whole file.
    FileStatus {
        id: String,
        state: FileState,
        reason: String,
    },
    /// Asks the receiver to offer back a file from its share directories.
    FileRequest {
        path: String,
    },
    /// The command numbered `seq` on this lane has been running for a while
    /// (sent only for commands that do not finish at once, to save bytes).
    Started {
        seq: u64,
    },
    /// "Tell me where our streams stand": answered with a [`Body::Sync`] that
    /// echoes `nonce`, which proves the answer fresh (a payload delayed from a
    /// store that has since been replaced cannot echo it). The only frame a payload
    /// sealed without knowing the receiver's store epoch may carry; harmless to
    /// replay. Unsequenced.
    Hello {
        nonce: u64,
    },
    /// Where the sender's streams with the receiver stand, sent when either side's
    /// store is new to the other (first contact, or a store that was lost or went
    /// back in time). Until a node has applied its peer's `Sync` it neither takes
    /// nor acknowledges the peer's sequenced frames. Unsequenced.
    Sync(Sync),
    /// "Everything of this stream up to `upto` is stored here; send what follows
    /// again now" (frames were dropped here, e.g. for lack of disk space).
    /// Unsequenced.
    Nack {
        upto: u64,
    },
    /// Stands in for a command its sender withdrew before it was delivered (its ttl
    /// passed at the sender): consumed without effect.
    Withdrawn {
        reason: String,
    },
    /// "Do not run my command `seq` on `lane`": sent on the control lane, so it
    /// may arrive before the command (then the command is cancelled when it
    /// comes). `stop` also stops it if it is already running; without it (a
    /// superseded command) a command that started is left to finish.
    Cancel {
        lane: Lane,
        seq: u64,
        /// The command's [`Envelope::fingerprint`]: a number its sender gave
        /// again after its store went back in time names another command, which
        /// this cancel must not hit. 0: not known, not checked.
        check: u32,
        stop: bool,
        reason: String,
    },
    /// Facts about the sender (see [`Facts`]).
    Facts(Facts),
    /// Errors the sender met, deduplicated: each entry counts repeats of one kind
    /// and text since it was last reported.
    Errors(Vec<ErrorEntry>),
}

/// Facts about a node, as a change against the facts it sent before on the same
/// stream (which the receiver has, as the stream delivers every frame once and in
/// order), or all of them when `full`. Sent on the control lane to the peers the
/// node's trust file allows anything; see [`crate::facts`] for the keys and when
/// a change is worth a frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Everything the sender knows is in `set`: facts the receiver holds that are
    /// not in it are gone.
    pub full: bool,
    /// Facts new or changed, `key = value`.
    pub set: Vec<(String, String)>,
    /// Keys no longer reported.
    pub unset: Vec<String>,
}

/// One kind of error, as [`Body::Errors`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// What failed: `store`, `disk`, `rejected`, `facts`, `spawn`, ...
    pub kind: String,
    pub text: String,
    /// How many times since the last report (at least 1).
    pub count: u32,
    /// First and last time, the sender's unix milliseconds.
    pub first_ms: u64,
    pub last_ms: u64,
}

/// One side's view of its streams with a peer; see [`Body::Sync`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// The sender wants the receiver's own `Sync` in return.
    pub want: bool,
    /// The nonce of the [`Body::Hello`] this answers, 0 for none.
    pub echo: u64,
    /// Streams receiver -> sender: the sender's watermark per lane (every frame up
    /// to it is stored or consumed there).
    pub received: Vec<(Lane, u64)>,
    /// Streams sender -> receiver.
    pub sent: Vec<SentStream>,
}

/// The sending side of one stream, as a [`Sync`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentStream {
    pub lane: Lane,
    /// Highest frame the receiver (or an earlier store of it) acknowledged: frames up
    /// to here are gone from the sender.
    pub acked: u64,
    /// Highest frame numbered so far.
    pub last: u64,
    /// Frames up to here may have reached an earlier store of the receiver, which
    /// is gone: the receiver must not run such a command again.
    pub doubt: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    pub id: String,
    pub size: u64,
    pub sha256: Vec<u8>,
    pub chunk_size: u32,
    /// Unix milliseconds after which the file is swept on both sides.
    pub expires_ms: Option<u64>,
}

/// Where a file transfer stands, as its receiver reports it. Variants only appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileState {
    /// Already held with that hash: nothing to send.
    Have,
    /// Send the chunks.
    Want,
    /// Every chunk arrived and the whole file matched its hash.
    Done,
    Failed,
}

impl Body {
    /// Control bodies are never sequenced or stored in an outbox.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            Body::Ack { .. } | Body::Hello { .. } | Body::Sync(_) | Body::Nack { .. }
        )
    }
}

/// A request to run something. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Exec(Exec),
    /// Answered at once; the sender measures the round trip.
    Ping,
    HttpGet(HttpGet),
}

impl Command {
    /// Whether the sender asked for it to run again after a crash interrupted it.
    pub fn reruns(&self) -> bool {
        matches!(self, Command::Exec(e) if e.rerun)
    }

    /// The method it is, for authorisation and reports.
    pub fn method(&self) -> Method {
        match self {
            Command::Exec(_) => Method::Exec,
            Command::Ping => Method::Ping,
            Command::HttpGet(_) => Method::HttpGet,
        }
    }
}

/// What a peer may ask of a node: every [`Command`] and the services that are not
/// commands (`files`). The names are the trust file's `allow=` words, the CLI's
/// subcommands and the `method` of a job. Adding one: ARCHITECTURE.md, "How to
/// add a method".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    Exec,
    Ping,
    HttpGet,
    /// Pushing files to a node and fetching its shared files.
    Files,
    /// Receiving this node's facts and error reports (not a command: the node
    /// sends them unasked to the peers it trusts with it).
    Facts,
}

impl Method {
    /// Every method, in the order help texts list them.
    pub const ALL: [Method; 5] = [
        Method::Exec,
        Method::Ping,
        Method::HttpGet,
        Method::Files,
        Method::Facts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Exec => "exec",
            Method::Ping => "ping",
            Method::HttpGet => "http-get",
            Method::Files => "files",
            Method::Facts => "facts",
        }
    }

    /// `exec, ping, ...`: for error messages and help.
    pub fn list() -> String {
        Method::ALL.map(Method::as_str).join(", ")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Method, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown method {s:?} (known: {})", Method::list()))
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments; no shell unless the program is one.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    pub timeout_ms: u32,
    /// Run again after a crash interrupted it (default: report `interrupted`).
    pub rerun: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpGet {
    pub url: String,
    pub timeout_ms: u32,
    pub max_body: u32,
}

/// How a command ended. Variants are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Ok,
    Failed,
    Timeout,
    Expired,
    Rejected,
    Interrupted,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::Expired => "expired",
            Status::Rejected => "rejected",
            Status::Interrupted => "interrupted",
            Status::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to the command numbered `seq` on the same lane in the other direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmdResult {
    pub seq: u64,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// Why, for rejected, expired, interrupted and failures before start.
    pub reason: String,
    /// HTTP status and headers, for `http-get` (the body is in `stdout`).
    pub http: Option<HttpReply>,
}

impl CmdResult {
    /// A result for a command that never ran.
    pub fn without_run(seq: u64, status: Status, reason: impl Into<String>, now_ms: u64) -> Self {
        CmdResult {
            seq,
            status,
            exit_code: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
            started_ms: now_ms,
            duration_ms: 0,
            reason: reason.into(),
            http: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// Encodes an envelope as a frame.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![FORMAT_VERSION];
    out = postcard::to_extend(env, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    if out.len() > MAX_FRAME {
        return Err(FrameError::Oversized(out.len()));
    }
    Ok(out)
}

/// Checks size, CRC and version without decoding the envelope; returns the postcard part.
pub fn verify(bytes: &[u8]) -> Result<&[u8], FrameError> {
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::Oversized(bytes.len()));
    }
    if bytes.len() <= OVERHEAD {
        return Err(FrameError::Truncated(bytes.len()));
    }
    let (data, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(data) != crc {
        return Err(FrameError::BadCrc);
    }
    if data[0] != FORMAT_VERSION {
        return Err(FrameError::UnknownVersion(data[0]));
    }
    Ok(&data[1..])
}

/// Decodes a frame, checking its CRC first.
pub fn decode(bytes: &[u8]) -> Result<Envelope, FrameError> {
    let body = verify(bytes)?;
    let (env, rest) = postcard::take_from_bytes::<Envelope>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(env)
}

/// Packs frames into one payload: each prefixed by its length as a LEB128 varint.
pub fn pack<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        push_varint(&mut out, f.len() as u64);
        out.extend_from_slice(f);
    }
    out
}

/// Bytes [`pack`] adds in front of a frame of `len` bytes.
pub fn packed_len(len: usize) -> usize {
    let mut n = 1;
    let mut v = len >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n + len
}

/// Splits a payload made by [`pack`]. Stops at the first structural error, which it
/// yields; frames before it are still returned.
pub fn unpack(payload: &[u8]) -> Unpack<'_> {
    Unpack { rest: payload }
}

#[derive(Debug)]
pub struct Unpack<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Unpack<'a> {
    type Item = Result<&'a [u8], FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (len, used) = match read_varint(self.rest) {
            Some(v) => v,
            None => {
                let n = self.rest.len();
                self.rest = &[];
                return Some(Err(FrameError::Truncated(n)));
            }
        };
        let after = &self.rest[used..];
        if len > MAX_FRAME as u64 {
            self.rest = &[];
            return Some(Err(FrameError::Oversized(len as usize)));
        }
        let len = len as usize;
        if len > after.len() {
            self.rest = &[];
            return Some(Err(FrameError::Truncated(after.len())));
        }
        let (frame, rest) = after.split_at(len);
        self.rest = rest;
        Some(Ok(frame))
    }
}

/// First byte of a compact payload, the form packed frames take on the wire.
pub const COMPACT_VERSION: u8 = 1;

/// What a compact payload carries per frame: the envelope without what the sealed
/// payload already says (sender and receiver, in the seal header) or what the
/// previous frame said (the lane), with the sequence number as a difference from
/// the previous frame's, and no CRC (the AEAD tag covers the whole payload). The
/// first frame's creation time travels as its age when sent, and the receiver puts
/// it on its own clock; the others as differences from the frame before. The body
/// is the frame's own.
#[derive(Serialize)]
struct SlimRef<'a> {
    lane: LaneRef<'a>,
    seq_delta: i64,
    /// First frame: age in ms when sent. Others: difference from the previous frame.
    created: i64,
    ttl_s: Option<u32>,
    body: &'a Body,
}

#[derive(Deserialize)]
struct Slim {
    lane: LaneOwned,
    seq_delta: i64,
    created: i64,
    ttl_s: Option<u32>,
    body: Body,
}

/// A frame's lane: the previous frame's, the default one (`ordered`), or by name.
#[derive(Serialize)]
enum LaneRef<'a> {
    Same,
    Default,
    Named(&'a Lane),
}

#[derive(Deserialize)]
enum LaneOwned {
    Same,
    Default,
    Named(Lane),
}

/// Rewrites a payload made by [`pack`] of frames from `from` to `to` into the
/// compact wire form, `[COMPACT_VERSION][postcard(Slim)]...`, at `now_ms` on the
/// sender's clock. About 35 bytes smaller per frame; [`expand`] restores the
/// frames, exactly when both clocks agree.
pub fn compact(packed: &[u8], from: &Name, to: &Name, now_ms: u64) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![COMPACT_VERSION];
    let default = default_lane();
    let (mut lane, mut seq, mut created): (Option<Lane>, u64, u64) = (None, 0, 0);
    for (i, bytes) in unpack(packed).enumerate() {
        let env = decode(bytes?)?;
        if &env.from != from || &env.to != to {
            return Err(FrameError::Malformed(format!(
                "frame {} -> {} in a payload {from} -> {to}",
                env.from, env.to
            )));
        }
        let slim = SlimRef {
            lane: if lane.as_ref() == Some(&env.lane) {
                LaneRef::Same
            } else if env.lane == default {
                LaneRef::Default
            } else {
                LaneRef::Named(&env.lane)
            },
            seq_delta: env.seq.wrapping_sub(seq) as i64,
            created: if i == 0 {
                now_ms.wrapping_sub(env.created_ms) as i64
            } else {
                env.created_ms.wrapping_sub(created) as i64
            },
            ttl_s: env.ttl_s,
            body: &env.body,
        };
        out = postcard::to_extend(&slim, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
        (seq, created) = (env.seq, env.created_ms);
        lane = Some(env.lane);
    }
    Ok(out)
}

/// Restores the frames of a compact payload from `from` to `to`, received at
/// `now_ms` on the receiver's clock, as a payload in [`pack`] form. Creation times
/// come out on the receiver's clock (so TTLs do not depend on clock skew); with
/// equal clocks the bytes are the sender's exactly (postcard is deterministic).
/// Frames before a malformed one are kept; the error says what stopped it.
pub fn expand(
    payload: &[u8],
    from: &Name,
    to: &Name,
    now_ms: u64,
) -> (Vec<u8>, Option<FrameError>) {
    let mut out = Vec::new();
    let Some((&version, mut rest)) = payload.split_first() else {
        return (out, Some(FrameError::Truncated(0)));
    };
    if version != COMPACT_VERSION {
        return (out, Some(FrameError::UnknownVersion(version)));
    }
    let (mut lane, mut seq, mut created): (Option<Lane>, u64, u64) = (None, 0, 0);
    while !rest.is_empty() {
        let slim = match postcard::take_from_bytes::<Slim>(rest) {
            Ok((slim, tail)) => {
                rest = tail;
                slim
            }
            Err(e) => return (out, Some(FrameError::Malformed(e.to_string()))),
        };
        let this_lane = match (slim.lane, &lane) {
            (LaneOwned::Named(l), _) => l,
            (LaneOwned::Default, _) => default_lane(),
            (LaneOwned::Same, Some(l)) => l.clone(),
            (LaneOwned::Same, None) => {
                let e = FrameError::Malformed("first frame names no lane".into());
                return (out, Some(e));
            }
        };
        seq = seq.wrapping_add(slim.seq_delta as u64);
        created = if lane.is_none() {
            now_ms.wrapping_sub(slim.created as u64)
        } else {
            created.wrapping_add(slim.created as u64)
        };
        let env = Envelope {
            from: from.clone(),
            to: to.clone(),
            lane: this_lane.clone(),
            seq,
            created_ms: created,
            ttl_s: slim.ttl_s,
            body: slim.body,
        };
        match encode(&env) {
            Ok(bytes) => out.extend_from_slice(&pack([bytes.as_slice()])),
            Err(e) => return (out, Some(e)),
        }
        lane = Some(this_lane);
    }
    (out, None)
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The `Body` variant of an encoded frame, read without decoding it (to class
/// and count traffic; see `budget::classify`). `None` if it does not parse.
pub fn body_index(frame: &[u8]) -> Option<u32> {
    let mut at = 1; // FORMAT_VERSION
    let mut next = |skip_len: bool| -> Option<u64> {
        let (v, used) = read_varint(frame.get(at..)?)?;
        at += used;
        if skip_len {
            at += v as usize;
        }
        Some(v)
    };
    // from, to, lane; seq, created_ms.
    for _ in 0..3 {
        next(true)?;
    }
    next(false)?;
    next(false)?;
    // ttl_s: Option<u32>.
    if next(false)? == 1 {
        next(false)?;
    }
    next(false).and_then(|v| u32::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn body_index_is_read_without_decoding() {
        let mut env = Envelope {
            from: name("central"),
            to: name("ship1"),
            lane: default_lane(),
            seq: 300,
            created_ms: 1_763_800_000_000,
            ttl_s: Some(70_000),
            body: Body::Ack { upto: 5 },
        };
        assert_eq!(body_index(&encode(&env).unwrap()), Some(2));
        env.ttl_s = None;
        env.body = Body::Hello { nonce: 1 };
        assert_eq!(body_index(&encode(&env).unwrap()), Some(10));
        assert_eq!(body_index(&[1, 7, b'c']), None);
    }

    fn uptime() -> Envelope {
        Envelope {
            from: name("central"),
            to: name("ship1"),
            lane: default_lane(),
            seq: 1,
            created_ms: 1_763_800_000_000,
            ttl_s: None,
            body: Body::Command(Command::Exec(Exec {
                argv: vec!["uptime".into()],
                timeout_ms: 60_000,
                ..Exec::default()
            })),
        }
    }

    fn uptime_result() -> Envelope {
        Envelope {
            from: name("ship1"),
            to: name("central"),
            lane: default_lane(),
            seq: 1,
            created_ms: 1_763_800_000_250,
            ttl_s: None,
            body: Body::Result(CmdResult {
                seq: 1,
                status: Status::Ok,
                exit_code: Some(0),
                stdout: b" 10:02:01 up 3 days,  4:05,  0 users,  load average: 0.00, 0.01, 0.05\n"
                    .to_vec(),
                stderr: Vec::new(),
                truncated: false,
                started_ms: 1_763_800_000_200,
                duration_ms: 3,
                reason: String::new(),
                http: None,
            }),
        }
    }

    #[test]
    fn frames_roundtrip() {
        for env in [uptime(), uptime_result()] {
            assert_eq!(decode(&encode(&env).unwrap()).unwrap(), env);
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        for env in [uptime(), uptime_result()] {
            let bytes = encode(&env).unwrap();
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(decode(&b).is_err(), "flip of bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn decode_reports_typed_errors() {
        let bytes = encode(&uptime()).unwrap();
        assert_eq!(decode(&bytes[..3]), Err(FrameError::Truncated(3)));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(FrameError::BadCrc));
        assert_eq!(
            decode(&vec![0u8; MAX_FRAME + 1]),
            Err(FrameError::Oversized(MAX_FRAME + 1))
        );

        let mut v2 = bytes.clone();
        v2[0] = 2;
        let n = v2.len();
        let crc = crc32fast::hash(&v2[..n - 4]).to_le_bytes();
        v2[n - 4..].copy_from_slice(&crc);
        assert_eq!(decode(&v2), Err(FrameError::UnknownVersion(2)));

        // A valid CRC over bytes that are not an envelope.
        let mut junk = vec![FORMAT_VERSION, 0xff, 0xff, 0xff];
        let crc = crc32fast::hash(&junk).to_le_bytes();
        junk.extend_from_slice(&crc);
        assert!(matches!(decode(&junk), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn names_are_validated_on_decode() {
        let mut env = uptime();
        env.to = name("ship1");
        let mut bytes = encode(&env).unwrap();
        // "ship1" -> "Ship1": valid postcard, invalid name.
        let at = bytes.windows(5).position(|w| w == b"ship1").unwrap();
        bytes[at] = b'S';
        let n = bytes.len();
        let crc = crc32fast::hash(&bytes[..n - 4]).to_le_bytes();
        bytes[n - 4..].copy_from_slice(&crc);
        assert!(matches!(decode(&bytes), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn names_follow_the_alphabet() {
        for ok in ["a", "ship1", "wind-farm.7_b", &"x".repeat(63)] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "Ship",
            "a/b",
            "a b",
            "../x",
            &"x".repeat(64),
            "é",
        ] {
            assert!(Name::new(bad).is_err(), "{bad}");
        }
        assert!(Lane::new("sixteen-chars-xx").is_err());
    }

    #[test]
    fn lane_names_map_to_classes() {
        let class = |s: &str| Lane::new(s).unwrap().class();
        assert_eq!(class("ordered"), LaneClass::Ordered);
        assert_eq!(class("deploy"), LaneClass::Ordered);
        assert_eq!(class("parallel"), LaneClass::Parallel);
        assert_eq!(class("parallel.2"), LaneClass::Parallel);
        assert_eq!(class("bulk"), LaneClass::Bulk);
        assert_eq!(class("control"), LaneClass::Control);
    }

    #[test]
    fn payloads_pack_and_unpack() {
        let a = encode(&uptime()).unwrap();
        let b = encode(&uptime_result()).unwrap();
        let payload = pack([a.as_slice(), b.as_slice()]);
        assert_eq!(payload.len(), packed_len(a.len()) + packed_len(b.len()));
        let frames: Vec<_> = unpack(&payload).collect::<Result<_, _>>().unwrap();
        assert_eq!(frames, vec![a.as_slice(), b.as_slice()]);

        // A cut payload yields the whole frames before the cut, then an error.
        let cut: Vec<_> = unpack(&payload[..payload.len() - 3]).collect();
        assert_eq!(cut.len(), 2);
        assert!(cut[0].is_ok());
        assert!(matches!(cut[1], Err(FrameError::Truncated(_))));
        // A huge length prefix does not allocate.
        let huge = [0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            unpack(&huge).next(),
            Some(Err(FrameError::Oversized(_)))
        ));
        let endless = [0x80u8; 12];
        assert!(matches!(
            unpack(&endless).next(),
            Some(Err(FrameError::Truncated(_)))
        ));
    }

    /// xorshift64*: deterministic bytes without a dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let sample = encode(&uptime_result()).unwrap();
        for i in 0..20_000 {
            let len = (rng(&mut seed) % 300) as usize;
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng(&mut seed) as u8).collect()
            } else {
                // Mutations of a real frame, with the CRC fixed up so that the
                // postcard decoder itself is exercised.
                let mut b = sample.clone();
                for _ in 0..1 + rng(&mut seed) % 4 {
                    let at = (rng(&mut seed) as usize) % (b.len() - 4);
                    b[at] = rng(&mut seed) as u8;
                }
                b.truncate(b.len() - 4);
                b.truncate(1 + (rng(&mut seed) as usize) % b.len());
                b[0] = FORMAT_VERSION;
                let crc = crc32fast::hash(&b).to_le_bytes();
                b.extend_from_slice(&crc);
                b
            };
            let _ = decode(&bytes);
            for f in unpack(&bytes).flatten() {
                let _ = decode(f);
            }
            bytes.clear();
        }
    }

    #[test]
    fn compact_payloads_restore_the_exact_frames_and_are_smaller() {
        let mut ack = uptime_result();
        ack.seq = 0;
        ack.body = Body::Ack { upto: 7 };
        let mut other_lane = uptime_result();
        other_lane.lane = Lane::new("files").unwrap();
        other_lane.seq = 3;
        other_lane.ttl_s = Some(60);
        let mut older = uptime_result();
        older.seq = 2;
        older.created_ms -= 5_000;
        let frames: Vec<Vec<u8>> = [ack, uptime_result(), older, other_lane]
            .iter()
            .map(|e| encode(e).unwrap())
            .collect();
        let packed = pack(frames.iter().map(std::vec::Vec::as_slice));
        let now = 1_763_800_001_000;
        let wire = compact(&packed, &name("ship1"), &name("central"), now).unwrap();
        assert_eq!(
            expand(&wire, &name("ship1"), &name("central"), now),
            (packed.clone(), None)
        );
        // On a receiver whose clock is 5 s ahead, frames were created 5 s later.
        let (ahead, _) = expand(&wire, &name("ship1"), &name("central"), now + 5_000);
        let shifted: Vec<u64> = unpack(&ahead)
            .map(|f| decode(f.unwrap()).unwrap().created_ms)
            .collect();
        let original: Vec<u64> = frames
            .iter()
            .map(|f| decode(f).unwrap().created_ms)
            .collect();
        assert_eq!(
            shifted,
            original.iter().map(|c| c + 5_000).collect::<Vec<_>>()
        );
        assert!(
            wire.len() + 4 * 25 < packed.len(),
            "compact {} bytes, packed {}",
            wire.len(),
            packed.len()
        );
        // Frames of another sender or receiver are refused, not rewritten.
        assert!(compact(&packed, &name("ship2"), &name("central"), now).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_compact_decoder() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let packed = pack([
            encode(&uptime_result()).unwrap().as_slice(),
            encode(&uptime_result()).unwrap().as_slice(),
        ]);
        let sample = compact(&packed, &name("ship1"), &name("central"), 1).unwrap();
        let (from, to) = (name("ship1"), name("central"));
        for i in 0..20_000usize {
            let mut b = sample.clone();
            for _ in 0..1 + rng(&mut seed) % 4 {
                let at = (rng(&mut seed) as usize) % b.len();
                b[at] = rng(&mut seed) as u8;
            }
            b.truncate(i % (b.len() + 1));
            let (frames, _) = expand(&b, &from, &to, 1);
            // Whatever comes out is whole frames.
            for f in unpack(&frames) {
                decode(f.unwrap()).unwrap();
            }
        }
        assert_eq!(expand(&[], &from, &to, 1).1, Some(FrameError::Truncated(0)));
        assert_eq!(
            expand(&[9, 1, 2], &from, &to, 1).1,
            Some(FrameError::UnknownVersion(9))
        );
    }
}
