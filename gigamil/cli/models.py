"""`gigamil models`: the registered MIL models and their options."""

from __future__ import annotations

import inspect

from rich.table import Table

from gigamil.cli._common import cli_errors, out


@cli_errors
def models() -> None:
    """Registered MIL models, their constructor options and defaults, and what they are."""
    from gigamil.mil.models import MODELS

    table = Table("name", "options (defaults)", "description", title="MIL models",
                  title_justify="left")
    for name in MODELS.names():
        factory = MODELS.get(name)
        model = factory(in_dim=8)
        sig = inspect.signature(type(model).__init__)
        fixed = {"abmil_gated": "gated", "mean": "mode", "max": "mode", "clam_sb": "multi_branch",
                 "clam_mb": "multi_branch"}.get(name)
        opts = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty
                         else p.name for p in list(sig.parameters.values())[1:]
                         if p.name != fixed)
        doc = (inspect.getdoc(factory) or inspect.getdoc(type(model)) or "").splitlines()[0]
        table.add_row(name, opts, doc)
    out.print(table)
