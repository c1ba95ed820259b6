//! The dashboard and alert rules in deploy/ against the real gateway: every metric they
//! name is on its /metrics with the labels they match on, promtool accepts the rules and
//! their unit tests, and a real Prometheus server (Debian's `prometheus` package) scrapes
//! the gateway, loads the rules and answers queries from what it scraped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::binary;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use binary::free_port;
use serde_json::Value;
use support::{client, env, get, metric, ALICE_OID};
use testkit::Scratch;
use tokio::process::{Child, Command};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/dynamics-gateway.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");
const ALERT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/alerts.test.yaml"
);
/// Labels Prometheus adds to every scraped series; never on /metrics itself.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// The path of a binary from Debian's `prometheus` package; a clear failure when it is
/// missing, since these tests are the proof that the deploy files work.
fn required_binary(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: install Debian's prometheus package \
             (`apt-get install -y --no-install-recommends prometheus`, as .ci/run does) to run this test"
        )
    })
}

/// Every PromQL query of the dashboard: panel targets, and the metric queries of its
/// template variables.
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push(expr.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    walk(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 10, "the panels have queries: {queries:?}");
    queries
}

/// `label_values(metric, label)` of the dashboard's query variables, as selectors.
fn dashboard_variable_selectors() -> Vec<Selector> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let selectors: Vec<Selector> = variables
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            let args = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {query}"));
            let (metric, label) = args.split_once(',').expect("label_values(metric, label)");
            Selector {
                name: metric.trim().to_string(),
                labels: vec![label.trim().to_string()],
            }
        })
        .collect();
    assert!(!selectors.is_empty());
    selectors
}

