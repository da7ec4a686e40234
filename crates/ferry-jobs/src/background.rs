//! Work that must yield to clients' requests (a hydration pass): a runtime
//! of its own, on threads at a lower CPU priority. On the runtime that
//! serves clients, the pass's wakeups and file writes took turns with
//! their requests on the same workers; here the scheduler gives the pass
//! what clients leave of the CPUs, and all of an idle machine.

use std::sync::Mutex;

use tokio::runtime::{Builder, Handle, Runtime};

/// Nice value of the background threads: against one busy nice-0 thread
/// a nice-10 one gets about a tenth of a CPU, several times what a paced
/// pass needs.
const NICE: i32 = 10;

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// The background runtime, started on first use: two workers (a pass at
/// full speed keeps both busy: it receives and writes at once) and its
/// blocking pool, all at [`NICE`].
pub fn handle() -> std::io::Result<Handle> {
    let mut rt = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = &*rt {
        return Ok(r.handle().clone());
    }
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ferry-background")
        .on_thread_start(lower_priority)
        .build()?;
    let handle = runtime.handle().clone();
    *rt = Some(runtime);
    Ok(handle)
}

/// Lowers the calling thread's priority to [`NICE`] unless it is lower
/// already (on Linux `setpriority` with a thread id acts on that thread
/// alone). Best effort: at worst the work runs at the priority it would
/// have had anyway.
pub(crate) fn lower_priority() {
    let tid = Some(rustix::thread::gettid());
    let now = rustix::process::getpriority_process(tid).unwrap_or(0);
    if now < NICE
        && let Err(e) = rustix::process::setpriority_process(tid, NICE)
    {
        tracing::debug!("cannot lower a background thread's priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_tasks_run_at_the_lower_priority() {
        let h = handle().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        h.spawn(async move {
            let here = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
            let pooled = tokio::task::spawn_blocking(|| {
                rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            })
            .await
            .unwrap();
            tx.send((here.unwrap(), pooled.unwrap())).unwrap();
        });
        let (here, pooled) = rx.recv().unwrap();
        let ours = rustix::process::getpriority_process(None).unwrap();
        assert_eq!(here, NICE.max(ours));
        assert_eq!(pooled, NICE.max(ours));
    }
}
