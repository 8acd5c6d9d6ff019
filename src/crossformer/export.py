"""Export CrossFormer models to ONNX, TorchScript and safetensors.

ONNX (:func:`export_onnx`) goes through ``torch.export`` and the dynamo-based ONNX
exporter, with symbolic batch, height and width. The forward pass decides some things
from the input size (spec section 5): padding, the LDA group shape of CrossFormer (v1),
and the small-map rule (a stage whose short side is at most its group size uses one SDA
group). Padding and group shapes stay symbolic in the graph, so they are right at every
size; the small-map rule is a branch, so one graph is valid for the input sizes at which
every stage takes the same side of it as at the example size. :func:`dynamic_size_range`
computes that range, the export declares it to ``torch.export`` (which proves the graph
holds over it), and the graph itself turns its outputs into NaN for sizes outside it, so
a wrong size can never give plausible-looking numbers. The range is also stored in the
ONNX metadata (``crossformer.height_range``, ``crossformer.width_range``).

TorchScript (:func:`export_torchscript`) is ``torch.jit.trace`` at one fixed size (any
batch); a wrapper refuses other sizes with an error. safetensors
(:func:`export_safetensors`) writes the weights, with the model's name, settings and
classes as JSON in the file's metadata.

Every file is written atomically (:func:`crossformer.atomic.write_atomic`): a failed
export leaves the previous file as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .atomic import check_output_path, write_atomic
from .errors import UserInputError
from .models.crossformer import MIN_INPUT_SIZE, CrossFormer
from .modes import eval_mode

__all__ = [
    "SizeRange",
    "dynamic_size_range",
    "export_onnx",
    "export_torchscript",
    "export_safetensors",
    "compare_onnx",
    "EXPORT_INSTALL_HINT",
    "require_onnx",
]

EXPORT_INSTALL_HINT = "pip install 'crossformer[export]'"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class SizeRange:
    """Input heights and widths (inclusive; ``None``: no upper bound) one export serves."""

    min_height: int
    max_height: int | None
    min_width: int
    max_width: int | None

    def contains(self, height: int, width: int) -> bool:
        return (
            self.min_height <= height <= (self.max_height or math.inf)
            and self.min_width <= width <= (self.max_width or math.inf)
        )

    @staticmethod
    def _span(low: int, high: int | None) -> str:
        return f"{low}..{high}" if high is not None else f">= {low}"

    @property
    def height_text(self) -> str:
        return self._span(self.min_height, self.max_height)

    @property
    def width_text(self) -> str:
        return self._span(self.min_width, self.max_width)

    def __str__(self) -> str:
        return f"height {self.height_text}, width {self.width_text}"


def _crossformer(model: nn.Module) -> CrossFormer:
    """The CrossFormer inside a model (itself, a timm ``features_only`` wrapper, or a
    segmentor's backbone)."""
    inner = model
    while not isinstance(inner, CrossFormer):
        inner = getattr(inner, "model", None) or getattr(inner, "backbone", None)
        if not isinstance(inner, nn.Module):
            raise UserInputError(f"{type(model).__name__} is not a CrossFormer model: only CrossFormer exports")
    return inner


def _stage_sizes(model: CrossFormer, size: int) -> list[int]:
    """Map height (or width) at each stage for an input side of ``size`` pixels."""
    return [side for side, _ in model.stage_sizes(size, size)]


def _first_input_where(model: CrossFormer, stage: int, predicate: Any) -> int:
    """Smallest input side whose ``stage`` map size satisfies a monotone ``predicate``."""
    low, high = 1, 1
    while not predicate(_stage_sizes(model, high)[stage]):
        high *= 2
    while low < high:
        mid = (low + high) // 2
        if predicate(_stage_sizes(model, mid)[stage]):
            high = mid
        else:
            low = mid + 1
    return low


def dynamic_size_range(model: nn.Module, height: int, width: int) -> SizeRange:
    """The input sizes that share the exported graph of a ``height x width`` example.

    Every stage must take the same side of the small-map rule (``min(h, w) <= G``) as at
    the example. A stage above the threshold there bounds both sides from below; a stage at
    or under it bounds the example's short side from above (both if it is square). A model
    with a ``smallest_map`` attribute (a segmentor's heads) needs its coarsest map at least
    that many pixels on each side.
    """
    core = _crossformer(model)
    low = MIN_INPUT_SIZE
    smallest = getattr(model, "smallest_map", 1)
    if smallest > 1:
        low = max(low, _first_input_where(core, len(core.layers) - 1, lambda n: n >= smallest))
    max_h: int | None = None
    max_w: int | None = None
    for s, (map_h, map_w) in enumerate(zip(_stage_sizes(core, height), _stage_sizes(core, width))):
        for group in sorted({block.group_size for block in core.layers[s].blocks}):
            if min(map_h, map_w) > group:
                low = max(low, _first_input_where(core, s, lambda n, g=group: n > g))
            else:
                top = _first_input_where(core, s, lambda n, g=group: n > g) - 1
                if map_h <= map_w:
                    max_h = top if max_h is None else min(max_h, top)
                if map_w <= map_h:
                    max_w = top if max_w is None else min(max_w, top)
    return SizeRange(low, max_h, low, max_w)


def _unit_maps_kept(model: nn.Module, valid: SizeRange, height: int, width: int) -> SizeRange:
    """``valid`` narrowed to the sizes whose map sides at every stage are 1 where the
    ``height x width`` example's are, and above 1 where they are not. torch.export may
    specialise a side of 1: CrossFormer's small-map groups (``min(h, w)`` square) made a 64x48
    example, whose last map is 2x1, a graph for last maps of that shape only; other models
    (CrossFormer++'s groups, ``max(h, w)``) keep serving the wider range."""
    core = _crossformer(model)
    sides = [[valid.min_height, valid.max_height], [valid.min_width, valid.max_width]]
    for s, maps in enumerate(zip(_stage_sizes(core, height), _stage_sizes(core, width))):
        above_one = _first_input_where(core, s, lambda n: n > 1)  # the smallest side whose map here is 2 or more
        for side, size in zip(sides, maps):
            if size == 1:
                side[1] = above_one - 1 if side[1] is None else min(side[1], above_one - 1)
            else:
                side[0] = max(side[0], above_one)
    return SizeRange(*sides[0], *sides[1])


def _check_size(model: nn.Module, height: int, width: int) -> None:
    _crossformer(model)
    if min(height, width) < MIN_INPUT_SIZE:
        raise UserInputError(f"the example size must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {height}x{width}")


def _example(model: nn.Module, height: int, width: int, batch: int) -> torch.Tensor:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, _crossformer(model).in_chans, height, width, generator=generator)
    return x.to(device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and the explicit-softmax attention for the duration of an export.

    The ONNX translation of ``scaled_dot_product_attention`` is limited; the explicit path
    computes the same thing with plain matmul/softmax.
    """
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    with eval_mode(model):
        for m in fused:
            m.fused_attn = False
        try:
            yield
        finally:
            for m, value in fused.items():
                m.fused_attn = value


class _SizeGuard(nn.Module):
    """Runs the model, then makes every output NaN when the input size is out of range.

    The test is on a shape *tensor*, so ``torch.export`` cannot fold it away even though
    the declared range proves it true; ONNX keeps it as a few scalar ops.
    """

    def __init__(self, model: nn.Module, size_range: SizeRange) -> None:
        super().__init__()
        self.model = model
        self.size_range = size_range

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        r = self.size_range
        height = torch.scalar_tensor(x.shape[2], dtype=torch.int64, device=x.device)
        width = torch.scalar_tensor(x.shape[3], dtype=torch.int64, device=x.device)
        ok = (height >= r.min_height) & (width >= r.min_width)
        if r.max_height is not None:
            ok = ok & (height <= r.max_height)
        if r.max_width is not None:
            ok = ok & (width <= r.max_width)
        poison = torch.where(ok, 0.0, float("nan")).to(x.dtype)
        if isinstance(out, torch.Tensor):
            return out + poison
        # integer outputs (a detector's labels) cannot hold NaN; its boxes and scores carry it
        return tuple(o + poison if o.is_floating_point() else o for o in out)


def require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserInputError(f"ONNX export needs {' and '.join(missing)}: {EXPORT_INSTALL_HINT}")


def _output_names(model: nn.Module, features: bool) -> list[str]:
    names = getattr(model, "output_names", None)  # a wrapper that names its outputs (a detector's graph)
    if names is not None:
        return list(names)
    if not features:
        return ["logits"]
    return [f"features_{i}" for i in range(len(_crossformer(model).layers))]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: Sequence[int] = (224, 224),
    *,
    dynamic: bool = True,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
    size_range: SizeRange | None = None,
    batch: int | None = None,
) -> SizeRange:
    """Write ``model`` as an ONNX file with symbolic batch, height and width.

    Args:
        model: A CrossFormer, or a timm ``features_only`` CrossFormer (its outputs are the
            four NCHW stage maps ``features_0..3``; otherwise one output ``logits``), or
            another module with one output ``logits`` around a CrossFormer ``backbone``
            (:class:`crossformer.segmentation.FullSizeLogits`).
        path: The ``.onnx`` file to write (one file, weights included).
        img_size: ``(height, width)`` of the example input used for tracing.
        dynamic: Symbolic height and width. ``False`` fixes them to the example size
            (the batch stays symbolic either way unless ``batch`` fixes it).
        opset: ONNX opset (default 18).
        metadata: More ``metadata_props`` entries (e.g. the class names).
        size_range: The sizes the graph serves, when the model knows them better than
            :func:`dynamic_size_range` (a detector that pads its input inside the graph).
        batch: A fixed batch size (a detector's graph: one image); default symbolic.
        A model with an ``output_names`` attribute names its outputs so.

    Returns:
        The input sizes the file is exact for. Outside them every output is NaN (or
        onnxruntime fails to run the graph).
    """
    require_onnx()
    height, width = int(img_size[0]), int(img_size[-1])
    _check_size(model, height, width)
    features = not isinstance(model, CrossFormer) and hasattr(model, "feature_info")
    if not dynamic:
        valid = SizeRange(height, height, width, width)
    else:
        valid = size_range or dynamic_size_range(model, height, width)
    if not valid.contains(height, width):  # a segmentor's coarsest map of one pixel (``smallest_map``)
        raise UserInputError(f"a {height}x{width} example is too small for this model's export: "
                             f"use at least {valid.min_height}x{valid.min_width}")
    import torch.fx.experimental._config as shape_config
    from torch.export import Dim

    path = check_output_path(path)  # before the minutes the export takes
    names = _output_names(model, features)
    example = _example(model, height, width, batch=batch or 2)  # batch 2: a batch of 1 would be specialised
    dims = {} if batch else {0: Dim("batch", min=1, max=1 << 16)}
    # the widest range first, then (where torch.export found it too wide) the one keeping every
    # map side of 1 at 1 and every other above 1
    narrowed = _unit_maps_kept(model, valid, height, width) if dynamic and size_range is None else valid
    ranges = [valid] if narrowed == valid else [valid, narrowed]
    with _export_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Size-oblivious reasoning: no guards that a symbolic size is (not) 0 or 1.
        with shape_config.patch(backed_size_oblivious=True):
            for attempt, valid in enumerate(ranges, 1):
                guarded = _SizeGuard(model, valid)
                if dynamic:
                    dims[2] = Dim("height", min=valid.min_height, max=valid.max_height or (1 << 16))
                    dims[3] = Dim("width", min=valid.min_width, max=valid.max_width or (1 << 16))
                try:
                    program = torch.export.export(guarded, (example,), dynamic_shapes={"x": dims})
                    break
                except Exception as err:  # a guard outside the declared range, or an untraceable op
                    if attempt == len(ranges):
                        raise RuntimeError(f"torch.export failed for {height}x{width} over {valid}: {err}") from err
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=opset or DEFAULT_OPSET,
                input_names=["images"],
                output_names=names,
                external_data=False,
                optimize=False,  # the graph rewriter takes longer than the export; runtimes optimise anyway
                verbose=False,
            )
    core = _crossformer(model)
    metadata = {
        "crossformer.height_range": valid.height_text,
        "crossformer.width_range": valid.width_text,
        "crossformer.long_distance": core.long_distance,
        "crossformer.outputs": ",".join(names),
        "crossformer.note": "outputs are NaN (or onnxruntime fails) for input sizes outside the ranges",
        **(metadata or {}),
    }
    for key, value in metadata.items():
        onnx_program.model.metadata_props[key] = value
    proto = onnx_program.model_proto  # one file, weights included
    write_atomic(path, lambda file: file.write(proto.SerializeToString()))
    return valid


def _difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max difference, relative to the output's largest magnitude when that exceeds 1 (a
    detector's boxes are in pixels, where float32 spacing is 1e-4 at 1000), else absolute;
    infinite where the shapes differ (a different number of detections), 0 for two empty outputs."""
    if got.shape != expected.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    expected = expected.double()
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def compare_onnx(
    model: nn.Module, path: str | Path, sizes: Sequence[Sequence[int]], batch: int = 1,
    counts: dict[tuple[int, int], int] | None = None,
) -> dict[tuple[int, int], float]:
    """Max difference between onnxruntime and PyTorch at each ``(height, width)``: absolute,
    or relative to an output's largest magnitude where that exceeds 1. ``counts``, when given,
    receives the length of PyTorch's first output at each size (a detector's detections)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserInputError(f"checking an ONNX file needs onnxruntime: {EXPORT_INSTALL_HINT}") from None
    options = ort.SessionOptions()
    # errors only: its graph optimiser warns that it cannot fold the exporter's CastLike nodes,
    # which says nothing about the file (the comparison below does)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    errors = {}
    with eval_mode(model):
        for size in sizes:
            height, width = int(size[0]), int(size[-1])
            x = _example(model, height, width, batch).float()
            with torch.no_grad():
                expected = model(x.to(next(model.parameters()).device))
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            got = session.run(None, {input_name: x.cpu().numpy()})
            if counts is not None:
                counts[(height, width)] = int(expected[0].shape[0])
            errors[(height, width)] = max(_difference(torch.from_numpy(g), e.cpu()) for g, e in zip(got, expected))
    return errors


class _FixedSize(nn.Module):
    """Calls a traced module after checking the input has the size it was traced at."""

    def __init__(self, traced: nn.Module, in_chans: int, height: int, width: int) -> None:
        super().__init__()
        self.traced = traced
        self.in_chans = in_chans
        self.height = height
        self.width = width

    def forward(self, x: torch.Tensor) -> Any:
        if x.dim() != 4 or x.size(1) != self.in_chans or x.size(2) != self.height or x.size(3) != self.width:
            raise ValueError(
                "this TorchScript CrossFormer was traced for (batch, {}, {}, {}) inputs, got {}".format(
                    self.in_chans, self.height, self.width, list(x.shape)
                )
            )
        return self.traced(x)


def export_torchscript(model: nn.Module, path: str | Path, img_size: Sequence[int] = (224, 224)) -> Path:
    """Write ``model`` as TorchScript, traced at one ``(height, width)`` (any batch size).

    The forward pass chooses padding and grouping from the input size; tracing records the
    choices for ``img_size`` only, so the saved module refuses other sizes with an error.
    """
    height, width = int(img_size[0]), int(img_size[-1])
    _check_size(model, height, width)
    in_chans = _crossformer(model).in_chans
    path = check_output_path(path)
    example = _example(model, height, width, batch=1)
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notices: asked for
        traced = torch.jit.trace(model, example, check_trace=False)
        scripted = torch.jit.script(_FixedSize(traced, in_chans, height, width))
        return write_atomic(path, lambda file: torch.jit.save(scripted, file))


def export_safetensors(
    source: nn.Module | str | Path, path: str | Path, description: dict[str, Any] | None = None
) -> Path:
    """Write the weights of a checkpoint file (via :func:`crossformer.convert_to_safetensors`,
    which keeps what the checkpoint says about its model) or of a model's state dict, with
    ``description`` (e.g. ``{"model_name": ..., "model_kwargs": ...}``) in the file's metadata.
    Read them back with :func:`crossformer.load_checkpoint`. A wrapped model (``features_only``,
    DDP, compiled) is saved as the network inside, under its own key names, which a model built
    as it was loads (the wrapper's ``model.`` prefix fitted nothing)."""
    from .models.weights import convert_to_safetensors, save_safetensors, unwrap_model

    if not isinstance(source, nn.Module):
        return convert_to_safetensors(source, path)
    return save_safetensors(unwrap_model(source)[0].state_dict(), path, description)
