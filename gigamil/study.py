"""A whole study in one YAML file: its inputs, and every stage's options.

    text = study_template()                      # what `gigamil init` writes
    study = load_study("study.yaml")             # checked: file, line and allowed values
    study.extract, study.embed, study.train      # the stages' config dataclasses
    study.cluster["train"]                       # where each stage runs (ClusterOptions)

Each stage section maps onto that stage's config dataclass, the same single source of
truth as the command-line options; its ``cluster:`` mapping onto
:class:`~gigamil.cluster.executor.ClusterOptions`. Paths follow one layout under
``out``: ``data/`` (patch stores and ``features/<encoder>/``), ``runs/<name>/`` and
``preds/``. :func:`gigamil.study_status.study_status` reads the manifests those stages
write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigamil.errors import GigamilError, UsageError

if typing.TYPE_CHECKING:
    from gigamil.mil.embed_config import EmbedConfig
    from gigamil.mil.infer_config import InferConfig
    from gigamil.mil.train_config import TrainConfig
    from gigamil.wsi.extract_config import ExtractConfig

__all__ = ["STAGES", "Study", "load_study", "study_template", "command_defaults"]

STAGES = ("extract", "embed", "train", "infer")
#: fields a study sets from its own layout (or a process sets at run time), not the file
_DERIVED = {"extract": set(), "embed": {"shard", "rank", "world_size", "local_rank"},
            "train": {"features", "labels", "out", "only_folds"}, "infer": set()}
_TOP = {"slides": "Slides to extract: files, folders, slide lists (required).",
        "labels": "labels.csv of the slides (slide_id, label, …) (required to train).",
        "out": "Everything goes here: data/, runs/<name>/, preds/ (required).",
        "name": "The training run's name: out/runs/<name>.",
        "predict": "Slides to predict with the trained run (none: no infer stage)."}


def _classes() -> dict[str, type]:
    from gigamil.mil.embed_config import EmbedConfig
    from gigamil.mil.infer_config import InferConfig
    from gigamil.mil.train_config import TrainConfig
    from gigamil.wsi.extract_config import ExtractConfig

    return {"extract": ExtractConfig, "embed": EmbedConfig, "train": TrainConfig,
            "infer": InferConfig}


@dataclass
class Study:
    """A loaded, checked study file."""

    path: Path
    slides: list[str]
    out: Path
    labels: str | None = None
    name: str = "run"
    predict: list[str] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage → its options
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage → cluster options

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def preds(self) -> Path:
        return self.out / "preds"

    @property
    def extract(self) -> ExtractConfig:
        return _classes()["extract"](**self.sections.get("extract", {}))

    @property
    def embed(self) -> EmbedConfig:
        return _classes()["embed"](**self.sections.get("embed", {}))

    @property
    def features(self) -> Path:
        from gigamil.layout import ExtractDir

        return ExtractDir(self.data).features(self.embed.encoder).root

    @property
    def train(self) -> TrainConfig:
        if not self.labels:
            raise UsageError(f"{self.path.name}: the train stage needs `labels:`",
                             "name the labels CSV of the slides")
        return _classes()["train"](features=str(self.features), labels=self.labels,
                                   out=str(self.run_dir), **self.sections.get("train", {}))

    @property
    def infer(self) -> InferConfig:
        return _classes()["infer"](**self.sections.get("infer", {}))

    def cluster(self, stage: str, **overrides: Any) -> Any:
        """Where ``stage`` runs: its ClusterOptions (InferJobOptions for ``infer``)."""
        return _where(stage)(**{**self.clusters.get(stage, {}), **overrides})

    def stages(self) -> list[str]:
        """The stages this study runs, in order (infer only with ``predict:``)."""
        return [s for s in STAGES if s != "infer" or self.predict]

    def resolved(self) -> dict[str, Any]:
        """Every option with its default filled in (what is saved beside the outputs)."""
        from gigamil.versions import gigamil_version, package_versions

        out: dict[str, Any] = {"slides": self.slides, "labels": self.labels,
                               "out": str(self.out), "name": self.name, "predict": self.predict}
        for stage in STAGES:
            cfg = self.train if stage == "train" and self.labels else (
                getattr(self, stage) if stage != "train" else None)
            if cfg is not None:
                out[stage] = {k: v for k, v in dataclasses.asdict(cfg).items()
                              if k not in _DERIVED[stage]}
                out[stage]["cluster"] = dataclasses.asdict(self.cluster(stage))
        out["versions"] = {"gigamil": gigamil_version(), **package_versions()}
        return out


# -- reading -------------------------------------------------------------------------------

def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and check a study file: unknown keys, wrong types and values outside their
    choices are one :class:`UsageError` naming the file, the line and what is allowed."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}",
                         "write one with `gigamil init study.yaml`") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        raise UsageError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})",
                         "fix the indentation or quoting there") from None
    if not isinstance(root, yaml.MappingNode):
        raise UsageError(f"{path.name}: a study file is a mapping of keys",
                         "start from `gigamil init study.yaml`")
    top = _mapping(root, path, set(_TOP) | set(STAGES), "the study")
    for key in ("slides", "out"):
        if key not in top:
            raise UsageError(f"{path.name}: `{key}:` is missing", _TOP[key])
    base = path.parent

    def paths(node: Any) -> list[str]:
        value = yaml.safe_load(yaml.serialize(node))
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise UsageError(f"{path.name}:{node.start_mark.line + 1}: paths must be text",
                             "give a path or a list of paths")
        return [str(base / v) for v in items]

    study = Study(path, paths(top["slides"][1]), Path(paths(top["out"][1])[0]))
    if "labels" in top:
        study.labels = paths(top["labels"][1])[0]
    if "name" in top:
        study.name = str(yaml.safe_load(yaml.serialize(top["name"][1])))
    if "predict" in top and yaml.safe_load(yaml.serialize(top["predict"][1])) is not None:
        study.predict = paths(top["predict"][1])
    for stage, cls in _classes().items():
        if stage not in top or isinstance(top[stage][1], yaml.ScalarNode):
            continue
        allowed = {f.name for f in dataclasses.fields(cls) if f.init} - _DERIVED[stage]
        entries = _mapping(top[stage][1], path, allowed | {"cluster"}, f"`{stage}:`")
        values = {k: _value(cls, k, node, path) for k, (_, node) in entries.items()
                  if k != "cluster"}
        _construct(cls, values, entries, path, stage, study)
        study.sections[stage] = values
        if "cluster" in entries:
            runs_on = _where(stage)
            c_allowed = {f.name for f in dataclasses.fields(runs_on) if f.init}
            c_entries = _mapping(entries["cluster"][1], path, c_allowed, f"`{stage}: cluster:`")
            c_values = {k: _value(runs_on, k, node, path) for k, (_, node) in c_entries.items()}
            _construct(runs_on, c_values, c_entries, path, stage, None)
            study.clusters[stage] = c_values
    return study


def _where(stage: str) -> type:
    """What a stage's ``cluster:`` maps onto: SLURM options (and Ray's for ``infer``)."""
    from gigamil.cluster.executor import ClusterOptions

    if stage == "infer":
        from gigamil.cluster.infer import InferJobOptions

        return InferJobOptions
    return ClusterOptions


def _mapping(node: Any, path: Path, allowed: set[str], what: str) -> dict[str, tuple[Any, Any]]:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise UsageError(f"{path.name}:{node.start_mark.line + 1}: {what} must be a mapping "
                         "of keys", "indent its options under it, `key: value` each")
    out = {}
    for key, value in node.value:
        name = str(key.value)
        if name not in allowed:
            import difflib

            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            raise UsageError(f"{path.name}:{key.start_mark.line + 1}: unknown key `{name}` "
                             f"in {what}", f"did you mean `{close[0]}`?" if close else
                             f"allowed: {', '.join(sorted(allowed))}")
        out[name] = (key, value)
    return out


def _value(cls: type, name: str, node: Any, path: Path) -> Any:
    """The YAML value of field ``name`` of ``cls``, checked against its type."""
    import yaml

    value = yaml.safe_load(yaml.serialize(node))
    kind = typing.get_type_hints(cls)[name]
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):  # a nested config (qc)
        allowed_keys = {f.name for f in dataclasses.fields(kind) if f.init}
        entries = _mapping(node, path, allowed_keys, f"`{name}:`")
        return kind(**{k: _value(kind, k, n, path) for k, (_, n) in entries.items()})
    if not _fits(kind, value):
        allowed = _describe(kind)
        raise UsageError(f"{path.name}:{node.start_mark.line + 1}: `{name}: {value!r}` is not "
                         f"{allowed}", f"give {allowed}")
    return tuple(value) if isinstance(value, list) else value


def _fits(kind: Any, value: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if kind is type(None):
        return value is None
    if origin in (tuple, list):
        inner = args[0] if args else Any
        return isinstance(value, list) and all(_fits(inner, v) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if kind is type(None):
        return "null"
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "a whole number", float: "a number",
            str: "text"}.get(kind, str(kind))


def _construct(cls: type, values: dict[str, Any], entries: dict[str, tuple[Any, Any]],
               path: Path, stage: str, study: Study | None) -> None:
    """Build the dataclass once, so its own checks (ranges, combinations) run here."""
    extra: dict[str, Any] = {}
    if stage == "train" and study is not None:
        extra = {"features": "f", "labels": "l", "out": "o"}
    try:
        cls(**extra, **values)
    except GigamilError as exc:
        line = min((k.start_mark.line + 1 for k, _ in entries.values()), default=1)
        raise UsageError(f"{path.name}:{line}: `{stage}:` {exc.message}",
                         exc.hint or "fix that section") from None
    except TypeError as exc:
        raise UsageError(f"{path.name}: `{stage}:` {exc}", "fix that section") from None


# -- writing -------------------------------------------------------------------------------

def study_template() -> str:
    """A commented study file with every option at its default."""
    lines = ["# gigamil study: `gigamil run study.yaml` runs every stage in order;",
             "# `gigamil status study.yaml` says where it stands. Paths are relative to this",
             "# file. Every option below is at its default: delete what you do not change.", "",
             "slides: slides/          # " + _TOP["slides"],
             "labels: slides/labels.csv  # " + _TOP["labels"],
             "out: study/              # " + _TOP["out"],
             "name: run                # " + _TOP["name"],
             "predict: null            # " + _TOP["predict"]]
    for stage, cls in _classes().items():
        lines += ["", f"{stage}:"]
        lines += _fields(cls, _DERIVED[stage], "  ")
        lines += ["  cluster:                # where the stage runs" +
                  (" (SLURM, then Ray)" if stage == "infer" else "")]
        lines += _fields(_where(stage), set(), "    ")
    return "\n".join(lines) + "\n"


def _fields(cls: type, skip: set[str], indent: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory()  # type: ignore[operator]
        if dataclasses.is_dataclass(default):  # a nested config (extract's qc)
            out.append(f"{indent}{f.name}:")
            out.extend(_fields(type(default), set(), indent + "  "))
            continue
        if isinstance(default, tuple):
            default = list(default)
        text = json.dumps(default)
        note = f.metadata.get("help") or ""
        choices = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is typing.Literal:
            note = (note + " " if note else "") + "(" + " | ".join(map(str, choices)) + ")"
        lines = f"{indent}{f.name}: {text}"
        out.append(f"{lines:<34s} # {note}" if note else lines)
    return out


def command_defaults(study: Study, command: str) -> dict[str, Any]:
    """The options a command takes from the study (``--config``): its stage's section and
    its ``cluster:``, as command-line values (lists joined with commas)."""
    stage = command if command in STAGES else None
    if stage is None:
        return {}
    values = {**study.clusters.get(stage, {}), **study.sections.get(stage, {})}
    out: dict[str, Any] = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(v):  # a nested config (extract's qc): its own options
            out.update(dataclasses.asdict(v))  # type: ignore[arg-type]
        elif isinstance(v, tuple):
            out[k] = ",".join(str(x) for x in v)
        else:
            out[k] = v
    return out
