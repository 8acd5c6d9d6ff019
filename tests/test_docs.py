"""The README and docs/*.md against the code, so that they cannot drift apart unnoticed.

Every ``crossformer ...`` command line in a shell block parses (each ``--flag`` exists for
its verb and task, every ``--config`` is bundled or a YAML example of the docs) and its
settings resolve; every YAML example is a valid config; every ``crossformer.x.y`` name in
backticks exists; the size tables (README, detection.md, segmentation.md) are what
``crossformer flops`` prints; every ``--flag`` and ``section.field`` setting the prose names
exists; the defaults the settings tables give are the config classes' defaults; every
relative link, anchor and repository path resolves.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import inspect
import io
import json
import pkgutil
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from crossformer.cli import COMMANDS, build_parsers, main, parse_command_line
from crossformer.commands.common import command_line_settings, split_overrides
from crossformer.classification.config import ClassificationConfig
from crossformer.engine.config import EngineConfig, leaf_keys, parse_overrides
from crossformer.engine.registry import TASKS, bundled_configs, config_module, resolve_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# ONNX metadata keys that export.md names in backticks: strings in a file, not Python names
METADATA_KEYS = {"crossformer.height_range", "crossformer.width_range", "crossformer.input", "crossformer.classes",
                 "crossformer.category_ids"}


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(offset, body)`` of each fenced block in one of ``languages`` ("" for unmarked fences)."""
    return [(m.start(), m.group(2)) for m in FENCE.finditer(text) if m.group(1) in languages]


def command_lines(text: str) -> list[list[str]]:
    """The arguments after ``crossformer`` (or ``-m crossformer``) of every command in the shell
    blocks: continuation lines joined, comments dropped, ``[--optional parts]`` kept without their
    brackets (a list value, ``depths=[1,1,2,1]``, keeps its own). Lines with ``...`` (an elided
    command) are left out."""
    found = []
    for _, body in fenced_blocks(text, ("bash", "")):
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"\[(--[^\[\]]*)\]", r"\1", re.sub(r"(^|\s)#.*$", "", line))
            if not re.match(r"(crossformer|torchrun)\s", line):  # output shown, other tools
                continue
            words = shlex.split(line)
            if "crossformer" not in words or "..." in words:
                continue
            found.append(words[words.index("crossformer") + 1:])
    return found


def inline_commands(text: str) -> list[tuple[str, str]]:
    """``(verb, the rest)`` of each ``crossformer VERB ...`` in backticks (``train|evaluate`` for several)."""
    return re.findall(r"`crossformer ([a-z|-]+)((?:\s[^`]*)?)`", text)


def yaml_examples(text: str) -> dict[str, str]:
    """The YAML blocks, by the file name the docs give them (``# my_coco.yaml: ...`` on the
    first line, or ``my_run.yaml`` just before the block), else by their position."""
    examples = {}
    for offset, body in fenced_blocks(text, ("yaml",)):
        named = re.match(r"#\s*(\S+\.yaml)", body) or re.search(r"`(\S+\.yaml)`\W*$", text[max(0, offset - 80):offset])
        examples[named.group(1) if named else f"example_{offset}.yaml"] = body
    return examples


def _doc_commands() -> list[Any]:
    return [pytest.param(doc, argv, id=f"{doc.name}:{' '.join(argv)[:60]}")
            for doc in DOCS for argv in command_lines(doc.read_text())]


