//! The validated agent configuration: a TOML file, then flags on top.
//!
//! Two steps, as ripgrep does: [`FileConfig`] and the flags are raw; [`Config`] is
//! what the agent runs with, every value checked once, here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::Name;
use crate::link::BrokerUrl;
use crate::store::Durability;

pub const DEFAULT_CONFIG: &str = "/etc/outpost/outpost.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/outpost";

/// The state directory, by the one rule the agent and every command follow: the
/// flag, else `OUTPOST_STATE_DIR`, else `state_dir` in the configuration file
/// (the default one unless `config` names another), else [`DEFAULT_STATE_DIR`].
pub fn state_dir(flag: Option<PathBuf>, config: Option<&Path>) -> PathBuf {
    let file =
        FileConfig::load(config.unwrap_or(Path::new(DEFAULT_CONFIG)), false).unwrap_or_default();
    flag.or(FileConfig::env().state_dir)
        .or(file.state_dir)
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

/// The configuration file as written; every key optional.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub broker: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub prefix: Option<String>,
    pub keepalive: Option<String>,
    pub backoff_cap: Option<String>,
    pub durability: Option<String>,
    pub quota: Option<String>,
    pub log_level: Option<String>,
    pub output_cap: Option<String>,
    /// Deflate payloads when it pays (default true); for measuring, and for
    /// senders whose peers run a build before compression.
    pub compress: Option<bool>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the broker password (first line), not readable by others.
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// `"1.2,1.3"` (default), `"1.2"` or `"1.3"`.
    pub tls_versions: Option<String>,
    pub files_dir: Option<PathBuf>,
    pub share_dirs: Option<Vec<PathBuf>>,
    pub chunk_size: Option<String>,
    pub facts_dir: Option<PathBuf>,
    pub facts_refresh: Option<String>,
    pub facts_interval: Option<String>,
    /// Finished history older than this is pruned.
    pub retention: Option<String>,
    /// Of finished jobs, results, journal rows, events: at most this many kept.
    pub retention_jobs: Option<u64>,
    /// Budgets of this node's link: `["5MiB/day", "100MiB/month"]`.
    pub budget: Option<Vec<String>>,
    /// Budgets of traffic with peers (by name or glob): `{ "ship*" = ["1MiB/day"] }`.
    pub peer_budgets: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// When classes of traffic may use the link: `["bulk 02:00-04:00 UTC"]`.
    pub link_windows: Option<Vec<String>>,
    /// `always` (default) or `on-demand`: connect only to send and to poll.
    pub link: Option<String>,
    /// On-demand: the longest the link stays down between polls.
    pub poll: Option<String>,
    /// On-demand: how long a quiet link stays up before it hangs up.
    pub linger: Option<String>,
}

impl FileConfig {
    /// Reads a file; a missing file at the default path is an empty config.
    pub fn load(path: &Path, explicit: bool) -> Result<FileConfig, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| {
            // path:line:column, as compilers say it.
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            });
            format!("{}{at}: {}", path.display(), e.message())
        })
    }

    /// The environment's layer: `OUTPOST_STATE_DIR` over the file, under flags.
    pub fn env() -> FileConfig {
        FileConfig {
            state_dir: std::env::var_os("OUTPOST_STATE_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ..FileConfig::default()
        }
    }

    /// Flags win over the file: fills `self` with every key `over` sets.
    pub fn overlay(mut self, over: FileConfig) -> FileConfig {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            name,
            broker,
            state_dir,
            prefix,
            keepalive,
            backoff_cap,
            durability,
            quota,
            log_level,
            output_cap,
            compress,
            username,
            password,
            password_file,
            ca_file,
            client_cert,
            client_key,
            tls_versions,
            files_dir,
            share_dirs,
            chunk_size,
            facts_dir,
            facts_refresh,
            facts_interval,
            retention,
            retention_jobs,
            budget,
            peer_budgets,
            link_windows,
            link,
            poll,
            linger
        );
        self
    }
}

/// How the agent keeps its broker link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LinkMode {
    /// Connected all the time, reconnecting forever.
    #[serde(rename = "always")]
    Always,
    /// Connected when there is something to send, every `poll` to fetch what
    /// waits in the broker session, and while traffic flows; down after
    /// `linger` of quiet (see `agent/demand.rs`).
    #[serde(rename = "on-demand")]
    OnDemand,
}

impl LinkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMode::Always => "always",
            LinkMode::OnDemand => "on-demand",
        }
    }
}

impl std::str::FromStr for LinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(LinkMode::Always),
            "on-demand" => Ok(LinkMode::OnDemand),
            _ => Err(format!(
                "unknown link mode {s:?} (expected always or on-demand)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(LogLevel::Error),
            "warn" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            _ => Err(format!(
                "unknown log level {s:?} (expected error, warn, info or debug)"
            )),
        }
    }
}

