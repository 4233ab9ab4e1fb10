"""Tuning the served settings (opt-in): one knob at a time around ``ServingSettings()``, each group's variants side by
side on the local tritonserver, measured in interleaved rounds by the benchmarks' load driver.

    python benchmarks/tune.py --out docs          # -> docs/tuning.{md,json} (~6 minutes)
    python benchmarks/tune.py --duration 0.5      # a smoke run

Groups: model instances, dynamic-batching delay, onnxruntime intra-op threads, the queue policy (three times as long:
it is judged by its stalls), the graph form (stacked actors against one branch per agent, served and in process) and
the comparison server's own setup (async endpoint and one torch thread, or thread pool and torch's default threads).
Each variant is scored on the figures the goals are about: the geometric mean of its ratios to the group's best p50
at concurrency 1, requests/s at 16, and decisions/s at 16 x 64 districts (1.00: best on all three). *Kept*: the best
variant among those with the fewest stalls, if it beats the served default by more than the run's noise (how much the
served default's figures moved between the groups it ran in); else the default. The served defaults live in
``ServingSettings`` (export/maddpg_export/triton_config.py), changed by hand from these tables.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from maddpg_benchmarks.floors import onnxruntime_floor
from maddpg_benchmarks.load import STALL_MS, find
from maddpg_benchmarks.report import cell as _f
from maddpg_benchmarks.repositories import INSTANCES_KNOB, model_figures, settings_view
from maddpg_benchmarks.runner import (
    Bench,
    BenchOptions,
    inprocess,
    make_payloads,
    run_interleaved,
    served,
    started,
    triton_servers,
    triton_target,
)
from maddpg_benchmarks.seed_server import SeedServerProcess

LEVELS = ((1, 1), (16, 1), (16, 64))
# (concurrency, districts, figure, lower is better): what a variant is scored on.
CRITERIA = ((1, 1, "p50_ms", True), (16, 1, "requests_per_s", False), (16, 64, "decisions_per_s", False))
SEED_VARIANTS = {"async endpoint, 1 torch thread": dict(endpoint="async", torch_threads=1),
                 "sync endpoint, torch default threads": dict(endpoint="sync", torch_threads=0)}


def figures(results: list[dict]) -> dict[str, float]:
    found = {}
    for concurrency, districts, name, _ in CRITERIA:
        r = find(results, results[0]["target"], concurrency, districts) if results else None
        if r and r["requests"]:
            found[name] = r[name]
    return found


def stalls(variant: dict) -> int:
    return sum(r.get("stalled") or 0 for r in variant["results"])


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else 0.0


def group(knob: str, question: str, results: dict[str, list[dict]], default: str, **extra) -> dict:
    variants = [{"label": label, "default": label == default, "results": rs}
                for label, rs in results.items()]
    for v in variants:
        v["figures"] = figures(v["results"])
    ratios: dict[str, list[float]] = {v["label"]: [] for v in variants}
    for _, _, name, lower in CRITERIA:
        values = {v["label"]: v["figures"][name] for v in variants if v["figures"].get(name, 0) > 0}
        best = (min if lower else max)(values.values(), default=0)
        for label, value in values.items():
            ratios[label].append(best / value if lower else value / best)
    for v in variants:
        v["score"] = geomean(ratios[v["label"]])
    return {"knob": knob, "question": question, "default": default, "variants": variants, **extra}


def settle(groups: list[dict]) -> float:
    """Set each group's ``kept`` variant; returns the run's noise (>= 1): the spread (max / min) of the served
    default's figures over the groups it ran in, geometric mean over the figures."""
    seen: dict[str, list[float]] = {}
    for g in groups:
        for v in g["variants"]:
            if v["default"] and g.get("served_default", True):
                for name, value in v["figures"].items():
                    seen.setdefault(name, []).append(value)
    noise = geomean(max(v) / min(v) for v in seen.values() if len(v) > 1 and min(v) > 0) or 1.0
    for g in groups:
        if not g["variants"]:
            continue
        fewest = min(stalls(v) for v in g["variants"])
        candidates = [v for v in g["variants"] if stalls(v) == fewest]
        best = max(candidates, key=lambda v: v["score"])
        default = next((v for v in candidates if v["default"]), None)
        beats = default is None or not g.get("served_default", True) or best["score"] > default["score"] * noise
        g["kept"] = best["label"] if beats else default["label"]
    return noise


