"""``maddpg-citylearn bench``: Triton (HTTP and gRPC, its other backend over HTTP), the seed-style server and the
in-process floors measured side by side in interleaved rounds (docs/benchmarks.md, "How"); then the paced floor,
perf_analyzer on the Triton rows, and the goals."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import load
from .load import Level, Measurement, Payload, Target, find
from .repositories import INSTANCES_KNOB, BenchmarkRepository, describe_settings, model_figures, settings_view

# The comparison server's fastest setup here (benchmarks/tune.py measures it against a thread-pool endpoint).
SEED_SETUP = {"label": "async endpoint, 1 torch thread", "endpoint": "async", "torch_threads": 1}
DISTRICTS = (1, 64)


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 4.0          # measured seconds per (contender, level), split over the rounds
    rounds: int = 4                  # interleaved rounds
    warmup_s: float = 0.25           # per window, not counted
    max_requests: int = 200_000      # per (contender, level): the other bound of a level
    levels: tuple[int, ...] = (1, 4, 16, 64)
    districts: tuple[int, ...] = DISTRICTS
    perf_analyzer: bool = True       # Triton rows again with Triton's perf_analyzer
    repository: Path | None = None   # default: a fresh policy on the real env layout, exported to a temp dir
    backend: str = "auto"            # Triton's backend for the served rows: auto, onnxruntime or python
    command: str = ""                # how this run was started, for the report
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "BenchOptions":
        """A smoke run: two levels, sub-second windows (about a minute)."""
        return cls(**{**dict(duration_s=0.6, rounds=1, warmup_s=0.2, max_requests=20_000, levels=(1, 16)), **overrides})


@dataclass
class Contender:
    """Something measured at a level: a served endpoint through the load driver, or an in-process floor."""

    name: str
    run: Callable[[Level, Payload], Measurement]
    config: str = ""
    client: str = "asyncio-raw"
    districts: tuple[int, ...] = DISTRICTS     # request sizes it takes
    levels: tuple[int, ...] | None = None      # concurrency levels it takes (None: all)


def served(target: Target, districts: tuple[int, ...] = DISTRICTS, name: str | None = None) -> Contender:
    return Contender(name or target.name, lambda level, payload: load.measure(target, payload, level), target.config,
                     districts=districts)


def inprocess(name: str, prepare, districts: tuple[int, ...], pause_s: float = 0.0,
              config: str = "1 thread") -> Contender:
    """An in-process floor (``floors``): one caller, its call prepared once per request size."""
    from .floors import measure_inprocess

    calls: dict[int, Callable[[], object]] = {}

    def run(level: Level, payload: Payload) -> Measurement:
        if payload.districts not in calls:
            calls[payload.districts] = prepare(payload)
        return measure_inprocess(calls[payload.districts], level, pause_s)

    return Contender(name, run, config, "in-process", districts, levels=(1,))


def run_interleaved(contenders: Sequence[Contender], levels: Sequence[tuple[int, int]], payloads: dict[int, Payload],
                    options: BenchOptions, description: str, duration_s: float | None = None) -> list[dict]:
    """Every contender at every (concurrency, districts) it takes, in ``options.rounds`` interleaved rounds."""
    from tqdm.auto import tqdm

    plan = [(c, d, contender) for c, d in levels for contender in contenders
            if d in contender.districts and (contender.levels is None or c in contender.levels)]
    rounds = options.rounds
    windows: list[list[Measurement]] = [[] for _ in plan]
    with tqdm(total=len(plan) * rounds, desc=description, unit="window", disable=not options.progress,
              leave=False) as bar:
        for _ in range(rounds):
            for (c, d, contender), measured in zip(plan, windows):
                measured.append(contender.run(Level(c, d, (duration_s or options.duration_s) / rounds,
                                                    max(1, options.max_requests // rounds), options.warmup_s),
                                              payloads[d]))
                bar.update()
    return [load.summarise(contender.name, Level(c, d), payloads[d], measured, client=contender.client,
                           config=contender.config) for (c, d, contender), measured in zip(plan, windows)]


# --- servers: maddpg_serving's LocalTritonServer and the seed-style server, started side by side ----------------------
@contextmanager
def started(servers: list):
    """Start ``servers`` in parallel; stop them all by PID on the way out, whatever happened."""
    try:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(lambda server: server.start(timeout=120.0), servers))
        yield servers
    finally:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(lambda server: server.stop(), servers))


def triton_servers(repositories: Sequence[Path], backend: str) -> list:
    from maddpg_serving.local_triton import LocalTritonServer, TritonPorts, reserve_ports

    ports = reserve_ports(3 * len(repositories), load.HOST)
    # A short exit timeout: nothing is in flight when benchmarks stop a server.
    return [LocalTritonServer(repository, ports=TritonPorts(*ports[3 * i : 3 * i + 3]), host=load.HOST, backend=backend,
                              exit_timeout_s=1) for i, repository in enumerate(repositories)]


def triton_target(server, model: str, config: str, name: str) -> Target:
    port = server.ports.grpc if name.endswith("grpc") else server.ports.http
    return Target(name, port, model, server.metrics_url, server.process.pid, config)


def make_payloads(source: BenchmarkRepository, districts: Sequence[int], seed: int = 0) -> dict[int, Payload]:
    """Observations on the scale of real ones (standard normal per slot) and the actions the exported model gives."""
    from maddpg_client.local_policy import LocalPolicy

    rng, local = np.random.default_rng(seed), LocalPolicy(source.onnx_path)
    counts = tuple(agent.action_count for agent in source.layout.agents)
    payloads = {}
    for count in sorted(set(districts) | {1}):
        observations = rng.standard_normal((count, *source.layout.observation_shape)).astype(np.float32)
        payloads[count] = Payload(observations, local.act(observations), source.layout.action_width, counts)
    local.close()
    return payloads


class Bench:
    """One benchmark run; :meth:`run` returns the report data (``report.write_benchmark_report`` writes the files)."""

    def __init__(self, options: BenchOptions, say: Callable[[str], None] = lambda _: None):
        from maddpg_serving.local_triton import default_backend

        self.options, self.say = options, say
        self.backend = default_backend() if options.backend == "auto" else options.backend

    def source(self, workdir: Path) -> BenchmarkRepository:
        from .repositories import build_repository, open_repository

        repository = self.options.repository
        return open_repository(Path(repository)) if repository else build_repository(workdir / "source", say=self.say)

    def run(self) -> dict[str, Any]:
        from maddpg_export.triton_config import ServingSettings
        from maddpg_serving.local_triton import default_backend

        from .floors import onnxruntime_floor, seed_loop_floor, torch_floor
        from .report import machine_info
        from .seed_server import SeedServerProcess

        o, started_at, machine = self.options, time.time(), machine_info()
        other = "python" if self.backend == "onnxruntime" else "onnxruntime"
        defaults = ServingSettings()
        label = describe_settings(defaults, self.backend)
        workdir = Path(tempfile.mkdtemp(prefix="maddpg-bench-"))
        try:
            source = self.source(workdir)
            payloads = make_payloads(source, o.districts)
            self.say(f"comparison: Triton ({label}) over HTTP and gRPC, Triton's {other} backend over HTTP, the "
                     f"seed-style server ({SEED_SETUP['label']}), in-process floors; levels {list(o.levels)} x "
                     f"districts {list(o.districts)}")
            view = settings_view(source, defaults, workdir / "served")
            triton = triton_servers([view], self.backend)
            others = triton_servers([view], other) if other == "python" or default_backend() == other else []
            seed = SeedServerProcess(source.layout, SEED_SETUP["endpoint"], SEED_SETUP["torch_threads"])
            with started([*triton, *others, seed]):
                contenders = [served(triton_target(triton[0], source.model, label, f"triton-{p}"), o.districts)
                              for p in ("http", "grpc")]
                contenders += [served(triton_target(s, source.model, describe_settings(defaults, other),
                                                    f"triton-{other}-http"), o.districts) for s in others]
                contenders += [served(seed.target(SEED_SETUP["label"]), (1,)),
                               inprocess("onnxruntime-inprocess", onnxruntime_floor(source.onnx_path), o.districts),
                               inprocess("torch-stacked-inprocess", torch_floor(source), o.districts),
                               inprocess("torch-seed-loop-inprocess", seed_loop_floor(source.layout), (1,))]
                results = run_interleaved(contenders, [(c, d) for c in o.levels for d in o.districts], payloads, o,
                                          "comparison")
                version = server_version(triton[0])
                perf = (self.perf_analyzer(triton[0], source, workdir) if o.perf_analyzer else
                        {"skipped": "--no-perf-analyzer"})
            paced = self.paced_floor(source, payloads, results)
            model = model_figures(source, str(o.repository) if o.repository else "fresh policy")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        machine.update(tritonserver_version=version, loadavg_end=list(os.getloadavg()))
        return {
            "command": o.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started_at)),
            "seconds": time.time() - started_at,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in o.__dict__.items()},
            "machine": machine,
            "backend": self.backend,
            "other_backend": other,
            "model": model,
            "serving_settings": {"label": label, "instances": getattr(defaults, INSTANCES_KNOB[self.backend]),
                                 "variant": "configs/cpu.pbtxt" if self.backend == "onnxruntime" else
                                            "configs/local.pbtxt", **defaults.__dict__},
            "seed_server": SEED_SETUP,
            "paced_floor": paced,
            "stall_ms": load.STALL_MS,
            "results": results,
            "perf_analyzer": perf,
            "goals": goals(results),
        }

    def perf_analyzer(self, server, source: BenchmarkRepository, workdir: Path) -> dict[str, Any]:
        """The Triton rows (HTTP and gRPC, every level and request size) measured again by perf_analyzer."""
        from tqdm.auto import tqdm

        from . import perf_analyzer

        found = perf_analyzer.version()
        if found is None:
            self.say(f"skipping perf_analyzer: {perf_analyzer.INSTALL_HINT}")
            return {"skipped": perf_analyzer.INSTALL_HINT}
        o = self.options
        plan = [(p, c, d) for p in ("http", "grpc") for d in o.districts for c in o.levels]
        window_ms = max(500, int(1000 * o.duration_s / 2))
        self.say(f"perf_analyzer {found}: {len(plan)} levels, {window_ms} ms windows")
        rows = [{"target": f"triton-{protocol}", "concurrency": concurrency, "districts": districts,
                 **perf_analyzer.measure(server.http_url if protocol == "http" else server.grpc_url, protocol,
                                         source.model, source.layout.observation_shape, districts, concurrency,
                                         window_ms, workdir)}
                for protocol, concurrency, districts in tqdm(plan, desc="perf_analyzer", disable=not o.progress,
                                                             leave=False)]
        return {"version": found, "window_ms": window_ms, "rows": rows}

    def paced_floor(self, source, payloads, results: list[dict]) -> dict[str, Any] | None:
        """In-process onnxruntime at the served pace: after each call, a pause as long as a served request at
        concurrency 1 spends outside the model (its mean latency minus Triton's compute time). Appended to results."""
        from .floors import onnxruntime_floor

        served_c1 = find(results, "triton-http", 1, 1)
        if served_c1 is None or not served_c1["requests"] or not served_c1["triton"]:
            return None
        compute_ms = served_c1["triton"]["compute_us_per_request"] / 1000
        pause_ms = max(0.0, served_c1["mean_ms"] - compute_ms)
        contender = inprocess("onnxruntime-inprocess-paced", onnxruntime_floor(source.onnx_path), (1,),
                              pause_s=pause_ms / 1000, config=f"1 thread, {pause_ms:.3f} ms pause after each call")
        results += run_interleaved([contender], [(1, 1)], payloads, self.options, "paced floor")
        return {"pause_ms": pause_ms, "served_mean_ms": served_c1["mean_ms"], "served_compute_ms": compute_ms}


def server_version(server) -> str:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as response:
            return json.loads(response.read()).get("version", "?")
    except (OSError, ValueError):
        return "?"


# --- goals --------------------------------------------------------------------------------------------------------
PROTOCOLS = {"triton-http": "HTTP", "triton-grpc": "gRPC"}


def goals(results: list[dict]) -> list[dict[str, Any]]:
    """The goals, each in words with the figures behind it. Missing levels make a goal 'not measured', never 'met'."""
    out = []

    def add(key, goal, measured="not measured", ratio=None, target=None, met=False, detail="", target_text=None):
        out.append({"id": key, "goal": goal, "measured": measured, "ratio": ratio, "target": target, "met": met,
                    "detail": detail, "target_text": target_text})

    def answered(target, concurrency, districts):
        found = find(results, target, concurrency, districts)
        return found if found is not None and found["requests"] else None

    seed = [r for r in results if r["target"] == "seed-fastapi" and r["requests"]]
    ours, paced = answered("triton-http", 1, 1), answered("onnxruntime-inprocess-paced", 1, 1)
    goal = ("Latency: p50 at concurrency 1 (HTTP) within 4x of in-process onnxruntime called at the same pace (the "
            "model idling between calls as long as a served request spends outside it)")
    if paced and ours:
        ratio = ours["p50_ms"] / paced["p50_ms"]
        add("latency_c1", goal, f"{ours['p50_ms']:.3f} vs {paced['p50_ms']:.3f} ms", ratio, 4.0, ratio <= 4.0)
    else:
        add("latency_c1", goal, target=4.0)
    tight = answered("onnxruntime-inprocess", 1, 1)
    if tight and ours:
        add("latency_c1_back_to_back", "Latency, reported: p50 at concurrency 1 (HTTP) against in-process "
            "onnxruntime called back to back (weights hot in the cache)",
            f"{ours['p50_ms']:.3f} vs {tight['p50_ms']:.3f} ms", ours["p50_ms"] / tight["p50_ms"], met=None)

    for served_name, protocol in PROTOCOLS.items():
        key = f"throughput_c16_{protocol.lower()}"
        goal = f"Throughput: requests/s at concurrency 16 ({protocol}) at least 20x the FastAPI + torch server's"
        mine, theirs = find(results, served_name, 16, 1), find(results, "seed-fastapi", 16, 1)
        if mine and theirs and theirs["requests_per_s"]:
            ratio = mine["requests_per_s"] / theirs["requests_per_s"]
            add(key, goal, f"{mine['requests_per_s']:,.0f} vs {theirs['requests_per_s']:,.0f} requests/s", ratio,
                20.0, ratio >= 20.0)
        else:
            add(key, goal, target=20.0)

    for served_name, protocol in PROTOCOLS.items():
        pairs = [(answered(served_name, r["concurrency"], 1), r) for r in seed]
        pairs = [(a, b) for a, b in pairs if a is not None]
        add(f"tail_{protocol.lower()}", f"Tail latency: p99 ({protocol}) below the FastAPI + torch server's at every "
            "concurrency level", ", ".join(f"c{b['concurrency']}: {a['p99_ms']:.2f} vs {b['p99_ms']:.2f} ms"
                                           for a, b in pairs) or "not measured",
            max((a["p99_ms"] / b["p99_ms"] for a, b in pairs), default=None), 1.0,
            bool(pairs) and all(a["p99_ms"] < b["p99_ms"] for a, b in pairs),
            "ratio: the highest p99 ratio over the levels")

    triton = [r for r in results if r["target"] in PROTOCOLS and r["requests"]]
    counted = [r for r in triton if r["stalled"] is not None]
    stalled, skipped = sum(r["stalled"] for r in counted), len(triton) - len(counted)
    add("no_stalls", f"No 500 ms stalls: no request to Triton (HTTP or gRPC) answered more than {load.STALL_MS:g} ms later "
        f"than its level's median, at every level where a stall stands out (median under "
        f"{load.STALL_DETECTABLE_MEDIAN_MS:g} ms)", f"{stalled} of {sum(r['requests'] for r in counted):,} requests" + (
            f" ({skipped} overloaded level(s) not counted)" if skipped else ""),
        None, 0.0, bool(counted) and stalled == 0, target_text="0 stalls")

    best_seed = max(seed, key=lambda r: r["decisions_per_s"], default=None)
    for served_name, protocol in PROTOCOLS.items():
        key = f"batched_{protocol.lower()}"
        goal = (f"Batched throughput: agent decisions/s with 64 districts per request ({protocol}) at least 200x the "
                f"FastAPI + torch server's best (its API takes one district per request)")
        best = max((r for r in results if r["target"] == served_name and r["districts"] == 64 and r["requests"]),
                   key=lambda r: r["decisions_per_s"], default=None)
        if best and best_seed:
            ratio = best["decisions_per_s"] / best_seed["decisions_per_s"]
            add(key, goal, f"{best['decisions_per_s']:,.0f} (c{best['concurrency']}) vs "
                f"{best_seed['decisions_per_s']:,.0f} (c{best_seed['concurrency']})", ratio, 200.0, ratio >= 200.0)
        else:
            add(key, goal, target=200.0)

    for concurrency in (16, 64):
        batch = ((find(results, "triton-http", concurrency, 1) or {}).get("triton") or {}).get("average_batch_size")
        if batch:
            add(f"batch_c{concurrency}", f"Batching, reported: rows per model execution at concurrency {concurrency} "
                f"(HTTP, 1 district per request)", f"{batch:.2f}", met=None,
                detail="Triton's nv_inference_count / nv_inference_exec_count over the window")
    return out
