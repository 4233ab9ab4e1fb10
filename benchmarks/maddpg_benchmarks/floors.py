"""In-process floors: the same computation with no server, no socket and no serialisation.

No network server can answer faster than its model runs, so these are the yardsticks of the served latency:

``onnxruntime-inprocess``       ``InferenceSession.run`` on the exported ``model.onnx`` (1 intra-op thread, as one
                                Triton instance runs it), input already a float32 array;
``torch-stacked-inprocess``     the exported ``PolicyNetwork`` in torch eager mode (stacked actors);
``torch-seed-loop-inprocess``   the comparison server's own model: 17 seed-shaped actors called one by one.

All run with one thread: torch's default of one thread per core made a batch-1 call ~35 ms instead of ~0.2 ms here
when other processes held the cores (its workers spin-wait for each other).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .load import Level, Measurement, Payload, Window

FLOOR_THREADS = 1


def onnxruntime_floor(onnx_path) -> Callable[[Payload], Callable[[], object]]:
    import onnxruntime as ort

    from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME

    options = ort.SessionOptions()
    options.intra_op_num_threads = FLOOR_THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def prepare(payload: Payload):
        feed = {INPUT_NAME: np.ascontiguousarray(payload.observations, dtype=np.float32)}
        return lambda: session.run([OUTPUT_NAME], feed)

    return prepare


def torch_floor(module) -> Callable[[Payload], Callable[[], object]]:
    """A torch module taking ``[batch, agents, obs_width]`` (the PolicyNetwork)."""
    import torch

    torch.set_num_threads(FLOOR_THREADS)
    module = module.eval()

    def prepare(payload: Payload):
        observations = torch.from_numpy(np.ascontiguousarray(payload.observations, dtype=np.float32))

        def call():
            with torch.inference_mode():
                return module(observations)

        return call

    return prepare


def seed_loop_floor(layout) -> Callable[[Payload], Callable[[], object]]:
    """The comparison server's model in process: one district, 17 actor calls (the seed's API has no batch)."""
    import torch

    from .seed_server import SeedStylePolicy

    torch.set_num_threads(FLOOR_THREADS)
    policy = SeedStylePolicy(layout)

    def prepare(payload: Payload):
        if payload.districts != 1:
            raise ValueError("the seed-style model takes one district per call")
        observations = payload.observations[0].astype(np.float64)
        return lambda: policy.act(observations)

    return prepare


def measure_inprocess(call: Callable[[], object], level: Level, pause_s: float = 0.0) -> Measurement:
    """Call ``call`` (one caller: concurrency 1) for the level's warm-up, then its window; back to back, or with
    ``pause_s`` of sleep after each call (the paced floor: the model idles between calls as it does in a server whose
    requests spend that long outside it, and its weights leave the cache as they do there)."""
    if level.concurrency != 1:
        raise ValueError("in-process floors are measured with one caller")
    deadline = time.perf_counter() + level.warmup_s
    while time.perf_counter() < deadline:
        call()
        if pause_s > 0:
            time.sleep(pause_s)
    window, clock = Window(), time.perf_counter_ns
    cpu_before, started = time.process_time(), time.perf_counter()
    deadline = started + level.duration_s
    for _ in range(level.max_requests):
        if time.perf_counter() >= deadline:
            break
        start = clock()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - counted like a server's error
            window.error(exc)
            continue
        window.latencies.append(clock() - start)
        if pause_s > 0:
            time.sleep(pause_s)
    seconds = time.perf_counter() - started
    return Measurement(latencies_ns=np.asarray(window.latencies, dtype=np.int64), seconds=seconds, span_s=seconds,
                       client_cpu_s=time.process_time() - cpu_before, errors=window.errors,
                       first_error=window.first_error)
