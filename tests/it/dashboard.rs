//! The Grafana dashboard (`scripts/grafana/normalizer.json`): every panel's
//! query, run against a real Prometheus that scrapes a real `serve` fed by
//! its socket, a NATS feed and an MQTT broker at once, through a killed
//! backend and a database outage, must parse and return series.

use std::time::{Duration, Instant};

use crate::mqtt::Mosquitto;
use crate::nats::{wait_until, Instance, NatsCluster};
use crate::pg::{free_port, PgCluster};
use crate::service::{bin, prometheus_query, start_prometheus};
use crate::support::TestDb;

/// Every query of the dashboard's panels, with the panel's title.
fn queries() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/grafana/normalizer.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            out.push((title.clone(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// The dashboard's variables as Grafana would fill them: every instance,
/// a rate window of a few scrapes.
fn filled(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$__rate_interval", "30s")
}

#[test]
fn every_panel_of_the_dashboard_returns_series_from_a_real_prometheus() {
    let queries = queries();
    let pg = PgCluster::start_new();
    let url = pg.create_database();
    let (provisioning, input) = crate::chaos::input(2_000);
    TestDb::open(&url, normalizer::db::PoolSettings::default()).provision(&provisioning);
    let nats = NatsCluster::start();
    let broker = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("n.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let instance = Instance::serve(
        dir.path(),
        "all",
        &url,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--nats",
            &nats.urls,
            "--mqtt",
            &broker.url(),
            "--metrics-listen",
            &metrics,
        ],
    );
    let (mut prometheus, prometheus_addr) = start_prometheus(dir.path(), &metrics);
    // Feed all three sources, with a killed backend and an outage between.
    let lines: Vec<&str> = input.lines().collect();
    let thirds: Vec<String> = lines
        .chunks(lines.len() / 3 + 1)
        .map(|c| c.join("\n") + "\n")
        .collect();
    let files: Vec<_> = thirds
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let path = dir.path().join(format!("part{i}.jsonl"));
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let run = |args: &[&str], file: &std::path::Path| {
        let out = bin().args(args).arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["send", "--socket", socket.to_str().unwrap()], &files[0]);
    assert!(
        pg.terminate_normalizer_backends(&url) > 0,
        "a backend killed"
    );
    run(&["send", "--nats", &nats.urls], &files[1]);
    pg.stop("fast");
    std::thread::sleep(Duration::from_secs(3));
    pg.start();
    run(&["send", "--mqtt", &broker.url()], &files[2]);
    // Let Prometheus take enough scrapes for every rate window.
    let query = |q: &str| prometheus_query(&prometheus_addr, q);
    wait_until(
        "Prometheus to store the outage",
        Duration::from_secs(60),
        || {
            query("normalizer_outage_seconds_total > 0")["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        },
    );
    let settled = Instant::now();
    let mut missing = Vec::new();
    for (title, expr) in &queries {
        let q = filled(expr);
        // A few scrapes may still be needed for a rate over 30 s.
        let result = loop {
            let answer = query(&q);
            assert_eq!(
                answer["status"], "success",
                "{title}: {q} does not parse: {answer}"
            );
            let result = answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !result.is_empty() || settled.elapsed() > Duration::from_secs(20) {
                break result;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if result.is_empty() {
            missing.push(format!("{title}: {q}"));
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let (status, log) = instance.stop();
    assert!(status.success(), "{log}");
    assert!(
        missing.is_empty(),
        "panels without series:\n{}",
        missing.join("\n")
    );
    println!(
        "dashboard: {} queries of {} panels returned series",
        queries.len(),
        {
            let mut titles: Vec<&String> = queries.iter().map(|(t, _)| t).collect();
            titles.dedup();
            titles.len()
        }
    );
}
