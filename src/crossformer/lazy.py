"""A package's public names, imported from its modules when first used.

The ``crossformer`` command reads its arguments (``--help``, a misspelt flag) before it needs
torch, timm or torchvision, which take seconds to import; packages on its way (``crossformer``,
``crossformer.engine``, ``crossformer.data`` and the tasks' ``crossformer.classification``,
``crossformer.detection``, ``crossformer.segmentation``) therefore name what they export with
:func:`export_lazily` instead of importing it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Mapping, Sequence

__all__ = ["export_lazily"]


class _LazyPackage(types.ModuleType):
    """A package whose exports (``_exports``: name -> relative module) are imported on first use."""

    _exports: Mapping[str, str]

    def __getattr__(self, name: str) -> Any:  # only for names not yet set
        where = self.__dict__.get("_exports", {}).get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, self.__name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a module of the package binds it to the package under its name; an export of
        # that name (crossformer.classification.evaluate, the function) keeps it, as it did when
        # the package imported its exports at once.
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_exports", {}):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._exports})


def export_lazily(package: str, exports: Mapping[str, Sequence[str]]) -> list[str]:
    """Make the names ``exports`` lists under each module (relative to ``package``, e.g.
    ``".models"``) attributes of the package ``package`` that import their module on first use,
    so that ``from package import name`` works as with the imports in its ``__init__``.
    Returns the names, in order (the package's ``__all__``)."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_exports"] = {name: where for where, names in exports.items() for name in names}
    return list(module.__dict__["_exports"])
