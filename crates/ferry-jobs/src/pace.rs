//! Pacing reads to a byte rate (`--rate`): each read books its share of
//! time on one schedule and waits for its slot, so the average rate holds
//! whatever the number of workers. An idle spell earns no burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct Pacer {
    bytes_per_sec: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `n` more bytes fit the rate.
    pub async fn wait(&self, n: u64) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            start
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_across_workers() {
        let p = std::sync::Arc::new(Pacer::new(1000));
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let p = p.clone();
            set.spawn(async move {
                for _ in 0..5 {
                    p.wait(100).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        // 2000 bytes at 1000 B/s: the last read starts at 1.9 s.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_millis(2000),
            "{took:?}"
        );
    }
}
