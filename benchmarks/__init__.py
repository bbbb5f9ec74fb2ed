"""fastssl benchmarks: each fused op against the baselines users run today.

``python -m benchmarks`` (``make bench``) runs every module listed in
``benchmarks.__main__.BENCHMARKS``; ``python -m benchmarks.<name>`` runs one.

A benchmark module ``benchmarks/<name>.py`` provides:

* ``PRESETS``: a dict of preset names (e.g. ``"smoke"``, ``"cpu"``, ``"target"``);
* ``main(argv: list[str] | None = None) -> dict[str, Path]``: parses ``--preset`` and
  ``--out``, prints its table, writes ``<name>.json`` / ``.md`` / ``.png`` with
  :func:`benchmarks.harness.write_results` and returns the paths written.

The shared timing, memory, roofline and reporting code is in :mod:`benchmarks.harness`.
"""
