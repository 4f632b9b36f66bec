//! The fake store's schedule and callback parts: the control plane never calls them, so
//! they only complete `RunStore`.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

use super::FakeStore;
use crate::domain::ports::{
    Cursor, FireResult, Firing, NewRun, Pause, Schedules, SlotKey, SlotRecord, StoreError,
};
use crate::domain::run::RunId;
use crate::domain::schedule::{Overlap, SkipReason};

#[async_trait]
impl Schedules for FakeStore {
    async fn fire_slot(
        &self,
        _: &SlotKey,
        _: DateTime<Utc>,
        _: NaiveDate,
        _: &NewRun,
        _: Overlap,
        _: DateTime<Utc>,
    ) -> Result<Firing, StoreError> {
        unimplemented!()
    }
    async fn backfill_slot(
        &self,
        _: &SlotKey,
        _: DateTime<Utc>,
        _: NaiveDate,
        _: &NewRun,
        _: DateTime<Utc>,
    ) -> Result<FireResult, StoreError> {
        unimplemented!()
    }
    async fn skip_slot(
        &self,
        _: &SlotKey,
        _: DateTime<Utc>,
        _: NaiveDate,
        _: SkipReason,
        _: Option<&str>,
        _: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        unimplemented!()
    }
    async fn slots(&self, _: &str, _: Option<&str>, _: u32) -> Result<Vec<SlotRecord>, StoreError> {
        unimplemented!()
    }
    async fn slots_between(
        &self,
        _: &str,
        _: &str,
        _: DateTime<Utc>,
        _: DateTime<Utc>,
    ) -> Result<Vec<SlotRecord>, StoreError> {
        unimplemented!()
    }
    async fn cursor(&self, _: &str, _: &str) -> Result<Option<Cursor>, StoreError> {
        unimplemented!()
    }
    async fn advance_cursor(&self, _: &str, _: &str, _: DateTime<Utc>) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn rebase_cursor(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn pause(&self, _: &str, _: &str) -> Result<Option<Pause>, StoreError> {
        unimplemented!()
    }
    async fn set_pause(&self, _: &str, _: &str, _: Option<&Pause>) -> Result<(), StoreError> {
        unimplemented!()
    }
}

#[async_trait]
impl crate::domain::callback::Callbacks for FakeStore {
    async fn due_callbacks(
        &self,
        _: DateTime<Utc>,
        _: u32,
    ) -> Result<Vec<crate::domain::callback::DueCallback>, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn record_callback_try(
        &self,
        _: i64,
        _: &crate::domain::callback::TryResult,
        _: crate::domain::callback::NextStep,
        _: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn redeliver_callbacks(
        &self,
        _: RunId,
        _: DateTime<Utc>,
    ) -> Result<crate::domain::callback::Redelivery, StoreError> {
        unimplemented!("not used by the control plane")
    }
}
