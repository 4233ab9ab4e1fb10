"""Everything in one go: tuning, then the served policy against the seed-style server and the in-process floors.

Servers that are compared with each other run side by side and are measured in interleaved rounds (round 1: A, B,
C at every level; round 2: A, B, C again; ...), each round a slice of the level's duration. On a shared 2-core machine
the background load drifts; interleaving spreads the drift over every contender instead of handing it to whichever
ran last. Windows of one (contender, level) are pooled into one result.

Triton runs on ``backend`` (``auto``: Triton's onnxruntime backend with ``configs/cpu.pbtxt`` when it is built, as
Kubernetes serves it; the python backend with ``configs/local.pbtxt`` otherwise).

1. Tuning (``tune=True``), one knob at a time around the served defaults (``ServingSettings()``): instance count,
   dynamic-batching delay, onnxruntime intra-op threads, the queue policy, graph form (stacked vs per-agent), the load
   generator's client, and the comparison server's own best setup. Each group scores its variants on the three
   figures the goals are about (p50 at concurrency 1, requests/s at concurrency 16, decisions/s with 64 districts per
   request); a variant whose requests stalled (``load.count_stalls``) never wins over one whose requests did not.
2. The comparison: local Triton with the served defaults over HTTP and gRPC (1 and 64 districts per request), the
   other backend over HTTP, the seed-style FastAPI + torch server (1 district: its API takes one), and the in-process
   floors, at every level; then the paced floor: in-process onnxruntime with the model idling between calls as long
   as a served request at concurrency 1 spends outside it (the latency goal compares like with like).
3. The goals, computed from (2).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
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
LEVELS = (1, 4, 16, 64)
DISTRICTS = (1, 64)
# Figures each tuning variant is measured on: (concurrency, districts per request).
TUNING_LEVELS = ((1, 1), (16, 1), (16, 64))


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 4.0          # measured seconds per (contender, level), split over the rounds
    rounds: int = 4                  # interleaved rounds
    warmup_s: float = 0.25           # per window, not counted
    max_requests: int = 200_000      # per (contender, level): the other bound of a level
    levels: tuple[int, ...] = LEVELS
    districts: tuple[int, ...] = DISTRICTS
    tune: bool = True
    tuning_duration_s: float = 3.0   # per (variant, tuning level), split over the rounds
    repository: Path | None = None   # default: a fresh policy on the real env layout, exported to a temp dir
    backend: str = "auto"            # Triton's backend for the served rows: auto, onnxruntime or python
    command: str = ""                # how this run was started, for the report
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "BenchOptions":
        """A smoke run: two levels, sub-second windows, no tuning (under a minute)."""
        base = dict(duration_s=0.6, rounds=1, warmup_s=0.2, max_requests=20_000, levels=(1, 16), tune=False,
                    tuning_duration_s=0.5)
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
    return Contender(name or target.name, lambda level, payload: measure(target, payload, level, client),
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


# --- tuning -------------------------------------------------------------------------------------------------------
@dataclass
class TuningGroup:
    knob: str                        # what varies
    question: str                    # what the group answers, for the report
    variants: list[dict[str, Any]]   # label, score, is_default, figures (scored), results (LevelResult dicts)
    default: str = ""
    note: str = ""
    same_default: bool = True        # its default variant is the served configuration (counts for the noise)
    winner: str = ""                 # set by decide(): what to keep
    decision: str = ""
    noise: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # label -> how to set that variant up, where needed
    floors: list[dict[str, Any]] = field(default_factory=list)  # in-process figures measured alongside, if any

    def as_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "question": self.question, "variants": self.variants, "default": self.default,
                "winner": self.winner, "decision": self.decision, "noise": self.noise, "note": self.note,
                "same_default": self.same_default, "options": self.options, "floors": self.floors}


# What the tuning score weighs: the figures the goals are about. (concurrency, districts, attribute, lower is better)
CRITERIA = ((1, 1, "p50_ms", True), (16, 1, "requests_per_s", False), (16, 64, "decisions_per_s", False))


def criteria_figures(results: Sequence[LevelResult]) -> dict[str, float]:
    """``{attribute: value}`` of the scored figures a variant was measured at."""
    found = {}
    for concurrency, districts, attribute, _ in CRITERIA:
        for r in results:
            if (r.concurrency, r.districts) == (concurrency, districts) and r.requests:
                found[attribute] = getattr(r, attribute)
    return found


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else 0.0


def score_variants(results_by_label: dict[str, list[LevelResult]]) -> dict[str, float]:
    """Geometric mean of the scored figures as ratios to the group's best (p50 at concurrency 1, requests/s at 16,
    decisions/s at 16 with 64 districts per request): 1.0 is best on all three. Figures not measured are left out."""
    figures = {label: criteria_figures(results) for label, results in results_by_label.items()}
    ratios: dict[str, list[float]] = {label: [] for label in results_by_label}
    for _, _, attribute, lower_is_better in CRITERIA:
        values = {label: f[attribute] for label, f in figures.items() if f.get(attribute, 0) > 0}
        if not values:
            continue
        best = (min if lower_is_better else max)(values.values())
        for label, value in values.items():
            ratios[label].append(best / value if lower_is_better else value / best)
    return {label: _geomean(r) for label, r in ratios.items()}


def served_default_noise(groups: Sequence["TuningGroup"]) -> float:
    """The run's own noise, as a ratio >= 1: the served default configuration runs in every group about the served
    stack, so the spread (max / min) of its scored figures between groups is what chance alone does here. Geometric
    mean over the figures; 1.0 when it ran in fewer than two groups."""
    seen: dict[str, list[float]] = {}
    for group in groups:
        if not group.same_default:
            continue
        default = next((v for v in group.variants if v["is_default"]), None)
        if default is not None:
            for attribute, value in default["figures"].items():
                seen.setdefault(attribute, []).append(value)
    spreads = [max(v) / min(v) for v in seen.values() if len(v) > 1 and min(v) > 0]
    return _geomean(spreads) if spreads else 1.0


def stalls(variant: dict[str, Any]) -> int:
    """Requests of a tuning variant answered after more than ``STALL_MS``, over every level it ran."""
    return sum(r.get("stalled") or 0 for r in variant["results"])


def decide(groups: Sequence["TuningGroup"]) -> float:
    """Settle every group: the winner is kept only if it beats the default by more than the run's noise; a variant
    whose requests stalled never wins over one whose requests did not."""
    noise = served_default_noise(groups)
    for group in groups:
        fewest = min((stalls(v) for v in group.variants), default=0)
        scores = {v["label"]: v["score"] for v in group.variants if stalls(v) == fewest}
        if not scores:
            group.decision = "not measured"
            continue
        best = max(scores, key=scores.get)
        default_score = scores.get(group.default, 0.0)
        if not group.same_default:  # the comparison server: always its fastest, to be fair to it
            group.winner, group.decision = best, "fastest, used for the comparison"
        elif group.default not in scores:
            group.winner, group.decision = best, "the default stalled"
        elif best == group.default:
            group.winner, group.decision = best, "default is best"
        elif default_score and scores[best] / default_score <= noise:
            group.winner, group.decision = group.default, f"within noise ({best} scored higher)"
        else:
            group.winner, group.decision = best, "beats the default"
        group.noise = noise
    return noise


def _group(knob: str, question: str, results: dict[str, list[LevelResult]], default: str, note: str = "",
           same_default: bool = True) -> "TuningGroup":
    scores = score_variants(results)
    variants = [{"label": label, "score": scores[label], "is_default": label == default,
                 "figures": criteria_figures(rs), "results": [r.as_dict() for r in rs]} for label, rs in results.items()]
    return TuningGroup(knob, question, variants, default=default, note=note, same_default=same_default)


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
            tuning = self.tune(source, payloads, defaults, workdir) if options.tune else []
            seed_options = self.seed_choice(tuning)
            comparison, server_version, paced = self.compare(source, payloads, defaults, seed_options, workdir)
            if options.tune:
                tuning.append(protocol_group(comparison))
                decide(tuning)
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
            "seed_server": seed_options,
            "paced_floor": paced,
            "stall_ms": STALL_MS,
            "results": [r.as_dict() for r in comparison],
            "tuning": [g.as_dict() for g in tuning],
            "goals": goals(comparison),
        }

    # --- (1) tuning ---------------------------------------------------------------------------------------------------
    def tune(self, source: BenchmarkRepository, payloads, defaults, workdir: Path) -> list[TuningGroup]:
        groups = []
        instances = INSTANCES_KNOB[self.backend]
        process = "in the server process" if self.backend == "onnxruntime" else "python-backend processes"
        knobs = [
            (instances, f"Model instances ({self.backend} backend, {process})", [1, 2, 4]),
            ("max_queue_delay_us", "Dynamic batching: how long a request may wait for company (us)", [0, 100, 200, 500]),
            ("onnx_intra_op_threads", "onnxruntime intra-op threads per instance", [1, 2]),
        ]
        for knob, question, values in knobs:
            variants = {f"{knob}={value}": replace(defaults, **{knob: value}) for value in values}
            default = f"{knob}={getattr(defaults, knob)}"
            results = self._triton_variants(source, payloads, variants, workdir / knob, f"tuning {knob}")
            groups.append(_group(knob, question, results, default))
        groups.append(self._queue_policy(source, payloads, defaults, workdir / "queue_policy"))
        groups.append(self._graph_forms(source, payloads, defaults, workdir / "graph"))
        groups.append(self._clients(source, payloads, defaults, workdir / "clients"))
        groups.append(self._seed_variants(source, payloads))
        return groups

    def _tuning_run(self, contenders, payloads, description: str, duration_s: float | None = None) -> list[LevelResult]:
        o = self.options
        return run_interleaved(contenders, TUNING_LEVELS, payloads, duration_s=duration_s or o.tuning_duration_s,
                               rounds=o.rounds, warmup_s=o.warmup_s, max_requests=o.max_requests,
                               progress=o.progress, description=description)

    def _triton_variants(self, source, payloads, variants: dict[str, Any], workdir: Path, description: str,
                         onnx_files: dict[str, Path] | None = None,
                         duration_s: float | None = None) -> dict[str, list[LevelResult]]:
        self.say(f"{description}: {', '.join(variants)}")
        with Servers() as servers:
            # Triton starts its python stub through a shell: keep the paths plain.
            views = [settings_view(source, settings, workdir / re.sub(r"[^A-Za-z0-9_.-]+", "-", label),
                                   onnx_file=(onnx_files or {}).get(label)) for label, settings in variants.items()]
            started = dict(zip(variants, triton_servers(views, self.backend)))
            servers.start(list(started.values()))
            contenders = [served(triton_targets(server, source.model, label)["http"], name=label)
                          for label, server in started.items()]
            results = self._tuning_run(contenders, payloads, description, duration_s)
        return {c.name: [r for r in results if r.target == c.name] for c in contenders}

    def _queue_policy(self, source, payloads, defaults, workdir: Path) -> TuningGroup:
        """The served default (no queue policy) against the bounded queue the configs had before: the one group whose
        answer is counted in stalls, so it runs three times as long as the others."""
        bounded = replace(defaults, queue_timeout_us=1_000_000, max_queue_size=4096)
        labels = {"no queue policy": defaults, "queue policy: 1 s timeout, at most 4096 queued": bounded}
        default = next(label for label, settings in labels.items() if settings == defaults)
        results = self._triton_variants(source, payloads, labels, workdir, "tuning queue policy",
                                        duration_s=3 * self.options.tuning_duration_s)
        return _group("queue_policy", "Queue policy: reject after a timeout and bound the queue, or not", results,
                      default, note=f"a stall is an answer more than {STALL_MS:g} ms slower than its level's median")

    def _graph_forms(self, source, payloads, defaults, workdir: Path) -> TuningGroup:
        from .floors import onnxruntime_floor
        from .graph_forms import export_per_agent

        question = "Graph form: stacked actors (one batched MatMul per layer) or one branch per agent"
        stacked_nodes = _node_count(source.onnx_path)
        if source.checkpoint is None:
            return TuningGroup("graph_form", question, [], note="skipped: needs the torch policy behind the "
                               "repository (run without --repository)")
        from maddpg_training.checkpoint import load_checkpoint

        workdir.mkdir(parents=True)
        checkpoint = load_checkpoint(source.checkpoint)
        per_agent_file = workdir / "per_agent.onnx"
        self.say(f"building the per-agent graph ({source.layout.n_agents} branches) for comparison")
        per_agent_nodes = export_per_agent(checkpoint.build_policy(), source.layout, per_agent_file, source.onnx_path,
                                           payloads[max(payloads)].observations)
        stacked, per_agent = f"stacked ({stacked_nodes} nodes)", f"per-agent ({per_agent_nodes} nodes)"
        results = self._triton_variants(source, payloads, {stacked: defaults, per_agent: defaults}, workdir,
                                        "tuning graph form", onnx_files={per_agent: per_agent_file})
        group = _group("graph_form", question, results, stacked,
                       note="the served form is decided by the export, training/maddpg_training/networks.py")
        # The graphs alone, in process: what onnxruntime makes of each form without a server around it.
        floors = [inprocess(f"{label} in process", onnxruntime_floor(path), self.options.districts)
                  for label, path in ((stacked, source.onnx_path), (per_agent, per_agent_file))]
        o = self.options
        group.floors = [r.as_dict() for r in run_interleaved(
            floors, [(1, d) for d in o.districts], payloads, duration_s=o.tuning_duration_s, rounds=o.rounds,
            warmup_s=o.warmup_s, max_requests=o.max_requests, progress=o.progress, description="graph forms in process")]
        return group

    def _clients(self, source, payloads, defaults, workdir: Path) -> TuningGroup:
        from .load import CLIENTS

        self.say(f"tuning the load generator's client: {', '.join(CLIENTS)}")
        with Servers() as servers:
            [server] = triton_servers([settings_view(source, defaults, workdir)], self.backend)
            servers.start([server])
            target = triton_targets(server, source.model, describe_settings(defaults, self.backend))["http"]
            contenders = [served(target, client, name=client) for client in CLIENTS]
            results = self._tuning_run(contenders, payloads, "tuning client")
        by_client = {c.name: [r for r in results if r.target == c.name] for c in contenders}
        return _group("client", "The load generator (same server, HTTP): which client costs the shared cores least",
                      by_client, DEFAULT_CLIENT)

    def _seed_variants(self, source, payloads) -> TuningGroup:
        variants = {"async endpoint, 1 torch thread": dict(endpoint="async", torch_threads=1),
                    "sync endpoint, torch default threads": dict(endpoint="sync", torch_threads=0)}
        self.say("the comparison server's own best setup: " + "; ".join(variants))
        with Servers() as servers:
            started = dict(zip(variants, seed_servers(source.layout, list(variants.values()))))
            servers.start(list(started.values()))
            contenders = [served(Target("seed-fastapi", s.port, server_pid=s.pid, config=label), name=label,
                                 districts=(1,)) for label, s in started.items()]
            results = self._tuning_run(contenders, payloads, "tuning comparison server")
        by_label = {c.name: [r for r in results if r.target == c.name] for c in contenders}
        group = _group("seed_server", "The comparison server's best setup (so the comparison is fair to it)",
                       by_label, next(iter(variants)), same_default=False)
        group.options = variants
        return group

    @staticmethod
    def seed_choice(tuning: list[TuningGroup]) -> dict[str, Any]:
        """The comparison server runs in the setup that won its own tuning (the fastest, to be fair to it)."""
        for group in tuning:
            if group.knob == "seed_server" and group.variants:
                best = max(group.variants, key=lambda v: v["score"])["label"]
                return {"label": best, **group.options[best]}
        return {"label": "async endpoint, 1 torch thread", "endpoint": "async", "torch_threads": 1}

    # --- (2) the comparison -----------------------------------------------------------------------------------------
    def compare(self, source, payloads, defaults, seed_options: dict[str, Any],
                workdir: Path) -> tuple[list[LevelResult], str, dict[str, Any] | None]:
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
        paced = self._paced_floor(source, payloads, results)
        if paced is not None:
            results.append(paced.pop("result"))
        return results, version, paced

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


def protocol_group(results: Sequence[LevelResult]) -> TuningGroup:
    """HTTP vs gRPC, scored on the comparison's own results (same server, same rounds)."""
    by_protocol = {"HTTP": [r for r in results if r.target == "triton-http"],
                   "gRPC": [r for r in results if r.target == "triton-grpc"]}
    return _group("protocol", "HTTP (binary tensors) or gRPC, same server (from the comparison below)", by_protocol,
                  "HTTP", note="both stay served; the winner is what simulators should prefer")


# --- (3) goals ----------------------------------------------------------------------------------------------------
def find(results: Sequence[LevelResult], target: str, concurrency: int, districts: int) -> LevelResult | None:
    return next((r for r in results if (r.target, r.concurrency, r.districts) == (target, concurrency, districts)),
                None)


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
