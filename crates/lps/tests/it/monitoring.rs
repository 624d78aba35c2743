//! The compose `monitoring` profile: the Grafana dashboard
//! (`monitoring/grafana/dashboards/lps.json`) queries only metrics the services expose, with
//! label values they use, and the Prometheus configurations scrape every service of their
//! compose file and give it the `hop` labels the dashboard selects.
//!
//! The metrics come from a real `lps up ng` (ephemeral ports) after one alarm through an
//! entry and one poison message that legacy-proxy-2 dead-letters, so that the labelled
//! families (publish outcomes, routes, dead-letter reasons) have samples.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Up, repo};
use lps_common::mqtt::mqtt5::{MqttClient, PublishOptions, QoS};

const DASHBOARD: &str = "monitoring/grafana/dashboards/lps.json";
/// Prometheus configuration per compose file.
const PROMETHEUS: [(&str, &str); 2] = [
    (
        "docker-compose-legacy.yml",
        "monitoring/prometheus-legacy.yml",
    ),
    ("docker-compose-ng.yml", "monitoring/prometheus-ng.yml"),
];
/// Labels Prometheus adds (the scrape configuration), not the services.
const SCRAPE_LABELS: [&str; 4] = ["hop", "service", "job", "instance"];

fn yaml(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// PromQL: the selectors of an expression
// ---------------------------------------------------------------------------------------

/// One vector selector: `metric{label="value", ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    metric: String,
    /// `(label, value)` of each `=` matcher (the dashboard uses no other kind).
    equals: Vec<(String, String)>,
}

/// PromQL aggregation operators: `sum by (x) (...)` puts the grouping before the call.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// PromQL words that are not metric names.
const KEYWORDS: [&str; 12] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
];

