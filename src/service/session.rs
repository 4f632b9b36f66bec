//! A worker process's session with the control plane: opened before the worker touches
//! any container, renewed by heartbeats while the process lives, ended when it exits.
//! While the session is live no other process may use the worker id, so no two
//! processes ever follow, adopt or stop the same containers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::ports::{ControlError, ControlPlane, SessionGrant};
use crate::domain::session::{SessionRenewal, SessionRequest, WorkerSession};

/// The longest gap between session heartbeats, whatever the TTL.
const MAX_HEARTBEAT_GAP: Duration = Duration::from_secs(5);
/// How long to keep asking a control plane that does not answer at start.
const OPEN_TRIES: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "worker id `{}` is in use by a live worker: host {}, pid {}, since {} (its session expires at {} unless it heartbeats); give each worker process its own --worker-id",
        .live.worker_id, .live.host, .live.pid, .live.started_at.to_rfc3339(), .live.expires_at.to_rfc3339()
    )]
    InUse { live: Box<WorkerSession> },
    #[error("opening the worker session: {0}")]
    Control(#[from] ControlError),
    #[error("stopped before the worker session was open")]
    Interrupted,
}

/// An open session. `keep_alive` renews it; `end` says goodbye.
pub struct Session {
    control: Arc<dyn ControlPlane>,
    worker_id: String,
    instance: String,
    ttl: Duration,
}

impl Session {
    /// Open the session, retrying a control plane that is down (it may be starting too).
    pub async fn open(
        control: Arc<dyn ControlPlane>,
        request: SessionRequest,
        shutdown: &CancellationToken,
    ) -> Result<Session, SessionError> {
        let mut pause = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            tries += 1;
            match control.open_session(&request).await {
                Ok(SessionGrant::Granted { ttl }) => {
                    return Ok(Session {
                        control,
                        worker_id: request.worker_id,
                        instance: request.instance,
                        ttl,
                    });
                }
                Ok(SessionGrant::Refused { live }) => {
                    return Err(SessionError::InUse {
                        live: Box::new(live),
                    });
                }
                Err(ControlError::Unavailable(error)) if tries < OPEN_TRIES => {
                    tracing::warn!(message = "control plane unavailable; opening the worker session again", %error, retry_in_ms = pause.as_millis() as u64);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(SessionError::Interrupted),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Heartbeats until `stop`. If another process took the worker id (this one was
    /// silent past the TTL), `superseded` is cancelled: the worker must stop touching
    /// the id's containers.
    pub async fn keep_alive(&self, stop: CancellationToken, superseded: CancellationToken) {
        let every = (self.ttl / 3).min(MAX_HEARTBEAT_GAP);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self
                .control
                .renew_session(&self.worker_id, &self.instance)
                .await
            {
                Ok(SessionRenewal::Renewed) => {}
                Ok(SessionRenewal::Superseded) => {
                    tracing::error!(message = "another process took this worker id; stopping", worker_id = %self.worker_id);
                    superseded.cancel();
                    return;
                }
                Err(error) => {
                    tracing::warn!(message = "worker session heartbeat failed", %error);
                }
            }
        }
    }

    /// Say goodbye, so a restart under the same id adopts the containers at once.
    pub async fn end(self) {
        if let Err(error) = self
            .control
            .end_session(&self.worker_id, &self.instance)
            .await
        {
            tracing::warn!(message = "ending the worker session failed; it expires by itself", %error);
        }
    }
}
