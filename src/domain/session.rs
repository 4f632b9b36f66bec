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
    /// The instance that held this host's lock for the worker id before the requester
    /// took it. The kernel releases the lock only when its holder dies, so a live-looking
    /// session of that instance on this host is a crashed process.
    pub lock_released_by: Option<String>,
    /// The worker's build (`tasuki --version`), recorded on the attempts it claims;
    /// `None` from a worker that does not say (one from before builds were named).
    pub build: Option<String>,
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
/// host and is the very instance whose lock the requester took over (the kernel released
/// that lock when the old process died, so its session is a crash that has not expired
/// yet). A lock in another directory proves nothing about the live session's process.
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
        Some(s)
            if s.host == request.host
                && request.lock_released_by.as_deref() == Some(s.instance.as_str()) =>
        {
            SessionDecision::Open {
                previous: Some(s.clone()),
            }
        }
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

/// The rule for a heartbeat: renewed while the stored session is still this instance's
/// and not ended. An expired one nobody replaced yet is renewed: the process was slow,
/// not gone.
pub fn decide_renewal(current: Option<&WorkerSession>, instance: &str) -> SessionRenewal {
    match current {
        Some(s) if s.instance == instance && s.ended_at.is_none() => SessionRenewal::Renewed,
        _ => SessionRenewal::Superseded,
    }
}

/// A goodbye ends the stored session only while it is this instance's (and not ended
/// already, so the first goodbye's time stands).
pub fn may_end(current: Option<&WorkerSession>, instance: &str) -> bool {
    current.is_some_and(|s| s.instance == instance && s.ended_at.is_none())
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

/// What the control plane knows of the attempt a container claims to belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptState {
    /// No such run or attempt here: the container may be another installation's that
    /// shares the engine, so it is never touched.
    Unknown,
    /// Running under the container's worker id.
    Running,
    /// Ended, or moved on to another worker.
    Over,
}

/// The rule for orphans: the attempt must be known and over, and its worker's session
/// known and over. Anything unknown is left alone.
pub fn orphan_verdict(
    attempt: AttemptState,
    owner: Option<&WorkerSession>,
    now: DateTime<Utc>,
) -> OrphanVerdict {
    match (attempt, owner) {
        (AttemptState::Over, Some(session)) if !session.is_live(now) => OrphanVerdict::Remove,
        _ => OrphanVerdict::Keep,
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

    /// `lock`: the requester took over the host lock last held by instance `a`.
    fn request(instance: &str, host: &str, lock: bool) -> SessionRequest {
        SessionRequest {
            worker_id: "w1".into(),
            instance: instance.into(),
            host: host.into(),
            pid: 43,
            lock_released_by: lock.then(|| "a".to_owned()),
            build: None,
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
                previous: Some(live.clone())
            }
        );
        // A lock some other instance held (another lock directory, say) proves nothing
        // about the live one.
        let elsewhere = SessionRequest {
            lock_released_by: Some("z".into()),
            ..request("b", "h1", false)
        };
        assert!(matches!(
            decide_session(Some(&live), &elsewhere, t(10)),
            SessionDecision::Refuse { .. }
        ));
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
    fn only_the_holding_instance_renews_or_ends_its_session() {
        let live = session("a", "h1", 30, None);
        let ended = session("a", "h1", 30, Some(5));
        assert_eq!(decide_renewal(Some(&live), "a"), SessionRenewal::Renewed);
        assert_eq!(decide_renewal(Some(&live), "b"), SessionRenewal::Superseded);
        assert_eq!(
            decide_renewal(Some(&ended), "a"),
            SessionRenewal::Superseded
        );
        assert_eq!(decide_renewal(None, "a"), SessionRenewal::Superseded);
        assert!(may_end(Some(&live), "a"));
        assert!(!may_end(Some(&live), "b"));
        assert!(!may_end(Some(&ended), "a"));
    }

    #[test]
    fn an_orphan_goes_only_when_its_attempt_and_its_session_are_known_and_over() {
        use AttemptState::*;
        let live = session("a", "h1", 30, None);
        let over = session("a", "h1", 30, Some(5));
        assert_eq!(
            orphan_verdict(Running, Some(&over), t(10)),
            OrphanVerdict::Keep
        );
        assert_eq!(
            orphan_verdict(Over, Some(&live), t(10)),
            OrphanVerdict::Keep
        );
        assert_eq!(
            orphan_verdict(Over, Some(&live), t(31)),
            OrphanVerdict::Remove
        );
        assert_eq!(
            orphan_verdict(Over, Some(&over), t(10)),
            OrphanVerdict::Remove
        );
        // Unknown to this control plane: another installation's, never touched.
        assert_eq!(orphan_verdict(Over, None, t(10)), OrphanVerdict::Keep);
        assert_eq!(
            orphan_verdict(Unknown, Some(&over), t(10)),
            OrphanVerdict::Keep
        );
    }
}
