//! `/metrics`: the Prometheus text the binary's recorder renders. Counters
//! of the NBD server are recorded where they happen; the state of disks
//! and jobs is sampled here at each scrape and handed to the renderer,
//! which writes it after them, so that nothing runs between scrapes and
//! nothing is recorded on the I/O path for it. Sampled, not recorded: a
//! recorder keeps every label set it has seen, and a deleted snapshot or a
//! finished job would be reported for as long as the daemon runs.

use std::sync::OnceLock;

use crate::error::ServiceError;
use crate::service::{Daemon, Sample};

/// Renders every recorded metric, then the sampled gauges, in the text
/// exposition format.
pub type Render = Box<dyn Fn(&[Gauge]) -> String + Send + Sync>;

#[derive(Default)]
pub(crate) struct Renderer(OnceLock<Render>);

impl Renderer {
    pub(crate) fn set(&self, render: Render) {
        let _ = self.0.set(render);
    }
}

impl Daemon {
    /// Serves `/metrics` with `render` (installed once, by the owner of
    /// the recorder).
    pub fn set_metrics(&self, render: Render) {
        self.renderer().set(render);
    }

    /// The metrics text, after sampling disks and jobs. Reads bitmaps:
    /// call it off the async workers.
    pub fn metrics(&self) -> Result<String, ServiceError> {
        let render = self
            .renderer()
            .0
            .get()
            .ok_or_else(|| ServiceError::NotFound("this daemon records no metrics".into()))?;
        Ok(render(&gauges(self.sample())))
    }
}

/// One sampled value: its metric, labels and value.
pub struct Gauge {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

impl Gauge {
    pub fn new(name: &'static str, labels: &[(&'static str, &str)], value: u64) -> Gauge {
        Gauge {
            name,
            labels: labels.iter().map(|&(k, v)| (k, v.to_string())).collect(),
            value,
        }
    }
}

/// The disks' and jobs' gauges, as they are now.
fn gauges(s: Sample) -> Vec<Gauge> {
    let mut out = Vec::new();
    for (disk, d) in s.disks {
        let disk = disk.as_str();
        let gran = d.granularity();
        let snapshots = d.snapshots();
        out.push(Gauge::new(
            "nbdferry_disk_snapshots",
            &[("disk", disk)],
            snapshots.len() as u64,
        ));
        for snap in snapshots {
            out.push(Gauge::new(
                "nbdferry_snapshot_preserved_bytes",
                &[("disk", disk), ("snapshot", &snap.name)],
                snap.preserved_blocks * gran,
            ));
        }
        for c in d.checkpoints() {
            out.push(Gauge::new(
                "nbdferry_checkpoint_dirty_bytes",
                &[("disk", disk), ("checkpoint", &c.name)],
                c.dirty_blocks * c.granularity,
            ));
        }
    }
    for h in s.hydrations {
        let l = [("job", "hydration"), ("disk", h.disk.as_str())];
        out.push(Gauge::new("nbdferry_job_done_bytes", &l, h.present_bytes));
        out.push(Gauge::new("nbdferry_job_total_bytes", &l, h.total_bytes));
        out.push(Gauge::new("nbdferry_job_rate_bytes_per_second", &l, h.rate));
    }
    for m in s.mirrors {
        let l = [("job", "mirror"), ("disk", m.disk.as_str())];
        out.push(Gauge::new("nbdferry_job_done_bytes", &l, m.bytes_sent));
        out.push(Gauge::new(
            "nbdferry_job_remaining_bytes",
            &l,
            m.dirty_bytes,
        ));
        out.push(Gauge::new(
            "nbdferry_job_rate_bytes_per_second",
            &l,
            m.link_rate,
        ));
    }
    out
}
