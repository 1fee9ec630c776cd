//! What traffic is, what it may spend and when it may go: categories for the
//! byte accounting, classes for budgets and link windows, and the [`Gate`] that
//! holds traffic back.
//!
//! Pure: no I/O, no clock (named zones are read once, when the config is built).
//! Every frame has a class (`classify`): `urgent` (acknowledgements, results,
//! cancels, the handshake, everything on the `control` and `urgent` lanes),
//! `bulk` (file chunks and facts: the `bulk` lanes) or `normal` (commands and the
//! rest). A budget lets bulk spend up to [`BULK_SHARE`] of it and normal up to
//! [`NORMAL_SHARE`]; urgent traffic always goes. A class may also be limited to
//! link windows (times of day). What the gate refuses waits in the outbox, in
//! order, until its period rolls over, its window opens or the operator releases
//! it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::frame::{Lane, LaneClass, Name};

/// Of a budget, bulk traffic may spend this share (per thousand)...
pub const BULK_SHARE: u64 = 800;
/// ...normal traffic this share; urgent traffic always goes.
pub const NORMAL_SHARE: u64 = 950;

/// How much traffic matters when bytes are scarce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Urgent,
    Normal,
    Bulk,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Urgent, Class::Normal, Class::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Urgent => "urgent",
            Class::Normal => "normal",
            Class::Bulk => "bulk",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown class {s:?} (expected urgent, normal or bulk)"))
    }
}

/// Where bytes went, for `outpost link usage`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    #[default]
    Commands,
    Results,
    Acks,
    Files,
    Facts,
    /// Handshakes, cancels, error reports, notices.
    Control,
    Presence,
    Keepalive,
    /// TCP and TLS handshakes, CONNECT, SUBSCRIBE and their answers.
    Connects,
    /// TLS records and TCP/IP headers of everything else.
    Overhead,
}

impl Category {
    pub const ALL: [Category; 10] = [
        Category::Commands,
        Category::Results,
        Category::Acks,
        Category::Files,
        Category::Facts,
        Category::Control,
        Category::Presence,
        Category::Keepalive,
        Category::Connects,
        Category::Overhead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Commands => "commands",
            Category::Results => "results",
            Category::Acks => "acks",
            Category::Files => "files",
            Category::Facts => "facts",
            Category::Control => "control",
            Category::Presence => "presence",
            Category::Keepalive => "keepalive",
            Category::Connects => "connects",
            Category::Overhead => "overhead",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// The class and category of a frame on `lane` whose body has variant `body`
/// (`frame::body_index`; `None` if it could not be read: normal, control).
pub fn classify(lane: &Lane, body: Option<u32>) -> (Class, Category) {
    let category = match body {
        Some(0) => Category::Commands,
        Some(1 | 9) => Category::Results,
        Some(2 | 12) => Category::Acks,
        Some(5..=8) => Category::Files,
        Some(15) => Category::Facts,
        _ => Category::Control,
    };
    let family = lane.as_str().split('.').next().unwrap_or_default();
    let class = match body {
        // Results, Started, Ack, Nack, Lost, Discarded, FileStatus, Hello, Sync,
        // Withdrawn, Cancel: small, and what someone waits for.
        Some(1..=4 | 7 | 9..=14) => Class::Urgent,
        _ if family == "urgent" || lane.class() == LaneClass::Control => Class::Urgent,
        _ if lane.class() == LaneClass::Bulk => Class::Bulk,
        _ => Class::Normal,
    };
    (class, category)
}

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// Calendar months (UTC).
    Month,
    /// Periods of this many milliseconds from the epoch (a day starts at 00:00 UTC).
    Every(u64),
}

impl Period {
    /// The period `now_ms` is in: `[start, end)`.
    pub fn bounds(self, now_ms: u64) -> (u64, u64) {
        match self {
            Period::Every(ms) => {
                let start = now_ms - now_ms % ms;
                (start, start + ms)
            }
            Period::Month => {
                let days = (now_ms / 86_400_000) as i64;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1);
                (start as u64 * 86_400_000, end as u64 * 86_400_000)
            }
        }
    }
}