/// The selectors of `expr`; an error for what this small parser does not know (so that a
/// dashboard edit cannot slip a metric past the test).
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '[' {
            // A range or subquery: `[1m]`, `[$__rate_interval]`.
            i = chars[i..]
                .iter()
                .position(|&c| c == ']')
                .map(|p| i + p + 1)
                .ok_or_else(|| format!("unclosed [ in {expr}"))?;
        } else if c == '"' {
            return Err(format!("a string outside a selector in {expr}"));
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
        } else if word_char(c) {
            let start = i;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            if AGGREGATIONS.contains(&word.as_str()) {
                // Its `by (...)` or its arguments are scanned next.
            } else if KEYWORDS.contains(&word.as_str()) {
                // `by (a, b)`: a label list, not metrics.
                if matches!(word.as_str(), "by" | "without" | "on" | "ignoring")
                    && chars.get(next) == Some(&'(')
                {
                    i = chars[next..]
                        .iter()
                        .position(|&c| c == ')')
                        .map(|p| next + p + 1)
                        .ok_or_else(|| format!("unclosed ( in {expr}"))?;
                }
            } else if chars.get(next) == Some(&'(') {
                // A function call; its arguments are scanned next.
                i = next + 1;
            } else if chars.get(next) == Some(&'{') {
                // Matchers up to the closing brace outside quotes (values may hold braces).
                let mut equals = Vec::new();
                let mut j = next + 1;
                loop {
                    while j < chars.len() && (chars[j].is_whitespace() || chars[j] == ',') {
                        j += 1;
                    }
                    match chars.get(j) {
                        Some('}') => break,
                        None => return Err(format!("unclosed {{ in {expr}")),
                        _ => {}
                    }
                    let label_start = j;
                    while j < chars.len() && word_char(chars[j]) {
                        j += 1;
                    }
                    let label: String = chars[label_start..j].iter().collect();
                    j = skip_ws(j);
                    if chars.get(j) != Some(&'=') || matches!(chars.get(j + 1), Some('~')) {
                        return Err(format!(
                            "matcher on {label} is not label=\"value\" in {expr}"
                        ));
                    }
                    j = skip_ws(j + 1);
                    if chars.get(j) != Some(&'"') {
                        return Err(format!("matcher on {label}: value not quoted in {expr}"));
                    }
                    let value_end = chars[j + 1..]
                        .iter()
                        .position(|&c| c == '"')
                        .map(|p| j + 1 + p)
                        .ok_or_else(|| format!("unclosed quote in {expr}"))?;
                    equals.push((label, chars[j + 1..value_end].iter().collect()));
                    j = value_end + 1;
                }
                let end = j;
                out.push(Selector {
                    metric: word,
                    equals,
                });
                i = end + 1;
            } else {
                out.push(Selector {
                    metric: word,
                    equals: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

#[test]
fn the_promql_reader_finds_metrics_and_matchers_only() {
    let found = selectors(
        r#"histogram_quantile(0.99, sum by (hop, le) (rate(x_bucket{hop="entry", route="/{command}"}[$__rate_interval]))) - sum(y_total)"#,
    )
    .unwrap();
    assert_eq!(
        found,
        [
            Selector {
                metric: "x_bucket".into(),
                equals: vec![
                    ("hop".into(), "entry".into()),
                    ("route".into(), "/{command}".into())
                ],
            },
            Selector {
                metric: "y_total".into(),
                equals: vec![]
            },
        ]
    );
    assert!(selectors(r#"sum(x{route=~"/a.*"})"#).is_err());
    assert!(selectors(r#"x{a!="b"}"#).is_err());
}

// ---------------------------------------------------------------------------------------
// The dashboard and the Prometheus configurations
// ---------------------------------------------------------------------------------------

/// Every `expr` of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join(DASHBOARD)).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            queries.push((title.clone(), expr.to_owned()));
        }
    }
    queries
}

/// `(host:port, hop)` of every target of a Prometheus configuration.
fn scrape_targets(path: &str) -> Vec<(String, String)> {
    let config = yaml(path);
    let mut targets = Vec::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        for group in job["static_configs"].as_array().expect("static_configs") {
            let hop = group["labels"]["hop"]
                .as_str()
                .expect("a hop label")
                .to_owned();
            for target in group["targets"].as_array().expect("targets") {
                targets.push((target.as_str().unwrap().to_owned(), hop.clone()));
            }
        }
    }
    targets
}

#[test]
fn the_dashboard_covers_what_the_issue_asks_for() {
    let titles: BTreeSet<String> = dashboard_queries().into_iter().map(|(t, _)| t).collect();
    for want in [
        "Accepted and delivered per second",
        "Broker backlog (NG)",
        "Retries per second",
        "Dead letters",
        "In-flight work",
        "p99 latency per hop",
    ] {
        assert!(titles.contains(want), "no panel {want:?}: {titles:?}");
    }
}

#[test]
fn prometheus_scrapes_every_service_of_its_compose_file() {
    let dashboard_hops: BTreeSet<String> = dashboard_queries()
        .iter()
        .flat_map(|(_, expr)| selectors(expr).unwrap())
        .flat_map(|s| s.equals)
        .filter(|(label, _)| label == "hop")
        .map(|(_, value)| value)
        .collect();
    for (compose_file, prometheus) in PROMETHEUS {
        let compose = yaml(compose_file);
        let services = compose["services"].as_object().unwrap();
        // Every service with an LPS binary (not Mosquitto, not the profile's own).
        let mut want = BTreeSet::new();
        for (name, service) in services {
            if service.get("profiles").is_some() || service.get("build").is_none() {
                continue;
            }
            let port = if service["command"][0] == "rast-simulator" {
                1337
            } else {
                8080
            };
            want.insert(format!("{name}:{port}"));
        }
        let targets = scrape_targets(prometheus);
        let have: BTreeSet<String> = targets.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(have, want, "{prometheus} against {compose_file}");
        // The profile mounts this configuration.
        let volumes = services["prometheus"]["volumes"].to_string();
        assert!(volumes.contains(prometheus), "{compose_file}: {volumes}");
        // The hops the dashboard selects exist (the legacy file has no bridges).
        let hops: BTreeSet<String> = targets.into_iter().map(|(_, h)| h).collect();
        for hop in ["entry", "simulator"] {
            assert!(hops.contains(hop), "{prometheus}: no hop {hop}");
        }
    }
    let ng_hops: BTreeSet<String> = scrape_targets("monitoring/prometheus-ng.yml")
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    let missing: Vec<&String> = dashboard_hops.difference(&ng_hops).collect();
    assert!(
        missing.is_empty(),
        "the dashboard selects hops no NG target has: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The metrics of a running topology
// ---------------------------------------------------------------------------------------

/// One sample line of the exposition format: metric name and labels.
fn sample(line: &str) -> Option<(String, Vec<(String, String)>)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let end = line.find(['{', ' '])?;
    let name = line[..end].to_owned();
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let close = line.rfind('}')?;
        let mut rest = &line[end + 1..close];
        while let Some((label, after)) = rest.split_once("=\"") {
            let stop = after.find('"')?;
            labels.push((
                label.trim_start_matches(',').trim().to_owned(),
                after[..stop].to_owned(),
            ));
            rest = &after[stop + 1..];
        }
    }
    Some((name, labels))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exposed_by_a_service() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 6, "{queries:?}");
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&["ng"], dir.path().join("run")).await;
    let client = lps_testkit::http1_client();

    // One alarm through an entry: the request, publish and delivery families get samples.
    let entry = &up.services["ars-comp-1-1"];
    let answer = client
        .post(format!("{entry}{}", ars_comp_1::SIMPLE_PATH))
        .header("content-type", "application/json")
        .body(r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    // One poison message: ars-comp-2 rejects it (400), legacy-proxy-2 dead-letters it.
    let broker = up.services["mosquitto"].clone();
    let publisher = MqttClient::new(format!("monitoring-test-{}", std::process::id()));
    publisher.connect(&broker).await.unwrap();
    publisher
        .publish_with_options(
            "proxy1/message",
            b"not json".to_vec(),
            PublishOptions {
                qos: QoS::AtLeastOnce,
                ..PublishOptions::default()
            },
        )
        .await
        .unwrap();

    let http: Vec<(String, String)> = up
        .services
        .iter()
        .filter(|(_, url)| url.starts_with("http://"))
        .map(|(n, u)| (n.clone(), u.clone()))
        .collect();
    let scrape = || async {
        let mut samples: Vec<Sample> = Vec::new();
        for (name, url) in &http {
            let text = lps_testkit::try_scrape(url).await?;
            samples.extend(
                text.lines()
                    .filter_map(sample)
                    .map(|(m, l)| (name.clone(), m, l)),
            );
        }
        Some(samples)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let samples = scrape().await.expect("every service answers /metrics");
        let missing = unmatched(&queries, &samples);
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard queries metrics no service exposes (after 30 s):\n  {}\nexposed: {:?}",
            missing.join("\n  "),
            samples
                .iter()
                .map(|(_, m, _)| m.as_str())
                .collect::<BTreeSet<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The checker itself: a metric or a label value nobody exposes is reported.
    let samples = scrape().await.unwrap();
    let bogus = [
        (
            "x".to_owned(),
            "sum(rate(bridge_no_such_metric_total[1m]))".to_owned(),
        ),
        (
            "y".to_owned(),
            r#"http_requests_total{route="/nowhere"}"#.to_owned(),
        ),
    ];
    assert_eq!(unmatched(&bogus, &samples).len(), 2);
    let _ = publisher.disconnect().await;
    up.stop().await;
}

/// `(service, metric, labels)` of one scraped sample.
type Sample = (String, String, Vec<(String, String)>);

/// The selectors of `queries` (`(panel title, expr)`) that match no sample: a selector
/// matches a sample of its metric that has every `label="value"` it names, except the
/// labels Prometheus adds.
fn unmatched(queries: &[(String, String)], samples: &[Sample]) -> Vec<String> {
    let mut unmatched = Vec::new();
    for (title, expr) in queries {
        for selector in selectors(expr).unwrap_or_else(|e| panic!("{title}: {e}")) {
            let own: Vec<&(String, String)> = selector
                .equals
                .iter()
                .filter(|(l, _)| !SCRAPE_LABELS.contains(&l.as_str()))
                .collect();
            let found = samples.iter().any(|(_, metric, labels)| {
                *metric == selector.metric && own.iter().all(|m| labels.contains(m))
            });
            if !found {
                unmatched.push(format!("{title}: {selector:?}"));
            }
        }
    }
    unmatched
}
