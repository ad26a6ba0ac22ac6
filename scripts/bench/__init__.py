"""Sections of ``scripts/bench_fps.py``: each module measures one part and returns JSON-ready data.

Every section is a function ``run(config, progress) -> dict | list``.  A section
whose dependency is missing (not installed, no GPU, not built yet) returns
``{"skipped": "<reason>"}`` instead, so the rest of the benchmark still runs.
"""
