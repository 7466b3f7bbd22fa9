"""Synthetic data for tests, benchmarks and the demo (no torch).

- :mod:`gigamil.synth.model`: the procedural H&E-like slide (masks, textures, tiles);
- :mod:`gigamil.synth.slides`: pyramidal ``.svs`` slides and cohorts with ground-truth masks;
- :mod:`gigamil.synth.bags`: feature bags with a planted signal.

Import from the submodules; this package imports nothing on its own.
"""

from __future__ import annotations

__all__: list[str] = []
