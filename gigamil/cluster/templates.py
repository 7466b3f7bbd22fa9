"""sbatch templates shipped as package data, rendered with every value shell-quoted.

    text = render_template("extract", opts, slides="/data/slides", out="/data/out",
                           n_tasks=8, args=["--mpp", "0.5"])

Command-line values (paths, extra arguments) go through ``shlex.quote``; ``#SBATCH``
values must be plain tokens (letters, digits and ``_.:,@=+-/%``), else it is an error.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from importlib import resources

from gigamil.cluster.executor import ClusterOptions
from gigamil.errors import UsageError

__all__ = ["TEMPLATES", "render_template"]

TEMPLATES = ("train", "extract", "embed", "infer")
_SAFE = re.compile(r"^[A-Za-z0-9_.:,@=+\-/%]+$")


def _directive(name: str, value: object) -> str:
    text = str(value)
    if not _SAFE.match(text):
        raise UsageError(f"--{name.replace('_', '-')} {text!r} is not a plain SLURM value",
                         "use letters, digits and _.:,@=+-/% only")
    return text


def render_template(kind: str, opts: ClusterOptions, *, args: Sequence[str] = (),
                    n_tasks: int = 1, python: str | None = None, **paths: str) -> str:
    """The sbatch script for ``kind`` (train, extract, embed or infer)."""
    if kind not in TEMPLATES:
        raise UsageError(f"no template {kind!r}", f"choose one of {', '.join(TEMPLATES)}")
    text = resources.files("gigamil.slurm_templates").joinpath(f"{kind}.sbatch").read_text()
    lines = []
    for key, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                      ("constraint", "constraint"), ("mem", "mem")):
        value = getattr(opts, key)
        if value is not None:
            lines.append(f"#SBATCH --{flag}={_directive(key, value)}")
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={int(opts.gpus_per_node)}")
    if opts.exclusive:
        lines.append("#SBATCH --exclusive")
    values = {
        "nodes": int(opts.nodes), "tasks_per_node": int(opts.tasks()),
        "cpus_per_task": int(opts.cpus_per_task), "time": _directive("time", opts.time),
        "signal_delay": int(opts.signal_delay), "array_parallelism": int(opts.array_parallelism),
        "n_tasks": int(n_tasks), "last_task": max(0, int(n_tasks) - 1),
        "sbatch_options": "\n".join(lines),
        "python": shlex.quote(python or sys.executable),
        "args": " ".join(shlex.quote(str(a)) for a in args),
        "slides": "", "data": "", "out": "",
    }
    values.update({k: shlex.quote(str(v)) for k, v in paths.items()})
    return text.format(**values)