fn alert_rules() -> Vec<(String, String)> {
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(ALERTS).unwrap()).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            out.push((
                rule["alert"].as_str().unwrap().to_string(),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// A series a query reads: the metric name and the label names its matchers use.
#[derive(Debug, PartialEq)]
struct Selector {
    name: String,
    labels: Vec<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index just past the string literal opening at `i`.
fn past_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The index just past the bracket closing the one that opens at `i`, skipping strings.
fn past_closing(chars: &[char], mut i: usize, close: char) -> usize {
    i += 1;
    while i < chars.len() && chars[i] != close {
        i = if matches!(chars[i], '"' | '\'' | '`') {
            past_string(chars, i)
        } else {
            i + 1
        };
    }
    i + 1
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The label names of the matchers in `{...}` opening at `i`, and the index past it.
fn matcher_labels(chars: &[char], mut i: usize) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    i += 1;
    while i < chars.len() && chars[i] != '}' {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = past_string(chars, i);
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            labels.push(chars[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    (labels, i + 1)
}

/// The series a PromQL expression reads. Just enough of PromQL for metric names: string
/// literals, ranges (`[5m]`), Grafana variables and numbers (with duration units) are
/// skipped; an identifier before `(` is a function, and aggregations are known by name
/// (`sum by (x) (...)`); the label lists of `by`/`without`/`on`/`ignoring`/`group_left`/
/// `group_right` are not series; the rest
/// are metric names, with the labels of the matchers that follow them.
fn selectors(expr: &str) -> Vec<Selector> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregations may put `by (...)` before their argument, so they are known by name.
    const OPERATORS: [&str; 20] = [
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = past_string(&chars, i);
        } else if c == '[' {
            i = past_closing(&chars, i, ']');
        } else if c == '{' {
            // A selector without a metric name: none of the deploy files use one.
            panic!("a selector without a metric name in {expr}");
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = past_closing(&chars, i, '}');
            }
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_'))
            {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_spaces(&chars, i);
            let followed_by = chars.get(next).copied();
            if GROUPING.contains(&word.as_str()) {
                if followed_by == Some('(') {
                    i = past_closing(&chars, next, ')');
                }
            } else if OPERATORS.contains(&word.to_ascii_lowercase().as_str())
                || followed_by == Some('(')
            {
                // An operator, or a function or aggregation whose arguments follow.
            } else if followed_by == Some('{') {
                let (labels, after) = matcher_labels(&chars, next);
                out.push(Selector { name: word, labels });
                i = after;
            } else {
                out.push(Selector {
                    name: word,
                    labels: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_the_series_and_nothing_else() {
    let found = selectors(
        "histogram_quantile(0.99, sum by (le, environment) (rate(a_seconds_bucket{environment=~\"$environment\",x!=\"}{\"}[$__rate_interval])))\n\
         / on (instance) group_left (version) b_total offset 5m unless ignoring(job) max(c) by (d) > bool 1e3 \
         and label_replace(e_total, \"class\", \"${1}xx\", \"status\", \"([1-5])..\") or sum without (f) (g:recorded[1h:5m])",
    );
    let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["a_seconds_bucket", "b_total", "c", "e_total", "g:recorded"]
    );
    assert_eq!(found[0].labels, ["environment", "x"]);
}

/// One scrape of /metrics: each family's type, and the label names seen on each sample name.
struct Exposition {
    types: HashMap<String, String>,
    samples: HashMap<String, BTreeSet<String>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = HashMap::new();
        let mut samples: HashMap<String, BTreeSet<String>> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.trim().to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let end = chars.iter().position(|c| *c == '{' || *c == ' ').unwrap();
            let name: String = chars[..end].iter().collect();
            let labels = if chars[end] == '{' {
                matcher_labels(&chars, end).0
            } else {
                Vec::new()
            };
            samples.entry(name).or_default().extend(labels);
        }
        Self { types, samples }
    }

    /// Why `selector` reads nothing on this scrape, if it does not.
    fn problem(&self, selector: &Selector) -> Option<String> {
        let name = &selector.name;
        match self.types.get(name).map(String::as_str) {
            Some(kind @ ("histogram" | "summary")) => {
                return Some(format!(
                    "{name} is a {kind}: its series are {name}_bucket, _sum and _count"
                ))
            }
            Some(_) => {}
            None => {
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                    let family = name.strip_suffix(suffix)?;
                    match self.types.get(family).map(String::as_str) {
                        Some("histogram") => Some(family),
                        Some("summary") if *suffix != "_bucket" => Some(family),
                        _ => None,
                    }
                });
                if family.is_none() {
                    return Some(format!("{name} is not on /metrics"));
                }
            }
        }
        let Some(labels) = self.samples.get(name) else {
            return Some(format!("{name} is declared but has no samples"));
        };
        selector
            .labels
            .iter()
            .find(|l| !labels.contains(*l) && !TARGET_LABELS.contains(&l.as_str()))
            .map(|l| format!("{name} has no label {l} (it has {labels:?})"))
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_on_metrics() {
    let env = env().start().await;
    // The series that need traffic: a forwarded request and a refused token.
    let answer = get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(answer.status(), 200);
    let refused = get(&env.gateway, ACCOUNTS, "not-a-jwt").await;
    assert_eq!(refused.status(), 401);
    let text = support::metrics_text(&env.gateway.admin_url()).await;
    let scrape = Exposition::parse(&text);

    let mut queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .map(|q| ("dashboard".to_string(), q))
        .collect();
    queries.extend(alert_rules());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (origin, query) in &queries {
        let found = selectors(query);
        assert!(!found.is_empty(), "{origin}: no series in {query}");
        for selector in found {
            if let Some(problem) = scrape.problem(&selector) {
                problems.push(format!("{origin}: {problem}\n  in {query}"));
            }
            used.insert(selector.name);
        }
    }
    for selector in dashboard_variable_selectors() {
        if let Some(problem) = scrape.problem(&selector) {
            problems.push(format!("dashboard variable: {problem}"));
        }
        used.insert(selector.name);
    }
    assert!(problems.is_empty(), "{}\n\n{text}", problems.join("\n"));
    // The brief's list, so a panel dropped by accident is noticed.
    for name in [
        "dynamics_gateway_requests_total",
        "dynamics_gateway_request_duration_seconds_bucket",
        "dynamics_gateway_auth_failures_total",
        "dynamics_gateway_token_requests_total",
        "dynamics_gateway_jwks_refresh_total",
        "dynamics_gateway_budget_in_flight",
        "dynamics_gateway_budget_limit",
        "dynamics_gateway_budget_queue_depth",
        "dynamics_gateway_upstream_throttled_total",
        "dynamics_gateway_ready",
    ] {
        assert!(used.contains(name), "{name} is used: {used:?}");
    }

    // A name that is not exported, a bare histogram name and a label it lacks are caught.
    for (bad, why) in [
        ("dynamics_gateway_requests", "not on /metrics"),
        (
            "dynamics_gateway_request_duration_seconds",
            "is a histogram",
        ),
        ("dynamics_gateway_ready_count", "not on /metrics"),
    ] {
        let problem = scrape.problem(&selectors(bad)[0]).unwrap_or_default();
        assert!(problem.contains(why), "{bad}: {problem}");
    }
    let problem = scrape
        .problem(&selectors("dynamics_gateway_auth_failures_total{environment=\"x\"}")[0])
        .unwrap_or_default();
    assert!(problem.contains("no label environment"), "{problem}");
}

fn promtool(args: &[&str]) -> std::process::Output {
    std::process::Command::new(required_binary("promtool"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let check = promtool(&["check", "rules", ALERTS]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "promtool check rules: {out}");
    let rules = alert_rules();
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{out}"
    );
    let tests = promtool(&["test", "rules", ALERT_TESTS]);
    let out = String::from_utf8_lossy(&tests.stdout).into_owned()
        + &String::from_utf8_lossy(&tests.stderr);
    assert!(tests.status.success(), "promtool test rules: {out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test that evaluates it.
    let unit_tests = std::fs::read_to_string(ALERT_TESTS).unwrap();
    for (alert, _) in &rules {
        assert!(
            unit_tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has a unit test in alerts.test.yaml"
        );
    }
}

/// A Prometheus server of our own, on a free loopback port with its data in a temp dir.
struct Prometheus {
    child: Child,
    url: String,
    /// Config, data and log; removed after the server is killed.
    dir: Scratch,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr, rules: &Path) -> Self {
        let binary = required_binary("prometheus");
        let dir = Scratch::new("dgw-prometheus").unwrap();
        let config = dir
            .write(
                "prometheus.yml",
                format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: dynamics-gateway\n    static_configs:\n      - targets: ['{target}']\n",
                    rules = rules.display()
                ),
            )
            .unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        for _ in 0..300 {
            if let Ok(r) = client().get(format!("{}/-/ready", server.url)).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus did not become ready:\n{}", server.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let body = support::json_of(client().get(
            url::Url::parse_with_params(&format!("{}/api/v1/{path}", self.url), query).unwrap(),
        ))
        .await;
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// Polls until `done` accepts the answer (at most 30 s).
    async fn until(
        &self,
        path: &str,
        query: &[(&str, &str)],
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            last = self.api(path, query).await;
            if done(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no answer from {path} {query:?} satisfied the test: {last}\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_and_answers_from_its_series() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    for _ in 0..3 {
        assert_eq!(get(&env.gateway, ACCOUNTS, &token).await.status(), 200);
    }
    const SERIES: &str =
        "dynamics_gateway_requests_total{environment=\"default\",method=\"GET\",status=\"200\"}";
    let exported = metric(&env.gateway, SERIES).await;
    assert_eq!(exported, 3.0);
    let prometheus = Prometheus::start(env.gateway.admin_addr, Path::new(ALERTS)).await;

    let data = prometheus
        .until("query", &[("query", SERIES)], |d| {
            d["result"].as_array().is_some_and(|r| !r.is_empty())
        })
        .await;
    let result = &data["result"][0];
    assert_eq!(
        result["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
        exported,
        "{data}"
    );
    assert_eq!(result["metric"]["job"], "dynamics-gateway");
    assert_eq!(
        result["metric"]["instance"],
        env.gateway.admin_addr.to_string()
    );

    // The real server loads the rules and evaluates each without error.
    let rules = prometheus
        .until("rules", &[("type", "alert")], |d| {
            let rules: Vec<&Value> = d["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
        })
        .await;
    let loaded: BTreeSet<&str> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let ours = alert_rules();
    assert_eq!(
        loaded,
        ours.iter().map(|(name, _)| name.as_str()).collect(),
        "{rules}"
    );
    // The gateway is ready, so its alert is not pending or firing.
    let ready = prometheus
        .api("query", &[("query", "dynamics_gateway_ready")])
        .await;
    assert_eq!(ready["result"][0]["value"][1], "1", "{ready}");

    // Every dashboard query parses and evaluates on the real server, with Grafana's
    // variables as Grafana would fill them for "All".
    for query in dashboard_queries() {
        let filled = query
            .replace("$__rate_interval", "1m")
            .replace("$environment", ".*")
            .replace("$instance", ".*");
        prometheus.api("query", &[("query", &filled)]).await;
    }
}
