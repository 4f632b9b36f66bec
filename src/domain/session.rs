//! Worker sessions: one live process per worker id. A worker process opens a session
//! (a random instance id) when it starts, keeps it alive with heartbeats and ends it when
//! it exits. Containers labelled with a worker id belong to that id's live session; only
//! once that session is over may another process adopt them, or remove them as orphans.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A worker process as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSession {
    pub worker_id: String,
    /// Random per process start: tells two processes with one worker id apart.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    /// Heartbeats push this forward by the session TTL.
    pub expires_at: DateTime<Utc>,
    /// Set when the process said goodbye (clean exit, drain done).
    pub ended_at: Option<DateTime<Utc>>,
}

impl WorkerSession {
    /// Live: not ended, and heard from within its TTL.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.ended_at.is_none() && self.expires_at > now
    }
}

/// A process asking to open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    pub worker_id: String,
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The process holds the host-wide lock for this worker id, so no other live process
    /// on `host` has the id: a live-looking session from the same host is a crashed one.
    pub holds_host_lock: bool,
}

/// What the control plane decides about a session request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionDecision {
    /// No session, or the previous one is over (ended, expired, or its process is known
    /// dead through the host lock): open the new one. `previous` is what it replaces.
    Open { previous: Option<WorkerSession> },
    /// The same process asking again (a retried request): keep it.
    Reopen,
    /// Another live process has this worker id.
    Refuse { live: WorkerSession },
}

/// The rule: a live session of another instance blocks the id, unless it is on the same
/// host and the requester holds that host's lock (the kernel released the lock when the
/// old process died, so the old session is a crash that has not expired yet).
pub fn decide_session(
    current: Option<&WorkerSession>,
    request: &SessionRequest,
    now: DateTime<Utc>,
) -> SessionDecision {
    match current {
        None => SessionDecision::Open { previous: None },
        Some(s) if s.instance == request.instance && s.ended_at.is_none() => {
            SessionDecision::Reopen
        }
        Some(s) if !s.is_live(now) => SessionDecision::Open {
            previous: Some(s.clone()),
        },
        Some(s) if request.holds_host_lock && s.host == request.host => SessionDecision::Open {
            previous: Some(s.clone()),
        },
        Some(s) => SessionDecision::Refuse { live: s.clone() },
    }
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRenewal {
    Renewed,
    /// Another process took the worker id (this one was silent past its TTL, or ended):
    /// this process must stop touching the id's containers.
    Superseded,
}

/// How long a session lives without a heartbeat.
pub fn session_expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

/// May a live worker remove a container of another worker id (an orphan)?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanVerdict {
    /// Its attempt is over and its worker's session is over: stop and remove it.
    Remove,
    /// Its attempt is still running, or its worker may still come back: leave it.
    Keep,
}

/// The rule for orphans: both the attempt and the owning session must be over. `attempt_running`
/// is true while the store still has the attempt running under that worker.
pub fn orphan_verdict(
    attempt_running: bool,
    owner: Option<&WorkerSession>,
    now: DateTime<Utc>,
) -> OrphanVerdict {
    let owner_live = owner.is_some_and(|s| s.is_live(now));
    if attempt_running || owner_live {
        OrphanVerdict::Keep
    } else {
        OrphanVerdict::Remove
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    fn session(instance: &str, host: &str, expires: i64, ended: Option<i64>) -> WorkerSession {
        WorkerSession {
            worker_id: "w1".into(),
            instance: instance.into(),
            host: host.into(),
            pid: 42,
            started_at: t(0),
            expires_at: t(expires),
            ended_at: ended.map(t),
        }
    }

    fn request(instance: &str, host: &str, lock: bool) -> SessionRequest {
        SessionRequest {
            worker_id: "w1".into(),
            instance: instance.into(),
            host: host.into(),
            pid: 43,
            holds_host_lock: lock,
        }
    }

    #[test]
    fn a_live_session_of_another_host_refuses_the_id() {
        let live = session("a", "h1", 30, None);
        let d = decide_session(Some(&live), &request("b", "h2", true), t(10));
        assert_eq!(d, SessionDecision::Refuse { live });
    }

    #[test]
    fn a_live_session_on_the_same_host_refuses_without_the_lock_and_is_replaced_with_it() {
        let live = session("a", "h1", 30, None);
        assert!(matches!(
            decide_session(Some(&live), &request("b", "h1", false), t(10)),
            SessionDecision::Refuse { .. }
        ));
        assert_eq!(
            decide_session(Some(&live), &request("b", "h1", true), t(10)),
            SessionDecision::Open {
                previous: Some(live)
            }
        );
    }

    #[test]
    fn ended_or_expired_sessions_give_way() {
        let ended = session("a", "h1", 30, Some(5));
        let expired = session("a", "h1", 30, None);
        assert!(matches!(
            decide_session(Some(&ended), &request("b", "h2", false), t(10)),
            SessionDecision::Open { .. }
        ));
        assert!(matches!(
            decide_session(Some(&expired), &request("b", "h2", false), t(30)),
            SessionDecision::Open { .. }
        ));
        assert_eq!(
            decide_session(None, &request("b", "h2", false), t(0)),
            SessionDecision::Open { previous: None }
        );
    }

    #[test]
    fn the_same_instance_asking_again_keeps_its_session() {
        let live = session("a", "h1", 30, None);
        assert_eq!(
            decide_session(Some(&live), &request("a", "h1", true), t(10)),
            SessionDecision::Reopen
        );
    }

    #[test]
    fn an_orphan_goes_only_when_its_attempt_and_its_session_are_over() {
        let live = session("a", "h1", 30, None);
        let over = session("a", "h1", 30, Some(5));
        assert_eq!(orphan_verdict(true, Some(&over), t(10)), OrphanVerdict::Keep);
        assert_eq!(orphan_verdict(false, Some(&live), t(10)), OrphanVerdict::Keep);
        assert_eq!(orphan_verdict(false, Some(&live), t(31)), OrphanVerdict::Remove);
        assert_eq!(orphan_verdict(false, Some(&over), t(10)), OrphanVerdict::Remove);
        assert_eq!(orphan_verdict(false, None, t(10)), OrphanVerdict::Remove);
    }
}
