"""Task-independent training machinery, shared by classification, detection and segmentation:
the training loop (:mod:`.trainer`) driving a :class:`Task`, layered configuration and the task
registry, distributed set-up, atomic checkpoints and resume, logging and progress, optimizer
and schedules, mixed precision, seeding, the non-finite-loss guard, and keeping freed memory
in the process."""

from ..lazy import export_lazily

# Imported on first use: most of the engine needs torch, and the command line reads its
# arguments with .config and .registry alone.
__all__ = export_lazily(__name__, {
    ".amp": ("AMP_CHOICES", "Precision", "resolve_precision"),
    ".checkpoint": ("BEST", "LAST", "load_training_state", "require_model_files", "resume_path", "save_atomic",
                    "start_from"),
    ".config": ("EngineConfig", "RunConfig", "OptimizerConfig", "ScheduleConfig",
                "apply_overrides", "build_config", "config_to_dict", "load_yaml", "parse_overrides"),
    ".distributed": ("DistContext", "PeerLostError", "resolve_device", "set_cpu_threads", "setup_distributed",
                     "teardown_distributed"),
    ".cpus": ("default_workers",),
    ".evaluation": ("evaluation_pass",),
    ".output": ("RUN_FILES", "claim_demo_output", "claim_output"),
    ".guard": ("NonFiniteLossError", "check_finite_loss"),
    ".memory": ("keep_freed_memory",),
    ".logging": ("Progress", "RunLogger", "SkippedFiles", "skipped_on_stderr", "MAX_NAMED_FILES"),
    ".optim": ("build_optimizer", "param_groups", "scale_lr"),
    ".schedule": ("LRSchedule", "build_schedule", "cosine_factor", "linear_warmup", "poly_factor", "step_factor"),
    ".seeding": ("capture_rng_state", "enable_determinism", "restore_rng_state", "seed_everything"),
    ".task": ("Task", "move_to_device", "require_one_batch"),
    ".trainer": ("InterruptedWhileStopping", "RunInterrupted", "Trainer", "train"),
})
