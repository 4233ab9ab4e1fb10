"""Tuning the served settings, opt-in: one knob at a time around ``ServingSettings()``, each group's variants side by
side in interleaved rounds, on the local tritonserver.

    python benchmarks/tune.py --out docs          # -> docs/tuning.{md,json} (~6 minutes)
    python benchmarks/tune.py --duration 0.5      # a smoke run

Groups: model instances, dynamic-batching delay, onnxruntime intra-op threads, the queue policy (counted in stalls),
graph form (stacked actors against one branch per agent, also in process), the load generator's client (the driver's
asyncio client against tritonclient's asyncio and threaded clients), and the comparison server's own setup. Score:
the geometric mean of three ratios to the group's best (p50 at concurrency 1, requests/s at 16, decisions/s at 16 x 64
districts); a variant replaces the default only if it beats it by more than the run's own noise (how much the served
default's figures moved between the groups it ran in), and never if its requests stalled more often. What the last
run decided is in docs/benchmarks.md ("Tuning"); the served defaults live in ``ServingSettings``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maddpg_benchmarks.graph_forms import node_count as _node_count
from maddpg_benchmarks.load import (
    DEFAULT_CLIENT,
    OUTPUT_NAME,
    REQUEST_TIMEOUT_S,
    STALL_MS,
    Level,
    LevelResult,
    Measurement,
    Payload,
    Target,
    Window,
    _measurement,
    _snapshot,
    check_actions,
    measure,
)
from maddpg_benchmarks.report import _f
from maddpg_benchmarks.repositories import INSTANCES_KNOB, BenchmarkRepository, describe_settings, settings_view
from maddpg_benchmarks.runner import (
    Bench,
    BenchOptions,
    Contender,
    Servers,
    find,
    inprocess,
    make_payloads,
    run_interleaved,
    seed_servers,
    triton_servers,
    triton_targets,
)
from maddpg_core.layout import INPUT_NAME

TUNING_LEVELS = ((1, 1), (16, 1), (16, 64))
CLIENTS = (DEFAULT_CLIENT, "tritonclient-aio", "tritonclient-threads")


# --- tritonclient's own clients, for the client group ---------------------------------------------------------------
class TritonClientAioCaller:
    """tritonclient's own asyncio HTTP client (aiohttp), inputs built once: the library a user would reach for."""

    def __init__(self, url: str, model: str, payload: Payload):
        self.url, self.model, self.payload = url, model, payload
        self.client = None

    async def open(self) -> None:
        import tritonclient.http.aio as httpclient

        self.client = httpclient.InferenceServerClient(self.url, conn_limit=1)
        tensor = httpclient.InferInput(INPUT_NAME, list(self.payload.observations.shape), "FP32")
        tensor.set_data_from_numpy(self.payload.observations, binary_data=True)
        self.inputs = [tensor]
        self.outputs = [httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def reset(self) -> None:
        await self.close()
        await self.open()

    async def call(self):
        return await self.client.infer(self.model, self.inputs, outputs=self.outputs)

    async def call_checked(self) -> None:
        check_actions((await self.call()).as_numpy(OUTPUT_NAME), self.payload)




def _measure_threaded(target: Target, payload: Payload, level: Level) -> Measurement:
    """One thread per caller, each with its own ``tritonclient.http`` client (a client must stay in its thread)."""
    if not (target.is_triton and target.protocol == "http"):
        raise ValueError("the tritonclient-threads client drives Triton over HTTP only")
    import tritonclient.http as httpclient

    url = f"{target.host}:{target.port}"
    outputs = [httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]
    check = httpclient.InferenceServerClient(url, network_timeout=REQUEST_TIMEOUT_S)
    try:  # correctness before speed
        check_actions(check.infer(target.model, _tritonclient_inputs(httpclient, payload), outputs=outputs)
                      .as_numpy(OUTPUT_NAME), payload)
    finally:
        check.close()

    lock = threading.Lock()
    state = {"budget": level.max_requests, "deadline": 0.0, "window": Window()}
    start_phase, end_phase = threading.Barrier(level.concurrency + 1), threading.Barrier(level.concurrency + 1)
    wait_s = 60 + level.warmup_s + level.duration_s + REQUEST_TIMEOUT_S

    def worker() -> None:
        client = httpclient.InferenceServerClient(url, network_timeout=REQUEST_TIMEOUT_S)
        inputs = _tritonclient_inputs(httpclient, payload)
        try:
            for _ in ("warmup", "window"):
                start_phase.wait(timeout=wait_s)
                window, latencies = state["window"], []
                while time.perf_counter() < state["deadline"]:
                    with lock:
                        if state["budget"] <= 0:
                            break
                        state["budget"] -= 1
                    start = time.perf_counter_ns()
                    try:
                        client.infer(target.model, inputs, outputs=outputs)
                    except Exception as exc:  # noqa: BLE001 - counted and named in the report
                        with lock:
                            window.error(exc)
                        continue
                    latencies.append(time.perf_counter_ns() - start)
                with lock:
                    window.latencies.extend(latencies)
                end_phase.wait(timeout=wait_s)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(level.concurrency)]
    for thread in threads:
        thread.start()
    state["deadline"] = time.perf_counter() + level.warmup_s
    start_phase.wait(timeout=wait_s)
    end_phase.wait(timeout=wait_s)
    warmup = state["window"]
    before = _snapshot(target)
    state.update(budget=level.max_requests, window=Window())
    started = time.perf_counter()
    state["deadline"] = started + level.duration_s
    start_phase.wait(timeout=wait_s)
    end_phase.wait(timeout=wait_s)
    seconds = time.perf_counter() - started
    after = _snapshot(target)
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    return _measurement(state["window"], warmup, seconds, before, after)


