//! What one run measured, as the tables `ha-bench` prints and the JSON it writes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::procfs;

/// Footprint rows compared as the idle RSS of a server (etcd, or `ha node`).
pub const IDLE_SERVER: &str = "idle server RSS";
/// Footprint rows compared as the size of a server's binary.
pub const BINARY: &str = "binary";

/// One measured series of gaps.
pub struct Series {
    /// failover, handoff, start → STANDBY.
    pub scenario: &'static str,
    /// raft, etcd, memory, etcd (reference).
    pub backend: &'static str,
    /// What exactly was measured.
    pub variant: String,
    /// The session TTL, where it matters.
    pub ttl: Option<Duration>,
    /// Every sample, in milliseconds.
    pub gaps_ms: Vec<f64>,
}

/// n, p50, p90, p99, max of a series (nearest-rank percentiles).
pub fn summary(values: &[f64]) -> Option<(usize, f64, f64, f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some((n, rank(0.50), rank(0.90), rank(0.99), sorted[n - 1]))
}

impl Series {
    fn json(&self) -> Value {
        let stats = summary(&self.gaps_ms);
        json!({
            "scenario": self.scenario,
            "backend": self.backend,
            "variant": self.variant,
            "ttl_s": self.ttl.map(|t| t.as_secs_f64()),
            "gaps_ms": self.gaps_ms,
            "n": stats.map(|s| s.0),
            "p50_ms": stats.map(|s| s.1),
            "p90_ms": stats.map(|s| s.2),
            "p99_ms": stats.map(|s| s.3),
            "max_ms": stats.map(|s| s.4),
        })
    }

    fn row(&self) -> String {
        let ttl = self
            .ttl
            .map_or_else(|| "-".to_owned(), |t| format!("{:.0} s", t.as_secs_f64()));
        match summary(&self.gaps_ms) {
            Some((n, p50, p90, p99, max)) => {
                let per_ttl = self.ttl.map_or_else(
                    || "-".to_owned(),
                    |t| format!("{:.2}", p99 / (t.as_secs_f64() * 1000.0)),
                );
                format!(
                    "| {} | {} | {} | {ttl} | {n} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {per_ttl} |",
                    self.scenario, self.backend, self.variant
                )
            }
            None => format!(
                "| {} | {} | {} | {ttl} | 0 | - | - | - | - | - |",
                self.scenario, self.backend, self.variant
            ),
        }
    }
}

/// How a table's rows compare with the like-for-like etcd's row.
struct Ratio {
    /// The column's heading.
    column: &'static str,
    /// The number compared, from a row's JSON.
    metric: fn(&Value) -> Option<f64>,
    /// Whether two rows (by their JSON) measure the same thing.
    same: fn(&Value, &Value) -> bool,
}

impl Ratio {
    /// `row`'s metric over that of the row of `reference` that measures the same, as
    /// a cell.
    fn cell(&self, row: &Value, rows: &[&Value], reference: Option<&str>) -> String {
        let Some(reference) = reference else {
            return "-".to_owned();
        };
        let base = rows
            .iter()
            .find(|other| other["backend"] == reference && (self.same)(row, other))
            .and_then(|other| (self.metric)(other));
        match ((self.metric)(row), base) {
            (Some(value), Some(base)) if base > 0.0 => format!("{:.2}", value / base),
            _ => "-".to_owned(),
        }
    }
}

/// The largest number in `value`: itself, or the maximum of an array of numbers.
fn largest(value: &Value) -> Option<f64> {
    match value {
        Value::Array(items) => items.iter().filter_map(Value::as_f64).reduce(f64::max),
        other => other.as_f64(),
    }
}

/// A table of rows that are not gap series: its title, columns, and for each row the
/// cells and the JSON.
pub struct Table {
    title: &'static str,
    columns: &'static [&'static str],
    ratio: Ratio,
    rows: Vec<(Vec<String>, Value)>,
}

