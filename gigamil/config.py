"""Config fields that carry their command-line option: one declaration for both.

    @dataclass
    class RayOptions:
        workers: int | None = option(None, "Predictor actors.", min=1)

:func:`gigamil.cli.options.from_config` turns such a dataclass into ``--options`` (help,
bounds, an optional ``flag`` name, and the default from the field itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["option"]


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with ``default`` whose metadata describes its CLI option."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})
