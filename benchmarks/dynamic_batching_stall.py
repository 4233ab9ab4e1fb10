"""Minimal reproduction: Triton 2.51's dynamic batcher sometimes leaves a request in its queue for ~500 ms.

Closed-loop callers (each sends its next request when its answer arrives) against the tritonserver bundled in
nvidia-pytriton, on a one-node model (``Identity``, FP32 [4]; ``--model shipped`` serves ``model_repository`` instead),
with these configs of the same model:

    queue-policy           dynamic_batching { default_queue_policy { timeout, allow_timeout_override, max_queue_size } }
    queue-policy+delay     the same with max_queue_delay_microseconds: 100
    queue-policy+preferred the same with preferred_batch_size: [4]
    no-queue-policy        dynamic_batching { }
    no-queue-policy+delay  dynamic_batching { max_queue_delay_microseconds: 100 }   (what the served configs use)
    no-dynamic-batching    no dynamic_batching at all

each with 1 and 2 instances, on the onnxruntime backend (built by ``make setup``) and the python backend. A request
answered more than 400 ms later than its level's median counts as stalled (``maddpg_benchmarks.load.count_stalls``,
as in ``maddpg-citylearn bench``): the model runs in about a millisecond, and the stall is a 500 ms wait on top.

    python benchmarks/dynamic_batching_stall.py --model shipped --out docs   # -> docs/dynamic-batching-stall.{md,json}
    python benchmarks/dynamic_batching_stall.py --backend onnxruntime --requests 2000

Why it happens (a lost wake-up in the batcher) and what the configs do about it: docs/benchmarks.md, "The 500 ms
stall".

Numbers come from a shared machine: the stall counts are the finding, not the latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

BACKENDS = ("onnxruntime", "python")
MODEL = "stall_repro"


@dataclass(frozen=True)
class Case:
    name: str
    instances: int
    change: Callable  # (ModelConfig) -> None, applied to a config that has dynamic_batching {} and no queue policy


def _queue_policy(config) -> None:
    policy = config.dynamic_batching.default_queue_policy
    policy.default_timeout_microseconds = 1_000_000
    policy.allow_timeout_override = True
    policy.max_queue_size = 4096


def _with(*changes: Callable) -> Callable:
    def change(config) -> None:
        for one in changes:
            one(config)
    return change


def _delay(config) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = 100


def _preferred(config) -> None:
    config.dynamic_batching.preferred_batch_size.append(4)


def _no_batching(config) -> None:
    config.ClearField("dynamic_batching")


CASES = [Case(f"{name}, {n} instance{'s' if n > 1 else ''}", n, change)
         for name, change in (("queue-policy", _queue_policy), ("queue-policy+delay", _with(_queue_policy, _delay)),
                              ("queue-policy+preferred", _with(_queue_policy, _preferred)),
                              ("no-queue-policy", lambda config: None), ("no-queue-policy+delay", _delay),
                              ("no-dynamic-batching", _no_batching))
         for n in (1, 2)]


def tiny_repository(root: Path, backend: str, case: Case) -> Path:
    """A one-model repository: Identity on FP32 [4] (onnxruntime) or a model.py that echoes it (python)."""
    import onnx
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2 as pb

    from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME
    from maddpg_export.triton_config import to_text

    model_dir = root / MODEL
    (model_dir / "1").mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "identity",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 4])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              model_dir / "1" / "model.onnx")
    config = pb.ModelConfig(name=MODEL, max_batch_size=64)
    config.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[1, 4])
    config.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[1, 4])
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=case.instances)
    config.dynamic_batching.SetInParent()
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
    else:
        config.backend = "python"
        (model_dir / "1" / "model.py").write_text(ECHO_MODEL)
    case.change(config)
    (model_dir / "config.pbtxt").write_text(to_text(config))
    return root


ECHO_MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("actions", pb_utils.get_input_tensor_by_name(
            request, "observations").as_numpy())]) for request in requests]
'''


def shipped_repository(root: Path, backend: str, case: Case, source: Path) -> Path:
    """``source``'s newest version of maddpg_ctde with the backend's variant changed as the case says."""
    from maddpg_export.triton_config import parse_config, to_text

    variant = {"onnxruntime": "cpu", "python": "local"}[backend]
    model_dir = root / "maddpg_ctde"
    model_dir.mkdir(parents=True)
    newest = max((p for p in (source / "maddpg_ctde").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    (model_dir / newest.name).symlink_to(newest.resolve())
    config = parse_config((source / "maddpg_ctde" / "configs" / f"{variant}.pbtxt").read_text())
    config.ClearField("dynamic_batching")
    config.dynamic_batching.SetInParent()
    for group in config.instance_group:
        group.count = case.instances
    case.change(config)
    (model_dir / "config.pbtxt").write_text(to_text(config))
    return root


def run(backends, levels, requests: int, model: str, source: Path, progress: bool,
        cases: list[Case] = CASES) -> list[dict]:
    from tqdm.auto import tqdm

    from maddpg_benchmarks.load import Level, Payload, Target, measure, summarise
    from maddpg_serving.local_triton import LocalTritonServer, free_ports

    rows = []
    bar = tqdm(total=len(backends) * len(cases) * len(levels), unit="level", disable=not progress)
    for backend in backends:
        for case in cases:
            with tempfile.TemporaryDirectory(prefix="stall-repro-") as workdir:
                if model == "tiny":
                    repository, name = tiny_repository(Path(workdir), backend, case), MODEL
                    observations = np.arange(4, dtype=np.float32).reshape(1, 1, 4)
                    payload = Payload(observations, observations.copy(), 4, (4,))
                else:
                    from maddpg_client.local_policy import LocalPolicy

                    repository, name = shipped_repository(Path(workdir), backend, case, source), "maddpg_ctde"
                    local = LocalPolicy(source)
                    observations = np.random.default_rng(0).standard_normal((1, *local.layout.observation_shape))
                    observations = observations.astype(np.float32)
                    payload = Payload(observations, local.act(observations), local.layout.action_width,
                                      tuple(a.action_count for a in local.layout.agents))
                with LocalTritonServer(repository, ports=free_ports(), backend=backend, config_name="default",
                                       exit_timeout_s=1) as server:
                    target = Target("triton-http", server.ports.http, model=name, metrics_url=server.metrics_url,
                                    server_pid=server.process.pid)
                    for concurrency in levels:
                        level = Level(concurrency, 1, duration_s=600.0, max_requests=requests, warmup_s=0.2)
                        rows.append(_row(backend, case, summarise(name, level, payload, [measure(target, payload, level)])))
                        bar.update()
    bar.close()
    return rows


def _row(backend: str, case: Case, result: dict) -> dict:
    triton = result["triton"] or {}
    return {"backend": backend, "config": case.name, "concurrency": result["concurrency"],
            **{key: result[key] for key in ("requests", "stalled", "errors", "p50_ms", "p99_ms", "max_ms")},
            "average_batch_size": triton.get("average_batch_size"),
            "queue_us_per_request": triton.get("queue_us_per_request")}


def table(rows: list[dict]) -> str:
    from maddpg_benchmarks.load import STALL_MS

    lines = [f"| Backend | Config | Concurrency | Requests | Stalled (p50 + {STALL_MS:g} ms) | Errors | Max ms | "
             "p99 ms | Avg batch |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        batch = "-" if r["average_batch_size"] is None else f"{r['average_batch_size']:.2f}"
        lines.append(f"| {r['backend']} | {r['config']} | {r['concurrency']} | {r['requests']:,} | {'-' if r['stalled'] is None else r['stalled']} | "
                     f"{r['errors']} | {r['max_ms']:.1f} | {r['p99_ms']:.2f} | {batch} |")
    return "\n".join(lines)


def totals(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per config: (stalled, requests) over all levels and backends."""
    found: dict[str, tuple[int, int]] = {}
    for r in rows:
        stalled, requests = found.get(r["config"], (0, 0))
        found[r["config"]] = (stalled + (r["stalled"] or 0), requests + r["requests"])
    return found