/// What the agent runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub name: Name,
    #[serde(serialize_with = "display")]
    pub broker: BrokerUrl,
    pub state_dir: PathBuf,
    pub prefix: String,
    #[serde(serialize_with = "secs")]
    pub keepalive: Duration,
    #[serde(serialize_with = "secs")]
    pub backoff_cap: Duration,
    pub durability: Durability,
    pub quota: u64,
    pub log_level: LogLevel,
    pub output_cap: u64,
    pub compress: bool,
    pub username: Option<String>,
    #[serde(serialize_with = "redact")]
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(serialize_with = "versions")]
    pub tls_versions: crate::link::TlsVersions,
    /// Received files land under `files_dir/SOURCE/`.
    pub files_dir: PathBuf,
    /// Directories whose files peers may fetch with `files get`.
    pub share_dirs: Vec<PathBuf>,
    pub chunk_size: u32,
    /// Custom facts: every executable (its output) or other file (its content) of
    /// `KEY=VALUE` lines in it.
    pub facts_dir: Option<PathBuf>,
    /// A full set of facts goes to each peer at least this often.
    #[serde(serialize_with = "secs")]
    pub facts_refresh: Duration,
    /// Facts are read and compared this often (only changes are sent).
    #[serde(serialize_with = "secs")]
    pub facts_interval: Duration,
    #[serde(serialize_with = "secs")]
    pub retention: Duration,
    pub retention_jobs: u64,
    pub budget: Vec<String>,
    pub peer_budgets: std::collections::BTreeMap<String, Vec<String>>,
    pub link_windows: Vec<String>,
    /// The three above, parsed.
    #[serde(skip)]
    pub plan: crate::budget::Plan,
    pub link: LinkMode,
    /// On-demand: the link is down at most this long between polls.
    #[serde(serialize_with = "secs")]
    pub poll: Duration,
    /// On-demand: a link quiet this long hangs up.
    #[serde(serialize_with = "secs")]
    pub linger: Duration,
}

fn display<S: serde::Serializer>(v: &BrokerUrl, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn secs<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_duration(*v))
}

fn versions<S: serde::Serializer>(v: &crate::link::TlsVersions, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match v {
        crate::link::TlsVersions::Any => "1.2,1.3",
        crate::link::TlsVersions::Only12 => "1.2",
        crate::link::TlsVersions::Only13 => "1.3",
    })
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

