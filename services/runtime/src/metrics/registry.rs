//! A small Prometheus registry: counters, gauges and histograms with labels, rendered in the text
//! exposition format (0.0.4). Collectors add families computed at scrape time (jobs by state, process stats).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{LazyLock, Mutex};

/// A labelled family's values, keyed by label values.
type Values<T> = Mutex<BTreeMap<Vec<String>, T>>;

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(names: &[&str], values: &[String], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// A float in the exposition format.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn key(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

/// A counter or gauge family.
pub struct Scalar {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    label_names: &'static [&'static str],
    values: Values<f64>,
}

impl Scalar {
    /// A counter (name ends in `_total`).
    pub const fn counter(name: &'static str, help: &'static str, label_names: &'static [&'static str]) -> Self {
        Self { name, help, kind: "counter", label_names, values: Mutex::new(BTreeMap::new()) }
    }
    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str, label_names: &'static [&'static str]) -> Self {
        Self { name, help, kind: "gauge", label_names, values: Mutex::new(BTreeMap::new()) }
    }
    /// Adds `v` to the series of `label_values`.
    pub fn add(&self, label_values: &[&str], v: f64) {
        *self.values.lock().expect("lock").entry(key(label_values)).or_insert(0.0) += v;
    }
    /// Adds one.
    pub fn inc(&self, label_values: &[&str]) {
        self.add(label_values, 1.0);
    }
    /// Sets the series (gauges).
    pub fn set(&self, label_values: &[&str], v: f64) {
        self.values.lock().expect("lock").insert(key(label_values), v);
    }
    /// The series' value (0 when never set).
    pub fn get(&self, label_values: &[&str]) -> f64 {
        self.values.lock().expect("lock").get(&key(label_values)).copied().unwrap_or(0.0)
    }
    /// The family's series now.
    pub fn snapshot(&self) -> Snapshot {
        let values = self.values.lock().expect("lock");
        let series = values.iter().map(|(lv, v)| (pairs(self.label_names, lv), *v)).collect();
        Snapshot { name: self.name, help: self.help, kind: self.kind, points: Points::Scalar(series) }
    }
}

/// One histogram series: per-bucket counts (not cumulative), sum, count.
#[derive(Clone)]
struct Series {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram family.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    buckets: &'static [f64],
    values: Values<Series>,
}

impl Histogram {
    /// A histogram with upper bounds `buckets` (increasing; +Inf is implied).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        Self { name, help, label_names, buckets, values: Mutex::new(BTreeMap::new()) }
    }
    /// Records one observation.
    pub fn observe(&self, label_values: &[&str], v: f64) {
        let mut values = self.values.lock().expect("lock");
        let s = values.entry(key(label_values)).or_insert_with(|| Series {
            counts: vec![0; self.buckets.len()],
            sum: 0.0,
            count: 0,
        });
        if let Some(i) = self.buckets.iter().position(|b| v <= *b) {
            s.counts[i] += 1;
        }
        s.sum += v;
        s.count += 1;
    }
    /// Observations of a series so far.
    pub fn count(&self, label_values: &[&str]) -> u64 {
        self.values.lock().expect("lock").get(&key(label_values)).map(|s| s.count).unwrap_or(0)
    }
    /// The family's series now.
    pub fn snapshot(&self) -> Snapshot {
        let values = self.values.lock().expect("lock");
        let series = values
            .iter()
            .map(|(lv, s)| {
                let mut counts = s.counts.clone();
                counts.push(s.count - s.counts.iter().sum::<u64>());
                HistogramPoint { labels: pairs(self.label_names, lv), counts, sum: s.sum, count: s.count }
            })
            .collect();
        Snapshot {
            name: self.name,
            help: self.help,
            kind: "histogram",
            points: Points::Histogram(self.buckets, series),
        }
    }
}

/// Label pairs of a series.
pub type Labels = Vec<(String, String)>;

fn pairs(names: &[&str], values: &[String]) -> Labels {
    names.iter().zip(values).map(|(n, v)| ((*n).to_owned(), v.clone())).collect()
}

