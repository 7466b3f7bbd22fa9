"""What a SLURM partition can run, and refusing a request it never could.

    limits = partition_limits("a100")        # from sinfo; None where sinfo cannot say
    check_request(opts)                      # UsageError naming the partition's limits

A job asking for more CPUs, memory or GPUs than any node of its partition has, more
nodes than it holds or a longer time than its limit pends for ever (reason
``PartitionConfig``, ``Resources``…) and says nothing; :func:`check_request` refuses it
at submission instead, with the partition's limits and the option to change.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gigamil.errors import UsageError

if TYPE_CHECKING:
    from gigamil.cluster.executor import ClusterOptions

__all__ = ["PartitionLimits", "partition_limits", "check_request", "parse_minutes",
           "parse_mem_mb"]


@dataclass(frozen=True)
class PartitionLimits:
    """The largest node of a partition, its node count and its time limit."""

    name: str
    cpus: int  # CPUs of its largest node
    mem_mb: int  # memory of its largest node (MB)
    gpus: int  # GPUs of its best-equipped node
    nodes: int
    time_min: int | None  # None: no limit


def parse_minutes(text: str) -> int | None:
    """SLURM's time limit (``infinite``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``)
    in minutes; None for no limit or an unreadable one."""
    text = text.strip().lower()
    if text in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return None
    h, m, s = ([0, 0] + parts)[-3:] if len(parts) > 1 else (0, parts[0], 0)
    return d * 1440 + h * 60 + m + (1 if s else 0)


def parse_mem_mb(text: str) -> int | None:
    """``--mem`` (``16G``, ``4000``, ``500M``, ``1T``) in MB; None for unreadable text."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        return None
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2)]
    return int(float(match.group(1)) * factor)


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES (``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_limits(partition: str | None) -> PartitionLimits | None:
    """The limits of ``partition`` (default: the cluster's default partition) from
    ``sinfo``; None when sinfo cannot be run or does not know the partition."""
    cmd = ["sinfo", "-h", "-o", "%P|%c|%m|%G|%D|%l"]
    if partition:
        cmd[2:2] = ["-p", partition]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|") for line in res.stdout.splitlines() if line.count("|") == 5]
    if res.returncode != 0 or not rows:
        return None
    if not partition:  # the default partition is marked with a star
        default = [r for r in rows if r[0].endswith("*")]
        rows = default or rows[:1]
    name = rows[0][0].rstrip("*")
    rows = [r for r in rows if r[0].rstrip("*") == name]
    try:
        cpus = max(int(r[1].rstrip("+")) for r in rows)
        mem = max(int(r[2].rstrip("+")) for r in rows)
        nodes = sum(int(r[4]) for r in rows)
    except ValueError:
        return None
    return PartitionLimits(name, cpus, mem, max(_gpus(r[3]) for r in rows), nodes,
                           parse_minutes(rows[0][5]))


def check_request(opts: ClusterOptions) -> None:
    """Refuse a request no node of the partition can satisfy (a job that would pend for
    ever), naming the partition's limits; silent where sinfo cannot tell."""
    limits = partition_limits(opts.partition)
    if limits is None:
        return
    where = f"partition {limits.name}"
    cpus = opts.cpus_per_task * opts.tasks()
    problems = []
    if cpus > limits.cpus:
        problems.append((f"{opts.tasks()} task(s) × --cpus-per-task {opts.cpus_per_task} = "
                         f"{cpus} CPUs per node, but no node of {where} has more than "
                         f"{limits.cpus}", f"--cpus-per-task {max(1, limits.cpus // opts.tasks())}"))
    mem = parse_mem_mb(opts.mem) if opts.mem else None
    if mem and mem > limits.mem_mb:
        problems.append((f"--mem {opts.mem}, but the nodes of {where} have at most "
                         f"{limits.mem_mb} MB", f"--mem {limits.mem_mb}M (or --mem 0: all of it)"))
    if opts.gpus_per_node > limits.gpus:
        problems.append((f"--gpus-per-node {opts.gpus_per_node}, but the nodes of {where} have "
                         f"at most {limits.gpus} GPU(s)",
                         "another --partition" if limits.gpus == 0
                         else f"--gpus-per-node {limits.gpus}"))
    if opts.nodes > limits.nodes:
        problems.append((f"--nodes {opts.nodes}, but {where} has {limits.nodes} node(s)",
                         f"--nodes {limits.nodes}"))
    if limits.time_min is not None and opts.time_minutes() > limits.time_min:
        problems.append((f"--time {opts.time}, but {where} allows at most "
                         f"{limits.time_min} minutes", "a shorter --time (jobs resume from "
                         "their checkpoints when requeued)"))
    if problems:
        raise UsageError("this job could never start: " + "; ".join(p for p, _ in problems),
                         "ask for " + ", ".join(f for _, f in problems) + ", or choose "
                         "another --partition")
