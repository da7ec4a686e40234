//! The Prometheus recorder behind `/metrics`. `metrics-exporter-prometheus`
//! earns its place over hand-written text: it owns the exposition format
//! (escaping, histogram buckets, `# TYPE` lines), and its handles are
//! lock-free, so the NBD server's hot path records through the facade
//! with atomic adds. Its own HTTP listener is off: the admin API serves
//! the text, with its roles and mutual TLS. The disks' and jobs' gauges,
//! which the daemon samples at each scrape (a recorder would keep the
//! label sets of deleted ones), are written after the recorder's text
//! with the exporter's own formatting.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use anyhow::Context;
use ferry_daemon::{Daemon, Gauge};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_key, sanitize_label_value, write_type_line,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio_util::sync::CancellationToken;

/// How often recorded histogram samples are folded into their buckets
/// between scrapes (bounds the memory they hold).
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the recorder for the process and hands `daemon` its renderer;
/// the returned task keeps it tidy until `shutdown`.
pub(super) fn install(
    daemon: &Daemon,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(nbd_server::REQUEST_DURATION.to_string()),
            nbd_server::DURATION_BUCKETS,
        )
        .context("metrics buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("cannot install the metrics recorder")?;
    let render = handle.clone();
    daemon.set_metrics(Box::new(move |gauges| {
        let mut text = render.render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        append_gauges(&mut text, gauges);
        text
    }));
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    }))
}

/// Appends sampled gauges: each metric's samples together, under one TYPE
/// line (the format requires a metric's samples to be consecutive).
fn append_gauges(out: &mut String, gauges: &[Gauge]) {
    let mut by_name: BTreeMap<&str, Vec<&Gauge>> = BTreeMap::new();
    for g in gauges {
        by_name.entry(g.name).or_default().push(g);
    }
    for (name, samples) in by_name {
        write_type_line(out, name, None, None, "gauge");
        for g in samples {
            let labels: Vec<String> = g
                .labels
                .iter()
                .map(|(k, v)| format!("{}=\"{}\"", sanitize_label_key(k), sanitize_label_value(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {}", labels.join(","), g.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_grouped_under_one_type_and_labels_escaped() {
        let gauges = [
            Gauge::new("nbdferry_b", &[("disk", "d1")], 1),
            Gauge::new("nbdferry_a", &[("disk", "d\"q")], 2),
            Gauge::new("nbdferry_b", &[("disk", "d2"), ("job", "mirror")], 3),
        ];
        let mut out = String::new();
        append_gauges(&mut out, &gauges);
        assert_eq!(
            out,
            "# TYPE nbdferry_a gauge\n\
             nbdferry_a{disk=\"d\\\"q\"} 2\n\
             # TYPE nbdferry_b gauge\n\
             nbdferry_b{disk=\"d1\"} 1\n\
             nbdferry_b{disk=\"d2\",job=\"mirror\"} 3\n"
        );
    }
}
