"""CrossFormer and CrossFormer++ for PyTorch.

Importing this package registers the 8 official variants with timm::

    import crossformer, timm
    model = timm.create_model("crossformer_small", num_classes=10)
"""

from .cli import quiet_start, started_as_command
from .lazy import export_lazily

quiet_start()  # the crossformer command: Ctrl-C while torch and timm load ends it quietly

__version__ = "0.1.0"

__all__ = [*export_lazily(__name__, {
    ".models": ("CrossFormer", "VARIANTS", "load_checkpoint", "read_checkpoint", "convert_to_safetensors",
                "count_params", "analytic_macs"),
    ".errors": ("CheckpointError",),
}), "__version__"]
if not started_as_command():
    # A program importing the package: the variants are registered with timm now, as documented.
    # The command imports the models (torch, timm: seconds) only once its arguments are read, so
    # that --help and a misspelt flag answer at once.
    from . import models  # noqa: F401
