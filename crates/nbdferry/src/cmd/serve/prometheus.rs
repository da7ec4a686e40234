//! The Prometheus recorder behind `/metrics`. `metrics-exporter-prometheus`
//! earns its place over hand-written text: it owns the exposition format
//! (escaping, histogram buckets, `# TYPE` lines), and its handles are
//! lock-free, so the NBD server's hot path records through the facade
//! with atomic adds. Its own HTTP listener is off: the admin API serves
//! the text, with its roles and mutual TLS, and appends the disks' and
//! jobs' gauges, which it samples at each scrape (`ferry_daemon`'s
//! metrics module: a recorder would keep the label sets of deleted ones).

use std::time::Duration;

use anyhow::Context;
use ferry_daemon::Daemon;
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
    daemon.set_metrics(Box::new(move || render.render()));
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
