//! What the scenarios measured: figures, each optionally against a baseline from the
//! same run and a target from issue 7, printed as a table and written as JSON.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// The bar a figure is held to. It applies to the ratio when the figure has a
/// baseline, else to the value itself.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn holds(self, x: f64) -> bool {
        match self {
            Target::AtLeast(t) => x >= t,
            Target::AtMost(t) => x <= t,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {}", short(t)),
            Target::AtMost(t) => format!("<= {}", short(t)),
        }
    }
}

/// One measured number.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Scenario number and name, e.g. "1 replay".
    pub scenario: String,
    /// What was measured, e.g. "100k small messages, msgs/s".
    pub what: String,
    pub value: f64,
    pub unit: String,
    /// The system compared against and its value, measured in the same run.
    pub baseline: Option<(String, f64)>,
    pub target: Option<Target>,
}

impl Figure {
    pub fn new(scenario: &str, what: &str, value: f64, unit: &str) -> Figure {
        Figure {
            scenario: scenario.into(),
            what: what.into(),
            value,
            unit: unit.into(),
            baseline: None,
            target: None,
        }
    }

    /// Compares with `value` of `system`; the ratio is this figure's value over it.
    pub fn against(mut self, system: &str, value: f64) -> Figure {
        self.baseline = Some((system.into(), value));
        self
    }

    pub fn target(mut self, t: Target) -> Figure {
        self.target = Some(t);
        self
    }

    /// Value over baseline; none without a baseline or when the baseline is 0
    /// (messages lost: 0 against 0 is no ratio).
    pub fn ratio(&self) -> Option<f64> {
        match &self.baseline {
            Some((_, b)) if *b != 0.0 => Some(self.value / b),
            _ => None,
        }
    }

    /// Whether the target holds; `None` without a target.
    pub fn meets(&self) -> Option<bool> {
        let t = self.target?;
        Some(t.holds(self.ratio().unwrap_or(self.value)))
    }
}

/// Everything one run measured, plus free-form notes (losses, machine, caveats).
#[derive(Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(&mut self, f: Figure) {
        eprintln!("  {}", line(&f));
        self.figures.push(f);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("  note: {s}");
        self.notes.push(s);
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| scenario | figure | outpost | baseline | ratio | target | met |"
        );
        let _ = writeln!(out, "| --- | --- | ---: | --- | ---: | --- | --- |");
        for f in &self.figures {
            let base = match &f.baseline {
                Some((name, v)) => format!("{name}: {} {}", short(*v), f.unit),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} {} | {} | {} | {} | {} |",
                f.scenario,
                f.what,
                short(f.value),
                f.unit,
                base,
                f.ratio().map(|r| format!("{r:.3}")).unwrap_or_default(),
                f.target.map(Target::describe).unwrap_or_default(),
                match f.meets() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                }
            );
        }
        out
    }

    pub fn json(&self, machine: &Value) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "scenario": f.scenario,
                    "figure": f.what,
                    "value": f.value,
                    "unit": f.unit,
                    "baseline": f.baseline.as_ref().map(|(n, v)| json!({ "system": n, "value": v })),
                    "ratio": f.ratio(),
                    "target": f.target.map(Target::describe),
                    "met": f.meets(),
                })
            })
            .collect();
        json!({ "machine": machine, "figures": figures, "notes": self.notes })
    }
}

fn line(f: &Figure) -> String {
    let mut s = format!("{} {}: {} {}", f.scenario, f.what, short(f.value), f.unit);
    if let (Some((name, v)), Some(r)) = (&f.baseline, f.ratio()) {
        let _ = write!(s, " vs {name} {} (ratio {r:.3})", short(*v));
    }
    if let (Some(t), Some(ok)) = (f.target, f.meets()) {
        let _ = write!(
            s,
            " target {} {}",
            t.describe(),
            if ok { "met" } else { "MISSED" }
        );
    }
    s
}

/// A number with at most 3 significant decimals and thousands separators.
pub fn short(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    let s = if a >= 1000.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.3}")
    } else {
        format!("{x:.4}")
    };
    group(&s)
}

fn group(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map_or(("", s), |r| ("-", r));
    let (int, frac) = rest
        .split_once('.')
        .map_or((rest, None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}
