"""The served policy against the seed-style server and the in-process floors, and perf_analyzer beside the driver.

Servers that are compared with each other run side by side and are measured in interleaved rounds (round 1: A, B,
C at every level; round 2: A, B, C again; ...), each round a slice of the level's duration: on a shared machine the
background load drifts, and interleaving spreads it over every contender. Windows of one (contender, level) are pooled.
Triton runs on ``backend`` (``auto``: its onnxruntime backend with ``configs/cpu.pbtxt`` when built, as Kubernetes'
CPU nodes serve it; the python backend with ``configs/local.pbtxt`` otherwise), the other backend over HTTP beside it.
Then the paced floor (in-process onnxruntime idling between calls as long as a served request spends outside the
model), perf_analyzer on the Triton rows, and the goals. Tuning the served settings is ``benchmarks/tune.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .load import (
    DEFAULT_CLIENT,
    HOST,
    STALL_DETECTABLE_MEDIAN_MS,
    STALL_MS,
    Level,
    LevelResult,
    Measurement,
    Payload,
    Target,
    measure,
    summarise,
)
from .repositories import (
    INSTANCES_KNOB,
    BenchmarkRepository,
    build_repository,
    describe_settings,
    open_repository,
    settings_view,
)

Say = Callable[[str], None]
# The comparison server's fastest setup here (benchmarks/tune.py measures it against a thread-pool endpoint).
SEED_SETUP = {"label": "async endpoint, 1 torch thread", "endpoint": "async", "torch_threads": 1}
LEVELS = (1, 4, 16, 64)
DISTRICTS = (1, 64)
# Figures each tuning variant is measured on: (concurrency, districts per request).


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 4.0          # measured seconds per (contender, level), split over the rounds
    rounds: int = 4                  # interleaved rounds
    warmup_s: float = 0.25           # per window, not counted
    max_requests: int = 200_000      # per (contender, level): the other bound of a level
    levels: tuple[int, ...] = LEVELS
    districts: tuple[int, ...] = DISTRICTS
    perf_analyzer: bool = True       # Triton rows again with Triton's perf_analyzer
    tuning_duration_s: float = 3.0   # benchmarks/tune.py: per (variant, tuning level)
    repository: Path | None = None   # default: a fresh policy on the real env layout, exported to a temp dir
    backend: str = "auto"            # Triton's backend for the served rows: auto, onnxruntime or python
    command: str = ""                # how this run was started, for the report
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "BenchOptions":
        """A smoke run: two levels, sub-second windows (about a minute)."""
        base = dict(duration_s=0.6, rounds=1, warmup_s=0.2, max_requests=20_000, levels=(1, 16))
        return cls(**{**base, **overrides})


@dataclass
class Contender:
    """Something measured at a level: a served endpoint through the load driver, or an in-process floor."""

    name: str                                   # e.g. "triton-http", "seed-fastapi", "onnxruntime-inprocess"
    run: Callable[[Level, Payload], Measurement]
    config: str = ""
    client: str = ""
    districts: tuple[int, ...] = DISTRICTS      # which request sizes it takes
    levels: tuple[int, ...] | None = None       # concurrency levels it takes (None: all)

    def takes(self, concurrency: int, districts: int) -> bool:
        return districts in self.districts and (self.levels is None or concurrency in self.levels)


def served(target: Target, client: str = DEFAULT_CLIENT, districts: tuple[int, ...] = DISTRICTS,
           name: str | None = None) -> Contender:
    return Contender(name or target.name, lambda level, payload: measure(target, payload, level),
                     config=target.config, client=client, districts=districts)


def inprocess(name: str, prepare: Callable[[Payload], Callable[[], object]], districts: tuple[int, ...],
              pause_s: float = 0.0, config: str = "1 thread") -> Contender:
    """An in-process floor as a contender: one caller (concurrency 1), the call prepared once per request size."""
    from .floors import measure_inprocess

    calls: dict[int, Callable[[], object]] = {}

    def run(level: Level, payload: Payload) -> Measurement:
        if payload.districts not in calls:
            calls[payload.districts] = prepare(payload)
        return measure_inprocess(calls[payload.districts], level, pause_s)

    return Contender(name, run, config=config, client="in-process", districts=districts, levels=(1,))


def run_interleaved(contenders: Sequence[Contender], levels: Sequence[tuple[int, int]], payloads: dict[int, Payload],
                    *, duration_s: float, rounds: int, warmup_s: float, max_requests: int,
                    progress: bool = False, description: str = "") -> list[LevelResult]:
    """Measure every contender at every (concurrency, districts) it takes, in ``rounds`` interleaved rounds."""
    from tqdm.auto import tqdm

    plan = [(c, d, contender) for c, d in levels for contender in contenders if contender.takes(c, d)]
    windows: dict[tuple[int, int, int], list[Measurement]] = {}
    bar = tqdm(total=len(plan) * rounds, desc=description, unit="window", disable=not progress, leave=False)
    for _ in range(rounds):
        for concurrency, districts, contender in plan:
            level = Level(concurrency, districts, duration_s / rounds, max(1, max_requests // rounds), warmup_s)
            key = (concurrency, districts, id(contender))
            windows.setdefault(key, []).append(contender.run(level, payloads[districts]))
            bar.update()
    bar.close()
    return [summarise(contender.name, Level(c, d), payloads[d], windows[(c, d, id(contender))],
                      client=contender.client, config=contender.config)
            for c, d, contender in plan]


# --- servers ------------------------------------------------------------------------------------------------------
class Servers:
    """Servers started together (in parallel) and stopped together by PID, whatever happens in between."""

    def __init__(self):
        self.items: list[Any] = []

    def start(self, servers: Sequence[Any], timeout: float = 120.0) -> None:
        self.items.extend(servers)
        errors: list[BaseException] = []

        def start_one(server) -> None:
            try:
                server.start(timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after every start has finished
                errors.append(exc)

        threads = [threading.Thread(target=start_one, args=(s,)) for s in servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        threads = [threading.Thread(target=s.stop) for s in self.items]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.items.clear()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def triton_servers(repositories: Sequence[Path], backend: str) -> list:
    from maddpg_serving.local_triton import LocalTritonServer, TritonPorts, reserve_ports

    ports = reserve_ports(3 * len(repositories), HOST)
    # A short exit timeout: nothing is in flight when benchmarks stop a server.
    return [LocalTritonServer(repository, ports=TritonPorts(*ports[3 * i : 3 * i + 3]), host=HOST, backend=backend,
                              exit_timeout_s=1)
            for i, repository in enumerate(repositories)]


def triton_targets(server, model: str, config: str, name: str = "triton") -> dict[str, Target]:
    common = dict(model=model, metrics_url=server.metrics_url, server_pid=server.process.pid, config=config)
    return {"http": Target(f"{name}-http", server.ports.http, **common),
            "grpc": Target(f"{name}-grpc", server.ports.grpc, **common)}


def other_backend(backend: str) -> str:
    return "python" if backend == "onnxruntime" else "onnxruntime"


def resolve_backend(backend: str) -> str:
    from maddpg_serving.local_triton import default_backend

    return default_backend() if backend == "auto" else backend


def seed_servers(layout, variants: Sequence[dict[str, Any]]) -> list:
    from maddpg_serving.local_triton import reserve_ports

    from .seed_server import SeedServerProcess

    return [SeedServerProcess(layout, port, host=HOST, **options)
            for port, options in zip(reserve_ports(len(variants), HOST), variants)]


# --- payloads -----------------------------------------------------------------------------------------------------
def make_payloads(source: BenchmarkRepository, districts: Sequence[int], seed: int = 0) -> dict[int, Payload]:
    """Observations on the scale of real ones (standard normal per slot) and the actions the exported model gives."""
    from maddpg_client.local_policy import LocalPolicy

    rng = np.random.default_rng(seed)
    local = LocalPolicy(source.onnx_path)
    counts = tuple(agent.action_count for agent in source.layout.agents)
    payloads = {}
    for count in sorted(set(districts) | {1}):
        observations = rng.standard_normal((count, *source.layout.observation_shape)).astype(np.float32)
        payloads[count] = Payload(observations, local.act(observations), source.layout.action_width, counts)
    local.close()
    return payloads


class Bench:
    """One benchmark run; :meth:`run` returns the report data (``report.write_benchmark_report`` turns it into files)."""

    def __init__(self, options: BenchOptions, say: Say = lambda _: None):
        self.options = options
        self.say = say
        self.backend = resolve_backend(options.backend)

    def run(self) -> dict[str, Any]:
        from maddpg_export.triton_config import ServingSettings

        from .graph_forms import flops_per_decision, layer_widths
        from .report import machine_info

        options = self.options
        started = time.time()
        machine = machine_info()
        workdir = Path(tempfile.mkdtemp(prefix="maddpg-bench-"))
        try:
            source = (open_repository(Path(options.repository)) if options.repository
                      else build_repository(workdir / "source", say=self.say))
            payloads = make_payloads(source, options.districts)
            graph_nodes = _node_count(source.onnx_path)
            widths = layer_widths(source.onnx_path)
            defaults = ServingSettings()
            comparison, server_version, paced, perf = self.compare(source, payloads, defaults, SEED_SETUP, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        machine["tritonserver_version"] = server_version
        machine["loadavg_end"] = list(os.getloadavg())
        return {
            "command": options.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "seconds": time.time() - started,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
            "machine": machine,
            "backend": self.backend,
            "other_backend": other_backend(self.backend),
            "model": {"layout": f"{source.layout.n_agents} x {source.layout.obs_width} -> "
                                f"{source.layout.n_agents} x {source.layout.action_width}",
                      "agents": source.layout.n_agents,
                      "repository": str(options.repository) if options.repository else "fresh policy",
                      "graph_nodes": graph_nodes, "layer_widths": widths,
                      "hidden": [outputs for _, outputs in widths[:-1]],
                      "flops_per_decision": flops_per_decision(widths)},
            "serving_settings": {"label": describe_settings(defaults, self.backend),
                                 "instances": getattr(defaults, INSTANCES_KNOB[self.backend]),
                                 "variant": "configs/cpu.pbtxt" if self.backend == "onnxruntime" else
                                            "configs/local.pbtxt", **defaults.__dict__},
            "seed_server": SEED_SETUP,
            "paced_floor": paced,
            "stall_ms": STALL_MS,
            "results": [r.as_dict() for r in comparison],
            "perf_analyzer": perf,
            "goals": goals(comparison),
        }

    # --- (1) tuning ---------------------------------------------------------------------------------------------------
    def compare(self, source, payloads, defaults, seed_options: dict[str, Any],
                workdir: Path) -> tuple[list[LevelResult], str, dict[str, Any] | None, dict[str, Any]]:
        from .floors import onnxruntime_floor, seed_loop_floor, torch_floor

        o = self.options
        other = other_backend(self.backend)
        self.say(f"comparison: Triton ({describe_settings(defaults, self.backend)}) over HTTP and gRPC, Triton's "
                 f"{other} backend over HTTP, the seed-style server ({seed_options['label']}), in-process floors; "
                 f"levels {list(o.levels)} x districts {list(o.districts)}")
        policy = self._torch_policy(source)
        floors = [
            ("onnxruntime-inprocess", onnxruntime_floor(source.onnx_path), o.districts),
            ("torch-stacked-inprocess", torch_floor(policy), o.districts),
            ("torch-seed-loop-inprocess", seed_loop_floor(source.layout), (1,)),
        ]
        other_built = other == "python" or resolve_backend("auto") == "onnxruntime"
        with Servers() as servers:
            view = settings_view(source, defaults, workdir / "served")
            [triton] = triton_servers([view], self.backend)
            others = triton_servers([view], other) if other_built else []
            [seed] = seed_servers(source.layout, [{"endpoint": seed_options["endpoint"],
                                                   "torch_threads": seed_options["torch_threads"]}])
            servers.start([triton, *others, seed])
            targets = triton_targets(triton, source.model, describe_settings(defaults, self.backend))
            contenders = [
                served(targets["http"], districts=o.districts),
                served(targets["grpc"], districts=o.districts),
            ]
            for server in others:
                contenders.append(served(triton_targets(server, source.model, describe_settings(defaults, other),
                                                        name=f"triton-{other}")["http"], districts=o.districts))
            contenders.append(served(Target("seed-fastapi", seed.port, server_pid=seed.pid,
                                            config=seed_options["label"]), districts=(1,)))
            contenders += [inprocess(name, prepare, districts) for name, prepare, districts in floors]
            plan = [(c, d) for c in o.levels for d in o.districts]
            results = run_interleaved(contenders, plan, payloads, duration_s=o.duration_s, rounds=o.rounds,
                                      warmup_s=o.warmup_s, max_requests=o.max_requests, progress=o.progress,
                                      description="comparison")
            version = _server_version(triton)
            perf = self._perf_analyzer(triton, source, workdir) if o.perf_analyzer else {"skipped": "--no-perf-analyzer"}
        paced = self._paced_floor(source, payloads, results)
        if paced is not None:
            results.append(paced.pop("result"))
        return results, version, paced, perf

    def _perf_analyzer(self, server, source, workdir: Path) -> dict[str, Any]:
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
        rows = []
        for protocol, concurrency, districts in tqdm(plan, desc="perf_analyzer", disable=not o.progress, leave=False):
            url = server.http_url if protocol == "http" else server.grpc_url
            figures = perf_analyzer.measure(url, protocol, source.model, source.layout.observation_shape, districts,
                                            concurrency, window_ms, workdir)
            rows.append({"target": f"triton-{protocol}", "concurrency": concurrency, "districts": districts, **figures})
        return {"version": found, "window_ms": window_ms, "rows": rows}

    def _paced_floor(self, source, payloads, results: list[LevelResult]) -> dict[str, Any] | None:
        """In-process onnxruntime at the pace the served model sees at concurrency 1: after each call, a pause as long
        as a served request spends outside the model (the client's mean latency minus Triton's compute time)."""
        from .floors import onnxruntime_floor

        served_c1 = find(results, "triton-http", 1, 1)
        if served_c1 is None or not served_c1.requests or not served_c1.triton:
            return None
        compute_ms = served_c1.triton["compute_us_per_request"] / 1000
        pause_ms = max(0.0, served_c1.mean_ms - compute_ms)
        o = self.options
        contender = inprocess("onnxruntime-inprocess-paced", onnxruntime_floor(source.onnx_path), (1,),
                              pause_s=pause_ms / 1000, config=f"1 thread, {pause_ms:.3f} ms pause after each call")
        [result] = run_interleaved([contender], [(1, 1)], payloads, duration_s=o.duration_s, rounds=o.rounds,
                                   warmup_s=o.warmup_s, max_requests=o.max_requests, progress=o.progress,
                                   description="paced floor")
        return {"pause_ms": pause_ms, "served_mean_ms": served_c1.mean_ms, "served_compute_ms": compute_ms,
                "result": result}

    @staticmethod
    def _torch_policy(source: BenchmarkRepository):
        """The torch model behind the served graph (a fresh one of the trained architecture for --repository)."""
        if source.checkpoint is not None:
            from maddpg_training.checkpoint import load_checkpoint

            return load_checkpoint(source.checkpoint).build_policy()
        from maddpg_training.networks import PolicyNetwork

        return PolicyNetwork(source.layout)


def _node_count(path: Path) -> int:
    from .graph_forms import node_count

    return node_count(path)


def _server_version(server) -> str:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as response:
            return json.loads(response.read()).get("version", "?")
    except (OSError, ValueError):
        return "?"


# --- (3) goals ----------------------------------------------------------------------------------------------------
def find(results: Sequence, target: str, concurrency: int, districts: int):
    """The result (a LevelResult, or its dict in a report) of ``target`` at one level, or None."""
    def key(r):
        return (r["target"], r["concurrency"], r["districts"]) if isinstance(r, dict) else (
            r.target, r.concurrency, r.districts)

    return next((r for r in results if key(r) == (target, concurrency, districts)), None)


PROTOCOLS = {"triton-http": "HTTP", "triton-grpc": "gRPC"}


def goals(results: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """The goals, each in words with the figures behind it. Missing levels make a goal 'not measured', never 'met'."""
    out = []
    seed = [r for r in results if r.target == "seed-fastapi" and r.requests]

    def add(key, goal, measured, ratio, target, met, detail="", target_text=None):
        out.append({"id": key, "goal": goal, "measured": measured, "ratio": ratio, "target": target, "met": met,
                    "detail": detail, "target_text": target_text})

    paced, tight = find(results, "onnxruntime-inprocess-paced", 1, 1), find(results, "onnxruntime-inprocess", 1, 1)
    ours = find(results, "triton-http", 1, 1)
    goal = ("Latency: p50 at concurrency 1 (HTTP) within 4x of in-process onnxruntime called at the same pace (the "
            "model idling between calls as long as a served request spends outside it)")
    if paced and ours and paced.requests and ours.requests:
        ratio = ours.p50_ms / paced.p50_ms
        add("latency_c1", goal, f"{ours.p50_ms:.3f} vs {paced.p50_ms:.3f} ms", ratio, 4.0, ratio <= 4.0)
    else:
        add("latency_c1", goal, "not measured", None, 4.0, False)
    if tight and ours and tight.requests and ours.requests:
        add("latency_c1_back_to_back", "Latency, reported: p50 at concurrency 1 (HTTP) against in-process "
            "onnxruntime called back to back (weights hot in the cache)", f"{ours.p50_ms:.3f} vs {tight.p50_ms:.3f} ms",
            ours.p50_ms / tight.p50_ms, None, None)

    for served_name, protocol in PROTOCOLS.items():
        goal = f"Throughput: requests/s at concurrency 16 ({protocol}) at least 20x the FastAPI + torch server's"
        mine, theirs = find(results, served_name, 16, 1), find(results, "seed-fastapi", 16, 1)
        if mine and theirs and theirs.requests_per_s:
            ratio = mine.requests_per_s / theirs.requests_per_s
            add(f"throughput_c16_{protocol.lower()}", goal,
                f"{mine.requests_per_s:,.0f} vs {theirs.requests_per_s:,.0f} requests/s", ratio, 20.0, ratio >= 20.0)
        else:
            add(f"throughput_c16_{protocol.lower()}", goal, "not measured", None, 20.0, False)

    for served_name, protocol in PROTOCOLS.items():
        pairs = [(find(results, served_name, r.concurrency, 1), r) for r in seed]
        pairs = [(a, b) for a, b in pairs if a is not None and a.requests]
        detail = ", ".join(f"c{b.concurrency}: {a.p99_ms:.2f} vs {b.p99_ms:.2f} ms" for a, b in pairs)
        add(f"tail_{protocol.lower()}", f"Tail latency: p99 ({protocol}) below the FastAPI + torch server's at every "
            f"concurrency level", detail or "not measured", max((a.p99_ms / b.p99_ms for a, b in pairs), default=None),
            1.0, bool(pairs) and all(a.p99_ms < b.p99_ms for a, b in pairs),
            "ratio: the highest p99 ratio over the levels")

    triton = [r for r in results if r.target in PROTOCOLS and r.requests]
    counted = [r for r in triton if r.stalled is not None]
    stalled = sum(r.stalled for r in counted)
    skipped = len(triton) - len(counted)
    add("no_stalls", f"No 500 ms stalls: no request to Triton (HTTP or gRPC) answered more than {STALL_MS:g} ms later "
        f"than its level's median, at every level where a stall stands out (median under "
        f"{STALL_DETECTABLE_MEDIAN_MS:g} ms)", f"{stalled} of {sum(r.requests for r in counted):,} requests" + (
            f" ({skipped} overloaded level(s) not counted)" if skipped else ""),
        None, 0.0, bool(counted) and stalled == 0, target_text="0 stalls")

    best_seed = max(seed, key=lambda r: r.decisions_per_s, default=None)
    for served_name, protocol in PROTOCOLS.items():
        goal = (f"Batched throughput: agent decisions/s with 64 districts per request ({protocol}) at least 200x the "
                f"FastAPI + torch server's best (its API takes one district per request)")
        batched = [r for r in results if r.target == served_name and r.districts == 64 and r.requests]
        best = max(batched, key=lambda r: r.decisions_per_s, default=None)
        if best and best_seed:
            ratio = best.decisions_per_s / best_seed.decisions_per_s
            add(f"batched_{protocol.lower()}", goal, f"{best.decisions_per_s:,.0f} (c{best.concurrency}) vs "
                f"{best_seed.decisions_per_s:,.0f} (c{best_seed.concurrency})", ratio, 200.0, ratio >= 200.0)
        else:
            add(f"batched_{protocol.lower()}", goal, "not measured", None, 200.0, False)

    for concurrency in (16, 64):
        loaded = find(results, "triton-http", concurrency, 1)
        if loaded and loaded.average_batch_size:
            add(f"batch_c{concurrency}", f"Batching, reported: rows per model execution at concurrency {concurrency} "
                f"(HTTP, 1 district per request)", f"{loaded.average_batch_size:.2f}", None, None, None,
                "Triton's nv_inference_count / nv_inference_exec_count over the window")
    return out