/// One histogram series: counts per bucket (not cumulative; the last is above every bound), sum, count.
#[derive(Debug, Clone)]
pub struct HistogramPoint {
    /// Labels.
    pub labels: Labels,
    /// Per-bucket counts, the overflow bucket last.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

/// A family's values at one moment.
#[derive(Debug, Clone)]
pub enum Points {
    /// Counter or gauge series.
    Scalar(Vec<(Labels, f64)>),
    /// Bucket upper bounds and series.
    Histogram(&'static [f64], Vec<HistogramPoint>),
}

/// A family at one moment (for exporters other than the text format).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Name.
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Values.
    pub points: Points,
}

/// A family computed at scrape time: (name, help, type, [(labels, value)]).
pub struct Collected {
    /// Metric name.
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    /// Series: label pairs and value.
    pub series: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// A source of scrape-time families.
pub type Collector = Box<dyn Fn() -> Vec<Collected> + Send + Sync>;

static COLLECTORS: LazyLock<Mutex<Vec<Collector>>> = LazyLock::new(|| Mutex::new(vec![]));

/// Adds a scrape-time collector (for the life of the process).
pub fn add_collector(c: Collector) {
    COLLECTORS.lock().expect("lock").push(c);
}

/// Snapshots of every collector's families; families several collectors report (one per hosted service)
/// are merged by name.
pub fn collected() -> Vec<Snapshot> {
    let mut merged: BTreeMap<&'static str, Snapshot> = BTreeMap::new();
    for c in COLLECTORS.lock().expect("lock").iter() {
        for f in c() {
            let series: Vec<(Labels, f64)> = f
                .series
                .into_iter()
                .map(|(ls, v)| (ls.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(), v))
                .collect();
            match merged.get_mut(f.name) {
                Some(Snapshot { points: Points::Scalar(s), .. }) => s.extend(series),
                _ => {
                    merged.insert(
                        f.name,
                        Snapshot { name: f.name, help: f.help, kind: f.kind, points: Points::Scalar(series) },
                    );
                }
            }
        }
    }
    merged.into_values().collect()
}

/// The text exposition (format 0.0.4) of `families`.
pub fn render(families: &[Snapshot]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
        let lbl = |ls: &Labels, extra: Option<(&str, &str)>| {
            let names: Vec<&str> = ls.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<String> = ls.iter().map(|(_, v)| v.clone()).collect();
            labels(&names, &values, extra)
        };
        match &f.points {
            Points::Scalar(series) => {
                for (ls, v) in series {
                    let _ = writeln!(out, "{}{} {}", f.name, lbl(ls, None), num(*v));
                }
            }
            Points::Histogram(bounds, series) => {
                for h in series {
                    let mut cum = 0;
                    for (b, c) in bounds.iter().zip(&h.counts) {
                        cum += c;
                        let _ = writeln!(out, "{}_bucket{} {cum}", f.name, lbl(&h.labels, Some(("le", &num(*b)))));
                    }
                    let _ = writeln!(out, "{}_bucket{} {}", f.name, lbl(&h.labels, Some(("le", "+Inf"))), h.count);
                    let _ = writeln!(out, "{}_sum{} {}", f.name, lbl(&h.labels, None), num(h.sum));
                    let _ = writeln!(out, "{}_count{} {}", f.name, lbl(&h.labels, None), h.count);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        static C: Scalar = Scalar::counter("t_requests_total", "Requests.", &["method", "code"]);
        static H: Histogram = Histogram::new("t_latency_seconds", "Latency.", &["method"], &[0.1, 1.0]);
        C.inc(&["Get", "OK"]);
        C.add(&["Get", "OK"], 2.0);
        C.inc(&["Say \"hi\"\n", "NOT_FOUND"]);
        H.observe(&["Get"], 0.05);
        H.observe(&["Get"], 0.5);
        H.observe(&["Get"], 7.0);
        let text = render(&[C.snapshot(), H.snapshot()]);
        assert!(text.contains("# TYPE t_requests_total counter\n"), "{text}");
        assert!(text.contains("t_requests_total{method=\"Get\",code=\"OK\"} 3\n"), "{text}");
        assert!(text.contains("t_requests_total{method=\"Say \\\"hi\\\"\\n\",code=\"NOT_FOUND\"} 1\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{method=\"Get\",le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{method=\"Get\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{method=\"Get\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("t_latency_seconds_sum{method=\"Get\"} 7.55\n"), "{text}");
        assert!(text.contains("t_latency_seconds_count{method=\"Get\"} 3\n"), "{text}");
    }
}
