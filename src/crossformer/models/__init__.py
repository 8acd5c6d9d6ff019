"""The CrossFormer network, its registered variants, weights loading and counting."""

from .crossformer import MIN_INPUT_SIZE, CrossFormer
from .flops import analytic_macs, count_params, dense_backbone_macs, layer_macs, traced_macs
from .grouping import GroupLayout, group_layout
from .variants import VARIANTS, Variant, create_crossformer, identify_variant, require_known_model
from .weights import (
    DESCRIPTION_KEY,
    EMA_WEIGHTS_KEY,
    CheckpointError,
    checkpoint_description,
    convert_to_safetensors,
    extract_state_dict,
    load_checkpoint,
    load_state,
    peek_checkpoint,
    read_checkpoint,
    recorded_model,
    save_safetensors,
)

__all__ = [
    "CrossFormer",
    "MIN_INPUT_SIZE",
    "VARIANTS",
    "Variant",
    "create_crossformer",
    "identify_variant",
    "require_known_model",
    "GroupLayout",
    "group_layout",
    "CheckpointError",
    "load_checkpoint",
    "load_state",
    "read_checkpoint",
    "peek_checkpoint",
    "extract_state_dict",
    "convert_to_safetensors",
    "save_safetensors",
    "checkpoint_description",
    "DESCRIPTION_KEY",
    "EMA_WEIGHTS_KEY",
    "recorded_model",
    "count_params",
    "analytic_macs",
    "dense_backbone_macs",
    "layer_macs",
    "traced_macs",
]
