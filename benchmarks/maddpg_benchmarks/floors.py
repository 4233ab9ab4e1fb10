"""In-process floors: the same computation with no server, socket or serialisation; one caller, one thread (torch's
default of one per core made a batch-1 call ~35 ms instead of ~0.2 ms here when other processes held the cores: its
workers spin-wait for each other). A floor is ``prepare(payload) -> call``, the call built once per request size.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME

from .load import Level, Measurement, Payload


def onnxruntime_floor(onnx_path):
    """``InferenceSession.run`` on the exported graph, 1 intra-op thread as one Triton instance runs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def prepare(payload: Payload):
        feed = {INPUT_NAME: np.ascontiguousarray(payload.observations, dtype=np.float32)}
        return lambda: session.run([OUTPUT_NAME], feed)

    return prepare


def torch_floor(source):
    """The torch PolicyNetwork behind the served graph (stacked actors, eager mode; for ``--repository``, a fresh one of
    the trained architecture)."""
    import torch

    from maddpg_training.checkpoint import load_checkpoint
    from maddpg_training.networks import PolicyNetwork

    torch.set_num_threads(1)
    module = load_checkpoint(source.checkpoint).build_policy() if source.checkpoint else PolicyNetwork(source.layout)
    module.eval()

    def prepare(payload: Payload):
        observations = torch.from_numpy(np.ascontiguousarray(payload.observations, dtype=np.float32))
        return torch.inference_mode()(lambda: module(observations))

    return prepare


def seed_loop_floor(layout):
    """The comparison server's own model: one district, 17 seed-shaped actors called one by one."""
    import torch

    from .seed_server import SeedStylePolicy

    torch.set_num_threads(1)
    policy = SeedStylePolicy(layout)

    def prepare(payload: Payload):  # one district: the seed's API has no batch
        observations = payload.observations[0].astype(np.float64)
        return lambda: policy.act(observations)

    return prepare


def measure_inprocess(call: Callable[[], object], level: Level, pause_s: float = 0.0) -> Measurement:
    """``call`` for the level's warm-up, then its window; back to back, or sleeping ``pause_s`` after each call (the
    paced floor: the model idles between calls, and its weights leave the cache, as in a server)."""
    if level.concurrency != 1:
        raise ValueError("in-process floors are measured with one caller")

    def phase(duration_s: float) -> Measurement:
        window, latencies = Measurement(), []
        cpu, started = time.process_time(), time.perf_counter()
        while len(latencies) + sum(window.errors.values()) < level.max_requests and \
                time.perf_counter() < started + duration_s:
            start = time.perf_counter_ns()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted like a server's error
                window.error(exc)
                continue
            latencies.append(time.perf_counter_ns() - start)
            if pause_s:
                time.sleep(pause_s)
        window.latencies_ns, window.client_cpu_s = np.asarray(latencies, np.int64), time.process_time() - cpu
        window.seconds = window.span_s = time.perf_counter() - started
        return window

    warmup, window = phase(level.warmup_s), phase(level.duration_s)
    window.warmup_errors, window.first_error = sum(warmup.errors.values()), window.first_error or warmup.first_error
    return window
