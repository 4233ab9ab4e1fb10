"""Benchmarks of maddpg-citylearn (docs/benchmarks.md): ``runner`` measures with ``load`` (the driver),
``perf_analyzer``, ``seed_server`` and the in-process ``floors`` on models from ``repositories``; ``report`` writes the
tables, JSON and plot; ``robustness`` floods. Scripts beside it: overload.py, dynamic_batching_stall.py, robustness.py,
tune.py."""