/// `5MiB/day`, `100MiB/month`, `10KiB/1min`, `2GiB/7d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub text: String,
    pub limit: u64,
    pub period: Period,
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        let bad = || format!("bad budget {s:?} (try 5MiB/day, 100MiB/month or 10KiB/1min)");
        let (size, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let limit = crate::config::parse_size(size).map_err(|e| format!("budget {s:?}: {e}"))?;
        if limit == 0 {
            return Err(format!("budget {s:?}: the limit must be positive"));
        }
        let period = match period.trim() {
            "month" => Period::Month,
            "day" => Period::Every(86_400_000),
            "hour" => Period::Every(3_600_000),
            "week" => Period::Every(7 * 86_400_000),
            p => {
                let p = p.strip_suffix("in").unwrap_or(p);
                let d = crate::config::parse_duration(p).map_err(|_| bad())?;
                let ms = d.as_millis() as u64;
                if ms < 1_000 {
                    return Err(format!("budget {s:?}: the period must be at least 1s"));
                }
                Period::Every(ms)
            }
        };
        Ok(Budget {
            text: s.trim().to_string(),
            limit,
            period,
        })
    }
}

/// A time zone for link windows: a fixed offset, or a TZif file's transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    /// (from unix second, offset seconds), sorted; the first applies before all.
    offsets: Vec<(i64, i32)>,
}

impl Zone {
    pub fn utc() -> Zone {
        Zone {
            name: "UTC".into(),
            offsets: vec![(i64::MIN, 0)],
        }
    }

    /// `UTC`, `+05:30`, `-03:00`, or a name under `zoneinfo` (`Europe/Oslo`).
    pub fn parse(name: &str, zoneinfo: &std::path::Path) -> Result<Zone, String> {
        if name == "UTC" || name == "Z" {
            return Ok(Zone::utc());
        }
        if let Some(sign) = name.strip_prefix(['+', '-']).map(|_| name.as_bytes()[0]) {
            let (h, m) = name[1..]
                .split_once(':')
                .and_then(|(h, m)| Some((h.parse::<i32>().ok()?, m.parse::<i32>().ok()?)))
                .filter(|(h, m)| *h <= 14 && *m < 60)
                .ok_or_else(|| format!("bad offset {name:?} (try +05:30)"))?;
            let off = (h * 3600 + m * 60) * if sign == b'-' { -1 } else { 1 };
            return Ok(Zone {
                name: name.into(),
                offsets: vec![(i64::MIN, off)],
            });
        }
        if name.contains("..") || name.starts_with('/') {
            return Err(format!("bad zone name {name:?}"));
        }
        let path = zoneinfo.join(name);
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "zone {name:?}: cannot read {}: {e} (use UTC or an offset such as +02:00 where there is no zoneinfo)",
                path.display()
            )
        })?;
        let offsets = parse_tzif(&bytes)
            .ok_or_else(|| format!("zone {name:?}: {} is not a TZif file", path.display()))?;
        Ok(Zone {
            name: name.into(),
            offsets,
        })
    }

    /// Seconds east of UTC at `unix_s`.
    pub fn offset_at(&self, unix_s: i64) -> i32 {
        let i = self.offsets.partition_point(|(from, _)| *from <= unix_s);
        self.offsets[i.saturating_sub(1)].1
    }
}