impl Config {
    pub fn build(raw: FileConfig) -> Result<Config, String> {
        let name = raw
            .name
            .ok_or("no node name: set `name` in the config file or pass --name")?;
        let name = Name::new(&name).map_err(|e| format!("name: {e}"))?;
        let broker = raw.broker.ok_or(
            "no broker: set `broker` in the config file or pass --broker mqtt://HOST:PORT",
        )?;
        let broker: BrokerUrl = broker.parse().map_err(|e| format!("broker: {e}"))?;
        let prefix = raw.prefix.unwrap_or_else(|| "outpost".into());
        if prefix.is_empty() || prefix.contains(['+', '#', '\0']) || prefix.ends_with('/') {
            return Err(format!("prefix {prefix:?}: must be a non-empty MQTT topic without wildcards or a trailing /"));
        }
        let keepalive = opt(raw.keepalive.as_deref(), "keepalive", parse_duration)?
            .unwrap_or(Duration::from_secs(300));
        if keepalive < Duration::from_secs(1) || keepalive > Duration::from_secs(65_535) {
            return Err("keepalive: between 1s and 65535s".into());
        }
        let backoff_cap = opt(raw.backoff_cap.as_deref(), "backoff_cap", parse_duration)?
            .unwrap_or(Duration::from_secs(60));
        let durability =
            opt(raw.durability.as_deref(), "durability", str::parse)?.unwrap_or(Durability::Full);
        let quota = opt(raw.quota.as_deref(), "quota", parse_size)?.unwrap_or(256 * 1024 * 1024);
        let output_cap =
            opt(raw.output_cap.as_deref(), "output_cap", parse_size)?.unwrap_or(64 * 1024);
        let log_level =
            opt(raw.log_level.as_deref(), "log_level", str::parse)?.unwrap_or(LogLevel::Info);
        let password = password(raw.password, raw.password_file.as_deref())?;
        if broker.tls && raw.ca_file.is_none() {
            return Err("ca_file: required for an mqtts:// broker".into());
        }
        if raw.client_cert.is_some() != raw.client_key.is_some() {
            return Err("client_cert and client_key go together".into());
        }
        let chunk_size =
            opt(raw.chunk_size.as_deref(), "chunk_size", parse_size)?.unwrap_or(16 * 1024);
        if !(1024..=512 * 1024).contains(&chunk_size) {
            return Err("chunk_size: between 1KiB and 512KiB".into());
        }
        let facts_refresh = opt(
            raw.facts_refresh.as_deref(),
            "facts_refresh",
            parse_duration,
        )?
        .unwrap_or(Duration::from_secs(24 * 3600));
        let facts_interval = opt(
            raw.facts_interval.as_deref(),
            "facts_interval",
            parse_duration,
        )?
        .unwrap_or(Duration::from_secs(300));
        if facts_interval < Duration::from_secs(1) || facts_refresh < facts_interval {
            return Err(
                "facts_interval: at least 1s, and facts_refresh at least facts_interval".into(),
            );
        }
        let retention = opt(raw.retention.as_deref(), "retention", parse_duration)?
            .unwrap_or(Duration::from_secs(30 * 86_400));
        if retention < Duration::from_secs(1) {
            return Err("retention: at least 1s".into());
        }
        let retention_jobs = raw.retention_jobs.unwrap_or(100_000);
        let budget = raw.budget.unwrap_or_default();
        let peer_budgets = raw.peer_budgets.unwrap_or_default();
        let link_windows = raw.link_windows.unwrap_or_default();
        let plan = plan(&budget, &peer_budgets, &link_windows)?;
        let link = opt(raw.link.as_deref(), "link", str::parse)?.unwrap_or(LinkMode::Always);
        let poll = opt(raw.poll.as_deref(), "poll", parse_duration)?
            .unwrap_or(Duration::from_secs(30 * 60));
        let linger = opt(raw.linger.as_deref(), "linger", parse_duration)?
            .unwrap_or(Duration::from_secs(30));
        if poll < Duration::from_secs(1) || poll > Duration::from_secs(7 * 86_400) {
            return Err("poll: between 1s and 7d".into());
        }
        if linger < Duration::from_millis(100) || linger > poll {
            return Err("linger: at least 100ms, and at most poll".into());
        }
        let state_dir: PathBuf = raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        Ok(Config {
            link,
            poll,
            linger,
            budget,
            peer_budgets,
            link_windows,
            plan,
            facts_dir: raw.facts_dir,
            facts_refresh,
            facts_interval,
            retention,
            retention_jobs,
            files_dir: raw.files_dir.unwrap_or_else(|| state_dir.join("files")),
            share_dirs: raw.share_dirs.unwrap_or_default(),
            chunk_size: chunk_size as u32,
            name,
            broker,
            state_dir,
            prefix,
            keepalive,
            backoff_cap,
            durability,
            quota,
            log_level,
            output_cap,
            compress: raw.compress.unwrap_or(true),
            username: raw.username,
            password,
            ca_file: raw.ca_file,
            client_cert: raw.client_cert,
            client_key: raw.client_key,
            // An on-demand link connects for every poll: TLS 1.2's resumption
            // costs about 600 B less per connect (measured, README).
            tls_versions: opt(raw.tls_versions.as_deref(), "tls_versions", str::parse)?.unwrap_or(
                match link {
                    LinkMode::OnDemand => crate::link::TlsVersions::Only12,
                    LinkMode::Always => crate::link::TlsVersions::Any,
                },
            ),
        })
    }

    pub fn inbox_topic(&self, node: &Name) -> String {
        format!("{}/{node}/in", self.prefix)
    }

    pub fn presence_topic(&self, node: &Name) -> String {
        format!("{}/{node}/presence", self.prefix)
    }
}

/// Budgets and link windows, checked (named zones are read from `TZDIR`,
/// default `/usr/share/zoneinfo`).
fn plan(
    budget: &[String],
    peers: &std::collections::BTreeMap<String, Vec<String>>,
    windows: &[String],
) -> Result<crate::budget::Plan, String> {
    use crate::budget::{Budget, Plan, Window};
    let budgets =
        |v: &[String]| -> Result<Vec<Budget>, String> { v.iter().map(|b| b.parse()).collect() };
    let zoneinfo = std::env::var_os("TZDIR")
        .map_or_else(|| PathBuf::from("/usr/share/zoneinfo"), PathBuf::from);
    Ok(Plan {
        budgets: budgets(budget).map_err(|e| format!("budget: {e}"))?,
        peers: peers
            .iter()
            .map(|(p, b)| {
                Ok((
                    p.clone(),
                    budgets(b).map_err(|e| format!("peer_budgets.{p}: {e}"))?,
                ))
            })
            .collect::<Result<_, String>>()?,
        windows: windows
            .iter()
            .map(|w| Window::parse(w, &zoneinfo))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("link_windows: {e}"))?,
    })
}

