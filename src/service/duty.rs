//! A background duty of `serve` (the scheduler, the lease reaper, retention) that one
//! replica of a shared store does at a time: before each round of work the replica
//! takes or renews the duty's lease in the store, and skips the round when another
//! replica holds it. A replica that dies loses the duty when its lease expires; one
//! that stops gives it up at once. A SQLite store, used by one process, always says
//! yes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;

use crate::domain::store::Duties;

pub struct Duty {
    store: Arc<dyn Duties>,
    name: &'static str,
    holder: String,
    ttl: Duration,
    /// Whether the last look found it ours, to log only changes.
    held: AtomicBool,
}

impl Duty {
    /// `holder` names this process among the replicas; `ttl` is how long the duty
    /// stays this process's after each look, so it must exceed the time between looks.
    pub fn new(
        store: Arc<dyn Duties>,
        name: &'static str,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Duty {
        Duty {
            store,
            name,
            holder: holder.into(),
            ttl,
            held: AtomicBool::new(false),
        }
    }

    /// Whether this process has the duty now, taking or renewing it. A store that
    /// cannot say counts as no: the round waits rather than risk being done twice.
    pub async fn held(&self) -> bool {
        let now = match self
            .store
            .hold_duty(self.name, &self.holder, self.ttl, Utc::now())
            .await
        {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(message = "cannot take or renew a duty; skipping its round", duty = self.name, %error);
                false
            }
        };
        let before = self.held.swap(now, Ordering::Relaxed);
        if now != before {
            if now {
                tracing::info!(message = "this replica does the duty now", duty = self.name, holder = %self.holder);
            } else {
                tracing::info!(message = "another replica does the duty", duty = self.name);
            }
        }
        now
    }

    /// Give the duty up (at shutdown), so another replica takes it without waiting
    /// for the lease to expire.
    pub async fn release(&self) {
        if !self.held.load(Ordering::Relaxed) {
            return;
        }
        if let Err(error) = self.store.release_duty(self.name, &self.holder).await {
            tracing::warn!(message = "cannot give a duty up; it passes on when its lease expires", duty = self.name, %error);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::domain::ports::StoreError;

    /// The duty table as a map: name → (holder, expires).
    #[derive(Default)]
    struct Leases(Mutex<std::collections::HashMap<String, (String, DateTime<Utc>)>>);

    #[async_trait]
    impl Duties for Leases {
        async fn hold_duty(
            &self,
            duty: &str,
            holder: &str,
            ttl: Duration,
            now: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let mut map = self.0.lock().unwrap();
            let free = map
                .get(duty)
                .is_none_or(|(h, until)| h == holder || *until <= now);
            if free {
                map.insert(
                    duty.to_owned(),
                    (
                        holder.to_owned(),
                        now + chrono::Duration::from_std(ttl).unwrap(),
                    ),
                );
            }
            Ok(free)
        }

        async fn release_duty(&self, duty: &str, holder: &str) -> Result<(), StoreError> {
            let mut map = self.0.lock().unwrap();
            if map.get(duty).is_some_and(|(h, _)| h == holder) {
                map.remove(duty);
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_released_at_once() {
        let store = Arc::new(Leases::default());
        let ttl = Duration::from_secs(60);
        let a = Duty::new(store.clone(), "scheduler", "a", ttl);
        let b = Duty::new(store.clone(), "scheduler", "b", ttl);
        let other = Duty::new(store.clone(), "retention", "b", ttl);
        assert!(a.held().await);
        assert!(!b.held().await);
        assert!(a.held().await, "renewed by its holder");
        assert!(other.held().await, "another duty is another lease");
        b.release().await;
        assert!(
            !b.held().await,
            "releasing what it never held changes nothing"
        );
        a.release().await;
        assert!(b.held().await, "given up: taken at once");
        assert!(!a.held().await);
    }
}