def _tritonclient_inputs(module, payload: Payload):
    tensor = module.InferInput(INPUT_NAME, list(payload.observations.shape), "FP32")
    tensor.set_data_from_numpy(payload.observations, binary_data=True)
    return [tensor]


def measure_client(target: Target, payload: Payload, level: Level, client: str) -> Measurement:
    if client == "tritonclient-threads":
        return _measure_threaded(target, payload, level)
    if client == "tritonclient-aio":
        return measure(target, payload, level, callers=lambda p, n: [
            TritonClientAioCaller(f"{target.host}:{target.port}", target.model, p) for _ in range(n)])
    return measure(target, payload, level)


def served(target: Target, client: str = DEFAULT_CLIENT, districts=(1, 64), name: str | None = None) -> Contender:
    return Contender(name or target.name, lambda level, payload: measure_client(target, payload, level, client),
                     config=target.config, client=client, districts=districts)


# --- the per-agent graph, for the graph-form group --------------------------------------------------------------------
def per_agent_policy(policy):
    """A torch module equal to ``policy`` (a ``PolicyNetwork``) with one ``nn.Sequential`` per agent."""
    import torch
    from torch import nn

    class PerAgentPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.normaliser = policy.normaliser
            self.scaler = policy.scaler
            self.register_buffer("action_mask", policy.actors.action_mask.clone())
            stacked = policy.actors.mlp.layers
            branches = []
            for agent in range(policy.layout.n_agents):
                layers = []
                for index, layer in enumerate(stacked):
                    linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
                    with torch.no_grad():
                        linear.weight.copy_(layer.weight[agent].T)
                        linear.bias.copy_(layer.bias[agent, 0])
                    layers.append(linear)
                    if index < len(stacked) - 1:
                        layers.append(nn.ReLU())
                branches.append(nn.Sequential(*layers))
            self.branches = nn.ModuleList(branches)

        def forward(self, observations):
            z = self.normaliser(observations)
            unit = torch.stack([branch(z[:, i]) for i, branch in enumerate(self.branches)], dim=1)
            return self.scaler(torch.tanh(unit) * self.action_mask)

    return PerAgentPolicy().eval()