/// The transitions of a TZif file (RFC 8536), version 2+ data when present.
/// Times past the last transition keep its offset (the footer's rule is not
/// read; tzdata as Debian ships it lists transitions to 2037).
fn parse_tzif(b: &[u8]) -> Option<Vec<(i64, i32)>> {
    fn be32(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }
    let header = |at: usize| -> Option<[usize; 6]> {
        if b.get(at..at + 4)? != b"TZif" {
            return None;
        }
        let mut c = [0usize; 6];
        for (i, v) in c.iter_mut().enumerate() {
            *v = be32(b, at + 20 + 4 * i)? as usize;
        }
        Some(c)
    };
    // isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt
    let [isut, isstd, leap, time, typ, chars] = header(0)?;
    let v1_len = time * 4 + time + typ * 6 + chars + leap * 8 + isstd + isut;
    let (at, tsize, counts) = if b[4] >= b'2' {
        let at = 44 + v1_len;
        (at, 8, header(at)?)
    } else {
        (0, 4, [isut, isstd, leap, time, typ, chars])
    };
    let [_, _, _, time, typ, _] = counts;
    let data = at + 44;
    let times = data;
    let idx = times + time * tsize;
    let types = idx + time;
    let ttinfo = |i: usize| -> Option<i32> { Some(be32(b, types + 6 * i)? as i32) };
    if typ == 0 {
        return None;
    }
    let mut out = vec![(i64::MIN, ttinfo(0)?)];
    for i in 0..time {
        let t = if tsize == 8 {
            i64::from_be_bytes(b.get(times + 8 * i..times + 8 * i + 8)?.try_into().ok()?)
        } else {
            i64::from(be32(b, times + 4 * i)? as i32)
        };
        let ty = *b.get(idx + i)? as usize;
        if ty >= typ {
            return None;
        }
        out.push((t, ttinfo(ty)?));
    }
    Some(out)
}

/// `02:00-04:00`, `bulk 01:00-05:00 Europe/Oslo`, `normal 22:00-06:00 +02:00`:
/// when a class may use the link. Without a class the window is for normal and
/// bulk traffic; urgent traffic is limited only by windows that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub text: String,
    pub class: Option<Class>,
    /// Minutes after local midnight; `end <= start` wraps past midnight.
    pub start: u32,
    pub end: u32,
    pub zone: Zone,
}

impl Window {
    pub fn parse(s: &str, zoneinfo: &std::path::Path) -> Result<Window, String> {
        let bad =
            || format!("bad link window {s:?} (try \"02:00-04:00\", \"bulk 01:00-05:00 UTC\")");
        let mut words = s.split_whitespace();
        let mut word = words.next().ok_or_else(bad)?;
        let class = match word.parse::<Class>() {
            Ok(c) => {
                word = words.next().ok_or_else(bad)?;
                Some(c)
            }
            Err(_) => None,
        };
        let (a, b) = word.split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.split_once(':')?;
            let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        let zone = match words.next() {
            Some(z) => Zone::parse(z, zoneinfo)?,
            None => Zone::utc(),
        };
        if words.next().is_some() || start == end && start != 0 {
            return Err(bad());
        }
        Ok(Window {
            text: s.trim().to_string(),
            class,
            start,
            end,
            zone,
        })
    }

    fn applies_to(&self, class: Class) -> bool {
        match self.class {
            Some(c) => c == class,
            None => class != Class::Urgent,
        }
    }

    /// Whether the window is open at `now_ms`, and when that changes (at most a
    /// day ahead; offsets are taken at `now_ms`).
    fn state(&self, now_ms: u64) -> (bool, u64) {
        let s = (now_ms / 1000) as i64;
        let local = s + i64::from(self.zone.offset_at(s));
        let minute = (local.rem_euclid(86_400) / 60) as u32;
        let (start, end) = (self.start, if self.end == 0 { 1440 } else { self.end });
        let open = if start < end {
            (start..end).contains(&minute)
        } else {
            minute >= start || minute < end
        };
        let next = if open { end % 1440 } else { start };
        let ahead = (next + 1440 - minute - 1) % 1440 + 1;
        let into_minute = (now_ms / 1000 % 60) * 1000 + now_ms % 1000;
        (open, now_ms + u64::from(ahead) * 60_000 - into_minute)
    }
}

