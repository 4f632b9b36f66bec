//! The control plane's side of the worker protocol: claims, leases, output and final
//! states, checked against the store. The embedded worker calls it in-process; remote
//! workers reach the same code through `http::worker`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use crate::domain::ports::{
    ClaimResult, ControlError, ControlPlane, Lease, LeaseStatus, LogError, LogSink, OutputChunk,
    RunMessage, RunStore, StoreError,
};
use crate::domain::run::Outcome;
use crate::service::events::{RunEventKind, RunEvents};

#[derive(Clone)]
pub struct LocalControlPlane {
    store: Arc<dyn RunStore>,
    logs: Arc<dyn LogSink>,
    events: RunEvents,
    lease_ttl: Duration,
}

impl LocalControlPlane {
    pub fn new(
        store: Arc<dyn RunStore>,
        logs: Arc<dyn LogSink>,
        events: RunEvents,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            store,
            logs,
            events,
            lease_ttl,
        }
    }
}

fn store_err(e: StoreError) -> ControlError {
    match e {
        StoreError::Unavailable(m) => ControlError::Unavailable(m),
        StoreError::Corrupt(m) => ControlError::Rejected(m),
    }
}

#[async_trait]
impl ControlPlane for LocalControlPlane {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
    ) -> Result<ClaimResult, ControlError> {
        let result = self
            .store
            .claim(message, worker_id, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        if let ClaimResult::Claimed(_) = result {
            self.events.publish(message.run_id, RunEventKind::Status);
        }
        Ok(result)
    }

    async fn started(&self, lease: Lease, container_id: &str) -> Result<LeaseStatus, ControlError> {
        let status = self
            .store
            .mark_started(lease, container_id, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        self.events.publish(lease.run_id, RunEventKind::Status);
        Ok(status)
    }

    async fn heartbeat(&self, lease: Lease) -> Result<LeaseStatus, ControlError> {
        self.store
            .renew_lease(lease, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)
    }

    async fn append_log(
        &self,
        lease: Lease,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError> {
        let len = self
            .logs
            .append(lease.run_id, lease.attempt, offset, chunks)
            .await
            .map_err(|e| match e {
                LogError::Gap { .. } => ControlError::Rejected(e.to_string()),
                LogError::Io(m) => ControlError::Unavailable(m),
            })?;
        self.events.publish(lease.run_id, RunEventKind::Log);
        Ok(len)
    }

    async fn finish(&self, lease: Lease, outcome: &Outcome) -> Result<LeaseStatus, ControlError> {
        let status = self
            .store
            .finish(lease, outcome, Utc::now())
            .await
            .map_err(store_err)?;
        self.events.publish(lease.run_id, RunEventKind::Status);
        Ok(status)
    }
}
