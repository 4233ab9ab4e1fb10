"""Overload against what production runs: how fast excess load is turned away, how long accepted requests wait,
whether any request stalls 500 ms, and whether the server serves normally afterwards.

    python benchmarks/overload.py --out docs        # -> docs/overload.{md,json}

The shipped model (``model_repository/``, ``configs/cpu.pbtxt`` on Triton's onnxruntime backend, as CPU pods serve
it) in three set-ups, each on a fresh server:

``shipped, no admission``      Triton alone, as the configs ship (no queue policy): what base/gpu pods run
``Triton queue bound``         the same with ``max_queue_size`` 30 (32 in flight with 2 instances): the bound Triton
                               offers itself, which costs the 500 ms stall (docs/dynamic-batching-stall.md)
``production: admission``      Triton behind the production pods' nginx (k8s/overlays/production/admission/nginx.conf)

Each gets a bounded flood (``--requests`` requests of ``--rows`` districts, ``--concurrency`` threads, no retries,
client timeout 60 s, 127.0.0.1 only), then steady load (16 closed-loop callers, 1 district each, ``--steady``
requests): the first says how the excess is handled, the second whether requests stall once the flood is over.
Triton's own counters (queue time per request) attribute the waiting. Numbers come from a shared machine: compare the
set-ups within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "maddpg_ctde"
QUEUE_BOUND = 30  # max_queue_size: with 2 instances executing, 32 requests in Triton, like the admission bound


def queue_bound_repository(source: Path, workdir: Path) -> Path:
    """``source`` with configs/cpu.pbtxt given a queue bound (through the config writer's own parser)."""
    from maddpg_export.triton_config import parse_config, to_text

    model_dir = workdir / MODEL
    (model_dir / "configs").mkdir(parents=True)
    for entry in (source / MODEL).iterdir():
        if entry.name.isdigit() or entry.name == "config.pbtxt":
            (model_dir / entry.name).symlink_to(entry.resolve())
    config = parse_config((source / MODEL / "configs" / "cpu.pbtxt").read_text())
    config.dynamic_batching.default_queue_policy.max_queue_size = QUEUE_BOUND
    (model_dir / "configs" / "cpu.pbtxt").write_text(to_text(config))
    return workdir


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds) * 1e3
    return {"count": int(ms.size), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max())}


def run_setup(name: str, repository: Path, admission: bool, flood_batches: np.ndarray, concurrency: int,
              protocols: tuple[str, ...], steady: int) -> list[dict]:
    from maddpg_benchmarks.load import Level, Payload, Target, measure, summarise
    from maddpg_benchmarks.robustness import flood
    from maddpg_client import LocalPolicy
    from maddpg_client.metrics import scrape, scrape_settled
    from maddpg_serving.admission import AdmissionProxy
    from maddpg_serving.local_triton import LocalTritonServer, free_ports

    local = LocalPolicy(repository)
    one = flood_batches[0, :1]
    payload = Payload(one, local.act(one), local.layout.action_width, tuple(a.action_count for a in local.layout.agents))
    rows = []
    with LocalTritonServer(repository, ports=free_ports(), backend="onnxruntime", config_name="cpu") as server:
        proxy = AdmissionProxy(server.ports.http, server.ports.grpc).start() if admission else None
        try:
            for protocol in protocols:
                url = (proxy or server).http_url if protocol == "http" else (proxy or server).grpc_url
                before = scrape(server.metrics_url, MODEL)
                started = time.perf_counter()
                result = flood(url, protocol, flood_batches, concurrency=concurrency,
                               client_timeout_s=60.0, model=MODEL)
                seconds = time.perf_counter() - started
                accepted = result.of("ok")
                window = scrape_settled(server.metrics_url, MODEL,
                                        expected_success=before.request_success + len(accepted)) - before
                # Steady load once the flood is over, through the same door (HTTP).
                port = int(((proxy or server).http_url).rsplit(":", 1)[1])
                target = Target("triton-http", port, model=MODEL, metrics_url=server.metrics_url)
                level = Level(16, 1, duration_s=600.0, max_requests=steady, warmup_s=0.2)
                steady_before = scrape(server.metrics_url, MODEL)
                after = summarise("triton-http", level, payload, [measure(target, payload, level)])
                steady_window = scrape(server.metrics_url, MODEL) - steady_before
                rows.append({
                    "setup": name, "protocol": protocol, "flood_seconds": seconds, "outcomes": dict(result.counts()),
                    "rejected_ms": percentiles([o.seconds for o in result.of("PolicyOverloadedError")]),
                    "accepted_ms": percentiles([o.seconds for o in accepted]),
                    "triton_requests": window.request_success, "triton_failures": window.request_failure,
                    "triton_queue_ms_per_request": window.queue_us_per_request / 1e3,
                    "steady": {**{k: after[k] for k in ("requests", "errors", "p50_ms", "p99_ms", "max_ms", "stalled")},
                               "triton_queue_ms_per_request": steady_window.queue_us_per_request / 1e3},
                })
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if proxy is not None:
                proxy.stop()
    local.close()
    return rows


