//! `/metrics`: the Prometheus text the binary's recorder renders. Counters
//! of the NBD server are recorded where they happen; the state of disks
//! and jobs is sampled into gauges here, at each scrape, so that nothing
//! runs between scrapes and nothing is recorded on the I/O path for it.

use std::sync::OnceLock;

use metrics::gauge;

use crate::error::ServiceError;
use crate::service::{Daemon, Sample};

/// Renders every recorded metric in the text exposition format.
pub type Render = Box<dyn Fn() -> String + Send + Sync>;

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
        record(self.sample());
        Ok(render())
    }
}

fn record(s: Sample) {
    for (disk, d) in s.disks {
        let gran = d.granularity();
        let snapshots = d.snapshots();
        gauge!("nbdferry_disk_snapshots", "disk" => disk.clone()).set(snapshots.len() as f64);
        for snap in snapshots {
            gauge!("nbdferry_snapshot_preserved_bytes", "disk" => disk.clone(), "snapshot" => snap.name)
                .set((snap.preserved_blocks * gran) as f64);
        }
        for c in d.checkpoints() {
            gauge!("nbdferry_checkpoint_dirty_bytes", "disk" => disk.clone(), "checkpoint" => c.name)
                .set((c.dirty_blocks * c.granularity) as f64);
        }
    }
    for h in s.hydrations {
        let disk = h.disk;
        gauge!("nbdferry_job_done_bytes", "job" => "hydration", "disk" => disk.clone())
            .set(h.present_bytes as f64);
        gauge!("nbdferry_job_total_bytes", "job" => "hydration", "disk" => disk.clone())
            .set(h.total_bytes as f64);
        gauge!("nbdferry_job_rate_bytes_per_second", "job" => "hydration", "disk" => disk)
            .set(h.rate as f64);
    }
    for m in s.mirrors {
        let disk = m.disk;
        gauge!("nbdferry_job_done_bytes", "job" => "mirror", "disk" => disk.clone())
            .set(m.bytes_sent as f64);
        gauge!("nbdferry_job_remaining_bytes", "job" => "mirror", "disk" => disk.clone())
            .set(m.dirty_bytes as f64);
        gauge!("nbdferry_job_rate_bytes_per_second", "job" => "mirror", "disk" => disk)
            .set(m.link_rate as f64);
    }
}
