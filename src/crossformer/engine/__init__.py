"""Task-independent training machinery, shared by classification, detection and segmentation:
distributed set-up, atomic checkpoints and resume, logging and progress, optimizer and
schedule, mixed precision, seeding, and the non-finite-loss guard."""

from .amp import AMP_CHOICES, Precision, resolve_precision
from .checkpoint import BEST, LAST, load_training_state, save_atomic
from .config import apply_overrides, config_to_dict, load_yaml
from .distributed import DistContext, resolve_device, setup_distributed, teardown_distributed
from .guard import NonFiniteLossError, check_finite_loss
from .logging import Progress, RunLogger
from .optim import ScaledLR, build_optimizer, build_scheduler, scale_learning_rates
from .seeding import capture_rng_state, enable_determinism, restore_rng_state, seed_everything

__all__ = [
    "AMP_CHOICES", "Precision", "resolve_precision",
    "BEST", "LAST", "load_training_state", "save_atomic",
    "apply_overrides", "config_to_dict", "load_yaml",
    "DistContext", "resolve_device", "setup_distributed", "teardown_distributed",
    "NonFiniteLossError", "check_finite_loss",
    "Progress", "RunLogger",
    "ScaledLR", "build_optimizer", "build_scheduler", "scale_learning_rates",
    "capture_rng_state", "enable_determinism", "restore_rng_state", "seed_everything",
]
