"""CrossFormer and CrossFormer++ for PyTorch.

Importing this package registers the 8 official variants with timm::

    import crossformer, timm
    model = timm.create_model("crossformer_small", num_classes=10)
"""

from .cli import quiet_start

quiet_start()  # the crossformer command: Ctrl-C while torch and timm load ends it quietly
from .models import (  # noqa: E402 (after quiet_start)
    VARIANTS,
    CheckpointError,
    CrossFormer,
    analytic_macs,
    convert_to_safetensors,
    count_params,
    load_checkpoint,
    read_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "CrossFormer",
    "VARIANTS",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "convert_to_safetensors",
    "count_params",
    "analytic_macs",
    "__version__",
]
