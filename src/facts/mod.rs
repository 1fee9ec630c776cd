//! Facts about a node: what they are, when a change is worth sending, and the
//! change itself. Pure: no I/O (reading them is [`collect`]'s).
//!
//! A node reports its facts to the peers that manage it as [`Body::Facts`] frames
//! on the control lane: a full set on first contact, to a peer's new store, and
//! every `facts_refresh`; otherwise only a change against what it queued on that
//! stream before (the stream delivers every frame once and in order, so the
//! receiver has exactly that). Noisy values must not cost bytes while a node is
//! idle, so each key has a [`Rule`]: load, free memory and disk, and queue depths
//! change something only past a threshold, and counters (the link's bytes) never
//! do by themselves: they ride along when something else is sent. Uptime is not a
//! fact (it changes every second); `boot.time` and `boot.id` are.
//!
//! [`Body::Facts`]: crate::frame::Body::Facts

use std::collections::BTreeMap;

use crate::frame::Facts;

pub mod collect;

/// A node's facts, by key.
pub type Snapshot = BTreeMap<String, String>;

/// Longest fact key and value accepted from a `facts_dir` entry.
pub const MAX_KEY: usize = 64;
pub const MAX_VALUE: usize = 256;

/// When a changed value is worth a frame of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Any change.
    Exact,
    /// Never by itself: sent along with other changes and in full sets.
    Ride,
    /// A number that moved by at least `min`, and by at least `rel` of the value
    /// sent before.
    Moved { min: f64, rel: f64 },
    /// A number that moved by at least `frac` of another fact (a total).
    FractionOf { total: String, frac: f64 },
    /// A count whose order of magnitude changed (0-9, 10-99, ...).
    Decade,
}

/// The rule for `key`. Keys not listed here (custom facts included) are exact.
pub fn rule(key: &str) -> Rule {
    match key {
        "load.15" => Rule::Moved { min: 0.5, rel: 0.5 },
        "load.1" | "load.5" => Rule::Ride,
        // Clock steps (NTP) move the kernel's idea of the boot time a little.
        "boot.time" => Rule::Moved {
            min: 120.0,
            rel: 0.0,
        },
        "mem.available" => Rule::FractionOf {
            total: "mem.total".into(),
            frac: 0.20,
        },
        k if k.starts_with("disk.") && k.ends_with(".free") => Rule::FractionOf {
            total: format!("{}.total", &k[..k.len() - ".free".len()]),
            frac: 0.05,
        },
        k if k.starts_with("queue.") => Rule::Decade,
        // How the link is configured counts; its counters only ride along.
        "link.mode" | "link.poll" => Rule::Exact,
        k if k.starts_with("link.") => Rule::Ride,
        _ => Rule::Exact,
    }
}

/// Whether `old` -> `new` of `key` is worth sending, given the facts now.
fn significant(key: &str, old: &str, new: &str, now: &Snapshot) -> bool {
    if old == new {
        return false;
    }
    let num = |s: &str| s.trim().parse::<f64>().ok();
    match rule(key) {
        Rule::Exact => true,
        Rule::Ride => false,
        Rule::Moved { min, rel } => match (num(old), num(new)) {
            (Some(a), Some(b)) => (b - a).abs() >= min.max(rel * a.abs()),
            _ => true,
        },
        Rule::FractionOf { total, frac } => {
            match (num(old), num(new), now.get(&total).and_then(|t| num(t))) {
                (Some(a), Some(b), Some(t)) if t > 0.0 => (b - a).abs() >= frac * t,
                _ => true,
            }
        }
        Rule::Decade => match (num(old), num(new)) {
            (Some(a), Some(b)) => decade(a) != decade(b),
            _ => true,
        },
    }
}

fn decade(n: f64) -> i32 {
    if n < 10.0 {
        0
    } else {
        n.log10().floor() as i32
    }
}

