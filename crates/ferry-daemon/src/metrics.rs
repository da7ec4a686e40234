//! `/metrics`: the Prometheus text the binary's recorder renders. Counters
//! of the NBD server are recorded where they happen; the state of disks
//! and jobs is sampled at each scrape and written after them here, so that
//! nothing runs between scrapes and nothing is recorded on the I/O path
//! for it. Sampled, not recorded: a recorder keeps every label set it has
//! seen, and a deleted snapshot or a finished job would be reported for
//! as long as the daemon runs.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::OnceLock;

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
        let mut text = render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        exposition(&gauges(self.sample()), &mut text);
        Ok(text)
    }
}

/// One sampled value: its metric, labels and value.
struct Gauge {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    value: u64,
}

fn gauge(name: &'static str, labels: &[(&'static str, &str)], value: u64) -> Gauge {
    Gauge {
        name,
        labels: labels.iter().map(|&(k, v)| (k, v.to_string())).collect(),
        value,
    }
}

/// The disks' and jobs' gauges, as they are now.
fn gauges(s: Sample) -> Vec<Gauge> {
    let mut out = Vec::new();
    for (disk, d) in s.disks {
        let disk = disk.as_str();
        let gran = d.granularity();
        let snapshots = d.snapshots();
        out.push(gauge(
            "nbdferry_disk_snapshots",
            &[("disk", disk)],
            snapshots.len() as u64,
        ));
        for snap in snapshots {
            out.push(gauge(
                "nbdferry_snapshot_preserved_bytes",
                &[("disk", disk), ("snapshot", &snap.name)],
                snap.preserved_blocks * gran,
            ));
        }
        for c in d.checkpoints() {
            out.push(gauge(
                "nbdferry_checkpoint_dirty_bytes",
                &[("disk", disk), ("checkpoint", &c.name)],
                c.dirty_blocks * c.granularity,
            ));
        }
    }
    for h in s.hydrations {
        let l = [("job", "hydration"), ("disk", h.disk.as_str())];
        out.push(gauge("nbdferry_job_done_bytes", &l, h.present_bytes));
        out.push(gauge("nbdferry_job_total_bytes", &l, h.total_bytes));
        out.push(gauge("nbdferry_job_rate_bytes_per_second", &l, h.rate));
    }
    for m in s.mirrors {
        let l = [("job", "mirror"), ("disk", m.disk.as_str())];
        out.push(gauge("nbdferry_job_done_bytes", &l, m.bytes_sent));
        out.push(gauge("nbdferry_job_remaining_bytes", &l, m.dirty_bytes));
        out.push(gauge("nbdferry_job_rate_bytes_per_second", &l, m.link_rate));
    }
    out
}

/// Appends `gauges` in the text exposition format: each metric's samples
/// together, under one TYPE line.
fn exposition(gauges: &[Gauge], out: &mut String) {
    let mut by_name: BTreeMap<&str, Vec<&Gauge>> = BTreeMap::new();
    for g in gauges {
        by_name.entry(g.name).or_default().push(g);
    }
    for (name, samples) in by_name {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for g in samples {
            let labels: Vec<String> = g
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {}", labels.join(","), g.value);
        }
    }
}

/// A label value as the text format quotes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_grouped_under_one_type_and_labels_escaped() {
        let gauges = [
            gauge("nbdferry_b", &[("disk", "d1")], 1),
            gauge("nbdferry_a", &[("disk", "d\"q\\\n")], 2),
            gauge("nbdferry_b", &[("disk", "d2"), ("job", "mirror")], 3),
        ];
        let mut out = String::new();
        exposition(&gauges, &mut out);
        assert_eq!(
            out,
            "# TYPE nbdferry_a gauge\n\
             nbdferry_a{disk=\"d\\\"q\\\\\\n\"} 2\n\
             # TYPE nbdferry_b gauge\n\
             nbdferry_b{disk=\"d1\"} 1\n\
             nbdferry_b{disk=\"d2\",job=\"mirror\"} 3\n"
        );
    }
}
