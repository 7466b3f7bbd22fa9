"""`gigamil models`: the registered MIL models and tissue detectors, with their options."""

from __future__ import annotations

import inspect

from rich.table import Table

from gigamil.cli._common import cli_errors, out


@cli_errors
def models() -> None:
    """Registered MIL models (`train --model`, options `-o`) and tissue detectors
    (`extract --tissue-detector`, options `-t`): their options, defaults, and what they are."""
    from gigamil.mil.models import MODELS
    from gigamil.wsi.tissue import TISSUE_DETECTORS

    table = Table("name", "options (defaults)", "description", title="MIL models",
                  title_justify="left")
    for name in MODELS.names():
        factory = MODELS.get(name)  # a model class, or a partial that fixes some options
        cls = getattr(factory, "func", factory)
        opts = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty
                         else p.name for p in inspect.signature(factory).parameters.values())
        table.add_row(name, opts, (inspect.getdoc(cls) or "").splitlines()[0])
    out.print(table)
    table = Table("name", "options (defaults)", "description", title="tissue detectors",
                  title_justify="left")
    for name in TISSUE_DETECTORS.names():
        detector = TISSUE_DETECTORS.get(name)
        opts = ", ".join(f"{p.name}={p.default!r}" for p in
                         inspect.signature(detector).parameters.values())
        table.add_row(name, opts, (inspect.getdoc(detector) or "").splitlines()[0])
    out.print(table)
