//! The conformance suite of the executor seam (`warden_tests::conformance`), run
//! against the PostgreSQL store on a fresh database and against the model store the
//! simulation uses. A scenario failing on one store only means the model and the SQL
//! disagree: fix the model (the SQL is what runs), or the scenario if it assumed what
//! neither promises.

use warden_runtime::store::{self, PgStore};
use warden_runtime::PartitionCount;
use warden_tests::conformance::{self as suite, P};
use warden_tests::model_store::{ModelDb, ModelStore};
use warden_tests::TestDb;

async fn pg_store() -> PgStore {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    let parts = store::init_partitions(&db.pool, PartitionCount::new(P).unwrap()).await.unwrap();
    PgStore::new(db.pool.clone(), parts)
}

fn model_store() -> ModelStore {
    ModelStore::new(ModelDb::shared(P))
}

/// Every scenario, once per store: `pg::<scenario>` and `model::<scenario>`.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod pg {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::suite::$scenario(&super::pg_store().await).await;
                }
            )*
        }
        mod model {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::suite::$scenario(&super::model_store()).await;
                }
            )*
        }
    };
}

conformance!(
    acquire_grants_free_expired_and_own_partitions,
    renew_extends_only_the_same_unexpired_epoch,
    release_frees_the_lease_and_keeps_its_epoch,
    lease_statements_match_each_listed_partition_once,
    lease_wait_is_the_time_until_another_owners_lease_expires,
    claim_takes_the_serial_head_in_run_at_then_id_order_ignoring_priority,
    a_running_serial_head_blocks_serial_jobs_but_not_unordered_ones,
    a_later_scheduled_job_does_not_block_and_a_backing_off_head_does,
    finish_records_the_attempt_and_claims_the_next_job,
    finish_outcomes_write_what_the_sql_writes,
    a_stale_or_expired_fence_is_refused,
    unclaim_gives_the_attempt_back,
    claim_adopts_a_job_left_running_at_its_own_fence,
    claim_sees_only_the_fence_partition,
    due_accounts_lists_runnable_accounts_oldest_first,
    running_here_lists_this_owners_running_jobs,
    rescue_resets_what_an_older_epoch_left_running,
    cancel_and_retry_follow_the_job_state,
    unique_keys_make_enqueue_idempotent,
    heartbeat_lists_the_members_seen_within_the_window,
    lease_holders_name_live_holders_and_when_their_lease_came_to_them,
    beats_are_fenced_per_attempt_and_keep_the_last_checkpoint,
    idempotency_keys_dedup_while_kept_even_after_the_job_completed,
);
