"""Benchmarks of maddpg-citylearn: the served policy measured against what users would otherwise run.

``runner`` (``maddpg-citylearn bench``) measures, with the load driver ``load``, Triton, the seed-style server
``seed_server`` and the in-process ``floors`` on models from ``repositories``, runs ``perf_analyzer`` beside it, and
``report`` writes the tables, JSON and plot. ``robustness``: a bounded, typed flood. Scripts beside the package:
overload.py, dynamic_batching_stall.py, robustness.py (restarts), tune.py (opt-in tuning).
"""