impl Table {
    fn new(title: &'static str, columns: &'static [&'static str], ratio: Ratio) -> Self {
        Self {
            title,
            columns,
            ratio,
            rows: Vec::new(),
        }
    }

    fn push(&mut self, cells: Vec<String>, json: Value) {
        self.rows.push((cells, json));
    }

    fn print(&self, reference: Option<&str>) {
        if self.rows.is_empty() {
            return;
        }
        let all: Vec<&Value> = self.rows.iter().map(|(_, json)| json).collect();
        println!("\n{}\n", self.title);
        println!("| {} | {} |", self.columns.join(" | "), self.ratio.column);
        println!("|{}", "---|".repeat(self.columns.len() + 1));
        for (cells, json) in &self.rows {
            let ratio = self.ratio.cell(json, &all, reference);
            println!("| {} | {ratio} |", cells.join(" | "));
        }
    }

    fn json(&self) -> Vec<Value> {
        self.rows.iter().map(|(_, json)| json.clone()).collect()
    }
}

/// `value` (a JSON number or array of numbers) printed with `digits` decimals.
pub fn cell(value: &Value, digits: usize) -> String {
    match value {
        Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| format!("{f:.digits$}")),
        Value::Array(items) => items
            .iter()
            .map(|v| cell(v, digits))
            .collect::<Vec<_>>()
            .join(" / "),
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Everything one run measured.
pub struct Report {
    machine: Value,
    quick: bool,
    /// The backend every row is compared with: the like-for-like etcd.
    reference: Option<&'static str>,
    gaps: Vec<Series>,
    throughput: Table,
    sessions: Table,
    elections: Table,
    placement: Table,
    footprint: Table,
}

impl Report {
    /// An empty report of a run on `machine`.
    pub fn new(machine: Value, quick: bool) -> Self {
        Self {
            machine,
            quick,
            reference: None,
            gaps: Vec::new(),
            throughput: Table::new(
                "Throughput: campaign+resign cycles, one candidate per election",
                &[
                    "backend",
                    "elections at once",
                    "cycles",
                    "cycles/s",
                    "cycle p50 ms",
                    "cycle p99 ms",
                ],
                Ratio {
                    column: "cycles/s ÷ etcd's",
                    metric: |row| row["cycles_per_s"].as_f64(),
                    same: |a, b| a["elections"] == b["elections"],
                },
            ),
            sessions: Table::new(
                "Live sessions, each renewed every TTL/3 (per server: Raft members 1 / 2 / 3, or etcd)",
                &[
                    "backend",
                    "sessions",
                    "TTL s",
                    "renewals/s",
                    "failed renewals",
                    "CPU % of a core, idle",
                    "CPU % of a core",
                    "RSS MiB",
                ],
                Ratio {
                    column: "busiest server's CPU ÷ etcd's",
                    metric: |row| largest(&row["cpu_per_server"]),
                    same: |a, b| a["sessions"] == b["sessions"],
                },
            ),
            elections: Table::new(
                "Many elections, three candidates each: all elected, then every leader resigns (64 at a time)",
                &[
                    "backend",
                    "elections",
                    "all elected s",
                    "all handed off s",
                    "handoff p50 ms",
                    "handoff p99 ms",
                ],
                Ratio {
                    column: "all elected s ÷ etcd's",
                    metric: |row| row["all_elected_s"].as_f64(),
                    same: |a, b| a["elections"] == b["elections"],
                },
            ),
            placement: Table::new(
                "Placement (3 `ha node --active-standby`, TTL 2 s): SIGKILL of the Raft leader's process with the ACTIVE elsewhere, and rolling restarts",
                &[
                    "placement",
                    "leader kills",
                    "ACTIVE kept its role",
                    "skipped (leader on the ACTIVE's member)",
                    "restarts",
                    "restarted ACTIVEs",
                    "handovers",
                    "roles lost",
                    "longest keepalive stall ms",
                ],
                Ratio {
                    column: "",
                    metric: |_| None,
                    same: |_, _| false,
                },
            ),
            footprint: Table::new(
                "Footprint",
                &["what", "backend", "value"],
                Ratio {
                    column: "÷ etcd's",
                    metric: |row| largest(&row["value"]),
                    same: |a, b| !a["compare"].is_null() && a["compare"] == b["compare"],
                },
            ),
        }
    }

    /// Compare every row with `backend`'s (the like-for-like etcd), where it has one.
    pub fn compare_with(&mut self, backend: Option<&'static str>) {
        self.reference = backend;
    }

    /// A series of gaps.
    pub fn series(&mut self, series: Series) {
        self.gaps.push(series);
    }

    /// Start → STANDBY samples of `backend`, added to its one series.
    pub fn start_to_standby(&mut self, backend: &'static str, times: Vec<f64>) {
        let all = self
            .gaps
            .iter_mut()
            .find(|s| s.scenario == "start → STANDBY" && s.backend == backend);
        match all {
            Some(series) => series.gaps_ms.extend(times),
            None => self.gaps.push(Series {
                scenario: "start → STANDBY",
                backend,
                variant: "process restart, data kept".to_owned(),
                ttl: None,
                gaps_ms: times,
            }),
        }
    }

    /// A footprint row: what, on which backend, the value as printed and as JSON, and
    /// what it is compared with etcd's as (`compare`: rows of one kind are compared).
    pub fn footprint(
        &mut self,
        what: &str,
        backend: &str,
        value: String,
        json: Value,
        compare: Option<&str>,
    ) {
        self.footprint.push(
            vec![what.to_owned(), backend.to_owned(), value],
            json!({ "what": what, "backend": backend, "value": json, "compare": compare }),
        );
    }

    /// A size in bytes as a footprint row.
    pub fn footprint_bytes(
        &mut self,
        what: &str,
        backend: &str,
        bytes: u64,
        compare: Option<&str>,
    ) {
        let value = format!("{:.1} MiB", procfs::mib(bytes));
        self.footprint(what, backend, value, json!(bytes), compare);
    }

    /// Rows of the throughput table, as `load::throughput` returns them.
    pub fn throughput(&mut self, rows: Vec<Value>) {
        for row in rows {
            let cells = vec![
                cell(&row["backend"], 0),
                cell(&row["elections"], 0),
                cell(&row["cycles"], 0),
                cell(&row["cycles_per_s"], 0),
                cell(&row["cycle_p50_ms"], 2),
                cell(&row["cycle_p99_ms"], 2),
            ];
            self.throughput.push(cells, row);
        }
    }

    /// A row of the sessions table, as `load::sessions` returns it.
    pub fn sessions(&mut self, row: Value) {
        let percent = |v: &Value| {
            let scaled: Vec<Value> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| json!(x.as_f64().unwrap_or(0.0) * 100.0))
                        .collect()
                })
                .unwrap_or_default();
            cell(&Value::Array(scaled), 1)
        };
        let cells = vec![
            cell(&row["backend"], 0),
            cell(&row["sessions"], 0),
            cell(&row["ttl_s"], 0),
            cell(&row["renewals_per_s"], 0),
            cell(&row["renewal_failures"], 0),
            percent(&row["idle_cpu_per_server"]),
            percent(&row["cpu_per_server"]),
            cell(&row["rss_mib_per_server"], 1),
        ];
        self.sessions.push(cells, row);
    }

    /// A row of the elections table, as `load::elections` returns it.
    pub fn elections(&mut self, row: Value) {
        let cells = vec![
            cell(&row["backend"], 0),
            cell(&row["elections"], 0),
            cell(&row["all_elected_s"], 2),
            cell(&row["all_handed_off_s"], 2),
            cell(&row["handoff_p50_ms"], 1),
            cell(&row["handoff_p99_ms"], 1),
        ];
        self.elections.push(cells, row);
    }

    /// A row of the placement table, as `placement::trials` returns it.
    pub fn placement(&mut self, row: Value) {
        let cells = [
            "placement",
            "leader_kills",
            "kept",
            "together",
            "restarts",
            "restarted_actives",
            "handovers",
            "lost",
        ]
        .iter()
        .map(|key| cell(&row[*key], 0))
        .chain([cell(&row["stall_max_ms"], 1)])
        .collect();
        self.placement.push(cells, row);
    }

    /// Prints every table.
    pub fn print(&self) {
        println!();
        println!(
            "| scenario | backend | variant | TTL | n | p50 ms | p90 ms | p99 ms | max ms | p99/TTL | p99 ÷ etcd's |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let gaps = Ratio {
            column: "",
            metric: |row| row["p99_ms"].as_f64(),
            // Handoffs and restarts do not depend on the TTL.
            same: |a, b| {
                a["scenario"] == b["scenario"]
                    && (a["scenario"] != "failover" || a["ttl_s"] == b["ttl_s"])
            },
        };
        let json: Vec<Value> = self.gaps.iter().map(Series::json).collect();
        let all: Vec<&Value> = json.iter().collect();
        for (series, row) in self.gaps.iter().zip(&json) {
            let ratio = gaps.cell(row, &all, self.reference);
            println!("{} {ratio} |", series.row());
        }
        for table in [
            &self.throughput,
            &self.sessions,
            &self.elections,
            &self.placement,
            &self.footprint,
        ] {
            table.print(self.reference);
        }
    }

    /// Everything, with the machine, as JSON.
    pub fn json(&self) -> Value {
        json!({
            "machine": self.machine,
            "quick": self.quick,
            "compared_with": self.reference,
        "results": self.gaps.iter().map(Series::json).collect::<Vec<_>>(),
            "throughput": self.throughput.json(),
            "sessions": self.sessions.json(),
            "elections": self.elections.json(),
            "placement": self.placement.json(),
            "footprint": self.footprint.json(),
        })
    }

    /// Writes [`Report::json`] to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.json())?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(summary(&values), Some((100, 50.0, 90.0, 99.0, 100.0)));
        assert_eq!(summary(&[3.0]), Some((1, 3.0, 3.0, 3.0, 3.0)));
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn the_json_holds_every_table_and_sample() {
        let mut report = Report::new(json!({"cores": 2}), true);
        report.series(Series {
            scenario: "handoff",
            backend: "memory",
            variant: "in-process".to_owned(),
            ttl: None,
            gaps_ms: vec![1.0, 2.0],
        });
        report.start_to_standby("raft", vec![400.0]);
        report.start_to_standby("raft", vec![420.0]);
        report.throughput(vec![
            json!({"backend": "raft", "elections": 1, "cycles_per_s": 137.2}),
        ]);
        report.footprint_bytes("binary", "-", 2 * 1024 * 1024, None);
        let json = report.json();
        assert_eq!(json["results"][0]["p50_ms"], 1.0);
        assert_eq!(json["results"][1]["gaps_ms"], json!([400.0, 420.0]));
        assert_eq!(json["throughput"][0]["cycles_per_s"], 137.2);
        assert_eq!(json["footprint"][0]["value"], 2 * 1024 * 1024);
        assert_eq!(report.throughput.rows[0].0[0], "raft");
        assert_eq!(report.footprint.rows[0].0[2], "2.0 MiB");
    }

    #[test]
    fn rows_are_compared_with_the_like_for_like_etcd_row_of_the_same_measure() {
        let mut report = Report::new(json!({"cores": 2}), false);
        report.compare_with(Some("etcd (3 members)"));
        report.throughput(vec![
            json!({"backend": "raft", "elections": 1, "cycles_per_s": 150.0}),
            json!({"backend": "raft", "elections": 16, "cycles_per_s": 600.0}),
            json!({"backend": "etcd (3 members)", "elections": 1, "cycles_per_s": 100.0}),
            json!({"backend": "etcd (3 members)", "elections": 16, "cycles_per_s": 1200.0}),
        ]);
        let table = &report.throughput;
        let all: Vec<&Value> = table.rows.iter().map(|(_, json)| json).collect();
        let ratios: Vec<String> = all
            .iter()
            .map(|row| table.ratio.cell(row, &all, report.reference))
            .collect();
        assert_eq!(ratios, ["1.50", "0.50", "1.00", "1.00"]);
        report.footprint_bytes("idle ha node RSS", "raft", 12, Some(IDLE_SERVER));
        report.footprint_bytes("ha binary", "raft", 30, Some(BINARY));
        report.footprint_bytes("etcd binary", "etcd (3 members)", 20, Some(BINARY));
        report.footprint_bytes("disk", "raft", 5, None);
        let table = &report.footprint;
        let all: Vec<&Value> = table.rows.iter().map(|(_, json)| json).collect();
        let ratios: Vec<String> = all
            .iter()
            .map(|row| table.ratio.cell(row, &all, report.reference))
            .collect();
        assert_eq!(ratios, ["-", "1.50", "1.00", "-"]);
    }
}
