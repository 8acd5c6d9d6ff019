"""Task-independent training machinery, shared by classification, detection and segmentation:
the training loop (:mod:`.trainer`) driving a :class:`Task`, layered configuration and the task
registry, distributed set-up, atomic checkpoints and resume, logging and progress, optimizer
and schedules, mixed precision, seeding, the non-finite-loss guard, and keeping freed memory
in the process."""

from .amp import AMP_CHOICES, Precision, resolve_precision
from .checkpoint import BEST, LAST, load_training_state, require_model_files, save_atomic, start_from
from .config import (
    EngineConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
    build_config,
    config_to_dict,
    load_yaml,
    parse_overrides,
)
from .distributed import DistContext, default_workers, resolve_device, set_cpu_threads, setup_distributed, teardown_distributed
from .output import RUN_FILES, claim_demo_output, claim_output
from .guard import NonFiniteLossError, check_finite_loss
from .memory import keep_freed_memory
from .logging import MAX_NAMED_FILES, Progress, RunLogger, SkippedFiles
from .optim import build_optimizer, param_groups, scale_lr
from .schedule import LRSchedule, build_schedule, cosine_factor, linear_warmup, poly_factor, step_factor
from .seeding import capture_rng_state, enable_determinism, restore_rng_state, seed_everything
from .task import Task, move_to_device
from .trainer import RunInterrupted, Trainer, train

__all__ = [
    "AMP_CHOICES", "Precision", "resolve_precision",
    "BEST", "LAST", "load_training_state", "require_model_files", "save_atomic", "start_from",
    "EngineConfig", "RunConfig", "OptimizerConfig", "ScheduleConfig",
    "apply_overrides", "build_config", "config_to_dict", "load_yaml", "parse_overrides",
    "DistContext", "default_workers", "resolve_device", "set_cpu_threads", "setup_distributed", "teardown_distributed",
    "RUN_FILES", "claim_demo_output", "claim_output",
    "NonFiniteLossError", "check_finite_loss",
    "keep_freed_memory",
    "Progress", "RunLogger", "SkippedFiles", "MAX_NAMED_FILES",
    "build_optimizer", "param_groups", "scale_lr",
    "LRSchedule", "build_schedule", "cosine_factor", "linear_warmup", "poly_factor", "step_factor",
    "capture_rng_state", "enable_determinism", "restore_rng_state", "seed_everything",
    "Task", "move_to_device",
    "RunInterrupted", "Trainer", "train",
]
