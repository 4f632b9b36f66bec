//! The table every section adds rows to: a figure, the baseline it is judged against
//! (measured in the same run), the target, and whether it was met.

#![allow(dead_code)] // shared by every section; not each uses all of it

/// What a figure must be to meet its target.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
pub enum Target {
    /// The value itself at least this.
    AtLeast(f64),
    /// The value itself at most this.
    AtMost(f64),
    /// value / baseline at least this.
    RatioAtLeast(f64),
    /// value / baseline at most this.
    RatioAtMost(f64),
    /// Shown for context; judged by nothing.
    None,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub section: String,
    pub figure: String,
    pub value: f64,
    pub unit: String,
    /// (what, value) in the same unit.
    pub baseline: Option<(String, f64)>,
    pub target: Target,
}

impl Row {
    pub fn new(section: &str, figure: impl Into<String>, value: f64, unit: &str) -> Self {
        Row {
            section: section.into(),
            figure: figure.into(),
            value,
            unit: unit.into(),
            baseline: None,
            target: Target::None,
        }
    }
    pub fn baseline(mut self, what: impl Into<String>, value: f64) -> Self {
        self.baseline = Some((what.into(), value));
        self
    }
    pub fn target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|(_, b)| *b != 0.0)
            .map(|(_, b)| self.value / b)
    }

    /// `Some(true)` met, `Some(false)` missed, `None` nothing to judge.
    pub fn met(&self) -> Option<bool> {
        match self.target {
            Target::AtLeast(t) => Some(self.value >= t),
            Target::AtMost(t) => Some(self.value <= t),
            Target::RatioAtLeast(t) => self.ratio().map(|r| r >= t),
            Target::RatioAtMost(t) => self.ratio().map(|r| r <= t),
            Target::None => None,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(t) => format!("≥ {} {}", num(t), self.unit),
            Target::AtMost(t) => format!("≤ {} {}", num(t), self.unit),
            Target::RatioAtLeast(t) => format!("≥ {}× baseline", ratio_text(t)),
            Target::RatioAtMost(t) => format!("≤ {}× baseline", ratio_text(t)),
            Target::None => String::new(),
        }
    }
}

/// A ratio with no more than 3 decimals, trailing zeros cut (0.952, 1.05, 0.9).
fn ratio_text(t: f64) -> String {
    let text = format!("{t:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A number as people read it: no more digits than it deserves.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub struct Report {
    machine: String,
    rows: Vec<Row>,
    failures: Vec<(String, String)>,
}

impl Report {
    pub fn new(machine: String) -> Self {
        Report {
            machine,
            rows: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Add a row, and print it at once (a long run shows its progress).
    pub fn add(&mut self, row: Row) {
        eprintln!("perf:   {}", line(&row));
        self.rows.push(row);
    }

    pub fn failed(&mut self, section: &str, why: &str) {
        self.failures.push((section.into(), why.into()));
    }

    /// The whole table, in Markdown, on stdout.
    pub fn print(&self) {
        println!("\n{}\n", self.machine);
        println!("| section | figure | tasuki | baseline | ratio | target | |");
        println!("|---|---|---:|---|---:|---|---|");
        for row in &self.rows {
            println!("{}", line(row));
        }
        for (section, why) in &self.failures {
            println!("| {section} | section failed: {why} | | | | | ✗ |");
        }
    }
}

fn line(row: &Row) -> String {
    let baseline = row
        .baseline
        .as_ref()
        .map(|(what, v)| format!("{what}: {} {}", num(*v), row.unit))
        .unwrap_or_default();
    let ratio = row.ratio().map(|r| format!("{r:.2}×")).unwrap_or_default();
    let verdict = match row.met() {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    };
    format!(
        "| {} | {} | {} {} | {} | {} | {} | {} |",
        row.section,
        row.figure,
        num(row.value),
        row.unit,
        baseline,
        ratio,
        row.target_text(),
        verdict
    )
}