/// What to send to a peer that holds `sent` (the facts as of the frames queued
/// to it so far), now that the facts are `now`: `None` when nothing changed
/// enough. When something did, the frame carries the changes that count and,
/// riding along, the changed [`Rule::Ride`] keys; values that moved less than
/// their threshold stay as the peer has them (apply the frame to `sent` for what
/// it holds afterwards).
pub fn delta(sent: &Snapshot, now: &Snapshot) -> Option<Facts> {
    let unset: Vec<String> = sent
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    let trigger = unset.iter().any(|k| rule(k) != Rule::Ride)
        || now.iter().any(|(k, v)| match sent.get(k) {
            None => rule(k) != Rule::Ride,
            Some(old) => significant(k, old, v, now),
        });
    if !trigger {
        return None;
    }
    let set = now
        .iter()
        .filter(|(k, v)| match sent.get(*k) {
            None => true,
            Some(old) => old != *v && (rule(k) == Rule::Ride || significant(k, old, v, now)),
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(Facts {
        full: false,
        set,
        unset,
    })
}

/// Every fact, replacing whatever the peer holds.
pub fn full(now: &Snapshot) -> Facts {
    Facts {
        full: true,
        set: now.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        unset: Vec::new(),
    }
}

/// What the receiver holds after applying `f` to `held`.
pub fn apply(held: &mut Snapshot, f: &Facts) {
    if f.full {
        held.clear();
    }
    for k in &f.unset {
        held.remove(k);
    }
    for (k, v) in &f.set {
        held.insert(k.clone(), v.clone());
    }
}

/// `KEY=VALUE` lines (os-release, a facts.d file, a script's output): comments and
/// blank lines skipped, values unquoted (`'...'` or `"..."`, with `\"`, `\\`,
/// `` \` `` and `\$` unescaped in double quotes, as os-release(5) says).
pub fn parse_key_values(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        let k = k.strip_prefix("export ").unwrap_or(k).trim();
        if k.is_empty() {
            continue;
        }
        out.push((k.to_string(), unquote(v.trim())));
    }
    out
}

fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        return v[1..v.len() - 1].to_string();
    }
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        let inner = &v[1..v.len() - 1];
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n @ ('"' | '\\' | '`' | '$')) => out.push(n),
                    Some(n) => {
                        out.push('\\');
                        out.push(n);
                    }
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    v.to_string()
}

/// The OS facts from `/etc/os-release` (`os`: its `ID`, `os.name`: `PRETTY_NAME`,
/// `os.version`: `VERSION_ID`) and, on OpenWrt, `/etc/openwrt_release`
/// (`DISTRIB_*`: `os.version` from `DISTRIB_RELEASE`, `os.target`,
/// `os.revision`), which wins where both say something.
pub fn os_facts(os_release: Option<&str>, openwrt_release: Option<&str>) -> Snapshot {
    let mut out = Snapshot::new();
    if let Some(text) = os_release {
        for (k, v) in parse_key_values(text) {
            let key = match k.as_str() {
                "ID" => "os",
                "PRETTY_NAME" => "os.name",
                "VERSION_ID" => "os.version",
                _ => continue,
            };
            if !v.is_empty() {
                out.insert(key.into(), v);
            }
        }
    }
    if let Some(text) = openwrt_release {
        for (k, v) in parse_key_values(text) {
            let key = match k.as_str() {
                "DISTRIB_ID" => "os",
                "DISTRIB_RELEASE" => "os.version",
                "DISTRIB_DESCRIPTION" => "os.name",
                "DISTRIB_TARGET" => "os.target",
                "DISTRIB_REVISION" => "os.revision",
                _ => continue,
            };
            if v.is_empty() {
                continue;
            }
            let v = if key == "os" { v.to_lowercase() } else { v };
            out.insert(key.into(), v);
        }
    }
    out
}

