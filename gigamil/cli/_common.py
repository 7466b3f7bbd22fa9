"""Shared CLI plumbing: consoles, error handling, progress bars, logging. No domain logic."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gigamil.errors import GigamilError

F = TypeVar("F", bound=Callable[..., Any])

#: Tables and data go to stdout; progress, logs and errors to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True)

EXIT_FAILED = 1  # the command ran but some items failed
EXIT_USAGE = 2  # the command could not run (bad options or inputs)


def cli_errors(fn: F) -> F:
    """Turn :class:`GigamilError` into one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GigamilError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished outputs are kept; rerun to do the rest")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger("gigamil")
    root.handlers.clear()
    handler = RichHandler(console=err, show_path=False, show_time=verbose > 1, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def progress_bar(**kwargs: Any) -> Progress:
    """A rich progress bar on stderr; silent when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
        **kwargs,
    )


def parse_size(text: str) -> tuple[int, int]:
    """``"20000x16000"`` → (20000, 16000)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT, e.g. 20000x16000") from None
    if w <= 0 or h <= 0:
        raise typer.BadParameter("width and height must be positive")
    return w, h
