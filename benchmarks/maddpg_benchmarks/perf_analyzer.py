"""Triton's own load generator on the Triton rows, beside the driver (docs/benchmarks.md, "perf_analyzer and the
driver"). The ``tritonclient==2.41.0`` manylinux wheel ships the binary; ``make setup`` installs it with the
``libcudart.so.12`` it needs (no GPU is used) into ``.venv/perf_analyzer``, apart from the venv's tritonclient."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

INSTALL_DIR = Path(sys.prefix) / "perf_analyzer"
BINARY = INSTALL_DIR / "bin" / "perf_analyzer"
INSTALL_HINT = ("perf_analyzer is not installed: run `make setup`, or `python -m pip install --no-deps --target "
                f"{INSTALL_DIR} tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79` and `apt-get install "
                "libb64-0d`")


def _run(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    libraries = [str(INSTALL_DIR / "nvidia" / "cuda_runtime" / "lib"), os.environ.get("LD_LIBRARY_PATH")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in libraries if p)}
    return subprocess.run([str(BINARY), *arguments], capture_output=True, text=True, env=env, timeout=timeout)


def version() -> str | None:
    """``2.41.0`` (from "Perf Analyzer Version 2.41.0"), or None where it is not installed."""
    if not BINARY.is_file():
        return None
    result = _run(["--version"], 30)
    found = re.search(r"Version (\d+\.\d+\.\d+)", result.stdout + result.stderr)
    return found.group(1) if found else None


def measure(url: str, protocol: str, model: str, input_shape: tuple[int, ...], districts: int, concurrency: int,
            window_ms: int, workdir: Path) -> dict:
    """One closed-loop level with random input: ``concurrency`` callers, ``districts`` per request (``-b``); figures
    per request, as the driver reports them."""
    report = workdir / f"perf-{protocol}-{districts}-{concurrency}.csv"
    result = _run(["-m", model, "-u", url, "-i", protocol, "-b", str(districts), "--shape",
                   f"observations:{','.join(map(str, input_shape))}", "--input-data", "random", "--concurrency-range",
                   f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms), "--max-trials", "3",
                   "--stability-percentage", "999", "--percentile", "99", "-f", str(report)],
                  timeout=60 + 10 * window_ms / 1000)
    if result.returncode != 0 or not report.is_file():
        return {"error": (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]}
    with open(report) as handle:
        (row,) = list(csv.DictReader(handle))
    return {"requests_per_s": float(row["Inferences/Second"]) / districts,  # it counts rows (-b) as inferences
            "p50_ms": float(row["p50 latency"]) / 1e3, "p95_ms": float(row["p95 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3}
