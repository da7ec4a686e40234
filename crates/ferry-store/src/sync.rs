//! Group commit: many threads that each need "what I wrote is durable"
//! share one `fdatasync`.
//!
//! Why: a first write to a clean block must make its dirty bit (and, with a
//! snapshot, the preserved old block) durable before the data is written.
//! One sync per write would cap the disk at the sync rate; with a leader
//! that syncs on behalf of everyone who arrived before it started, N
//! concurrent first writes pay about one or two syncs in total.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// Syncs started so far.
    started: u64,
    /// Syncs finished so far (always `started` or `started - 1`).
    done: u64,
    running: bool,
    /// After a failed sync the kernel may have dropped dirty pages, so
    /// nothing written before it can be trusted durable again: every later
    /// call fails too ("fsyncgate").
    poisoned: Option<String>,
}

#[derive(Default)]
pub(crate) struct GroupSync {
    state: Mutex<State>,
    cv: Condvar,
}

impl GroupSync {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once a run of `sync` that *started after this call began*
    /// has completed. `sync` must make durable everything any caller wrote
    /// before calling this; only one caller (the leader) runs it per round.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut s = self.lock();
        // A sync already running may have started before our write landed,
        // so only the next one counts for us.
        let target = s.started + 1;
        let mut sync = Some(sync);
        loop {
            if let Some(msg) = &s.poisoned {
                return Err(io::Error::other(format!("earlier sync failed: {msg}")));
            }
            if s.done >= target {
                return Ok(());
            }
            if !s.running {
                s.started += 1;
                s.running = true;
                let mine = s.started;
                drop(s);
                let f = sync.take().expect("a caller leads at most one round");
                let r = f();
                s = self.lock();
                s.running = false;
                s.done = mine;
                if let Err(e) = &r {
                    s.poisoned = Some(e.to_string());
                }
                self.cv.notify_all();
                return r;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn concurrent_callers_share_syncs() {
        let g = Arc::new(GroupSync::default());
        let runs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, runs) = (g.clone(), runs.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        g.sync(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = runs.load(Ordering::SeqCst);
        assert!(n < 16 * 50, "expected shared syncs, got {n} for 800 calls");
    }

    #[test]
    fn failure_poisons() {
        let g = GroupSync::default();
        assert!(g.sync(|| Err(io::Error::other("disk gone"))).is_err());
        assert!(g.sync(|| Ok(())).is_err());
    }
}
