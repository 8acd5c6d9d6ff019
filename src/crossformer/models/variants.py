"""The 8 official variants, registered with timm.

``import crossformer`` registers ``crossformer_{tiny,small,base,large}`` (CrossFormer) and
``crossformer_pp_{small,base,large,huge}`` (CrossFormer++). No weights are downloaded:
pass an official or converted file with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .crossformer import CrossFormer

__all__ = ["Variant", "VARIANTS", "create_crossformer"]

_V1 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval")
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group")


@dataclass(frozen=True)
class Variant:
    """One official model: its architecture and the figures published for it."""

    name: str
    arch: dict[str, Any]
    params: int  # official parameter count with a 1000-class head
    official_gmacs: float  # the official analytic counter at 224
    paper_params_m: float
    paper_gflops: float
    paper_top1: float


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("crossformer_tiny", dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16),
                                         drop_path_rate=0.1, **_V1), 27_776_794, 2.858, 27.8, 2.9, 81.5),
        Variant("crossformer_small", dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                                          drop_path_rate=0.2, **_V1), 30_657_394, 4.910, 30.7, 4.9, 82.5),
        Variant("crossformer_base", dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                                         drop_path_rate=0.3, **_V1), 51_971_554, 9.165, 52.0, 9.2, 83.4),
        Variant("crossformer_large", dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                          drop_path_rate=0.5, **_V1), 91_971_184, 16.116, 92.0, 16.1, 84.0),
        Variant("crossformer_pp_small", dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16),
                                             drop_path_rate=0.2, **_PP), 23_325_340, 4.389, 23.3, 4.9, 83.2),
        Variant("crossformer_pp_base", dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                                            drop_path_rate=0.3, **_PP), 51_994_594, 9.504, 52.0, 9.5, 84.2),
        Variant("crossformer_pp_large", dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                             drop_path_rate=0.5, **_PP), 92_001_904, 16.567, 92.0, 16.6, 84.7),
        Variant("crossformer_pp_huge", dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32),
                                            drop_path_rate=0.5, **_PP), 95_962_944, 21.586, 96.0, 21.8, 84.9),
    ]
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": tuple(f"patch_embed.projs.{i}" for i in range(4)),
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2108.00154, arXiv:2303.06908",
        "paper_name": "CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention",
        "origin_url": "https://github.com/cheerss/CrossFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"{name}.in1k": _cfg() for name in VARIANTS})


def create_crossformer(variant: str, pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """Build a registered variant; ``kwargs`` override its architecture (timm style).

    ``pretrained=True`` needs a local file in the pretrained config
    (``pretrained_cfg_overlay=dict(file=PATH)``); it is read with
    :func:`crossformer.load_checkpoint`, which accepts the official formats without
    unpickling arbitrary objects.
    """
    from .weights import load_checkpoint  # weights imports this module's registry

    arch = {**VARIANTS[variant].arch, **kwargs}
    out_indices = arch.pop("out_indices", (0, 1, 2, 3))
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=arch.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=arch.pop("pretrained_cfg_overlay", None),
    )
    weights_file = pretrained_cfg.file if pretrained else None
    if pretrained and not weights_file:
        raise RuntimeError(
            f"no weights are bundled for {variant}: pass a local checkpoint with "
            f"pretrained_cfg_overlay=dict(file=PATH) (official .pth files work as they are)"
        )
    model = build_model_with_cfg(
        CrossFormer,
        variant,
        pretrained=False,
        pretrained_cfg=pretrained_cfg,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **arch,
    )
    if weights_file:
        load_checkpoint(model, weights_file)
    return model


def _register(name: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
        return create_crossformer(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: see crossformer.models.variants.VARIANTS[{name!r}]."
    globals()[name] = register_model(entrypoint)


for _name in VARIANTS:
    _register(_name)