def export_per_agent(policy, layout, path: Path, reference_onnx: Path, observations: np.ndarray) -> int:
    """Write the per-agent graph of ``policy`` to ``path``; proves it answers as ``reference_onnx``. Returns its node
    count."""
    import onnxruntime as ort

    from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME
    from maddpg_export.onnx_graph import export_onnx

    model = export_onnx(per_agent_policy(policy), layout)
    path.write_bytes(model.SerializeToString())
    feed = {INPUT_NAME: np.ascontiguousarray(observations, dtype=np.float32)}
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feed)[0]
    reference = ort.InferenceSession(str(reference_onnx), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feed)[0]
    worst = float(np.abs(ours - reference).max())
    if worst > 1e-4:
        raise AssertionError(f"the per-agent graph differs from the stacked one by {worst:.2e}")
    return len(model.graph.node)



# --- scoring ---------------------------------------------------------------------------------------------------------
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




class Tuner(Bench):
    """The tuning groups; the comparison's servers and helpers come from :class:`Bench`."""

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
        from maddpg_benchmarks.floors import onnxruntime_floor

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


def protocol_group(results: Sequence[LevelResult]) -> TuningGroup:
    """HTTP vs gRPC, scored on the comparison's own results (same server, same rounds)."""
    by_protocol = {"HTTP": [r for r in results if r.target == "triton-http"],
                   "gRPC": [r for r in results if r.target == "triton-grpc"]}
    return _group("protocol", "HTTP (binary tensors) or gRPC, same server (from the comparison below)", by_protocol,
                  "HTTP", note="both stay served; the winner is what simulators should prefer")




