//! Replies to a producer that asked for a run over a queue: which moments it wants to
//! hear about, and what became of each reply. A reply is an obligation stored with the
//! run; a relay sends it.

use chrono::{DateTime, Utc};

use super::run::RunId;

/// When a reply is sent: right after the run was accepted, or once it is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    Accepted,
    Finished,
}

impl ReplyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyKind::Accepted => "accepted",
            ReplyKind::Finished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(ReplyKind::Accepted),
            "finished" => Some(ReplyKind::Finished),
            _ => None,
        }
    }
}

/// Where a reply stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyState {
    /// A `finished` reply whose run is not final yet.
    Waiting,
    /// Due: the relay sends it (again, after a failed try).
    Pending,
    /// The broker confirmed it.
    Sent,
    /// The broker returned it: no queue by that name. Not tried again.
    Unroutable,
}

impl ReplyState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyState::Waiting => "waiting",
            ReplyState::Pending => "pending",
            ReplyState::Sent => "sent",
            ReplyState::Unroutable => "unroutable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "waiting" => Some(ReplyState::Waiting),
            "pending" => Some(ReplyState::Pending),
            "sent" => Some(ReplyState::Sent),
            "unroutable" => Some(ReplyState::Unroutable),
            _ => None,
        }
    }
}

/// Who asked for a run over a queue, and which replies they want.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requester {
    /// The broker-validated user that published the request, if it said.
    pub requested_by: Option<String>,
    /// The queue replies go to, and the correlation id they carry.
    pub reply_to: Option<ReplyAddress>,
    pub replies: Vec<ReplyKind>,
}

impl Requester {
    /// The replies a new run starts with: `accepted` due at once, `finished` waiting
    /// for the final state. None without a `reply_to`.
    pub fn initial_replies(&self) -> Vec<Reply> {
        let Some(address) = &self.reply_to else {
            return Vec::new();
        };
        self.replies
            .iter()
            .map(|&kind| Reply {
                to: address.to.clone(),
                kind,
                state: match kind {
                    ReplyKind::Accepted => ReplyState::Pending,
                    ReplyKind::Finished => ReplyState::Waiting,
                },
                tries: 0,
                last_error: None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAddress {
    pub to: String,
    pub correlation_id: Option<String>,
}

/// A reply as the run records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub to: String,
    pub kind: ReplyKind,
    pub state: ReplyState,
    pub tries: u32,
    pub last_error: Option<String>,
}

/// A reply the relay should send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueReply {
    pub id: i64,
    pub run_id: RunId,
    pub kind: ReplyKind,
    pub address: ReplyAddress,
    pub tries: u32,
}

/// The delay before a failed reply is tried again: doubling from 1 s, at most 60 s.
pub fn retry_delay(tries: u32) -> chrono::Duration {
    let secs = 1_i64
        .checked_shl(tries.saturating_sub(1).min(6))
        .unwrap_or(64)
        .min(60);
    chrono::Duration::seconds(secs)
}

/// When a failed reply is due again.
pub fn next_try(now: DateTime<Utc>, tries: u32) -> DateTime<Utc> {
    now + retry_delay(tries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_up_to_a_minute() {
        let secs: Vec<i64> = (1..=9).map(|t| retry_delay(t).num_seconds()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(0).num_seconds(), 1);
    }

    #[test]
    fn kinds_and_states_read_back_what_they_write() {
        for k in [ReplyKind::Accepted, ReplyKind::Finished] {
            assert_eq!(ReplyKind::parse(k.as_str()), Some(k));
        }
        for s in [
            ReplyState::Waiting,
            ReplyState::Pending,
            ReplyState::Sent,
            ReplyState::Unroutable,
        ] {
            assert_eq!(ReplyState::parse(s.as_str()), Some(s));
        }
    }
}
