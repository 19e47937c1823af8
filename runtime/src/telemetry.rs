//! Metric names and descriptions (Prometheus via the `metrics` crate). Install any
//! `metrics` recorder — e.g. `metrics-exporter-prometheus` — in the binary.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `warden_queue_seconds` | histogram: due → started | kind |
//! | `warden_processing_seconds` | histogram: handler run time | kind |
//! | `warden_attempts_total` | counter | kind, outcome |
//! | `warden_jobs_completed_total` | counter (throughput) | kind |
//! | `warden_retries_total`, `warden_discards_total`, `warden_cancels_total`, `warden_snoozes_total` | counter | kind |
//! | `warden_errors_total` | counter: attempts that did not complete | kind |
//! | `warden_active_actors` | gauge | |
//! | `warden_lease_renewals_total` | counter | result |
//! | `warden_self_fence_total`, `warden_fenced_writes_total`, `warden_rescued_attempts_total` | counter | |
//! | `warden_interrupted_total` | counter: attempts stopped by a handoff (not counted) | kind |
//! | `warden_finish_in_doubt_total`, `warden_orphans_adopted_total` | counter: ambiguous results resolved | |
//! | `warden_attempt_panics_total`, `warden_finish_permanent_errors_total`, `warden_undecodable_jobs_total` | counter | |
//! | `warden_notifications_ignored_total`, `warden_wakeups_dropped_total` | counter: hostile or excess NOTIFYs | |
//! | `warden_retention_pruned_total` | counter: rows deleted by the pruner | table (`jobs`, `attempts`) |
//! | `warden_retention_batch_seconds`, `warden_retention_run_seconds` | histogram: pruner batch / run time | |
//! | `warden_api_rejected_total` | counter: API calls refused by a limit | limit |
//! | `warden_saturation` | gauge 0..1: busy execution slots / slots, mean over 10 s (the autoscaling signal) | |
//! | `warden_execution_slots`, `warden_execution_slots_busy` | gauge | |
//! | `warden_execution_busy_seconds_total` | counter: ∫ busy slots dt | |
//! | `warden_process_cpu_ratio` | gauge 0..1: process CPU / cores, mean over 10 s | |
//! | `warden_runnable_accounts` | gauge: accounts waiting for a slot in this node's partitions | |
//! | `warden_attempts_waiting_for_slot` | gauge: claimed attempts waiting for a slot | |
//! | `warden_heartbeating_attempts` | gauge: attempts running here that have heartbeated (long jobs) | |
//! | `warden_heartbeat_age_max_seconds` | gauge: longest time since one of them last heartbeated | |
//! | `warden_heartbeats_total` | counter: heartbeat writes (`recorded`, `fenced`, `error`) | kind, outcome |
//! | `warden_heartbeat_write_seconds` | histogram: one heartbeat write | |
//! | `warden_checkpoints_total` | counter: checkpoint writes (`recorded`, `fenced`, `error`) | kind, outcome |
//! | `warden_checkpoint_bytes` | histogram: size of committed checkpoints | |
//! | `warden_heartbeat_timeouts_total` | counter: attempts aborted for missing their heartbeat timeout | kind |

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!("warden_queue_seconds", Unit::Seconds, "Time from a job being due to its attempt starting");
    describe_histogram!("warden_processing_seconds", Unit::Seconds, "Handler run time per attempt");
    describe_histogram!(
        "warden_claims_per_statement",
        Unit::Count,
        "Claims one claim statement carried (claims made while one is in flight go together)"
    );
    describe_counter!("warden_attempts_total", "Attempts by outcome");
    describe_counter!(
        "warden_schedule_fires_total",
        "Schedule nominal times by outcome: enqueued, skipped (a policy), missed (outside the catch-up window)"
    );
    describe_counter!("warden_schedule_errors_total", "Schedule fires that failed (retried by the next pass)");
    describe_histogram!(
        "warden_schedule_fire_lag_seconds",
        Unit::Seconds,
        "From a fire being due (nominal time + jitter) to its job's first start, for fires whose job started on this node"
    );
    describe_counter!("warden_jobs_completed_total", "Jobs completed");
    describe_counter!("warden_retries_total", "Attempts that will be retried");
    describe_counter!("warden_discards_total", "Jobs discarded");
    describe_counter!("warden_cancels_total", "Jobs cancelled while running");
    describe_counter!("warden_snoozes_total", "Attempts snoozed");
    describe_counter!("warden_errors_total", "Attempts that did not complete");
    describe_gauge!("warden_active_actors", "Live account actors on this node");
    describe_counter!("warden_lease_renewals_total", "Lease renewal rounds by result");
    describe_counter!("warden_self_fence_total", "Partitions this node stopped because renewal missed its deadline");
    describe_counter!("warden_fenced_writes_total", "Executor writes rejected by the lease fence");
    describe_counter!("warden_rescued_attempts_total", "Attempts rescued from an older epoch");
    describe_counter!("warden_interrupted_total", "Attempts stopped by a partition handoff (not counted)");
    describe_counter!("warden_finish_in_doubt_total", "Finishes whose earlier try had committed (reply lost)");
    describe_counter!(
        "warden_orphans_adopted_total",
        "Jobs claimed under this node's lease with no attempt here, woken for adoption"
    );
    describe_counter!("warden_attempt_panics_total", "Attempt tasks that panicked outside the handler");
    describe_counter!(
        "warden_finish_permanent_errors_total",
        "Finishes PostgreSQL rejected for good (recorded as failures instead)"
    );
    describe_counter!("warden_undecodable_jobs_total", "Claimed job rows that could not be decoded (discarded)");
    describe_counter!("warden_notifications_ignored_total", "NOTIFY payloads that were malformed or inconsistent");
    describe_counter!(
        "warden_wakeups_dropped_total",
        "Wake-ups dropped because the queue was full (a scan replaces them)"
    );
    describe_counter!("warden_retention_pruned_total", "Rows deleted by the retention pruner");
    describe_histogram!("warden_retention_batch_seconds", Unit::Seconds, "Retention pruner batch time");
    describe_histogram!("warden_retention_run_seconds", Unit::Seconds, "Retention pruner run time");
    describe_gauge!("warden_saturation", "Busy execution slots / slots, mean over the last 10 s");
    describe_gauge!("warden_execution_slots", "Execution slots of this node");
    describe_gauge!("warden_execution_slots_busy", "Handlers running now");
    describe_counter!(
        "warden_execution_busy_seconds_total",
        "Integral of busy execution slots over time (slot-seconds)"
    );
    describe_gauge!("warden_process_cpu_ratio", "Process CPU time / available cores, mean over the last 10 s");
    describe_gauge!(
        "warden_runnable_accounts",
        "Accounts waiting for a slot: due and unclaimed in this node's partitions, or claimed here and waiting"
    );
    describe_gauge!("warden_heartbeating_attempts", "Attempts running on this node that have heartbeated");
    describe_gauge!(
        "warden_heartbeat_age_max_seconds",
        "Longest time since one of this node's heartbeating attempts last heartbeated"
    );
    describe_counter!("warden_heartbeats_total", "Heartbeat writes of running jobs by outcome");
    describe_histogram!("warden_heartbeat_write_seconds", Unit::Seconds, "Time of one heartbeat write");
    describe_counter!("warden_checkpoints_total", "Checkpoint writes by outcome");
    describe_histogram!("warden_checkpoint_bytes", Unit::Bytes, "Size of committed checkpoints (bytes of JSON)");
    describe_counter!(
        "warden_heartbeat_timeouts_total",
        "Attempts aborted because their handler missed its kind's heartbeat timeout"
    );
    describe_counter!("warden_api_rejected_total", "gRPC API calls refused by a limit (concurrency, streams, pool)");
}
