"""The results of a run as ``benchmarks.json`` (everything), ``benchmarks.md`` (tables, decisions, machine, command)
and ``benchmarks.png`` (decisions/s against p99 latency)."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "tritonclient", "nvidia-pytriton", "grpcio", "fastapi",
            "uvicorn", "pydantic", "maddpg-citylearn")
LABELS = {
    "triton-http": "Triton, HTTP",
    "triton-grpc": "Triton, gRPC",
    "triton-python-http": "Triton (python backend), HTTP",
    "triton-onnxruntime-http": "Triton (onnxruntime backend), HTTP",
    "seed-fastapi": "seed-style FastAPI + torch",
    "onnxruntime-inprocess": "in-process onnxruntime",
    "onnxruntime-inprocess-paced": "in-process onnxruntime, paced",
    "torch-stacked-inprocess": "in-process torch (stacked actors)",
    "torch-seed-loop-inprocess": "in-process torch (seed's actor loop)",
}


# --- the machine --------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": "none used (CPU only)",
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "loadavg_start": list(os.getloadavg()),
        "busy_processes_start": busy_processes(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def busy_processes(interval_s: float = 0.5, threshold: float = 0.1) -> list[dict[str, Any]]:
    """Other processes using more than ``threshold`` of a core: what the benchmark shared the machine with."""
    def sample() -> dict[int, tuple[str, int]]:
        ticks = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    raw = handle.read()
            except OSError:
                continue
            name = _command(entry.name) or raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
            fields = raw.rsplit(b")", 1)[1].split()
            ticks[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
        return ticks

    first = sample()
    time.sleep(interval_s)
    second = sample()
    tick = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, after) in second.items():
        if pid in first:
            share = (after - first[pid][1]) / tick / interval_s
            if share >= threshold:
                busy.append({"pid": pid, "name": name, "cores": round(share, 2)})
    return sorted(busy, key=lambda p: -p["cores"])


def _command(pid: str) -> str:
    """``python3 maddpg-citylearn train``: the base names of a process's first three arguments."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return ""
    return " ".join(Path(a).name if "/" in a else a for a in argv[:3])[:60]