/// The broker password: `OUTPOST_PASSWORD`, else the first line of
/// `password_file`, else `password` (which, given as a flag, anyone can read in
/// `ps`).
fn password(plain: Option<String>, file: Option<&Path>) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(p) = std::env::var("OUTPOST_PASSWORD") {
        return Ok(Some(p));
    }
    let Some(file) = file else {
        return Ok(plain);
    };
    let meta =
        std::fs::metadata(file).map_err(|e| format!("password_file {}: {e}", file.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "password_file {} is readable by everyone; chmod o-r {}",
            file.display(),
            file.display()
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("password_file {}: {e}", file.display()))?;
    let line = text.lines().next().unwrap_or_default().to_string();
    if line.is_empty() {
        return Err(format!("password_file {} is empty", file.display()));
    }
    Ok(Some(line))
}

fn opt<T>(
    v: Option<&str>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    v.map(|s| parse(s).map_err(|e| format!("{key}: {e}")))
        .transpose()
}

/// `500ms`, `30s`, `5m`, `2h`, `1d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 30s, 5m, 2h, 1d)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(86_400_000) && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// `14:30 UTC`, or `2026-11-22 14:30 UTC` when `ms` falls on another UTC day
/// than `now_ms`: a wall-clock time for people (both in ms since the epoch).
pub fn format_utc(ms: u64, now_ms: u64) -> String {
    let (day, secs) = (ms / 86_400_000, ms / 1000 % 86_400);
    let hm = format!("{:02}:{:02} UTC", secs / 3600, secs / 60 % 60);
    if day == now_ms / 86_400_000 {
        return hm;
    }
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y}-{m:02}-{d:02} {hm}")
}

/// `1000`, `64KiB`, `256MiB`, `1GiB` (also KB/MB/GB as powers of ten).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (try 64MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "bad size unit {u:?} in {s:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

/// `812 B`, `4.2 KiB`, `256.0 MiB`: a size for people.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(256 * 1024 * 1024), "256.0 MiB");
        assert_eq!(format_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn utc_times_print_for_people_with_the_date_only_when_another_day() {
        // 2025-11-22 08:26:40 UTC.
        let t = 1_763_800_000_000;
        assert_eq!(format_utc(t, t), "08:26 UTC");
        assert_eq!(format_utc(t + 3_600_000, t), "09:26 UTC");
        assert_eq!(format_utc(t + 86_400_000, t), "2025-11-23 08:26 UTC");
        assert_eq!(format_utc(951_782_400_000, t), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn durations_and_sizes_parse_in_human_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_named() {
        let file: FileConfig =
            toml::from_str("name = \"ship1\"\nbroker = \"mqtt://b:1883\"\nkeepalive = \"2m\"")
                .unwrap();
        let flags = FileConfig {
            keepalive: Some("30s".into()),
            ..FileConfig::default()
        };
        let cfg = Config::build(file.clone().overlay(flags)).unwrap();
        assert_eq!(cfg.keepalive, Duration::from_secs(30));
        assert_eq!(cfg.name.as_str(), "ship1");
        let bad = FileConfig {
            durability: Some("sometimes".into()),
            ..file
        };
        assert!(Config::build(bad).unwrap_err().starts_with("durability:"));
        assert!(
            toml::from_str::<FileConfig>("nmae = \"x\"").is_err(),
            "unknown keys are errors"
        );
    }

    #[test]
    fn the_link_is_always_on_unless_on_demand_with_its_poll_and_linger() {
        let base = "name = \"ship1\"\nbroker = \"mqtt://b:1883\"\n";
        let build = |extra: &str| {
            let file: FileConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            Config::build(file)
        };
        let cfg = build("").unwrap();
        assert_eq!(cfg.link, LinkMode::Always);
        assert_eq!(
            (cfg.poll, cfg.linger),
            (Duration::from_secs(1800), Duration::from_secs(30))
        );
        let cfg = build("link = \"on-demand\"\npoll = \"5m\"\nlinger = \"10s\"").unwrap();
        assert_eq!(cfg.link, LinkMode::OnDemand);
        assert_eq!(
            (cfg.poll, cfg.linger),
            (Duration::from_secs(300), Duration::from_secs(10))
        );
        assert!(build("link = \"sometimes\"")
            .unwrap_err()
            .starts_with("link:"));
        assert!(build("poll = \"10s\"\nlinger = \"1m\"")
            .unwrap_err()
            .starts_with("linger:"));
        assert!(build("poll = \"0s\"").unwrap_err().starts_with("poll:"));
    }
}