@pytest.fixture
def in_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding every YAML example of the docs under its name."""
    for doc in DOCS:
        for name, body in yaml_examples(doc.read_text()).items():
            (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_docs_have_commands_and_examples() -> None:
    """The extraction finds what the docs hold (so the tests below cannot pass on nothing)."""
    readme = (ROOT / "README.md").read_text()
    assert len(command_lines(readme)) >= 30 and sum(len(command_lines(d.read_text())) for d in DOCS) >= 80
    assert sum(len(inline_commands(d.read_text())) for d in DOCS) >= 30
    assert "my_run.yaml" in yaml_examples(readme) and "my_coco.yaml" in yaml_examples((ROOT / "docs/engine.md").read_text())


@pytest.mark.parametrize(("doc", "argv"), _doc_commands())
def test_documented_command_parses_and_its_settings_resolve(doc: Path, argv: list[str], in_examples: Path) -> None:
    """An unknown or misspelt flag, a config that is not bundled or a ``KEY=VALUE`` of no such
    setting fails here; the files and folders named need not exist (nothing is run)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args = parse_command_line(argv)
        except SystemExit as exit_:
            pytest.fail(f"{doc.name}: crossformer {' '.join(argv)}: exit {exit_.code}: {err.getvalue().strip()}")
    if not hasattr(args, "config"):
        return  # convert, demo, make-data: no configuration
    if args.config is None and args.command != "train":
        return  # the task and settings come from a checkpoint the docs' example names, not here
    overrides = args.overrides if hasattr(args, "overrides") else split_overrides(args.inputs)[1]  # predict: among the images
    resolve_config(args.config, command_line_settings(args, overrides), use_default=args.command == "train")


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_documented_yaml_examples_are_valid_configs(doc: Path, in_examples: Path) -> None:
    for name in yaml_examples(doc.read_text()):
        resolve_config(str(in_examples / name))