def page(data: dict) -> str:
    def cell(d: dict, key: str, digits: int = 0) -> str:
        return "-" if key not in d else f"{d[key]:,.{digits}f}"

    lines = [
        "# Overload: what production turns away, and how fast",
        "",
        f"Generated by `{data['command']}` on {data['started']} in {data['seconds'] / 60:.1f} minutes, on a shared "
        f"2-core machine (load average {' / '.join(f'{v:.2f}' for v in data['loadavg_start'])} at the start; a "
        "training job and other work ran beside it): compare the set-ups within this page, not absolute times. What "
        "the set-ups are and why production runs the last one: README, section 3, \"When the server is overloaded\"; "
        "`benchmarks/overload.py`.",
        "",
        f"Flood: {data['requests']} requests of {data['districts']} districts from {data['concurrency']} threads at once, "
        "no retries, client timeout 60 s. Then steady load: 16 callers, 1 district per request, "
        f"{data['steady']:,} requests (closed loop). *Stalled*: steady answers more than 400 ms slower than their "
        "median. Triton's queue time comes from its own counters (`nv_inference_queue_duration_us`).",
        "",
        "| Set-up | Protocol | Answered | Turned away | Turned away: p50 / p99 / max ms | Answered: p50 / p99 / max ms "
        "| Reached Triton | Triton queue ms per answered request | Afterwards: p50 / p99 / max ms | Afterwards: "
        "stalled / errors |",
        "|---|---|--:|--:|---|---|--:|--:|---|---|",
    ]
    for r in data["rows"]:
        rej, acc, s = r["rejected_ms"], r["accepted_ms"], r["steady"]
        other = {k: v for k, v in r["outcomes"].items() if k not in ("ok", "PolicyOverloadedError")}
        lines.append(
            f"| {r['setup']} | {r['protocol']} | {r['outcomes'].get('ok', 0)} | "
            f"{r['outcomes'].get('PolicyOverloadedError', 0)}{' + ' + str(other) if other else ''} | "
            f"{cell(rej, 'p50')} / {cell(rej, 'p99')} / {cell(rej, 'max')} | "
            f"{cell(acc, 'p50')} / {cell(acc, 'p99')} / {cell(acc, 'max')} | {r['triton_requests']:.0f} | "
            f"{r['triton_queue_ms_per_request']:,.0f} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['max_ms']:.1f} | "
            f"{'-' if s['stalled'] is None else s['stalled']} / {s['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rows", type=int, default=256, help="districts per flood request")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--steady", type=int, default=3000, help="requests of the steady load after the flood")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/overload.md and .json")
    args = parser.parse_args()
    if args.requests > 2048 or args.concurrency > 256:
        sys.exit("Error: a flood here is bounded: at most 2048 requests from 256 threads")

    from maddpg_client import LocalPolicy

    layout = LocalPolicy(args.repository).layout
    batches = np.random.default_rng(1).standard_normal((args.requests, args.rows, *layout.observation_shape))
    batches = batches.astype(np.float32)
    started, load = time.time(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="maddpg-overload-") as workdir:
        rows += run_setup("shipped, no admission", args.repository, False, batches, args.concurrency, ("http",), args.steady)
        rows += run_setup(f"Triton queue bound (max_queue_size {QUEUE_BOUND})",
                          queue_bound_repository(args.repository, Path(workdir)), False, batches, args.concurrency,
                          ("http",), args.steady)
        rows += run_setup("production: admission (nginx, 32 in flight)", args.repository, True, batches,
                          args.concurrency, ("http", "grpc"), args.steady)
    data = {"command": " ".join(["python", *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": time.time() - started, "loadavg_start": load, "requests": args.requests, "districts": args.rows,
            "concurrency": args.concurrency, "steady": args.steady, "rows": rows}
    print(page(data))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overload.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "overload.md").write_text(page(data))


if __name__ == "__main__":
    main()
