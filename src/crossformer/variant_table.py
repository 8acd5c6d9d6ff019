"""The 8 official CrossFormer variants (their names, architectures and published figures) and the
check of a model name, without torch: configs check a backbone or model name as they load,
before a command imports torch (seconds). :mod:`crossformer.models.variants` registers each
with timm under its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserInputError, did_you_mean

__all__ = ["Variant", "VARIANTS", "IMAGENET_CLASSES", "require_known_model"]

IMAGENET_CLASSES = 1000  # the official classifiers' head, and a model-only command's default

_V1 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval")
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group")


def family_grouping(use_acl: bool) -> dict[str, Any]:
    """The group sizes, intervals and long-distance groups of the family that has (CrossFormer++)
    or lacks (v1) the activation cooling layer: what its weights were trained with."""
    return {key: value for key, value in (_PP if use_acl else _V1).items() if key != "use_acl"}


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


def require_known_model(name: str, variants_only: bool = False, setting: str | None = None) -> None:
    """A one-line error unless ``name`` is a registered variant (or, by default, any timm
    model), suggesting the closest known names (``crossformer_tinny``: ``crossformer_tiny``);
    ``setting`` (e.g. ``"model.backbone"``) names the config key that gave it. A variant's
    name is known without timm, which imports torch."""
    if name in VARIANTS:
        return
    known = list(VARIANTS)
    if not variants_only:
        import timm

        known = list(dict.fromkeys([*VARIANTS, *timm.list_models()]))  # timm lists them once crossformer.models ran
    if name in known:
        return
    hint = did_you_mean(name, known)
    others = "" if variants_only else ", or any timm model"
    where = f"{setting}: " if setting else ""
    raise UserInputError(f"{where}unknown model {name!r}; {hint}the CrossFormers: {', '.join(VARIANTS)}{others}")