# --- the page -----------------------------------------------------------------------------------------------------
def tuning_section(group: dict, stall_ms: float) -> list[str]:
    lines = [f"### {group['question']}", ""]
    if not group["variants"]:
        return lines + [f"Not measured: {group['note']}.", ""]
    lines += ["| Variant | p50 ms, c1 | p99 ms, c1 | Requests/s, c16 | p99 ms, c16 | Avg batch, c16 | "
              "Decisions/s, c16 x 64 districts | p99 ms, c16 x 64 | Client CPU, c16 | Server CPU, c16 | "
              f"Stalled (p50 + {stall_ms:g} ms), all levels | Score |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for v in group["variants"]:
        results = v["results"]
        c1, c16 = find(results, v["results"][0]["target"], 1, 1), find(results, v["results"][0]["target"], 16, 1)
        big = find(results, v["results"][0]["target"], 16, 64)
        default = " (served default)" if group.get("same_default", True) else " (default)"
        label = v["label"] + (default if v["is_default"] else "") + (" **kept**" if v["label"] == group["winner"] else "")
        batch = (c16 or {}).get("triton") or {}
        requests = sum(r["requests"] for r in results)
        lines.append(
            f"| {label} | {_f((c1 or {}).get('p50_ms'), 3)} | {_f((c1 or {}).get('p99_ms'), 3)} | "
            f"{_f((c16 or {}).get('requests_per_s'), 0)} | {_f((c16 or {}).get('p99_ms'), 2)} | "
            f"{_f(batch.get('average_batch_size'), 1)} | {_f((big or {}).get('decisions_per_s'), 0)} | "
            f"{_f((big or {}).get('p99_ms'), 1)} | {_f((c16 or {}).get('client_cpu_cores'))} | "
            f"{_f((c16 or {}).get('server_cpu_cores'))} | {stalls(v)} of {requests:,} | {v['score']:.2f} |")
    lines += ["", *floors_table(group), decision(group), ""]
    return lines


def decision(group: dict) -> str:
    scores = {v["label"]: v["score"] for v in group["variants"]}
    winner, default, verdict = group["winner"], group["default"], group.get("decision", "")
    note = f" ({group['note']})" if group.get("note") else ""
    noise = f"{(group.get('noise', 1.0) - 1) * 100:.0f}%"
    stalls = {v["label"]: stalls(v) for v in group["variants"]}
    if verdict == "fastest, used for the comparison":
        return f"**Decision: `{winner}`**, its fastest setup here, is what the comparison runs{note}."
    if verdict == "the default stalled":
        return (f"**Decision: `{winner}`**: its requests stalled {stalls[winner]} time(s), the served default's "
                f"{stalls[default]} time(s); a variant that stalls never wins over one that does not{note}.")
    stalled_rivals = [label for label, count in stalls.items() if count > stalls.get(default, 0)]
    because = (f"; {', '.join(f'`{label}`' for label in stalled_rivals)} stalled ({', '.join(str(stalls[label]) for label in stalled_rivals)} "
               f"request(s)) and could not win" if stalled_rivals else "")
    if verdict == "default is best":
        return f"**Decision: keep `{default}`**, the best score in this run{because}{note}."
    if verdict.startswith("within noise"):
        best = max((label for label in scores if label not in stalled_rivals), key=scores.get)
        return (f"**Decision: keep `{default}`**: `{best}` scored {scores[best]:.2f} against {scores[default]:.2f}, "
                f"a gap inside this run's noise ({noise}: how much the served default's own figures moved between "
                f"the groups it ran in){because}{note}.")
    return (f"**Decision: `{winner}`**: {scores[winner]:.2f} against {scores.get(default, 0):.2f} for `{default}`, "
            f"more than this run's noise ({noise}){because}{note}.")


def floors_table(group: dict) -> list[str]:
    if not group.get("floors"):
        return []
    lines = ["The graphs alone, in process (onnxruntime, one thread, one caller):", "",
             "| Graph | Districts / call | p50 ms | p99 ms | Decisions/s |", "|---|--:|--:|--:|--:|"]
    for r in sorted(group["floors"], key=lambda r: (r["districts"], r["target"])):
        lines.append(f"| {r['target'].removesuffix(' in process')} | {r['districts']} | {_f(r['p50_ms'], 3)} | "
                     f"{_f(r['p99_ms'], 3)} | {_f(r['decisions_per_s'], 0)} |")
    by_size: dict[int, dict[str, float]] = {}
    for r in group["floors"]:
        by_size.setdefault(r["districts"], {})[r["target"]] = r["decisions_per_s"]
    default = f"{group['default']} in process"
    sentences = []
    for size, rates in sorted(by_size.items()):
        for target, rate in rates.items():
            if target != default and rates.get(default):
                sentences.append(f"{target.removesuffix(' in process')} does {rate / rates[default]:.2f}x the "
                                 f"decisions/s of {group['default']} with {size} district(s) per call")
    return lines + ["", "In process, " + "; ".join(sentences) + ".", ""] if sentences else lines + [""]




def run(options: BenchOptions, say=print) -> dict[str, Any]:
    """Every tuning group, then HTTP against gRPC from a short comparison, each group settled against the noise."""
    from maddpg_benchmarks.repositories import build_repository, open_repository
    from maddpg_export.triton_config import ServingSettings

    tuner = Tuner(options, say=say)
    workdir = Path(tempfile.mkdtemp(prefix="maddpg-tune-"))
    try:
        source = (open_repository(Path(options.repository)) if options.repository
                  else build_repository(workdir / "source", say=say))
        payloads = make_payloads(source, options.districts)
        defaults = ServingSettings()
        groups = tuner.tune(source, payloads, defaults, workdir)
        comparison, *_ = tuner.compare(source, payloads, defaults, tuner.seed_choice(groups), workdir / "compare")
        groups.append(protocol_group(comparison))
        noise = decide(groups)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"command": " ".join(["python", *sys.argv]), "noise": noise, "stall_ms": STALL_MS,
            "backend": tuner.backend, "tuning": [g.as_dict() for g in groups]}


def page(data: dict[str, Any]) -> str:
    lines = ["# Tuning the served settings", "", f"Generated by `{data['command']}` ({data['backend']} backend); "
             "how to read it: `benchmarks/tune.py` and docs/benchmarks.md, \"Tuning\".", ""]
    for group in data["tuning"]:
        lines += tuning_section(group, data["stall_ms"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per variant and level")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/tuning.md and .json")
    args = parser.parse_args()
    options = BenchOptions(duration_s=args.duration, tuning_duration_s=args.duration, rounds=args.rounds,
                           repository=args.repository, perf_analyzer=False, progress=True)
    data = run(options)
    print(page(data))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tuning.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (args.out / "tuning.md").write_text(page(data))


if __name__ == "__main__":
    main()
