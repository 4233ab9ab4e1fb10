"""Benchmarks of maddpg-citylearn: the served policy measured against what users would otherwise run.

``load``         the closed-loop load driver (Triton HTTP and gRPC, the seed-style server's ``POST /predict``)
``seed_server``  the comparison server in the seed project's style: FastAPI + PyTorch, one actor call per building
``floors``       in-process onnxruntime and torch: what no network server can beat
``graph_forms``  the per-agent ONNX graph (17 branches), built only to compare it with the stacked one
``runner``       all of it in one go -> ``docs/benchmarks.{md,json,png}`` (``maddpg-citylearn bench``)
"""
