//! The server-wide budget of request and reply buffers (`--max-memory`).
//!
//! A READ or WRITE leases its buffer's bytes before the buffer exists and
//! returns them when its reply has been sent, so the buffers of all
//! connections together never exceed the budget: when it is exhausted,
//! requests wait for it in turn (the semaphores are FIFO) instead of
//! allocating.
//!
//! Two rules keep the sharing fair. A connection holds at most its share
//! (at most half of the shared part), so no single connection can take all
//! of it. And every connection may hold a small allowance (the reserve
//! divided by the connection limit, at most 4 MiB) without waiting: clients
//! that never read their replies or stall mid-payload may fill the shared
//! part until the stall deadline cuts them off, but a client with a
//! request or two in flight is still served at once, from the reserve.

use std::sync::Arc;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::limits::Limits;

/// The largest allowance: enough for qemu-img's 2 MiB requests one at a
/// time, or a handful of smaller ones in flight.
const MAX_ALLOWANCE: usize = 4 << 20;

/// The reserve is at most this part of the budget (1/RESERVE_SHARE).
const RESERVE_SHARE: usize = 8;

pub struct MemoryBudget {
    shared: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    /// Most bytes one connection may hold.
    per_connection: usize,
    /// A connection holding at most this much may use the reserve. As it
    /// is the reserve divided by the connection limit, the reserve never
    /// runs out: taking from it never waits.
    allowance: usize,
}

impl MemoryBudget {
    /// The budget of `limits.max_memory` bytes (raised to the minimum if
    /// below it, since the largest request must fit, and cut to what a
    /// semaphore can count).
    pub fn new(limits: &Limits) -> Self {
        let total = limits
            .max_memory
            .clamp(limits.min_memory(), Semaphore::MAX_PERMITS);
        let connections = limits.max_connections.max(1);
        let reserve = (total / RESERVE_SHARE).min(connections * MAX_ALLOWANCE);
        let shared = total - reserve;
        let per_connection = limits
            .max_inflight_bytes
            .min(shared / 2)
            .max(limits.max_payload as usize);
        MemoryBudget {
            shared: Arc::new(Semaphore::new(shared)),
            reserve: Arc::new(Semaphore::new(reserve)),
            per_connection,
            allowance: reserve / connections,
        }
    }

    /// One connection's view of the budget.
    pub fn connection(self: &Arc<Self>) -> ConnBudget {
        ConnBudget {
            own: Arc::new(Semaphore::new(self.per_connection)),
            server: self.clone(),
        }
    }
}

/// A connection's part of the budget: what it holds is capped by its own
/// semaphore, then taken from the server's.
pub struct ConnBudget {
    own: Arc<Semaphore>,
    server: Arc<MemoryBudget>,
}

/// Bytes leased from the budget; dropping it gives them back.
pub struct Lease {
    _own: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

impl ConnBudget {
    /// Waits until `bytes` (at most the largest payload) can be held.
    pub async fn lease(&self, bytes: u32) -> Result<Lease, AcquireError> {
        let own = self.own.clone().acquire_many_owned(bytes).await?;
        let server = &self.server;
        let held = server.per_connection - self.own.available_permits();
        let from_server = match server.shared.clone().try_acquire_many_owned(bytes) {
            Ok(p) => p,
            Err(_) if held <= server.allowance => {
                server.reserve.clone().acquire_many_owned(bytes).await?
            }
            Err(_) => server.shared.clone().acquire_many_owned(bytes).await?,
        };
        Ok(Lease {
            _own: own,
            _server: from_server,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: usize = 1 << 20;

    fn budget(max_memory: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(&Limits {
            max_memory,
            ..Limits::default()
        }))
    }

    async fn pending<T>(f: impl Future<Output = T>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn one_connection_cannot_take_everything() {
        let b = budget(256 * MIB);
        let greedy = b.connection();
        let mut held = Vec::new();
        while let Ok(Ok(l)) =
            tokio::time::timeout(Duration::from_millis(50), greedy.lease(32 * MIB as u32)).await
        {
            held.push(l);
        }
        // 224 MiB shared: the greedy connection stops at half of it.
        assert_eq!(held.len() * 32 * MIB, 96 * MIB);
        let other = b.connection();
        let l = tokio::time::timeout(Duration::from_secs(1), other.lease(32 * MIB as u32)).await;
        assert!(l.is_ok(), "a second connection found nothing left");
    }

    #[tokio::test]
    async fn light_requests_use_the_reserve_when_the_shared_part_is_gone() {
        let b = budget(256 * MIB);
        let (heavy1, heavy2, heavy3) = (b.connection(), b.connection(), b.connection());
        let mut held = Vec::new();
        for c in [&heavy1, &heavy2] {
            for _ in 0..3 {
                held.push(c.lease(32 * MIB as u32).await.unwrap());
            }
        }
        held.push(heavy2.lease(16 * MIB as u32).await.unwrap());
        held.push(heavy3.lease(16 * MIB as u32).await.unwrap());
        // 224 MiB shared, all held: a heavy request waits...
        let third = b.connection();
        assert!(pending(third.lease(8 * MIB as u32)).await);
        // ...one within the allowance (32 MiB / 256 connections) does
        // not, and a heavy connection below its own share still cannot
        // reach the reserve.
        let light = b.connection();
        let small = light.lease(128 << 10).await.unwrap();
        assert!(pending(light.lease(MIB as u32)).await);
        assert!(pending(heavy1.lease(64 << 10)).await);
        drop(small);
        drop(held.pop());
        assert!(!pending(third.lease(8 * MIB as u32)).await);
    }

    #[tokio::test]
    async fn waiters_are_served_in_turn() {
        let b = budget(64 * MIB);
        let a = b.connection();
        let first = a.lease(32 * MIB as u32).await.unwrap();
        let c = b.connection();
        let second = c.lease(24 * MIB as u32).await.unwrap();
        // 56 MiB shared, all held: d queues before e.
        let (d, e) = (b.connection(), b.connection());
        let mut d_wait = Box::pin(d.lease(32 * MIB as u32));
        assert!(pending(&mut d_wait).await);
        let mut e_wait = Box::pin(e.lease(8 * MIB as u32));
        assert!(pending(&mut e_wait).await);
        drop(second);
        // 24 MiB free would fit e, but d is first in line.
        assert!(pending(&mut e_wait).await);
        drop(first);
        let _d = d_wait.await.unwrap();
        let _e = e_wait.await.unwrap();
    }
}