/// The budgets and windows one agent keeps.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Everything on this node's link.
    pub budgets: Vec<Budget>,
    /// Traffic to and from peers matching a name pattern (`*` wildcards).
    pub peers: Vec<(String, Vec<Budget>)>,
    pub windows: Vec<Window>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty() && self.peers.is_empty() && self.windows.is_empty()
    }
}

/// Why traffic waits, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wait {
    pub until_ms: u64,
    pub why: String,
}

/// Spending of one budget in its current period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Spent {
    start_ms: u64,
    bytes: u64,
    /// Admitted but not yet metered.
    pending: u64,
}

/// A budget's state, for `status` and `link usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    /// `node`, or the peer's name.
    pub scope: String,
    pub budget: String,
    pub limit: u64,
    pub spent: u64,
    pub period_end_ms: u64,
}

/// Streams held back, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldView {
    pub peer: String,
    pub lane: String,
    pub class: Class,
    pub until_ms: u64,
    pub why: String,
}

/// Decides, frame by frame, whether traffic may go now.
#[derive(Debug, Default)]
pub struct Gate {
    plan: Plan,
    /// Per (scope, budget text): "" is the node's own scope.
    spent: BTreeMap<(String, String), Spent>,
    released_until_ms: u64,
    held: BTreeMap<(Name, Lane), HeldView>,
}

impl Gate {
    pub fn new(plan: Plan) -> Gate {
        Gate {
            plan,
            ..Gate::default()
        }
    }

    /// Whether anything is limited at all (if not, nothing need be classified).
    pub fn is_active(&self) -> bool {
        !self.plan.is_empty()
    }

    pub fn set_plan(&mut self, plan: Plan) {
        self.plan = plan;
        self.held.clear();
    }

