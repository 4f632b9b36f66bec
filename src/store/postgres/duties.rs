//! Duties: a lease per background duty in `duty_leases`, one statement each (an upsert
//! that takes the row only when it is free, expired or the holder's own), so two
//! replicas asking at once never both get it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::super::common::{ms, ttl_ms};
use super::{PgStore, store_db};
use crate::domain::ports::StoreError;
use crate::domain::store::Duties;

#[async_trait]
impl Duties for PgStore {
    async fn hold_duty(
        &self,
        duty: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let held: Option<String> = sqlx::query_scalar(
            "INSERT INTO duty_leases (duty, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (duty) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
             WHERE duty_leases.holder = EXCLUDED.holder OR duty_leases.expires_at <= $4 \
             RETURNING holder",
        )
        .bind(duty)
        .bind(holder)
        .bind(ms(now).saturating_add(ttl_ms(ttl)))
        .bind(ms(now))
        .fetch_optional(self.pool())
        .await
        .map_err(store_db)?;
        Ok(held.is_some())
    }

    async fn release_duty(&self, duty: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM duty_leases WHERE duty = $1 AND holder = $2")
            .bind(duty)
            .bind(holder)
            .execute(self.pool())
            .await
            .map_err(store_db)?;
        Ok(())
    }
}
