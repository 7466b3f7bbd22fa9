"""Options shared by several commands (one definition, the same help everywhere)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gigamil.wsi.extract_config import Backend as ExtractBackend
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.qc import QCConfig

F = TypeVar("F", bound=Callable[..., Any])

#: The defaults of every extraction option: the CLI reads them from here, never restates them.
EXTRACT = ExtractConfig()
QC = QCConfig()
DEFAULT_MPP = ",".join(f"{m:g}" for m in EXTRACT.mpps)


Mpp = Annotated[
    str, typer.Option(help="Target µm per pixel (0.5 ≈ 20x, 0.25 ≈ 40x); a list like "
                      "0.5,1.0,2.0 stores aligned grids at several scales.")
]
PatchSize = Annotated[int, typer.Option(min=8, max=8192, help="Patch side in px at --mpp.")]
Overlap = Annotated[int, typer.Option(min=0, help="Px shared by neighbouring patches.")]
MinTissue = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Minimum tissue fraction to keep a patch.")
]
Backend = Annotated[ExtractBackend, typer.Option(help="Slide reader.")]
MppOverride = Annotated[
    float | None, typer.Option(help="Level-0 µm/px for slides that do not record it "
                               "(a recorded value is never replaced).")
]
Pseudonymize = Annotated[bool, typer.Option(
    rich_help_panel="Slides",
    help="Replace slide ids and file names in every output with salted hashes; the mapping "
         "goes to --pseudonym-map only (mode 0600).")]
PseudonymMap = Annotated[Path | None, typer.Option(
    dir_okay=False, rich_help_panel="Slides",
    help="The id → slide mapping of --pseudonymize (default OUT.pseudonyms.json, beside OUT). "
         "Keep it; share outputs without it. Give extract's map to get the same ids.")]
AllowUpsample = Annotated[bool, typer.Option(help="Allow --mpp finer than the scan (interpolates).")]
TissueMpp = Annotated[float, typer.Option(min=1.0, help="µm/px of the tissue-detection thumbnail.")]
QcBackground = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="QC: reject a patch with more glass than this (1 = off).")
]
QcPen = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="QC: reject a patch with more marker ink than this (1 = off).")
]
QcBlur = Annotated[
    float, typer.Option(min=0.0, help="QC: reject a patch whose focus score (median Laplacian "
                        "variance of its 32-px blocks) is below this (0 = off).")
]


TissueDetector = Annotated[str, typer.Option(
    help="A registered tissue detector (see `gigamil models`).")]
TissueParam = Annotated[list[str] | None, typer.Option(
    "--tissue-param", "-t", help="Tissue detector option KEY=VALUE, repeatable "
                                 "(e.g. -t min_saturation=30).")]


def _study_defaults(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """``--config``: the study file's section for this command becomes the defaults of its
    options (so the command line still wins); eager, so it is read before the others."""
    if value is None:
        return value
    from gigamil.errors import GigamilError
    from gigamil.study import command_defaults, load_study

    try:
        study = load_study(value)
    except GigamilError as exc:  # during option parsing: click's own error line, exit 2
        raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None
    names = {}
    for p in ctx.command.params:
        for flag in getattr(p, "opts", []):
            if flag.startswith("--"):
                names[flag[2:].replace("-", "_")] = p.name
        names.setdefault(str(p.name), p.name)
    found = command_defaults(study, str(ctx.info_name))
    ctx.default_map = {**(ctx.default_map or {}),
                       **{names[k]: v for k, v in found.items() if k in names}}
    return value


#: ``--config study.yaml``: this command's options from a study file's section for it
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", exists=True, dir_okay=False, is_eager=True, callback=_study_defaults,
    help="Take this command's options from the study file's section for it (and its "
         "`cluster:`); options given here win.")]


def parse_key_values(items: list[str] | None, what: str = "option") -> dict[str, Any]:
    """``["hidden=128", "gated=true"]`` → ``{"hidden": 128, "gated": True}`` (JSON values)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} {item!r} is not KEY=VALUE, e.g. hidden=128")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def qc_default(value: float | None, off: float) -> float:
    """A QCConfig threshold as the CLI shows it (``off`` for a filter switched off)."""
    return off if value is None else value


def parse_mpps(text: str) -> tuple[float, ...]:
    """``"0.5,1.0"`` → (0.5, 1.0)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"--mpp {text!r}: give numbers like 0.5 or 0.5,1.0,2.0") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"--mpp {text!r}: values must be positive")
    return values


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"3/16"`` → (3, 16): share 3 of 16 (0-based), for SLURM array tasks."""
    if not text:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard {text!r} is not k/n, e.g. 3/16") from None
    if n < 1 or not 0 <= k < n:
        raise typer.BadParameter(f"--shard {text!r}: need 0 <= k < n")
    return k, n


def qc_config(background_max: float, pen_max: float, blur_min: float) -> QCConfig:
    """CLI thresholds → QCConfig (1, 1 and 0 switch the filters off)."""
    return QCConfig(
        background_max=None if background_max >= 1 else background_max,
        pen_max=None if pen_max >= 1 else pen_max,
        blur_min=None if blur_min <= 0 else blur_min,
    )


# -- options derived from a config dataclass -------------------------------------------------

def from_config(cls: type[Any], name: str, *, panel: str | None = None,
                defaults: dict[str, Any] | None = None, flags: dict[str, str] | None = None,
                exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command one ``--option`` per field of the dataclass ``cls``, and pass the
    built instance as the keyword argument ``name``.

    Help, bounds and choices come from each field's metadata (``help``, ``min``, ``max``,
    ``choices``; ``choices="executors"`` means the registered executors), defaults from the
    dataclass (``defaults`` overrides a few per command) — so the dataclass is the single
    source of the options. ``flags`` renames an option (``{"gpus_per_node": "--gpus-per-job"}``).
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    defaults, flags = defaults or {}, flags or {}

    def option(f: dataclasses.Field[Any]) -> inspect.Parameter:
        meta = f.metadata
        extra: dict[str, Any] = {k: meta[k] for k in ("min", "max") if k in meta}
        kind: Any = hints[f.name]
        default = defaults.get(f.name, f.default)
        if meta.get("choices") == "executors":  # the registry's names, as a choice
            from gigamil.cluster.executor import EXECUTORS

            choices: Any = Enum("Executor", {n: n for n in EXECUTORS.ordered()}, type=str)  # type: ignore[misc]
            kind, default = choices, choices(default)
        flag = flags.get(f.name) or meta.get("flag")
        decls = [flag] if flag else []
        info = typer.Option(*decls, help=meta.get("help"), rich_help_panel=panel, **extra)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[kind, info])

    added = [option(f) for f in fields]

    def decorator(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)  # real types: typer reads __signature__
        kept = [p for p in sig.parameters.values() if p.name != name]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields if f.name in kwargs}
            kwargs[name] = cls(**values)
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in kept} | {
            p.name: p.annotation for p in added}
        return wrapper  # type: ignore[return-value]

    return decorator


def cluster_options(stage: str, **flags: str) -> Callable[[F], F]:
    """The SLURM/executor options of a command (``ClusterOptions``), passed as ``cluster``."""
    from gigamil.cluster.executor import DEFAULT_TIME, ClusterOptions

    return from_config(ClusterOptions, "cluster", panel="Where it runs (--executor, SLURM)",
                       defaults={"time": DEFAULT_TIME[stage]}, flags=flags)
