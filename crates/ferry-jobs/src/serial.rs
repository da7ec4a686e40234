//! One thread that runs blocking jobs one after another, for work that the
//! kernel serialises anyway. Buffered writes to one file take its inode
//! lock: from several threads at once they only spin there (9% of the CPU
//! of a copy into tmpfs with 64 writers, 11% of a hydration pass with
//! eight fetches in flight). A thread fed by a queue also saves the
//! hand-over to the blocking pool for every job while the queue is busy.

use std::sync::mpsc;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The queue of one such thread. The thread ends when the last clone is
/// dropped, after the jobs queued before.
#[derive(Clone)]
pub(crate) struct SerialThread {
    name: &'static str,
    jobs: mpsc::Sender<Job>,
}

/// The thread is gone: it could not take the job, or the job panicked.
#[derive(Debug, thiserror::Error)]
#[error("the {0} thread stopped")]
pub(crate) struct Stopped(&'static str);

impl SerialThread {
    /// Starts the thread `name`; it runs `setup` first (say, to lower its
    /// priority).
    pub fn start(name: &'static str, setup: fn()) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                setup();
                for job in rx {
                    job();
                }
            })?;
        Ok(SerialThread { name, jobs: tx })
    }

    /// Runs `f` on the thread after the jobs queued before it, and waits
    /// for its result without blocking the caller's runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| Stopped(self.name))?;
        rx.await.map_err(|_| Stopped(self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_from_many_tasks_run_on_one_thread() {
        let t = SerialThread::start("test-serial", || {}).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..20u32 {
            let tx = tx.clone();
            let t = t.clone();
            // Queued from other tasks at once; each answers its own caller.
            tokio::spawn(async move {
                let got = t
                    .run(move || (i, std::thread::current().id()))
                    .await
                    .unwrap();
                tx.send(got).unwrap();
            });
        }
        drop(tx);
        let got: Vec<_> = tokio::task::spawn_blocking(move || rx.iter().collect())
            .await
            .unwrap();
        let mut ids: Vec<u32> = got.iter().map(|x: &(u32, _)| x.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert!(got.iter().all(|x| x.1 == got[0].1));
        assert_ne!(got[0].1, std::thread::current().id());
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_not_a_hang() {
        let t = SerialThread::start("test-serial", || {}).unwrap();
        let r = t.run(|| -> u8 { panic!("a job failed") }).await;
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("test-serial thread stopped")
        );
        // Later jobs get the same error.
        assert!(t.run(|| 1).await.is_err());
    }
}
