"""The results of a run as ``benchmarks.json`` (every figure), ``benchmark-results.md`` (the tables, the machine, the
command) and ``benchmarks.png`` (decisions/s against p99 latency). What the figures mean is written once, by hand, in
``docs/benchmarks.md``; this page only states them."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .load import find, process_ticks

PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "tritonclient", "nvidia-pytriton", "grpcio", "fastapi",
            "uvicorn", "pydantic", "maddpg-citylearn")
# Every contender: its name in the tables and the legend, its colour and marker; in the order of both.
CONTENDERS = {
    "triton-http": ("Triton, HTTP", "tab:blue", "o"),
    "triton-grpc": ("Triton, gRPC", "tab:green", "s"),
    "triton-python-http": ("Triton (python backend), HTTP", "tab:cyan", "v"),
    "triton-onnxruntime-http": ("Triton (onnxruntime backend), HTTP", "tab:cyan", "v"),
    "seed-fastapi": ("seed-style FastAPI + torch", "tab:red", "^"),
    "onnxruntime-inprocess": ("in-process onnxruntime", "black", "*"),
    "onnxruntime-inprocess-paced": ("in-process onnxruntime, paced", "dimgray", "*"),
    "torch-stacked-inprocess": ("in-process torch (stacked actors)", "tab:gray", "P"),
    "torch-seed-loop-inprocess": ("in-process torch (seed's actor loop)", "tab:brown", "X"),
}


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    memory = _proc_field("/proc/meminfo", "MemTotal:")
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None if memory is None else round(int(memory.split()[0]) / 1024**2, 1),
        "gpu": "none used (CPU only)",
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "loadavg_start": list(os.getloadavg()),
        "busy_processes_start": busy_processes(),
    }


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        with open(path) as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(prefix)), None)
    except OSError:
        return None


def busy_processes(interval_s: float = 0.5, threshold: float = 0.1) -> list[dict[str, Any]]:
    """Other processes using more than ``threshold`` of a core: what the benchmark shared the machine with."""
    first = {pid: ticks for pid, _, ticks, _ in process_ticks()}
    time.sleep(interval_s)
    busy = []
    for pid, _, ticks, name in process_ticks():
        share = (ticks - first.get(pid, ticks)) / os.sysconf("SC_CLK_TCK") / interval_s
        if share >= threshold and pid != os.getpid():
            try:  # "python3 maddpg-citylearn train": the base names of its first three arguments
                argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
                name = " ".join(Path(a).name if "/" in a else a for a in argv[:3])[:60] or name
            except OSError:
                pass
            busy.append({"pid": pid, "name": name, "cores": round(share, 2)})
    return sorted(busy, key=lambda p: -p["cores"])


def write_benchmark_report(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "benchmarks.json", "markdown": out_dir / "benchmark-results.md",
             "plot": out_dir / "benchmarks.png"}
    text = json.dumps(data, indent=1, default=lambda value: value.item() if hasattr(value, "item") else str(value))
    paths["json"].write_text(text + "\n")
    plot(data, paths["plot"])
    paths["markdown"].write_text(markdown(data))
    return paths


def _order(target: str) -> int:
    return list(CONTENDERS).index(target) if target in CONTENDERS else len(CONTENDERS)


def _label(target: str) -> str:
    return CONTENDERS.get(target, (target,))[0]


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    series: dict[tuple[str, int], list[dict]] = {}
    for r in data["results"]:
        if r["requests"]:
            series.setdefault((r["target"], r["districts"]), []).append(r)
    for (target, districts), rows in sorted(series.items(), key=lambda item: (_order(item[0][0]), item[0][1])):
        rows = sorted(rows, key=lambda r: r["concurrency"])
        _, color, marker = CONTENDERS.get(target, (target, "tab:purple", "d"))
        x, y = [r["decisions_per_s"] for r in rows], [r["p99_ms"] for r in rows]
        ax.plot(x, y, marker=marker, color=color, linestyle="--" if districts > 1 else "-",
                markersize=11 if marker == "*" else 7,
                label=f"{_label(target)}, {districts} district{'s' if districts > 1 else ''}/request")
        for r, xi, yi in zip(rows, x, y):
            text = f"c{r['concurrency']}" if len(rows) > 1 else f"{districts}/call"
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"agent decisions per second (districts x {data['model'].get('agents', 'agents')} per second), "
                  "log scale")
    ax.set_ylabel("p99 latency (ms), log scale")
    ax.set_title("Throughput vs p99 latency (cN = concurrency N; lower right is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- markdown: tables only ------------------------------------------------------------------------------------------
def cell(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def results_table(results: list[dict], stall_ms: float) -> list[str]:
    lines = ["| Contender | Setup | Districts / request | Concurrency | Requests/s | Decisions/s | p50 ms | p95 ms | "
             f"p99 ms | Max ms | Stalled (p50 + {stall_ms:g} ms) | Errors | Avg batch (rows / execution) | "
             "Triton queue ms / request | Client CPU (cores) | Server CPU (cores) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(results, key=lambda r: (_order(r["target"]), r["districts"], r["concurrency"])):
        triton = r.get("triton") or {}
        queue = triton.get("queue_us_per_request")
        lines.append(
            f"| {_label(r['target'])} | {r['config']} | {r['districts']} | {r['concurrency']} | "
            f"{cell(r['requests_per_s'], 0)} | {cell(r['decisions_per_s'], 0)} | {cell(r['p50_ms'], 3)} | "
            f"{cell(r['p95_ms'], 3)} | {cell(r['p99_ms'], 3)} | {cell(r['max_ms'], 1)} | "
            f"{'-' if r.get('stalled') is None else r['stalled']} | {r['errors']} | "
            f"{cell(triton.get('average_batch_size'), 1)} | {cell(None if queue is None else queue / 1000, 3)} | "
            f"{cell(r['client_cpu_cores'])} | {cell(r.get('server_cpu_cores'))} |")
    return lines


def goals_table(goals: list[dict]) -> list[str]:
    lines = ["| Goal | Measured | Ratio | Target | Met |", "|---|---|--:|--:|---|"]
    for g in goals:
        met = "n/a" if g["met"] is None else ("**yes**" if g["met"] else "**no**")
        target = g.get("target_text") or ("-" if g["target"] is None else f"{g['target']:g}x")
        measured = f"{g['measured']} ({g['detail']})" if g.get("detail") else g["measured"]
        lines.append(f"| {g['goal']} | {measured} | {cell(g['ratio'], 2)}{'x' if g['ratio'] else ''} | {target} | {met} |")
    return lines


def perf_analyzer_table(data: dict[str, Any]) -> list[str]:
    """perf_analyzer's figures beside the driver's, level by level, and their ratio (perf_analyzer / driver)."""
    perf = data.get("perf_analyzer") or {}
    if "rows" not in perf:
        return [f"Not measured: {perf.get('skipped', 'perf_analyzer did not run')}."]
    lines = [f"perf_analyzer {perf['version']}, {perf['window_ms']} ms windows, random input, same server as the "
             "driver's rows, right after them.", "",
             "| Protocol | Districts / request | Concurrency | Requests/s: driver / perf_analyzer | Ratio | "
             "p50 ms: driver / perf_analyzer | p99 ms: driver / perf_analyzer |", "|---|--:|--:|---|--:|---|---|"]
    for p in perf["rows"]:
        ours = find(data["results"], p["target"], p["concurrency"], p["districts"])
        if ours is None or "error" in p:
            lines.append(f"| {_label(p['target'])} | {p['districts']} | {p['concurrency']} | "
                         f"{p.get('error', 'not measured by the driver')} | - | - | - |")
            continue
        lines.append(f"| {_label(p['target'])} | {p['districts']} | {p['concurrency']} | "
                     f"{cell(ours['requests_per_s'], 0)} / {cell(p['requests_per_s'], 0)} | "
                     f"{p['requests_per_s'] / ours['requests_per_s']:.2f} | {cell(ours['p50_ms'], 3)} / "
                     f"{cell(p['p50_ms'], 3)} | {cell(ours['p99_ms'], 3)} / {cell(p['p99_ms'], 3)} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    machine, settings, paced = data["machine"], data["serving_settings"], data.get("paced_floor") or {}
    model = data["model"]
    load = " / ".join(f"{v:.2f}" for v in machine["loadavg_start"])
    load_end = " / ".join(f"{v:.2f}" for v in machine.get("loadavg_end", []))
    busy = ", ".join(f"{p['name']} ({p['cores']:.2f} cores)" for p in machine["busy_processes_start"][:6]) or "none"
    return "\n".join([
        "# Benchmark results",
        "",
        f"Generated by `{data['command'] or 'maddpg-citylearn bench'}` on {data['started']} in "
        f"{data['seconds'] / 60:.1f} minutes. What the figures mean, how they were measured and what limits them: "
        "[benchmarks.md](benchmarks.md). Every figure is also in `benchmarks.json`.",
        "",
        f"- Served: {settings['label']} (`{settings['variant']}`); model {model['layout']}, hidden "
        f"{'-'.join(map(str, model['hidden']))}, {model['graph_nodes']} ONNX nodes, "
        f"{model['flops_per_decision'] / 1e3:.0f} kFLOP per decision ({model['repository']}).",
        f"- Paced floor: {cell(paced.get('pause_ms'), 3)} ms pause after each call (served mean "
        f"{cell(paced.get('served_mean_ms'), 3)} ms minus Triton's compute {cell(paced.get('served_compute_ms'), 3)} ms).",
        f"- Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['gpu']}; "
        f"{machine['os']}; {machine['python']}; tritonserver {machine.get('tritonserver_version', '?')}; load "
        f"average {load} at the start, {load_end} at the end (1 / 5 / 15 min); busy at the start: {busy}.",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v),
        "",
        "## Goals",
        "",
        *goals_table(data["goals"]),
        "",
        "## Results",
        "",
        *results_table(data["results"], data["stall_ms"]),
        "",
        "![Decisions per second against p99 latency](benchmarks.png)",
        "",
        "## perf_analyzer beside the driver (Triton rows)",
        "",
        *perf_analyzer_table(data),
        "",
    ])