/// A fact key as `facts_dir` entries may use: `[A-Za-z0-9._-]`, 1 to
/// [`MAX_KEY`] characters.
pub fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One `--where` selector: `KEY=VALUE` or `KEY!=VALUE`, the value a glob (`*`,
/// `?`). A node that has not reported KEY matches neither form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub key: String,
    pub value: String,
    pub negate: bool,
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Selector, String> {
        let (key, value, negate) = match s.split_once("!=") {
            Some((k, v)) => (k, v, true),
            None => match s.split_once('=') {
                Some((k, v)) => (k, v, false),
                None => return Err(format!("{s:?}: expected KEY=VALUE or KEY!=VALUE")),
            },
        };
        let key = key.trim();
        if !valid_key(key) {
            return Err(format!(
                "{s:?}: a fact key is letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(Selector {
            key: key.into(),
            value: value.trim().into(),
            negate,
        })
    }
}

impl Selector {
    pub fn matches(&self, facts: &Snapshot) -> bool {
        match facts.get(&self.key) {
            None => false,
            Some(v) => crate::agent::glob(&self.value, v) != self.negate,
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.negate { "!=" } else { "=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pairs: &[(&str, &str)]) -> Snapshot {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn os_release_is_parsed_with_quotes_and_comments() {
        let text = "# comment\nNAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nID=debian\nHOME_URL='https://www.debian.org/'\nBAD LINE\n";
        let f = os_facts(Some(text), None);
        assert_eq!(f["os"], "debian");
        assert_eq!(f["os.version"], "12");
        assert_eq!(f["os.name"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(f.len(), 3);
        let kv = parse_key_values("A=\"say \\\"hi\\\" \\$HOME\"\nexport B=2\n=x\n");
        assert_eq!(
            kv,
            vec![
                ("A".to_string(), "say \"hi\" $HOME".to_string()),
                ("B".to_string(), "2".to_string())
            ]
        );
    }

    #[test]
    fn openwrt_release_wins_over_os_release() {
        let os = "NAME=\"OpenWrt\"\nVERSION=\"23.05.3\"\nID=\"openwrt\"\nVERSION_ID=\"23.05.3\"\nPRETTY_NAME=\"OpenWrt 23.05.3\"\n";
        let owrt = "DISTRIB_ID='OpenWrt'\nDISTRIB_RELEASE='23.05.3'\nDISTRIB_REVISION='r23809-234f1a2efa'\nDISTRIB_TARGET='ath79/generic'\nDISTRIB_ARCH='mips_24kc'\nDISTRIB_DESCRIPTION='OpenWrt 23.05.3 r23809-234f1a2efa'\nDISTRIB_TAINTS=''\n";
        let f = os_facts(Some(os), Some(owrt));
        assert_eq!(f["os"], "openwrt");
        assert_eq!(f["os.version"], "23.05.3");
        assert_eq!(f["os.target"], "ath79/generic");
        assert_eq!(f["os.revision"], "r23809-234f1a2efa");
        assert_eq!(f["os.name"], "OpenWrt 23.05.3 r23809-234f1a2efa");
        // An old OpenWrt without os-release still says what it is.
        assert_eq!(os_facts(None, Some(owrt))["os"], "openwrt");
        assert!(os_facts(None, None).is_empty());
    }

    #[test]
    fn an_unchanged_or_noisy_change_sends_nothing() {
        let sent = snap(&[
            ("hostname", "ship1"),
            ("load.1", "0.10"),
            ("load.15", "0.05"),
            ("mem.total", "1000"),
            ("mem.available", "500"),
            ("disk.state.total", "10000"),
            ("disk.state.free", "5000"),
            ("queue.outbox", "3"),
            ("link.out.today", "100"),
        ]);
        assert_eq!(delta(&sent, &sent), None);
        let mut now = sent.clone();
        now.insert("load.1".into(), "0.90".into());
        now.insert("load.15".into(), "0.40".into());
        now.insert("mem.available".into(), "350".into());
        now.insert("disk.state.free".into(), "4700".into());
        now.insert("queue.outbox".into(), "9".into());
        now.insert("link.out.today".into(), "90000".into());
        now.insert("link.last_error".into(), "connection reset".into());
        assert_eq!(delta(&sent, &now), None, "below every threshold");
    }

    #[test]
    fn a_real_change_sends_it_with_what_rides_along_but_not_sub_threshold_noise() {
        let sent = snap(&[
            ("hostname", "ship1"),
            ("role", "gateway"),
            ("old", "x"),
            ("link.out.today", "100"),
            ("mem.total", "1000"),
            ("mem.available", "500"),
        ]);
        let mut now = sent.clone();
        now.insert("role".into(), "spare".into());
        now.insert("link.out.today".into(), "300".into());
        now.insert("mem.available".into(), "480".into());
        now.remove("old");
        let d = delta(&sent, &now).expect("a changed custom fact is sent");
        assert!(!d.full);
        assert_eq!(
            d.set,
            vec![
                ("link.out.today".to_string(), "300".to_string()),
                ("role".to_string(), "spare".to_string())
            ]
        );
        assert_eq!(d.unset, vec!["old".to_string()]);
        let mut held = sent.clone();
        apply(&mut held, &d);
        now.insert("mem.available".into(), "500".into());
        assert_eq!(held, now, "the receiver has what counts, noise as before");
        // Past a threshold counts too.
        let mut low = sent.clone();
        low.insert("mem.available".into(), "250".into());
        assert!(delta(&sent, &low).is_some());
        let mut q = snap(&[("queue.inbox", "9")]);
        let before = q.clone();
        q.insert("queue.inbox".into(), "10".into());
        assert!(delta(&before, &q).is_some(), "a new order of magnitude");
    }

    #[test]
    fn a_full_set_replaces_what_the_receiver_held() {
        let mut held = snap(&[("a", "1"), ("gone", "2")]);
        let now = snap(&[("a", "3"), ("b", "4")]);
        let f = full(&now);
        assert!(f.full);
        apply(&mut held, &f);
        assert_eq!(held, now);
    }

    #[test]
    fn selectors_match_reported_facts_only() {
        let facts = snap(&[("arch", "mips"), ("os.version", "23.05.3")]);
        let sel = |s: &str| s.parse::<Selector>().unwrap();
        assert!(sel("arch=mips").matches(&facts));
        assert!(!sel("arch!=mips").matches(&facts));
        assert!(sel("os.version=23.*").matches(&facts));
        assert!(sel("os.version!=22.*").matches(&facts));
        assert!(!sel("os=openwrt").matches(&facts));
        assert!(
            !sel("os!=openwrt").matches(&facts),
            "unknown matches neither"
        );
        assert!("arch".parse::<Selector>().is_err());
        assert!("a b=c".parse::<Selector>().is_err());
        assert_eq!(sel("arch!=mips").to_string(), "arch!=mips");
    }
}
