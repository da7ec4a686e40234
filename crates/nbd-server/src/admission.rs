//! Admission: what a request must hold before it runs, and gives back
//! when its reply has been sent. Every request, refused ones too, holds one
//! of the connection's `max_inflight` slots (so a client that never reads
//! replies cannot make them pile up); a READ or WRITE also leases its
//! buffer's bytes from the memory budget.

use std::sync::Arc;

use nbd_proto::consts::cmd;
use nbd_proto::request::Request;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::{ConnBudget, Lease, MemoryBudget};

/// The in-flight budget a request holds until its reply is sent.
pub struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<Lease>,
}

/// One connection's gate.
pub struct Admission {
    slots: Arc<Semaphore>,
    max_inflight: usize,
    budget: ConnBudget,
}

fn closed(e: tokio::sync::AcquireError) -> std::io::Error {
    std::io::Error::other(e)
}

impl Admission {
    pub fn new(max_inflight: usize, budget: &Arc<MemoryBudget>) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            budget: budget.connection(),
        }
    }

    /// A slot for a request that will be answered without running (a
    /// refusal).
    pub async fn slot_only(&self) -> std::io::Result<Permits> {
        let slot = self.slots.clone().acquire_owned().await.map_err(closed)?;
        Ok(Permits {
            _slot: slot,
            _bytes: None,
        })
    }

    /// A slot, and for READ/WRITE the bytes of the request's buffer. The
    /// slot comes first: a client has at most `max_inflight` requests
    /// waiting for bytes.
    pub async fn admit(&self, req: &Request) -> std::io::Result<Permits> {
        let mut permits = self.slot_only().await?;
        if matches!(req.command, cmd::READ | cmd::WRITE) && req.length > 0 {
            // Validated requests are at most the maximum payload (u32).
            let bytes = u32::try_from(req.length).map_err(std::io::Error::other)?;
            permits._bytes = Some(self.budget.lease(bytes).await.map_err(closed)?);
        }
        Ok(permits)
    }

    /// Whether no request of this connection is in flight.
    pub fn idle(&self) -> bool {
        self.slots.available_permits() == self.max_inflight
    }
}
