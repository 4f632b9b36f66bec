//! The store's behaviour, as any implementation must show it: each test is a function
//! of a fresh store, and `store_suite!(open)` turns them all into `#[tokio::test]`s for
//! one backend (`open` makes a fresh, empty store and whatever keeps it alive).

mod admission;
mod callbacks;
mod lifecycle;
mod listing;
mod outbox;
mod output;
mod replies;
pub(crate) mod retention;
mod schedules;
mod sessions;
mod usage;

pub(crate) use admission::*;
pub(crate) use callbacks::*;
pub(crate) use lifecycle::*;
pub(crate) use listing::*;
pub(crate) use outbox::*;
pub(crate) use output::*;
pub(crate) use replies::*;
pub(crate) use schedules::*;
pub(crate) use sessions::*;
pub(crate) use usage::*;

/// Every test of the suite, for one backend: `open` is an async fn returning
/// `(store, keep_alive)`.
macro_rules! store_suite {
    ($open:path) => {
        $crate::store::suite::store_suite!(@each $open;
            a_run_goes_from_outbox_to_claim_to_final_state_guarded_by_epoch,
            the_outbox_is_read_past_an_id_while_earlier_entries_stay_pending,
            unclaimed_runs_are_published_again_for_a_volatile_queue,
            retry_rules_queue_the_next_attempt_after_its_backoff,
            expired_leases_become_lost_and_a_person_can_retry,
            cancel_ends_a_queued_run_and_flags_a_running_one,
            idempotency_keys_return_the_first_run,
            runs_are_listed_only_for_the_jobs_the_globs_match,
            runs_are_filtered_by_trigger_and_creation_time,
            an_unstarted_attempt_can_be_released_and_an_adopted_one_renewed,
            only_unclaimed_due_runs_sent_long_ago_are_published_again,
            a_cancel_reaches_a_run_whose_attempt_is_given_back_or_whose_worker_vanished,
            leases_are_renewed_together_and_answered_in_order,
            writes_under_a_stale_or_ended_lease_are_refused,
            undelivered_output_only_rises_counts_once_and_is_handed_to_adopt,
            a_session_is_opened_refused_to_another_host_and_reopened_by_its_own_process,
            a_live_session_is_replaced_from_its_own_host_only_with_the_host_lock,
            an_expired_or_ended_session_gives_the_id_away,
            a_superseded_or_ended_session_is_not_renewed,
            an_orphan_goes_only_once_its_attempt_and_its_session_are_over,
            an_attempt_keeps_the_build_of_the_worker_that_claimed_it,
            max_concurrent_one_admits_the_next_run_whenever_one_ends,
            at_most_two_runs_together_and_alone_waits_for_all,
            a_persons_retry_waits_for_room_like_a_new_run,
            a_run_waiting_for_admission_is_never_published_again,
            a_slot_fires_once_and_its_run_carries_the_trigger,
            overlap_skip_and_allow,
            overlap_buffer_one_keeps_one_waiting_and_buffer_all_every_one,
            overlap_cancel_other_stops_the_active_runs_then_starts,
            a_skipped_slot_is_recorded_once_and_never_fires,
            slots_are_listed_newest_first_and_ranges_oldest_first,
            a_cursor_never_goes_back,
            a_cursor_keeps_its_definition_until_rebased_and_never_moves_back,
            a_schedule_is_paused_and_resumed,
            a_backfill_fires_skipped_or_unseen_slots_and_never_a_fired_one,
            a_final_state_comes_with_its_callback_obligation_one_per_event,
            a_cancelled_queued_run_is_announced_too,
            each_try_is_recorded_and_a_redelivery_makes_it_due_again,
            the_finished_reply_becomes_due_with_the_final_state,
            a_run_cancelled_before_it_started_owes_its_finished_reply,
            a_run_without_reply_to_owes_no_reply,
            a_repeated_request_adds_its_replies_once,
            an_attempts_usage_is_kept_with_its_final_state,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, _keep) = $open().await;
                $crate::store::suite::$name(&store).await;
            }
        )*
    };
}
pub(crate) use store_suite;
