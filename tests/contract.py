"""Names fixed between areas (contract C): what the trainer exports, what rules and dashboards may use."""

METRIC_NAMES = frozenset({
    "rnalm_train_tokens_total", "rnalm_train_samples_total", "rnalm_train_steps_total", "rnalm_train_step", "rnalm_train_loss",
    "rnalm_train_learning_rate", "rnalm_train_grad_norm", "rnalm_train_step_duration_seconds",
    "rnalm_train_tokens_per_second", "rnalm_train_mfu_ratio", "rnalm_dataloader_wait_seconds_total",
    "rnalm_dataloader_corrupt_shards",
    "rnalm_train_nonfinite_steps_total", "rnalm_device_memory_allocated_bytes", "rnalm_device_memory_peak_bytes",
    "rnalm_checkpoint_duration_seconds", "rnalm_checkpoint_last_success_timestamp_seconds",
    "rnalm_train_last_step_timestamp_seconds", "rnalm_train_start_timestamp_seconds", "rnalm_valid_loss",
    "rnalm_run_info",
})
