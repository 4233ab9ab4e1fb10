"""Benchmarks of maddpg-citylearn: the served policy measured against what users would otherwise run.

``load``           the closed-loop load driver (Triton HTTP and gRPC, the seed-style server's ``POST /predict``)
``perf_analyzer``  Triton's own load generator on the same Triton rows
``seed_server``    the comparison server in the seed project's style: FastAPI + PyTorch, one actor call per building
``floors``         in-process onnxruntime and torch: what no network server can beat
``runner``         all of it in one go (``maddpg-citylearn bench``); ``report`` writes its tables, JSON and plot
``robustness``     a bounded flood of typed-error-checked requests (benchmarks/overload.py, tests/test_overload.py)
Scripts beside the package: overload.py, dynamic_batching_stall.py, robustness.py (restarts), tune.py (opt-in tuning).
"""
