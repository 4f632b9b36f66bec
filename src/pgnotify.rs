//! Run events across control plane replicas that share a PostgreSQL store: each
//! replica's own events (`RunEvents::publish`) go out as `NOTIFY tasuki_run_events`,
//! and every other replica delivers them to its own watchers (`?wait`, log follows,
//! the UI's live logs, the relay's wake-up), whichever replica the worker reports to.
//!
//! A notification is lost when a listener's connection is (PostgreSQL does not keep
//! them). So after a reconnect, and when a sender had to drop events, every watched run
//! is woken once and read again (`RunEvents::wake_all`): a watcher may wake for
//! nothing, never sleep through a change. The followers' backstop (`events::BACKSTOP`)
//! remains the bound if PostgreSQL itself is away.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::run::RunId;
use crate::service::events::{OutboundLoss, RunEvent, RunEventKind, RunEvents};

/// The channel every replica listens on.
pub const CHANNEL: &str = "tasuki_run_events";
/// PostgreSQL refuses payloads of 8000 bytes or more; a notification carries up to
/// this much (some 250 events).
const MAX_PAYLOAD: usize = 7000;
/// How many events one pass of the sender takes from the queue.
const BATCH: usize = 1024;
/// The pause after a failure to listen or to send, before trying again.
const RETRY: Duration = Duration::from_secs(1);
/// A line that asks every replica to look at every run it watches.
const ALL: &str = "*";

/// The bridge between one process's `RunEvents` and the other replicas.
pub struct Bridge {
    pool: PgPool,
    events: RunEvents,
    /// This process, so it skips its own notifications.
    replica: String,
}

impl Bridge {
    pub fn new(pool: PgPool, events: RunEvents) -> Bridge {
        Bridge {
            pool,
            events,
            replica: RunId::new().to_string(),
        }
    }

    /// Listen first (so nothing sent after start-up is missed), then send and receive
    /// until shutdown. `None` if the process's events are bridged already.
    pub async fn start(self, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let (outgoing, loss) = self.events.outbound()?;
        let listener = self.listen().await;
        let send = Sender {
            pool: self.pool.clone(),
            replica: self.replica.clone(),
            loss,
        };
        Some(tokio::spawn(async move {
            tokio::join!(
                send.run(outgoing, shutdown.clone()),
                receive(self.pool, listener, self.events, self.replica, shutdown),
            );
        }))
    }

    /// A listener on the channel, or `None` when PostgreSQL cannot be reached now
    /// (`receive` keeps trying).
    async fn listen(&self) -> Option<PgListener> {
        match listen(&self.pool).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(message = "cannot listen for other replicas' run events yet", error = %e);
                None
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Deliver other replicas' events until shutdown; after any gap (no listener yet, a
/// lost connection), wake every watched run once.
async fn receive(
    pool: PgPool,
    mut listener: Option<PgListener>,
    events: RunEvents,
    replica: String,
    shutdown: CancellationToken,
) {
    loop {
        let Some(l) = listener.as_mut() else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
            if let Ok(l) = listen(&pool).await {
                tracing::info!(message = "listening for other replicas' run events");
                listener = Some(l);
                events.wake_all();
            }
            continue;
        };
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = l.try_recv() => next,
        };
        match next {
            Ok(Some(n)) => deliver(&events, &replica, n.payload()),
            Ok(None) => {
                // The connection was lost and is back: what was sent meanwhile is gone.
                tracing::info!(
                    message = "reconnected to other replicas' run events; waking every watcher"
                );
                events.wake_all();
            }
            Err(e) => {
                tracing::warn!(message = "listening for other replicas' run events failed; retrying", error = %e);
                listener = None;
            }
        }
    }
}

/// One notification: the sending replica's id on the first line, then one event a line
/// (`s RUN` status, `l RUN` output) or `*` (every run). Lines that do not parse are
/// skipped: a newer build may send kinds this one does not know.
fn deliver(events: &RunEvents, me: &str, payload: &str) {
    let mut lines = payload.lines();
    if lines.next() == Some(me) {
        return;
    }
    for line in lines {
        if line == ALL {
            events.wake_all();
            continue;
        }
        let Some((kind, run)) = line.split_once(' ') else {
            continue;
        };
        let kind = match kind {
            "s" => RunEventKind::Status,
            "l" => RunEventKind::Log,
            _ => continue,
        };
        if let Ok(run_id) = RunId::from_str(run) {
            events.deliver(run_id, kind);
        }
    }
}

/// Sends this process's events, batched: what is queued when a send starts goes in as
/// few notifications as fit, each (run, kind) once.
struct Sender {
    pool: PgPool,
    replica: String,
    loss: OutboundLoss,
}

impl Sender {
    async fn run(self, mut outgoing: mpsc::Receiver<RunEvent>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut owed_all = false;
        loop {
            let got = tokio::select! {
                () = shutdown.cancelled() => return,
                got = outgoing.recv_many(&mut batch, BATCH) => got,
            };
            if got == 0 {
                return;
            }
            // Events that did not fit the queue, or a send that failed: the others
            // look at every run they watch.
            owed_all |= self.loss.take();
            let payloads = payloads(&self.replica, &batch, owed_all);
            batch.clear();
            let mut failed = false;
            for payload in payloads {
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&payload)
                    .execute(&self.pool)
                    .await
                {
                    tracing::warn!(message = "cannot send run events to other replicas", error = %e);
                    failed = true;
                    break;
                }
            }
            owed_all = failed;
            if failed {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// The notifications for `events` (each distinct one once, in order), each at most
/// `MAX_PAYLOAD` bytes; `all` adds the line that wakes every watched run.
fn payloads(replica: &str, events: &[RunEvent], all: bool) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut current = String::new();
    let lines = all.then(|| ALL.to_owned()).into_iter().chain(
        events
            .iter()
            .filter(|e| seen.insert((e.run_id, e.kind as u8)))
            .map(|e| {
                let kind = match e.kind {
                    RunEventKind::Status => 's',
                    RunEventKind::Log => 'l',
                };
                format!("{kind} {}", e.run_id)
            }),
    );
    for line in lines {
        if !current.is_empty() && current.len() + 1 + line.len() > MAX_PAYLOAD {
            out.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(replica);
        }
        current.push('\n');
        current.push_str(&line);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests;