class Tuner(Bench):
    """The tuning groups, on the comparison's own servers and load driver (:class:`~maddpg_benchmarks.runner.Bench`)."""

    def measure(self, contenders, payloads, description: str, scale: float = 1.0) -> dict[str, list[dict]]:
        results = run_interleaved(contenders, LEVELS, payloads, self.options, description,
                                  scale * self.options.duration_s)
        return {c.name: [r for r in results if r["target"] == c.name] for c in contenders}

    def triton_variants(self, source, payloads, variants: dict, workdir: Path, description: str,
                        onnx_files: dict | None = None, scale: float = 1.0) -> dict[str, list[dict]]:
        self.say(f"{description}: {', '.join(variants)}")
        # Triton starts its python stub through a shell: keep the paths plain.
        views = [settings_view(source, settings, workdir / re.sub(r"[^A-Za-z0-9_.-]+", "-", label))
                 for label, settings in variants.items()]
        for label, view in zip(variants, views):
            if label in (onnx_files or {}):  # the same interface, another graph: the version serves it instead
                version = view / source.model / source.onnx_path.parent.name
                version.unlink()
                version.mkdir()
                for entry in source.onnx_path.parent.iterdir():
                    (version / entry.name).symlink_to((onnx_files[label] if entry.name == "model.onnx" else entry).resolve())
        with started(triton_servers(views, self.backend)) as servers:
            contenders = [served(triton_target(server, source.model, label, "triton-http"), name=label)
                          for label, server in zip(variants, servers)]
            return self.measure(contenders, payloads, description, scale)

    def tune(self, source, payloads, defaults, workdir: Path) -> list[dict]:
        groups = []
        knobs = [(INSTANCES_KNOB[self.backend], f"Model instances ({self.backend} backend)", [1, 2, 4]),
                 ("max_queue_delay_us", "Dynamic batching: how long a request may wait for company (us)",
                  [0, 100, 200, 500]),
                 ("onnx_intra_op_threads", "onnxruntime intra-op threads per instance", [1, 2])]
        for knob, question, values in knobs:
            variants = {f"{knob}={value}": replace(defaults, **{knob: value}) for value in values}
            results = self.triton_variants(source, payloads, variants, workdir / knob, f"tuning {knob}")
            groups.append(group(knob, question, results, f"{knob}={getattr(defaults, knob)}"))
        variants = {"no queue policy": defaults, "queue policy: 1 s timeout, at most 4096 queued":
                    replace(defaults, queue_timeout_us=1_000_000, max_queue_size=4096)}
        results = self.triton_variants(source, payloads, variants, workdir / "queue", "tuning queue policy", scale=3)
        groups.append(group("queue_policy", "Queue policy: reject after a timeout and bound the queue, or not",
                            results, "no queue policy"))
        groups.append(self.graph_forms(source, payloads, defaults, workdir / "graph"))
        self.say("the comparison server's own setup: " + "; ".join(SEED_VARIANTS))
        servers = {label: SeedServerProcess(source.layout, **options) for label, options in SEED_VARIANTS.items()}
        with started(list(servers.values())):
            contenders = [served(s.target(label), (1,), name=label) for label, s in servers.items()]
            results = self.measure(contenders, payloads, "tuning comparison server")
        groups.append(group("seed_server", "The comparison server's best setup (so the comparison is fair to it)",
                            results, next(iter(SEED_VARIANTS)), served_default=False))
        return groups

    def graph_forms(self, source, payloads, defaults, workdir: Path) -> dict:
        question = "Graph form: stacked actors (one batched MatMul per layer) or one branch per agent"
        if source.checkpoint is None:
            return {"knob": "graph_form", "question": question + " (skipped: needs the torch policy, run without "
                    "--repository)", "default": "", "variants": []}
        from maddpg_training.checkpoint import load_checkpoint

        workdir.mkdir(parents=True)
        per_agent_file = workdir / "per_agent.onnx"
        nodes = export_per_agent(load_checkpoint(source.checkpoint).build_policy(), source.layout, per_agent_file,
                                 source.onnx_path, payloads[max(payloads)].observations)
        stacked, per_agent = f"stacked ({model_figures(source, '')['graph_nodes']} nodes)", f"per-agent ({nodes} nodes)"
        results = self.triton_variants(source, payloads, {stacked: defaults, per_agent: defaults}, workdir,
                                       "tuning graph form", onnx_files={per_agent: per_agent_file})
        floors = [inprocess(f"{label} in process", onnxruntime_floor(path), self.options.districts)
                  for label, path in ((stacked, source.onnx_path), (per_agent, per_agent_file))]
        in_process = run_interleaved(floors, [(1, d) for d in self.options.districts], payloads, self.options,
                                     "graph forms in process")
        return group("graph_form", question, results, stacked, floors=in_process)

    def run(self) -> dict:
        from maddpg_export.triton_config import ServingSettings

        workdir = Path(tempfile.mkdtemp(prefix="maddpg-tune-"))
        try:
            source = self.source(workdir)
            groups = self.tune(source, make_payloads(source, self.options.districts), ServingSettings(), workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return {"command": " ".join(["python", *sys.argv]), "backend": self.backend, "noise": settle(groups),
                "stall_ms": STALL_MS, "groups": groups}


def per_agent_policy(policy):
    """A torch module equal to ``policy`` (a ``PolicyNetwork``) with one ``nn.Sequential`` per agent."""
    import torch
    from torch import nn

    class PerAgentPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.normaliser, self.scaler = policy.normaliser, policy.scaler
            self.register_buffer("action_mask", policy.actors.action_mask.clone())
            stacked, branches = policy.actors.mlp.layers, []
            for agent in range(policy.layout.n_agents):
                layers = []
                for index, layer in enumerate(stacked):
                    linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
                    with torch.no_grad():
                        linear.weight.copy_(layer.weight[agent].T)
                        linear.bias.copy_(layer.bias[agent, 0])
                    layers += [linear] + ([nn.ReLU()] if index < len(stacked) - 1 else [])
                branches.append(nn.Sequential(*layers))
            self.branches = nn.ModuleList(branches)

        def forward(self, observations):
            z = self.normaliser(observations)
            unit = torch.stack([branch(z[:, i]) for i, branch in enumerate(self.branches)], dim=1)
            return self.scaler(torch.tanh(unit) * self.action_mask)

    return PerAgentPolicy().eval()


def export_per_agent(policy, layout, path: Path, reference_onnx: Path, observations) -> int:
    """Write the per-agent graph to ``path``, proven to answer as ``reference_onnx``; returns its node count."""
    import numpy as np
    import onnxruntime as ort

    from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME
    from maddpg_export.onnx_graph import export_onnx

    model = export_onnx(per_agent_policy(policy), layout)
    path.write_bytes(model.SerializeToString())
    feed = {INPUT_NAME: np.ascontiguousarray(observations, dtype=np.float32)}
    ours, reference = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feed)[0]
                       for p in (path, reference_onnx))
    worst = float(np.abs(ours - reference).max())
    if worst > 1e-4:
        raise AssertionError(f"the per-agent graph differs from the stacked one by {worst:.2e}")
    return len(model.graph.node)