def summary(rows: list[dict]) -> str:
    return "\n".join(f"{config}: {stalled} stalled of {requests:,}"
                     for config, (stalled, requests) in totals(rows).items())


def page(data: dict) -> str:
    model = ("a one-node model (`Identity` on FP32 [1, 4])" if data["model"] == "tiny" else
             "the shipped model (`model_repository/maddpg_ctde`, its backend's variant with the case's changes)")
    return "\n".join([
        "# Triton's dynamic batcher and the 500 ms stall: a minimal reproduction",
        "",
        f"Generated by `{data['command']}` on {data['started']} in {data['seconds'] / 60:.1f} minutes (load average "
        f"{' / '.join(f'{v:.2f}' for v in data['loadavg_start'])} at the start, "
        f"{' / '.join(f'{v:.2f}' for v in data['loadavg_end'])} at the end; 1 / 5 / 15 min). Closed-loop callers "
        f"(each sends its next request when its answer arrives), {data['requests']:,} requests per row, against the "
        f"tritonserver 2.51 bundled in nvidia-pytriton serving {model}. A request is stalled when it was answered "
        f"more than {data['stall_ms']:g} ms later than its row's median; *Errors* are requests the queue policy "
        "rejected after waiting its 1 s timeout. Why it happens and what the served configs "
        "do about it: [benchmarks.md, The 500 ms stall](benchmarks.md#the-500-ms-stall); the cases are described in "
        "`benchmarks/dynamic_batching_stall.py`.",
        "",
        "## Stalled requests per config, all levels and backends",
        "",
        "| Config | Stalled | Requests |",
        "|---|--:|--:|",
        *(f"| {config} | {stalled} | {requests:,} |" for config, (stalled, requests) in totals(data["rows"]).items()),
        "",
        "## Every row",
        "",
        table(data["rows"]),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=3000, help="requests per (config, level)")
    parser.add_argument("--model", choices=("tiny", "shipped"), default="tiny",
                        help="tiny: a one-node Identity model; shipped: model_repository/maddpg_ctde")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="for --model shipped")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="also write DIR/dynamic-batching-stall.md and .json")
    parser.add_argument("--configs", default=None, metavar="NAME,NAME",
                        help="only these configs (e.g. no-queue-policy+delay); default: all")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    from maddpg_serving.onnxruntime_backend import installed

    backends = BACKENDS if args.backend == "both" else (args.backend,)
    if "onnxruntime" in backends and installed() is None:
        sys.exit("Error: Triton's onnxruntime backend is not built: run `make setup` (or pass --backend python)")
    levels = tuple(int(v) for v in args.levels.split(","))
    started = time.time()
    load = os.getloadavg()
    chosen = [c for c in CASES if args.configs is None or c.name.split(",")[0] in args.configs.split(",")]
    rows = run(backends, levels, args.requests, args.model, args.repository, not args.no_progress, chosen)
    from maddpg_benchmarks.load import STALL_MS

    command = " ".join(["python", *sys.argv])
    print(table(rows))
    print("\n" + summary(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"command": command, "model": args.model, "requests": args.requests, "stall_ms": STALL_MS,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
                "loadavg_start": load, "loadavg_end": os.getloadavg(), "seconds": time.time() - started, "rows": rows}
        (args.out / "dynamic-batching-stall.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "dynamic-batching-stall.md").write_text(page(data))


if __name__ == "__main__":
    main()