@functools.lru_cache(maxsize=None)
def _verb_flags(verb: str) -> set[str]:
    """Every flag ``crossformer VERB`` takes, for any task (one bundled config of each)."""
    flags: set[str] = set()
    for config in ((), ("--config", "digits"), ("--config", "mask_rcnn_shapes_demo"), ("--config", "upernet_demo")):
        _, parsers = build_parsers([verb, *config])
        flags.update(option for action in parsers[verb]._actions for option in action.option_strings)
    return flags


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_flags_of_inline_commands_exist(doc: Path) -> None:
    """``crossformer VERB --flag`` in backticks in the text (placeholders such as NAME make
    these no whole command lines): the verb exists and takes each flag."""
    spans = inline_commands(doc.read_text())
    unknown = []
    for verb, rest in spans:
        for name in verb.split("|"):
            flags = _verb_flags(name) if name in COMMANDS else set()
            unknown += [f"{name} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest) if flag not in flags]
            if name not in COMMANDS:
                unknown.append(name)
    assert not unknown


def _python_name(name: str) -> Any:
    """The module attribute a dotted name ``crossformer.a.b`` stands for (AttributeError or ImportError if none)."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:]:
            found = getattr(found, part)
        return found
    raise ImportError(name)


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_documented_python_names_exist(doc: Path) -> None:
    """``crossformer.x.y`` in backticks, and the names a module's listing gives it
    (``(`crossformer.segmentation.evaluate`: `IoUAccumulator`, `SegMetrics`)``)."""
    text = doc.read_text()
    names = {name for span in re.findall(r"`([^`\n]+)`", text)
             for name in re.findall(r"(?<![\w/.])crossformer(?:\.(?:[A-Za-z_]\w*|\{[\w,]+\}))+", span)}  # not spec/crossformer.md
    names |= {f"{module}.{name}" for module, listed in re.findall(r"`(crossformer\.[\w.]+)`: ((?:`\w+`(?:, )?)+)", text)
              for name in re.findall(r"`(\w+)`", listed)}
    names = {expanded for name in names for expanded in _expand_braces(name)}
    missing = []
    for name in sorted(names - METADATA_KEYS):
        try:
            _python_name(re.sub(r"\.(py|yaml)$", "", name))
        except (AttributeError, ImportError):
            missing.append(name)
    assert not missing


@functools.lru_cache(maxsize=None)
def _flops(*argv: str) -> dict[str, Any]:
    """What ``crossformer flops ARGV --json`` prints (several tables count the same configs)."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert main(["flops", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def _cells(row: str) -> list[str]:
    """A markdown table row's cells (``\\|`` inside a cell is a ``|`` of its text)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _table_rows(doc: str, header: str) -> list[list[str]]:
    """The cells of the table in ``doc`` whose header row starts with ``header``."""
    text = (ROOT / doc).read_text()
    table = text[text.index(header):].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip("`") for cell in _cells(row)] for row in table]


def _readme_rows(header: str) -> list[list[str]]:
    return _table_rows("README.md", header)


def _expand_braces(cell: str) -> list[str]:
    """``mask_rcnn_x_{1x,3x}`` -> both names."""
    braces = re.search(r"\{(.*?)\}", cell)
    if braces is None:
        return [cell]
    return [cell[:braces.start()] + choice + cell[braces.end():] for choice in braces.group(1).split(",")]


def test_readme_variant_table_is_what_flops_prints() -> None:
    rows = _readme_rows("| model | embed |")
    assert len(rows) == 8
    for row in rows:
        counted = _flops("--model", row[0])
        assert (f"{counted['params']:,}", f"{counted['macs'] / 1e9:.3f}") == (row[7], row[8]), row[0]


@pytest.mark.parametrize("header", ["| detector (80 classes) |", "| segmentor (150 classes) |"])
def test_readme_dense_tables_are_what_flops_prints(header: str) -> None:
    rows = _readme_rows(header)
    assert len(rows) >= 9
    for row in rows:
        ours_params, ours_gmacs = row[2].split(" / ")[0], row[3].split(" / ")[0]
        for config in _expand_braces(row[4]):
            counted = _flops("--config", config)
            assert (f"{counted['params'] / 1e6:.2f}M", f"{counted['macs'] / 1e9:.1f}") == (ours_params, ours_gmacs), config


# the docs' names of the dense models and backbones -> the bundled configs' words
DENSE_KINDS = {"RetinaNet": "retinanet", "Mask R-CNN": "mask_rcnn", "Cascade Mask R-CNN": "cascade_mask_rcnn",
               "FPN": "fpn", "UPerNet": "upernet"}
BACKBONES = {"S": "small", "B": "base", "L": "large"}


def _dense_config(kind: str, backbone: str) -> str:
    """("Mask R-CNN", "CrossFormer++-S") -> "mask_rcnn_crossformer_pp_small_1x" (cascade: its 3x)."""
    family, size = backbone.split("-")
    name = f"{DENSE_KINDS[kind]}_crossformer_{'pp_' if family.endswith('++') else ''}{BACKBONES[size]}"
    if kind in ("RetinaNet", "Mask R-CNN"):
        return f"{name}_1x"
    return f"{name}_3x" if kind == "Cascade Mask R-CNN" else name


def test_detection_doc_table_is_what_flops_prints() -> None:
    rows = _table_rows("docs/detection.md", "| Detector | Backbone |")
    assert len(rows) == 9
    for row in rows:
        counted = _flops("--config", _dense_config(row[0], row[1]))
        assert (f"{counted['params'] / 1e6:.2f}M", f"{counted['macs'] / 1e9:.1f}G") == (row[2], row[4]), row[:2]


def test_segmentation_doc_table_is_what_flops_prints() -> None:
    rows = _table_rows("docs/segmentation.md", "| model | params (ours) |")
    assert len(rows) == 10
    for row in rows:
        kind, backbone = row[0].split(" ")
        counted = _flops("--config", _dense_config(kind, backbone))
        ours = [f"{counted['params']:,}", *(f"{counted[key] / 1e9:.1f}" for key in ("macs", "backbone_macs",
                                                                                  "backbone_macs_analytic", "head_macs"))]
        assert ours == [row[1], row[3], row[5], row[6], row[7]], row[0]


def test_dense_config_names_in_the_docs_are_the_bundled_ones() -> None:
    """Each detection or segmentation config named in backticks is bundled, and each bundled
    one is named somewhere (``mask_rcnn_crossformer_small_{1x,3x}`` names two)."""
    pattern = r"`((?:retinanet|mask_rcnn|cascade_mask_rcnn|fpn|upernet)_(?:crossformer_[\w{},]+|shapes_demo|demo))`"
    named = {name for doc in DOCS for cell in re.findall(pattern, doc.read_text()) for name in _expand_braces(cell)}
    named = {expanded for name in named for expanded in _expand_braces(name)}  # two brace groups
    bundled = set(bundled_configs("detection")) | set(bundled_configs("segmentation"))
    assert sorted(named - bundled) == [] and sorted(bundled - named) == []


# flags of other tools the docs show (torchrun's, tensorboard's), engine.md's patterns of the
# derived flags, and the abbreviation README shows being refused
OTHER_FLAGS = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--logdir",
               "--field-name", "--section-field-name", "--section", "--x", "--no-x", "--img"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_flag_the_docs_name_exists(doc: Path) -> None:
    """A ``--flag`` anywhere in the text (``--skip-corrupt`` in a sentence, an option list) is a
    flag of some command, so that a flag renamed or removed leaves no doc naming it."""
    flags = set().union(*(_verb_flags(verb) for verb in COMMANDS))
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", doc.read_text()))
    assert sorted(named - flags - OTHER_FLAGS) == []


@functools.lru_cache(maxsize=None)
def _settings() -> frozenset[str]:
    """Every ``section.field`` of any task's configuration."""
    return frozenset(key for task in TASKS for key in leaf_keys(config_module(task).CONFIG))


def _text_spans(doc: Path, multiline: bool = False) -> list[str]:
    """What the prose of ``doc`` puts in backticks (fenced blocks left out: checked above); with
    ``multiline``, spans that go on over a line break too."""
    return re.findall(r"`([^`]+)`" if multiline else r"`([^`\n]+)`", FENCE.sub("", doc.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_settings_the_text_names_exist(doc: Path) -> None:
    """``run.eval_every``, ``data.skip_corrupt``, ``model.kwargs.embed_dim=32`` in backticks: the
    section has that field (in some task). Python (``model.output_fmt == ...``, calls) is no setting."""
    sections = "|".join(sorted({key.split(".")[0] for key in _settings()}))
    setting = re.compile(rf"(?<![\w.])((?:{sections})\.[a-z_]\w*)(?![\w(])")
    named = {key for span in _text_spans(doc) if "==" not in span for key in setting.findall(span)}
    assert sorted(named - _settings()) == []


def _split_top(text: str) -> list[str]:
    """``"0.4, [0.08, 1], x (a, b)"`` -> ``["0.4", "[0.08, 1]", "x (a, b)"]``: split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def _default_of(config: Any, key: str) -> Any:
    """The default of ``section.field`` in a configuration instance (tuples as lists, as YAML gives them)."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def _check_defaults(documented: list[tuple[str, str]], config: Any) -> int:
    """Compare ``(key, default as written)`` pairs with ``config``'s values; the count compared.
    A default described in words ("the variant's", "digits" for None) is not compared."""
    compared = 0
    for key, text in documented:
        value = parse_overrides([f"value={text}"])["value"] if text not in ("-", "") else None
        default = _default_of(config, key)
        if text in ("-", "") or (isinstance(value, str) and not isinstance(default, str)):
            continue
        assert value == default, f"{key}: the docs say {text}, the code {default!r}"
        compared += 1
    return compared


def test_engine_settings_table_gives_the_defaults() -> None:
    """engine.md's ``| section | fields (defaults) |`` table: each ``field`` default as the engine's."""
    rows = _table_rows("docs/engine.md", "| section | fields (defaults) |")
    documented = []
    for row in rows:
        section = re.match(r"\w+", row[0]).group()
        # each default runs up to the next field, a choice ("\|"), a comment or an " or "
        for field_name, text in re.findall(r"`(\w+)` (.+?)(?=, `|\\\||\s\(|\sor\s|$)", f"`{row[1]}"):
            documented.append((f"{section}.{field_name}", text))
    assert _check_defaults(documented, EngineConfig()) >= 30


def test_classification_settings_table_gives_the_defaults() -> None:
    """classification.md's ``| setting | default | meaning |`` table: the ImageNet recipe's defaults
    (``ClassificationConfig``); a bare key after a ``section.key`` is of the same section."""
    documented = []
    for keys_cell, defaults_cell, _ in _table_rows("docs/classification.md", "| setting | default |"):
        keys, section = [], ""
        for key in re.findall(r"[\w.*]+", keys_cell):
            section = key.split(".")[0] if "." in key else section
            keys.append(re.sub(r"\.\*$", "", key if "." in key else f"{section}.{key}"))
        defaults = _split_top(defaults_cell)
        assert len(defaults) == len(keys), keys_cell
        documented += zip(keys, defaults)
    assert _check_defaults(documented, ClassificationConfig()) >= 25


def _heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_links_and_repository_paths_resolve(doc: Path) -> None:
    """Each relative link (and its ``#anchor``) and each repository file the text names
    (``tests/...``, ``benchmarks/...``, ``docs/...``, ``src/...``; ``models/layout.py`` in the
    package) exists."""
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = doc.parent / path if path else doc
        headings = re.findall(r"^#+\s+(.+)$", FENCE.sub("", linked.read_text()), re.M) if linked.is_file() else []
        if not linked.exists() or (anchor and anchor not in map(_heading_anchor, headings)):
            broken.append(target)
    named = set(re.findall(r"(?<![\w./-])((?:tests|benchmarks|docs|src)/[\w./-]*\w)", text))
    named -= {"tests/test_models.py"}  # timm's own, which README says passes
    broken += sorted(path for path in named if not (ROOT / path).exists())
    folders = "models|data|engine|commands|classification|detection|segmentation"
    package = set(re.findall(rf"(?<![\w./-])((?:{folders})/\w+\.py)", text))
    broken += sorted(path for path in package if not (ROOT / "src/crossformer" / path).exists())
    assert broken == []


@functools.lru_cache(maxsize=None)
def _crossformer_modules() -> tuple[Any, ...]:
    """Every module of the package (``__main__`` left out: importing it runs the command line)."""
    import crossformer

    found = pkgutil.walk_packages(crossformer.__path__, "crossformer.")
    return tuple(importlib.import_module(info.name) for info in found if not info.name.endswith("__main__"))


def _defined(name: str) -> list[Any]:
    """Each function or class called ``name`` that a module of the package defines (or the one a
    dotted ``crossformer.x.name`` names)."""
    if "." in name:
        return [_python_name(name)]
    found = {id(obj): obj for module in _crossformer_modules() if (obj := getattr(module, name, None)) is not None
             and callable(obj) and getattr(obj, "__module__", "").startswith("crossformer")}
    return list(found.values())


def _documented_signatures(doc: Path) -> list[tuple[str, list[tuple[str, Any]], bool]]:
    """``(name, [(parameter, default)], open)`` of each signature the prose writes in backticks,
    ``[crossformer.x.]name(a, b=1, c=None)`` (at least one default, every default a literal: a call
    such as ``predict(..., class_names=...)`` is none); ``open``: it ends with ``...`` (the rest left out)."""
    found = []
    for span in _text_spans(doc, multiline=True):
        call = re.fullmatch(r"((?:crossformer\.[\w.]+\.)?[A-Za-z_]\w*)\((.*?)\)(?:\s*->.*)?", " ".join(span.split()))
        if call is None or "=" not in call.group(2):
            continue
        items = _split_top(call.group(2))
        is_open = items[-1] == "..."
        parameters = []
        for item in items[:-1] if is_open else items:
            name, equals, value = item.partition("=")
            if not name.isidentifier():
                break
            try:
                parameters.append((name, ast.literal_eval(value) if equals else inspect.Parameter.empty))
            except (ValueError, SyntaxError):
                break  # a value such as PATH or callback: a call, not a signature
        else:
            found.append((call.group(1), parameters, is_open))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_signatures_the_text_writes_are_the_code_s(doc: Path) -> None:
    """``evaluate_detector(detector, dataset, ctx=None, ...)`` as the docs write it: the parameters
    of that function (in order, with those defaults), all of them unless the text ends its list
    with ``...``, so that a parameter added, renamed or given another default is documented."""
    wrong = []
    for name, parameters, is_open in _documented_signatures(doc):
        actual = [[(p.name, p.default) for p in inspect.signature(obj).parameters.values()] for obj in _defined(name)]
        if not any(parameters == (params[:len(parameters)] if is_open else params) for params in actual):
            wrong.append(f"{name}{parameters}: the code has {actual or 'no such function'}")
    assert wrong == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_config_the_docs_name_is_bundled(doc: Path) -> None:
    """``--config NAME`` anywhere in the text (prose included: ``--config crossformer_tiny``) is a
    bundled config; files (``my_run.yaml``) and placeholders (``NAME_OR_FILE``) are not names."""
    named = set(re.findall(r"--config[ =]([a-z][\w-]*)(?![\w./-])", doc.read_text()))
    assert sorted(named - set(bundled_configs())) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_model_the_docs_name_exists(doc: Path) -> None:
    """``--model NAME``, ``--compare NAME``, ``--backbone NAME`` and ``model.backbone=NAME`` name
    models timm has (our variants registered, its own for a peer)."""
    import timm

    importlib.import_module("crossformer")  # registers the variants with timm
    named = set(re.findall(r"(?:--model|--compare|--backbone|model\.backbone)[ =]([a-z][\w.-]*\w)", doc.read_text()))
    assert sorted(name for name in named if not timm.is_model(name)) == []


def test_environment_variables_the_docs_name_are_read() -> None:
    """``CROSSFORMER_CACHE``, ``CROSSFORMER_KEEP_FREED_MEMORY``: each is a string the package's code holds."""
    named = {name for doc in DOCS for name in re.findall(r"\bCROSSFORMER_[A-Z_]*[A-Z]", doc.read_text())}
    source = "\n".join(path.read_text() for path in (ROOT / "src/crossformer").rglob("*.py"))
    assert named and sorted(name for name in named if f'"{name}"' not in source) == []


def test_image_extensions_in_the_data_layout_are_the_ones_read() -> None:
    """classification.md's "any common format: jpg, jpeg, ...; webp, avif where Pillow decodes them"
    is the folder reader's list."""
    from crossformer.data.folder import ALWAYS_READ_EXTENSIONS, CODEC_EXTENSIONS

    found = re.search(r"any common format: ([\w, ]+); ([\w, ]+) where Pillow decodes them",
                      (ROOT / "docs/classification.md").read_text())
    always, with_codec = ([f".{ext}" for ext in group.split(", ")] for group in found.groups())
    assert always == list(ALWAYS_READ_EXTENSIONS)
    assert with_codec == [extension for extensions in CODEC_EXTENSIONS.values() for extension in extensions]


def _help_of(argv: list[str], flag: str) -> str:
    """The ``--help`` text of ``flag`` in ``crossformer ARGV --help``, on one line."""
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        main([*argv, "--help"])
    entry = re.search(rf"^  {flag} .*?(?=^  -)", out.getvalue(), re.M | re.S)  # up to the next option
    return " ".join(entry.group().split())


def test_flops_and_benchmark_help_give_what_a_config_takes() -> None:
    """``flops`` and ``benchmark`` ``--help`` give --img-size's default; with a detection or
    segmentation --config it is not 224 but the sizes those commands use (the docs' figures), and
    a segmentation --config's benchmark always has a peer, smp's UPerNet on a timm encoder."""
    from crossformer.detection.commands import BENCHMARK_SIZE
    from crossformer.segmentation.commands import BENCH_SIZES, PEER_ENCODER

    flops_help = _help_of(["flops"], "--img-size")
    for config in ("mask_rcnn_crossformer_small_1x", "upernet_crossformer_small"):
        height, width = _flops("--config", config)["img_size"]
        assert f"{height}x{width}" in flops_help, config
    benchmark_help = _help_of(["benchmark"], "--img-size")
    for height, width in (BENCHMARK_SIZE, *BENCH_SIZES):
        assert f"{height}x{width}" in benchmark_help
    compare_help = _help_of(["benchmark"], "--compare")
    assert "UPerNet" in compare_help and PEER_ENCODER in compare_help


def test_class_names_help_says_they_replace_the_recorded_ones() -> None:
    """classification.md: labels are those of ``--class-names FILE`` where given, else the names
    the checkpoint records; the help said "(for files that record none)", as if ignored otherwise."""
    text = _help_of(["predict"], "--class-names")
    assert "replaces" in text and "record none" not in text