def page(data: dict) -> str:
    lines = ["# Tuning the served settings", "", f"Generated by `{data['command']}` ({data['backend']} backend). How "
             f"to read it: `benchmarks/tune.py`. This run's noise: {(data['noise'] - 1) * 100:.0f}%.", ""]
    for g in data["groups"]:
        lines += [f"## {g['question']}", ""]
        if not g["variants"]:
            continue
        lines += ["| Variant | p50 ms, c1 | p99 ms, c1 | Requests/s, c16 | Decisions/s, c16 x 64 | Client CPU, c16 | "
                  f"Server CPU, c16 | Stalled (p50 + {data['stall_ms']:g} ms) | Score | Kept |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for v in g["variants"]:
            target = v["results"][0]["target"]
            c1, c16 = find(v["results"], target, 1, 1) or {}, find(v["results"], target, 16, 1) or {}
            big = find(v["results"], target, 16, 64) or {}
            lines.append(f"| {v['label']}{' (default)' if v['default'] else ''} | {_f(c1.get('p50_ms'), 3)} | "
                         f"{_f(c1.get('p99_ms'), 3)} | {_f(c16.get('requests_per_s'), 0)} | "
                         f"{_f(big.get('decisions_per_s'), 0)} | {_f(c16.get('client_cpu_cores'))} | "
                         f"{_f(c16.get('server_cpu_cores'))} | {stalls(v)} | {v['score']:.2f} | "
                         f"{'**kept**' if v['label'] == g.get('kept') else ''} |")
        for r in g.get("floors", []):
            lines.append(f"| {r['target']}, {r['districts']} district(s) per call | {_f(r['p50_ms'], 3)} | "
                         f"{_f(r['p99_ms'], 3)} | - | {_f(r['decisions_per_s'], 0)} | - | - | - | - | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per variant and level")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repository", type=Path, default=None, help="default: a fresh policy (needs CityLearn)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/tuning.md and .json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    options = BenchOptions(duration_s=args.duration, rounds=args.rounds, repository=args.repository,
                           progress=not args.no_progress)
    data = Tuner(options, say=lambda m: print(m, file=sys.stderr)).run()
    print(page(data))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tuning.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "tuning.md").write_text(page(data))


if __name__ == "__main__":
    main()