# --- files --------------------------------------------------------------------------------------------------------
def write_benchmark_report(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "benchmarks.json", "markdown": out_dir / "benchmarks.md",
             "plot": out_dir / "benchmarks.png"}
    paths["json"].write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    plot(data, paths["plot"])
    paths["markdown"].write_text(markdown(data, plot_name=paths["plot"].name))
    return paths


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    series: dict[tuple[str, int], list[dict]] = {}
    for r in data["results"]:
        if r["requests"]:
            series.setdefault((r["target"], r["districts"]), []).append(r)
    styles = {"triton-http": ("tab:blue", "o"), "triton-grpc": ("tab:green", "s"), "seed-fastapi": ("tab:red", "^"),
              "triton-python-http": ("tab:cyan", "v"), "triton-onnxruntime-http": ("tab:cyan", "v"),
              "onnxruntime-inprocess": ("black", "*"), "onnxruntime-inprocess-paced": ("dimgray", "*"),
              "torch-stacked-inprocess": ("tab:gray", "P"), "torch-seed-loop-inprocess": ("tab:brown", "X")}
    order = list(LABELS)
    for (target, districts), rows in sorted(series.items(), key=lambda item: (
            order.index(item[0][0]) if item[0][0] in order else len(order), item[0][1])):
        rows = sorted(rows, key=lambda r: r["concurrency"])
        color, marker = styles.get(target, ("tab:purple", "d"))
        x = [r["decisions_per_s"] for r in rows]
        y = [r["p99_ms"] for r in rows]
        dashed = districts > 1
        ax.plot(x, y, marker=marker, color=color, linestyle="--" if dashed else "-",
                markersize=11 if marker == "*" else 7,
                label=f"{LABELS.get(target, target)}, {districts} district{'s' if districts > 1 else ''}/request")
        for r, xi, yi in zip(rows, x, y):
            text = f"c{r['concurrency']}" if len(rows) > 1 else f"{districts}/call"
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    agents = data["model"].get("agents", "agents")
    ax.set_xlabel(f"agent decisions per second (districts x {agents} per second), log scale")
    ax.set_ylabel("p99 latency (ms), log scale")
    ax.set_title("Throughput vs p99 latency (cN = concurrency N; lower right is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- markdown -----------------------------------------------------------------------------------------------------
def _f(value, digits=2, unit="") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def _find(results, target, concurrency, districts):
    return next((r for r in results if (r["target"], r["concurrency"], r["districts"]) == (target, concurrency,
                                                                                          districts)), None)


def _order(target: str) -> int:
    order = list(LABELS)
    return order.index(target) if target in order else len(order)


def results_table(results: list[dict], stall_ms: float) -> list[str]:
    lines = ["| Contender | Setup | Districts / request | Concurrency | Requests/s | Decisions/s | p50 ms | p95 ms | "
             f"p99 ms | Max ms | Stalled (p50 + {stall_ms:g} ms) | Errors | Avg batch (rows / execution) | "
             "Client CPU (cores) | Server CPU (cores) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    rows = sorted(results, key=lambda r: (_order(r["target"]), r["districts"], r["concurrency"]))
    for r in rows:
        triton = r.get("triton") or {}
        lines.append(
            f"| {LABELS.get(r['target'], r['target'])} | {r['config']} | {r['districts']} | {r['concurrency']} | "
            f"{_f(r['requests_per_s'], 0)} | {_f(r['decisions_per_s'], 0)} | {_f(r['p50_ms'], 3)} | "
            f"{_f(r['p95_ms'], 3)} | {_f(r['p99_ms'], 3)} | {_f(r['max_ms'], 1)} | {_stall_cell(r)} | "
            f"{r['errors']} | {_f(triton.get('average_batch_size'), 1)} | {_f(r['client_cpu_cores'])} | "
            f"{_f(r.get('server_cpu_cores'))} |")
    return lines


def goals_table(goals: list[dict]) -> list[str]:
    lines = ["| Goal | Measured | Ratio | Target | Met |", "|---|---|--:|--:|---|"]
    for g in goals:
        met = "n/a" if g["met"] is None else ("**yes**" if g["met"] else "**no**")
        target = g.get("target_text") or ("-" if g["target"] is None else f"{g['target']:g}x")
        measured = f"{g['measured']} ({g['detail']})" if g.get("detail") else g["measured"]
        lines.append(f"| {g['goal']} | {measured} | {_f(g['ratio'], 2)}{'x' if g['ratio'] else ''} | "
                     f"{target} | {met} |")
    return lines


def _stalls(variant: dict) -> int:
    return sum(r.get("stalled") or 0 for r in variant["results"])


def _stall_cell(result: dict) -> str:
    return "-" if result.get("stalled") is None else str(result["stalled"])


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
        c1, c16 = _find(results, v["results"][0]["target"], 1, 1), _find(results, v["results"][0]["target"], 16, 1)
        big = _find(results, v["results"][0]["target"], 16, 64)
        default = " (served default)" if group.get("same_default", True) else " (default)"
        label = v["label"] + (default if v["is_default"] else "") + (" **kept**" if v["label"] == group["winner"] else "")
        batch = (c16 or {}).get("triton") or {}
        requests = sum(r["requests"] for r in results)
        lines.append(
            f"| {label} | {_f((c1 or {}).get('p50_ms'), 3)} | {_f((c1 or {}).get('p99_ms'), 3)} | "
            f"{_f((c16 or {}).get('requests_per_s'), 0)} | {_f((c16 or {}).get('p99_ms'), 2)} | "
            f"{_f(batch.get('average_batch_size'), 1)} | {_f((big or {}).get('decisions_per_s'), 0)} | "
            f"{_f((big or {}).get('p99_ms'), 1)} | {_f((c16 or {}).get('client_cpu_cores'))} | "
            f"{_f((c16 or {}).get('server_cpu_cores'))} | {_stalls(v)} of {requests:,} | {v['score']:.2f} |")
    lines += ["", *floors_table(group), decision(group), ""]
    return lines


def decision(group: dict) -> str:
    scores = {v["label"]: v["score"] for v in group["variants"]}
    winner, default, verdict = group["winner"], group["default"], group.get("decision", "")
    note = f" ({group['note']})" if group.get("note") else ""
    noise = f"{(group.get('noise', 1.0) - 1) * 100:.0f}%"
    stalls = {v["label"]: _stalls(v) for v in group["variants"]}
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


def _model_words(model: dict) -> str:
    hidden = "-".join(str(h) for h in model.get("hidden", [])) or "?"
    return (f"{model['layout']}, one MLP per agent with hidden layers {hidden} (read from the graph's weights), "
            f"{model['graph_nodes']} ONNX nodes")


def markdown(data: dict[str, Any], plot_name: str = "benchmarks.png") -> str:
    from .load import REQUEST_TIMEOUT_S

    machine, settings, options = data["machine"], data["serving_settings"], data["options"]
    results, stall_ms = data["results"], data.get("stall_ms", 250.0)
    backend, other = data.get("backend", "python"), data.get("other_backend", "onnxruntime")
    other_variant = "configs/local.pbtxt" if other == "python" else "configs/cpu.pbtxt"
    client = next((g for g in data["tuning"] if g["knob"] == "client"), None)
    paced = data.get("paced_floor")
    lines = [
        "# Benchmarks: the served policy against what users would otherwise run",
        "",
        f"Generated by `{data['command'] or 'maddpg-citylearn bench'}` on {data['started']}, in "
        f"{data['seconds'] / 60:.1f} minutes, on {machine['cores']} cores ({machine['cpu_model']}) shared by the "
        f"load generator and the servers. Everything below comes from that one run; rerun the command to regenerate "
        f"this page, `benchmarks.json` (every figure) and `benchmarks.png`.",
        "",
        "Figures come from a shared, noisy machine: compare ratios within this page, never absolute times across "
        f"runs. The served model is {'a freshly initialised policy of the trained architecture' if data['model']['repository'] == 'fresh policy' else data['model']['repository']} "
        f"({_model_words(data['model'])}): speed does not depend on whether the weights are trained.",
        "",
        "## Goals",
        "",
        *goals_table(data["goals"]),
        "",
        "Not-met goals are explained under [What limits it](#what-limits-it).",
        "",
        "## Results",
        "",
        f"Triton runs the served defaults (`ServingSettings()`: {settings['label']}) from `{settings['variant']}` on "
        f"Triton's {backend} backend, as `maddpg-citylearn serve` runs it{' when `make setup` has built that backend' if backend == 'onnxruntime' else ''}. "
        f"\"Triton ({other} backend)\" serves the same model and settings from `{other_variant}` on the {other} "
        f"backend. The seed-style server runs in its best measured setup ({data['seed_server']['label']}). In-process "
        f"floors are one caller, one thread"
        + (f"; the paced one sleeps {paced['pause_ms']:.3f} ms after each call: the served requests' mean latency at "
           f"concurrency 1 ({paced['served_mean_ms']:.3f} ms, HTTP) minus Triton's compute time for them "
           f"({paced['served_compute_ms']:.3f} ms), so the model idles between calls as long as it does in the "
           f"server." if paced else "."),
        "",
        *results_table(results, stall_ms),
        "",
        f"![Decisions per second against p99 latency]({plot_name})",
        "",
        "## What limits it",
        "",
        *limits(data),
        "",
        *stall_section(data),
        "## Tuning",
        "",
        "One knob at a time around the served defaults, each group's variants running side by side and measured in "
        "interleaved rounds. Score: the geometric mean of three ratios to the group's best (p50 at concurrency 1, "
        "requests/s at concurrency 16, decisions/s at concurrency 16 with 64 districts per request), so 1.00 is best "
        "on all three goals' figures. A variant replaces the served default only if its score beats the default's "
        "by more than the run's own noise (the served configuration runs in every group, and how much its figures "
        "moved between groups is what chance alone does on this machine), and never if its requests stalled more "
        "often. The served defaults live in `ServingSettings` "
        "(`export/maddpg_export/triton_config.py`), the one writer of the model configs.",
        "",
    ]
    if not data["tuning"]:
        lines += ["Not run in this invocation (`--no-tune` or `--quick`).", ""]
    for group in data["tuning"]:
        lines += tuning_section(group, stall_ms)
    lines += [
        "## How it was measured",
        "",
        f"- **Load**: closed loop, fixed concurrency {options['levels']} (each caller sends its next request when "
        f"its answer arrives), {options['districts']} districts per request. Each (contender, level) gets "
        f"{options['duration_s']:g} s of measurement split over {options['rounds']} interleaved round(s), each "
        f"window after a {options['warmup_s']:g} s warm-up, and at most {options['max_requests']:,} requests; a "
        f"request unanswered after {REQUEST_TIMEOUT_S:g} s counts as an error. Everything listens and connects on "
        "127.0.0.1 only.",
        "- **Interleaving**: contenders that are compared run side by side and take turns level by level, round by "
        "round, so drifting background load lands on all of them alike. The paced floor runs after them: its pause "
        "comes from their results.",
        f"- **Client**: {client_choice(client)}",
        "- **Shared cores**: the load generator, the servers under test and anything else on the machine share "
        f"the same {machine['cores']} cores. The *Client CPU* and *Server CPU* columns say how much of them each "
        "used (CPU seconds per second: 1.00 is one full core). A load generator on its own machine would leave the "
        "server more; the ratios here are what one small host gives.",
        f"- **Background load**: load average {_loadavg(machine['loadavg_start'])} at the start and "
        f"{_loadavg(machine.get('loadavg_end'))} at the end; other processes busy at the start: "
        f"{_busy(machine['busy_processes_start'])}.",
        "- **Correctness**: each window first checks one answer completely (Triton: decoded actions equal to "
        f"in-process onnxruntime within 1e-4; seed-style: {data['model'].get('agents', '?')} buildings, each its own "
        "action count, in [-1, 1]); every later answer by status and size. Wrong answers count as errors.",
        f"- **Stalls**: answers slower than their row's median by more than {stall_ms:g} ms, counted per row "
        "(*Stalled*): Triton's 500 ms wait on top of whatever the request costs, while big batches that are slow "
        f"for good reason do not count. A row whose median is above {_detectable_ms():g} ms (overloaded on purpose) "
        "has a tail as wide as a stall and is not counted (-); *Max ms* is the slowest answer of the row.",
        "- **Triton's batching**: `nv_inference_count / nv_inference_exec_count` differences between metrics "
        "snapshots taken just outside each window (rows per model execution; with 64 districts per request it "
        "counts rows, so 64 means no merging).",
        f"- **The comparison server** (`benchmarks/maddpg_benchmarks/seed_server.py`): {seed_server_words()}",
        "- **Floors**: in-process onnxruntime (`InferenceSession.run` on `model.onnx`, 1 intra-op thread), back to "
        "back and paced (above), torch eager on the stacked `PolicyNetwork`, and the seed-style actor loop in "
        "process, all with one thread (torch's default of one thread per core spin-waits for cores that other "
        "processes hold: `benchmarks/maddpg_benchmarks/floors.py`).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"{machine['memory_gib']} GiB memory, {machine['gpu']}",
        f"- OS: {machine['os']}",
        f"- Python: {machine['python']}; tritonserver {machine.get('tritonserver_version', '?')} (bundled in "
        "nvidia-pytriton: python backend), Triton's onnxruntime backend r24.10 built by `make setup` "
        "(`python -m maddpg_serving.onnxruntime_backend build`)",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v),
        "",
        "## Reproduce",
        "",
        "```bash",
        data["command"] or "maddpg-citylearn bench",
        "```",
        "",
        "`maddpg-citylearn bench --quick` is a one-minute smoke run (two levels, no tuning); `--help` lists the "
        "options. Without `--repository` the command exports a fresh policy on the real env layout into a temporary "
        "repository (it needs the CityLearn dataset, like the tests).",
        "",
    ]
    return "\n".join(lines)


def seed_server_words() -> str:
    from .seed_server import SEED_COORDINATION, SEED_HIDDEN

    h = SEED_HIDDEN
    return ("FastAPI + PyTorch on one uvicorn process, `GET /health`, `GET /ready`, `POST /predict` with "
            "`{\"observations\": [{\"obs\": [...]}, ...]}`, sanitising and normalising like the seed, then a Python "
            "loop calling one torch actor per building, each of the seed's shape "
            f"(Linear(obs+{SEED_COORDINATION}, {h}), LayerNorm, ReLU, Linear({h}, {h}), LayerNorm, ReLU, "
            f"Linear({h}, actions), Tanh). Left out in its favour: the seed's coordinator (hints are zeros) and the "
            "access log. Started as a subprocess on a free port, stopped by PID.")


def client_choice(group: dict | None) -> str:
    base = ("asyncio in one thread, one connection per caller, each level's request encoded once and sent again "
            "(HTTP/1.1 keep-alive over asyncio streams; gRPC through `grpc.aio` and Triton's generated stub). ")
    if not group or not group["variants"]:
        return base + "Compared with tritonclient when tuning runs."
    rows = {}
    for v in group["variants"]:
        c16 = _find(v["results"], v["results"][0]["target"], 16, 1) or {}
        rows[v["label"]] = c16
    parts = [f"{label}: {_f(r.get('requests_per_s'), 0)} requests/s at c16 using {_f(r.get('client_cpu_cores'))} "
             f"cores" for label, r in rows.items()]
    return base + ("Chosen because it left the most of the shared cores to the server: " + "; ".join(parts) +
                   " (same server, same rounds; see the client group under Tuning). tritonclient's HTTP client must "
                   "stay in the thread that made it, so its threaded variant uses one client per thread.")


def limits(data: dict[str, Any]) -> list[str]:
    """What the figures say about where the time goes (computed from this run's numbers)."""
    results, settings = data["results"], data["serving_settings"]
    backend, other = data.get("backend", "python"), data.get("other_backend", "onnxruntime")
    cores = data["machine"]["cores"]
    out = []
    http1, floor = _find(results, "triton-http", 1, 1), _find(results, "onnxruntime-inprocess", 1, 1)
    paced = _find(results, "onnxruntime-inprocess-paced", 1, 1)
    other1 = _find(results, f"triton-{other}-http", 1, 1)
    if http1 and floor and http1.get("triton"):
        t = http1["triton"]
        line = (f"- **Latency at concurrency 1**: the client sees p50 {http1['p50_ms']:.3f} ms; Triton itself reports "
                f"{t['request_us_per_request'] / 1000:.3f} ms per request on average, of which "
                f"{t['compute_us_per_request'] / 1000:.3f} ms in the model's execution and "
                f"{t['queue_us_per_request'] / 1000:.3f} ms queued. The same graph in process takes "
                f"{floor['p50_ms']:.3f} ms (p50) called back to back"
                + (f" and {paced['p50_ms']:.3f} ms at the served pace" if paced else "")
                + (f" (its weights, {_weights_mib(data):.1f} MiB, partly leave the cache while the model idles)"
                   if paced and paced["p50_ms"] > floor["p50_ms"] else "")
                + ". ")
        if backend == "onnxruntime":
            line += ("Triton's onnxruntime backend runs the graph inside the server process; the rest of the round "
                     "trip is HTTP parsing, scheduling and the answer's way back, on cores the load generator "
                     "shares.")
            if other1:
                line += (f" The python backend, which hands every execution to a stub process through shared memory "
                         f"and back, answers at p50 {other1['p50_ms']:.3f} ms.")
        else:
            line += ("The difference is the python backend: each execution crosses from the server to a separate stub "
                     "process through shared memory and back"
                     + (f"; Triton's onnxruntime backend, in process, answers at p50 {other1['p50_ms']:.3f} ms."
                        if other1 else "."))
        out.append(line)
    seed1 = _find(results, "seed-fastapi", 1, 1)
    if http1 and seed1 and floor:
        out.append(
            f"- **p99 at concurrency 1** is {http1['p99_ms']:.2f} ms for Triton (HTTP) and {seed1['p99_ms']:.2f} ms "
            f"for the seed-style server, against {floor['p99_ms']:.3f} ms in process: a served request wakes several "
            f"threads in turn (client, HTTP thread, scheduler, model instance), and when one wake-up finds the "
            f"{cores} cores busy with other work it waits for a time slice. From concurrency 4 up, queueing behind the "
            f"seed-style server's single process dominates.")
    seed16, http16 = _find(results, "seed-fastapi", 16, 1), _find(results, "triton-http", 16, 1)
    if seed16 and http16 and seed16.get("server_cpu_cores") and http16.get("server_cpu_cores"):
        ours = http16["server_cpu_cores"] / http16["requests_per_s"] * 1e6
        theirs = seed16["server_cpu_cores"] / seed16["requests_per_s"] * 1e6
        out.append(
            f"- **Throughput at concurrency 16** is CPU-bound on both sides. Per request, Triton spent {ours:,.0f} us "
            f"of CPU and the seed-style server {theirs:,.0f} us (JSON, pydantic, one torch call per building): "
            f"{theirs / ours:.1f}x less; the throughput ratio is "
            f"{http16['requests_per_s'] / seed16['requests_per_s']:.1f}x. Triton got "
            f"{http16['server_cpu_cores']:.2f} cores, the load generator {http16['client_cpu_cores']:.2f}, and the "
            f"rest went to other processes (*Background load* below). The seed-style server is one Python process and "
            f"cannot use more than one core ({seed16['server_cpu_cores']:.2f} here); Triton's "
            f"{settings['instances']} instance(s) can run on {min(settings['instances'], cores)} of the {cores} cores, "
            f"so on an otherwise idle machine the ratio would grow with the cores Triton gets, not measured here.")
    stalled = [r for r in results if r["target"].startswith("triton") and (r.get("stalled") or 0)]
    if stalled:
        out.append(
            f"- **Stalls**: {sum(r['stalled'] for r in stalled)} request(s) in {len(stalled)} Triton row(s) took "
            f"more than {data.get('stall_ms', 400):g} ms longer than their row's median (slowest "
            f"{max(r['max_ms'] for r in stalled) / 1000:.2f} s): see [The 500 ms stall](#the-500-ms-stall).")
    big = max((r for r in results if r["target"].startswith("triton") and r["districts"] == 64 and r["requests"]),
              key=lambda r: r["decisions_per_s"], default=None)
    floor64 = _find(results, "onnxruntime-inprocess", 1, 64)
    seed = max((r for r in results if r["target"] == "seed-fastapi" and r["requests"]),
               key=lambda r: r["decisions_per_s"], default=None)
    flops = data["model"].get("flops_per_decision")
    if big and floor64:
        line = (f"- **64 districts per request**: the best Triton level ({LABELS.get(big['target'], big['target'])}, "
                f"c{big['concurrency']}) reached {big['decisions_per_s']:,.0f} decisions/s; in-process onnxruntime on "
                f"one thread does {floor64['decisions_per_s']:,.0f} with no server at all. At this size the model's "
                f"arithmetic dominates"
                + (f" (each decision is one agent's MLP, {flops / 1e3:.0f} kFLOP from the graph's layer widths)"
                   if flops else "")
                + ", so throughput is bounded by the cores the model gets.")
        if seed:
            needed = 200 * seed["decisions_per_s"]
            line += (f" 200x the seed-style server's best ({seed['decisions_per_s']:,.0f}) would be "
                     f"{needed:,.0f} decisions/s, {needed / floor64['decisions_per_s']:.1f} times what one core "
                     f"running nothing but the model achieves; this machine has {cores} cores, shared with the load "
                     f"generator and the background load.")
        out.append(line)
    return out


def _weights_mib(data: dict[str, Any]) -> float:
    widths, agents = data["model"].get("layer_widths", []), data["model"].get("agents", 1)
    return sum((i + 1) * o for i, o in widths) * agents * 4 / 2**20


def stall_section(data: dict[str, Any]) -> list[str]:
    """The 500 ms stall: what this run measured about it, why it happens, what the configs do about it."""
    from .load import STALL_MS

    stall_ms = data.get("stall_ms", STALL_MS)
    results = data["results"]
    triton = [r for r in results if r["target"].startswith("triton") and r["requests"]]
    group = next((g for g in data["tuning"] if g["knob"] == "queue_policy"), None)
    lines = ["## The 500 ms stall", "",
             "With `dynamic_batching` and a queue policy (a timeout, a timeout override or a queue bound; the configs "
             "had all three: `default_timeout_microseconds: 1000000`, `allow_timeout_override: true`, "
             "`max_queue_size: 4096`), Triton 2.51 now and then leaves a request in its queue for about 500 ms, "
             "with both backends and with one instance or two."]
    if group and group["variants"]:
        parts = []
        for v in group["variants"]:
            levels = ", ".join(f"c{r['concurrency']}{' x ' + str(r['districts']) + ' districts' if r['districts'] > 1 else ''}: "
                               f"{_stall_cell(r)} of {r['requests']:,}" for r in v["results"])
            parts.append(f"{v['label']}: {levels}")
        lines[-1] += f" In this run (the queue-policy group under Tuning, {data.get('backend')} backend): " + \
            "; ".join(parts) + "."
    if triton:
        counted = [r for r in triton if r.get("stalled") is not None]
        lines[-1] += (f" In the comparison, with the served configs: {sum(r['stalled'] for r in counted)} of "
                      f"{sum(r['requests'] for r in counted):,} Triton requests (both backends) took more than "
                      f"{stall_ms:g} ms longer than their row's median.")
    slow = _slow_rows(data)
    if slow:
        lines += ["", "Every row of this run with answers that late, and whether Triton's queue held requests long "
                  "enough to account for them (its queue time over the window against the stalls x "
                  f"{stall_ms:g} ms; where it does not, the delay was outside Triton's queue, e.g. the server or the "
                  "load generator waiting for a core):", "",
                  "| Where | Variant | Level | Stalled | Requests | Queue time, s | Stalls x "
                  f"{stall_ms:g} ms, s | Triton's queue time covers them |", "|---|---|---|--:|--:|--:|--:|---|",
                  *(row for row, _ in slow)]
        unexplained = [result for _, result in slow if not result.get("with_queue_policy")]
        if unexplained:
            levels = sorted({(r["concurrency"], r["districts"]) for r in unexplained})
            lines += ["", f"{len(unexplained)} of these rows ran without a queue policy, at "
                      + ", ".join(f"{c} callers x {d} district(s) per request" for c, d in levels)
                      + f" (at most {max(r['stalled'] for r in unexplained)} late answers in a row): where Triton's "
                      "queue time does not cover them they are not the batcher's wait described below, and this run "
                      "does not establish what holds the others. The minimal reproduction below sends one district "
                      "per request."]
    lines += [
        "",
        "How often, for which configs, concurrency levels and backends, on a one-node model and on the shipped one: "
        "`python benchmarks/dynamic_batching_stall.py --model shipped --out docs` writes "
        "[dynamic-batching-stall.md](dynamic-batching-stall.md) (a minimal reproduction: the same server, a model "
        "that is one `Identity` node, the configs that differ in the queue policy, delay and preferred batch sizes).",
        "",
        "Why, as far as Triton's core r24.10 shows (`src/dynamic_batch_scheduler.cc`, `src/rate_limiter.cc`, "
        "`src/scheduler_utils.cc`): a queue policy that is not the default turns off payload prefetching. Without "
        "it, the batcher thread hands a batch over only when a model instance is already waiting for work, and waits "
        "for that on its condition variable with a 500 ms timeout. Nothing signals that condition variable when an "
        "instance starts waiting; the signals it does get come just before: when an execution finishes (before the "
        "instance thread is back waiting) and on a new request only if an instance is waiting already. A caller that "
        "sends its next request as soon as the answer arrives lands in that window, and the batcher sleeps out its "
        "500 ms: a lost wake-up in Triton, not a cost of the model or the network. A `max_queue_delay_microseconds` "
        "does not change that wait; preferred batch sizes make the batcher hit it more often.",
        "",
        "What the configs do: no queue policy (`ServingSettings.queue_timeout_us = 0`, `max_queue_size = 0`; "
        "`dynamic_batching { }` keeps batching on; with prefetching the batcher only checks how many batches are "
        "queued, at most two per instance, and is signalled after an instance has taken one, so no wake-up is "
        "lost), in `config.pbtxt`, `configs/cpu.pbtxt` and `configs/local.pbtxt` alike"
        + _batching_words(results)
        + ". What it gives up: Triton no longer rejects requests that waited over a second or a queue over 4096; "
        "clients keep their own timeouts (`TritonPolicy(timeout=...)`), and the production overlay scales out on "
        "queue time before a queue builds.",
        "",
    ]
    return lines


def _slow_rows(data: dict[str, Any]) -> list[tuple[str, dict]]:
    """(table row, result) of every result with stalls, comparison and tuning alike."""
    stall_ms = data.get("stall_ms", 400.0)
    found = [("comparison", LABELS.get(r["target"], r["target"]), r) for r in data["results"]]
    for group in data["tuning"]:
        for variant in group["variants"]:
            found += [(f"tuning: {group['knob']}", variant["label"], r) for r in variant["results"]]
    rows = []
    for where, label, r in found:
        triton = r.get("triton") or {}
        if not (r.get("stalled") or 0) or "queue_us_per_request" not in triton:
            continue
        queue_s = triton["queue_us_per_request"] * r["requests"] / 1e6
        needed_s = r["stalled"] * stall_ms / 1000
        level = f"c{r['concurrency']} x {r['districts']}"
        rows.append((f"| {where} | {label} | {level} | {r['stalled']} | {r['requests']:,} | {queue_s:.1f} | "
                     f"{needed_s:.1f} | {'yes' if queue_s >= needed_s else 'no'} |",
                     {**r, "with_queue_policy": label.startswith("queue policy:")}))
    return rows


def _batching_words(results: list[dict]) -> str:
    loaded = [r for r in results if r["target"] == "triton-http" and r["districts"] == 1 and r["concurrency"] > 1
              and (r.get("triton") or {}).get("average_batch_size")]
    if not loaded:
        return ""
    return ("; under load Triton still merges requests: " + ", ".join(
        f"{r['triton']['average_batch_size']:.1f} rows per execution at concurrency {r['concurrency']}"
        for r in sorted(loaded, key=lambda r: r["concurrency"])) + " (HTTP, this run)")


def _detectable_ms() -> float:
    from .load import STALL_DETECTABLE_MEDIAN_MS

    return STALL_DETECTABLE_MEDIAN_MS


def _loadavg(values) -> str:
    return "?" if not values else " / ".join(f"{v:.2f}" for v in values) + " (1 / 5 / 15 min)"


def _busy(processes) -> str:
    if not processes:
        return "none above 0.1 core"
    return ", ".join(f"{p['name']} ({p['cores']:.2f} cores)" for p in processes[:6])
