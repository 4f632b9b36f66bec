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
    /// Open the session, retrying a control plane that is down (it may be starting too)
    /// until it answers or `shutdown`; a refusal or a rejected request ends it at once.
    pub async fn open(
        control: Arc<dyn ControlPlane>,
        request: SessionRequest,
        shutdown: &CancellationToken,
    ) -> Result<Session, SessionError> {
        let mut pause = Duration::from_millis(200);
        loop {
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
                Err(ControlError::Unavailable(error)) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::worker::fakes::FakeControl;

    fn request() -> SessionRequest {
        SessionRequest {
            worker_id: "w1".into(),
            instance: "i1".into(),
            host: "h1".into(),
            pid: 7,
            lock_released_by: None,
            build: None,
        }
    }

    fn live() -> WorkerSession {
        WorkerSession {
            worker_id: "w1".into(),
            instance: "i0".into(),
            host: "h0".into(),
            pid: 4242,
            started_at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            expires_at: chrono::DateTime::from_timestamp(1_800_000_030, 0).unwrap_or_default(),
            ended_at: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opening_waits_out_a_control_plane_that_is_down_and_stops_on_a_refusal() {
        let control = Arc::new(FakeControl::default());
        control.set_session_answers(vec![
            Err(ControlError::Unavailable("starting".into())),
            Err(ControlError::Unavailable("starting".into())),
        ]);
        let session = Session::open(control.clone(), request(), &CancellationToken::new())
            .await
            .expect("opened after the control plane came up");
        assert_eq!(session.instance(), "i1");

        control.set_session_answers(vec![Ok(SessionGrant::Refused { live: live() })]);
        let Err(error) = Session::open(control.clone(), request(), &CancellationToken::new()).await
        else {
            panic!("a live id was granted");
        };
        let text = error.to_string();
        assert!(matches!(error, SessionError::InUse { .. }), "{text}");
        assert!(
            text.contains("`w1`") && text.contains("host h0, pid 4242"),
            "{text}"
        );

        // A refused request (a wrong token, say) is not retried.
        control.set_session_answers(vec![Err(ControlError::Rejected("401".into()))]);
        assert!(matches!(
            Session::open(control.clone(), request(), &CancellationToken::new()).await,
            Err(SessionError::Control(ControlError::Rejected(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn opening_gives_up_on_shutdown_while_the_control_plane_is_down() {
        let control = Arc::new(FakeControl::default());
        control.set_session_answers(
            (0..100)
                .map(|_| Err(ControlError::Unavailable("down".into())))
                .collect(),
        );
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.cancel();
        });
        assert!(matches!(
            Session::open(control, request(), &shutdown).await,
            Err(SessionError::Interrupted)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_on_until_stopped_and_a_takeover_stops_the_worker() {
        let control = Arc::new(FakeControl::default());
        let session = Session::open(control.clone(), request(), &CancellationToken::new())
            .await
            .expect("opened");
        let (stop, superseded) = (CancellationToken::new(), CancellationToken::new());
        // TTL 3 s: a heartbeat every second.
        let beating = tokio::time::timeout(
            Duration::from_millis(3500),
            session.keep_alive(stop.clone(), superseded.clone()),
        )
        .await;
        assert!(beating.is_err(), "keep_alive returned on its own");
        assert_eq!(control.renewals(), 3);
        assert!(!superseded.is_cancelled());

        control.set_renewal(SessionRenewal::Superseded);
        session.keep_alive(stop, superseded.clone()).await;
        assert!(superseded.is_cancelled());
        session.end().await;
        assert_eq!(control.sessions_ended(), 1);
    }
}