    /// The budgets that apply to traffic with `peer`: the node's, then the peer's.
    fn budgets_for<'a>(
        &'a self,
        peer: &'a Name,
    ) -> impl Iterator<Item = (String, &'a Budget)> + 'a {
        let node = self.plan.budgets.iter().map(|b| (String::new(), b));
        let peers = self
            .plan
            .peers
            .iter()
            .filter(move |(pattern, _)| crate::agent::glob(pattern, peer.as_str()))
            .flat_map(move |(_, bs)| bs.iter().map(move |b| (peer.to_string(), b)));
        node.chain(peers)
    }

    fn spent_mut(&mut self, scope: String, budget: &Budget, now_ms: u64) -> &mut Spent {
        let (start, _) = budget.period.bounds(now_ms);
        let s = self.spent.entry((scope, budget.text.clone())).or_default();
        if s.start_ms != start {
            *s = Spent {
                start_ms: start,
                ..Spent::default()
            };
        }
        s
    }

    /// May a frame of `class` and about `bytes` on the wire go to `peer` now? If
    /// so it is counted as pending until the meter says what it cost.
    pub fn admit(
        &mut self,
        peer: &Name,
        class: Class,
        bytes: u64,
        now_ms: u64,
    ) -> Result<(), Wait> {
        if now_ms >= self.released_until_ms {
            for w in self.plan.windows.iter().filter(|w| w.applies_to(class)) {
                let (open, _) = w.state(now_ms);
                if open {
                    return self.admit_budgets(peer, class, bytes, now_ms);
                }
            }
            if let Some(until_ms) = self
                .plan
                .windows
                .iter()
                .filter(|w| w.applies_to(class))
                .map(|w| w.state(now_ms).1)
                .min()
            {
                let texts: Vec<&str> = self
                    .plan
                    .windows
                    .iter()
                    .filter(|w| w.applies_to(class))
                    .map(|w| w.text.as_str())
                    .collect();
                return Err(Wait {
                    until_ms,
                    why: format!(
                        "{class} traffic goes only in its link window ({})",
                        texts.join(", ")
                    ),
                });
            }
        }
        self.admit_budgets(peer, class, bytes, now_ms)
    }

    fn admit_budgets(
        &mut self,
        peer: &Name,
        class: Class,
        bytes: u64,
        now_ms: u64,
    ) -> Result<(), Wait> {
        let share = match class {
            Class::Urgent => None,
            Class::Normal => Some(NORMAL_SHARE),
            Class::Bulk => Some(BULK_SHARE),
        };
        let budgets: Vec<(String, Budget)> = self
            .budgets_for(peer)
            .map(|(s, b)| (s, b.clone()))
            .collect();
        if let (Some(share), false) = (share, now_ms < self.released_until_ms) {
            for (scope, b) in &budgets {
                let s = self.spent_mut(scope.clone(), b, now_ms);
                let allowed = b.limit / 1000 * share + b.limit % 1000 * share / 1000;
                if s.bytes + s.pending + bytes > allowed {
                    let (_, end) = b.period.bounds(now_ms);
                    let whose = if scope.is_empty() {
                        "this node's".to_string()
                    } else {
                        format!("{scope}'s")
                    };
                    return Err(Wait {
                        until_ms: end,
                        why: format!(
                            "{class} traffic may spend {}% of {whose} budget {}, and {} of it is spent",
                            share / 10,
                            b.text,
                            crate::config::format_size(s.bytes + s.pending)
                        ),
                    });
                }
            }
        }
        for (scope, b) in &budgets {
            self.spent_mut(scope.clone(), b, now_ms).pending += bytes;
        }
        Ok(())
    }

    /// Bytes the link spent: the node's whole link (`peer` none), or traffic
    /// with one peer.
    pub fn spend(&mut self, peer: Option<&Name>, bytes: u64, now_ms: u64) {
        let budgets: Vec<(String, Budget)> = match peer {
            None => self
                .plan
                .budgets
                .iter()
                .map(|b| (String::new(), b.clone()))
                .collect(),
            Some(p) => self
                .budgets_for(p)
                .filter(|(s, _)| !s.is_empty())
                .map(|(s, b)| (s, b.clone()))
                .collect(),
        };
        for (scope, b) in budgets {
            let s = self.spent_mut(scope, &b, now_ms);
            s.bytes += bytes;
            s.pending = s.pending.saturating_sub(bytes);
        }
    }

    /// Notes that a stream waits; `until` also tells delivery when to look again.
    pub fn hold(&mut self, peer: &Name, lane: &Lane, class: Class, wait: &Wait) {
        self.held.insert(
            (peer.clone(), lane.clone()),
            HeldView {
                peer: peer.to_string(),
                lane: lane.to_string(),
                class,
                until_ms: wait.until_ms,
                why: wait.why.clone(),
            },
        );
    }

    /// A stream sent again: it no longer waits.
    pub fn unhold(&mut self, peer: &Name, lane: &Lane) {
        if !self.held.is_empty() {
            self.held.remove(&(peer.clone(), lane.clone()));
        }
    }

    /// The operator lifts budgets and windows until `until_ms`.
    pub fn release(&mut self, until_ms: u64) {
        self.released_until_ms = until_ms;
        self.held.clear();
    }

    pub fn released_until(&self, now_ms: u64) -> Option<u64> {
        (self.released_until_ms > now_ms).then_some(self.released_until_ms)
    }

    pub fn held(&self) -> Vec<HeldView> {
        self.held.values().cloned().collect()
    }

    /// Every budget with what it has spent this period: the node's, then those
    /// of each of `peers` a pattern names.
    pub fn budgets(&self, peers: &[Name], now_ms: u64) -> Vec<BudgetView> {
        let mut out: Vec<BudgetView> = self
            .plan
            .budgets
            .iter()
            .map(|b| self.view(String::new(), b, now_ms))
            .collect();
        for peer in peers {
            for (scope, b) in self.budgets_for(peer).filter(|(s, _)| !s.is_empty()) {
                out.push(self.view(scope, b, now_ms));
            }
        }
        out
    }

    fn view(&self, scope: String, b: &Budget, now_ms: u64) -> BudgetView {
        let (start, end) = b.period.bounds(now_ms);
        let spent = self
            .spent
            .get(&(scope.clone(), b.text.clone()))
            .filter(|s| s.start_ms == start)
            .map_or(0, |s| s.bytes + s.pending);
        BudgetView {
            scope: if scope.is_empty() {
                "node".into()
            } else {
                scope
            },
            budget: b.text.clone(),
            limit: b.limit,
            spent,
            period_end_ms: end,
        }
    }

    /// What to persist: (scope, budget, period start, bytes spent).
    pub fn spent_rows(&self) -> Vec<(String, String, u64, u64)> {
        self.spent
            .iter()
            .map(|((scope, b), s)| (scope.clone(), b.clone(), s.start_ms, s.bytes + s.pending))
            .collect()
    }

    /// Takes back what was persisted (rows of another period are ignored by
    /// `spent_mut` as soon as they are looked at).
    pub fn restore(&mut self, rows: Vec<(String, String, u64, u64)>) {
        for (scope, budget, start_ms, bytes) in rows {
            self.spent.insert(
                (scope, budget),
                Spent {
                    start_ms,
                    bytes,
                    pending: 0,
                },
            );
        }
    }
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31); Howard Hinnant's.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn lane(s: &str) -> Lane {
        Lane::new(s).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// 2026-12-02 14:00:00 UTC.
    const NOW: u64 = 1_796_220_000_000;

    #[test]
    fn frames_are_classified_by_body_and_lane() {
        assert_eq!(
            classify(&lane("ordered"), Some(0)),
            (Class::Normal, Category::Commands)
        );
        assert_eq!(
            classify(&lane("urgent"), Some(0)),
            (Class::Urgent, Category::Commands)
        );
        assert_eq!(
            classify(&lane("ordered"), Some(1)),
            (Class::Urgent, Category::Results)
        );
        assert_eq!(
            classify(&lane("bulk"), Some(6)),
            (Class::Bulk, Category::Files)
        );
        assert_eq!(
            classify(&lane("control"), Some(5)),
            (Class::Urgent, Category::Files)
        );
        assert_eq!(
            classify(&lane("bulk.facts"), Some(15)),
            (Class::Bulk, Category::Facts)
        );
        assert_eq!(
            classify(&lane("control"), Some(14)),
            (Class::Urgent, Category::Control)
        );
        assert_eq!(
            classify(&lane("errors"), Some(16)),
            (Class::Normal, Category::Control)
        );
    }

    #[test]
    fn budgets_parse_and_periods_align() {
        let b: Budget = "5MiB/day".parse().unwrap();
        assert_eq!((b.limit, b.period), (5 << 20, Period::Every(86_400_000)));
        let b: Budget = "10KiB/1min".parse().unwrap();
        assert_eq!((b.limit, b.period), (10 << 10, Period::Every(60_000)));
        assert!("5MiB".parse::<Budget>().is_err());
        assert!("0/day".parse::<Budget>().is_err());
        assert!("1MiB/fortnight".parse::<Budget>().is_err());
        let (start, end) = Period::Month.bounds(NOW);
        // 2026-12-01 and 2027-01-01.
        assert_eq!(start, days_from_civil(2026, 12, 1) as u64 * 86_400_000);
        assert_eq!(end, days_from_civil(2027, 1, 1) as u64 * 86_400_000);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        let (start, end) = Period::Every(86_400_000).bounds(NOW);
        assert_eq!((start, end), (NOW - 14 * 3_600_000, NOW + 10 * 3_600_000));
    }

    #[test]
    fn bulk_stops_first_then_normal_and_urgent_always_goes() {
        let plan = Plan {
            budgets: vec!["1000B/day".parse().unwrap()],
            ..Plan::default()
        };
        let mut gate = Gate::new(plan);
        let ship = name("ship1");
        assert!(gate.admit(&ship, Class::Bulk, 700, NOW).is_ok());
        gate.spend(None, 700, NOW);
        let wait = gate.admit(&ship, Class::Bulk, 200, NOW).unwrap_err();
        assert_eq!(wait.until_ms, NOW + 10 * 3_600_000);
        assert!(
            wait.why.contains("80% of this node's budget 1000B/day"),
            "{}",
            wait.why
        );
        assert!(gate.admit(&ship, Class::Normal, 200, NOW).is_ok());
        assert!(
            gate.admit(&ship, Class::Normal, 100, NOW).is_err(),
            "pending counts"
        );
        assert!(gate.admit(&ship, Class::Urgent, 5000, NOW).is_ok());
        // The next period starts afresh.
        assert!(gate.admit(&ship, Class::Bulk, 700, wait.until_ms).is_ok());
        // Released: everything goes until then.
        gate.release(wait.until_ms + 1000);
        assert!(gate.admit(&ship, Class::Bulk, 5000, wait.until_ms).is_ok());
    }

    #[test]
    fn peer_budgets_limit_only_their_peers() {
        let plan = Plan {
            peers: vec![("ship*".into(), vec!["100B/hour".parse().unwrap()])],
            ..Plan::default()
        };
        let mut gate = Gate::new(plan);
        gate.spend(Some(&name("ship1")), 90, NOW);
        assert!(gate.admit(&name("ship1"), Class::Normal, 20, NOW).is_err());
        assert!(gate.admit(&name("ship2"), Class::Normal, 20, NOW).is_ok());
        assert!(gate.admit(&name("base"), Class::Bulk, 2000, NOW).is_ok());
        let views = gate.budgets(&[name("ship1")], NOW);
        assert_eq!(views[0].scope, "ship1");
        assert_eq!(views[0].spent, 90);
        let rows = gate.spent_rows();
        let mut again = Gate::new(gate.plan.clone());
        again.restore(rows);
        assert!(again.admit(&name("ship1"), Class::Normal, 20, NOW).is_err());
    }

    #[test]
    fn windows_open_and_close_per_class() {
        let zi = Path::new("/nonexistent");
        let w = Window::parse("bulk 02:00-04:00", zi).unwrap();
        let plan = Plan {
            windows: vec![w],
            ..Plan::default()
        };
        let mut gate = Gate::new(plan);
        let ship = name("ship1");
        // 14:00: closed for bulk until 02:00 tomorrow, open for the rest.
        let wait = gate.admit(&ship, Class::Bulk, 10, NOW).unwrap_err();
        assert_eq!(wait.until_ms, NOW + 12 * 3_600_000);
        assert!(gate.admit(&ship, Class::Normal, 10, NOW).is_ok());
        assert!(gate.admit(&ship, Class::Urgent, 10, NOW).is_ok());
        let at_three = NOW + 13 * 3_600_000;
        assert!(gate.admit(&ship, Class::Bulk, 10, at_three).is_ok());
        // Wrapping past midnight, and an offset zone.
        let w = Window::parse("22:00-06:00 +02:00", zi).unwrap();
        // 14:00 UTC is 16:00 there: closed until 22:00 local, 20:00 UTC.
        assert_eq!(w.state(NOW), (false, NOW + 6 * 3_600_000));
        assert_eq!(w.state(NOW + 6 * 3_600_000), (true, NOW + 14 * 3_600_000));
        assert!(Window::parse("2-4", zi).is_err());
        assert!(Window::parse("often 02:00-04:00", zi).is_err());
        assert!(Window::parse("02:00-04:00 Mars/Olympus", zi).is_err());
    }

    #[test]
    fn named_zones_come_from_tzif_files() {
        // tzdata is installed by .ci/run where it is missing.
        let zoneinfo = Path::new("/usr/share/zoneinfo");
        let oslo = Zone::parse("Europe/Oslo", zoneinfo).unwrap();
        // December: CET, +1h; July: CEST, +2h.
        assert_eq!(oslo.offset_at((NOW / 1000) as i64), 3600);
        assert_eq!(oslo.offset_at(1_814_400_000), 7200);
    }
}
