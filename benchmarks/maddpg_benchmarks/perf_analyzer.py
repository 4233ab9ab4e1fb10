"""Triton's own load generator beside the project's driver, for the Triton rows of ``maddpg-citylearn bench``.

``perf_analyzer`` is not the placeholder on PyPI: the ``tritonclient==2.41.0`` manylinux wheel ships the binary. It
needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; no GPU is used). ``make
setup`` installs both wheels into ``.venv/perf_analyzer`` with ``pip install --target``, apart from the venv's own
tritonclient. Each level is one closed-loop run at a fixed concurrency with random input data, like the project's
driver; its CSV report gives throughput and client-side latency percentiles. Its stability check (latency within a
percentage over 3 windows) is effectively off (999 %): on a shared machine it would refuse most levels, and the driver
does not gate on stability either.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

INSTALL_DIR = Path(sys.prefix) / "perf_analyzer"
INSTALL_HINT = ("perf_analyzer is not installed: run `make setup`, or `python -m pip install --no-deps --target "
                f"{INSTALL_DIR} tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79` and `apt-get install "
                "libb64-0d`")


def binary(install_dir: Path = INSTALL_DIR) -> Path | None:
    path = install_dir / "bin" / "perf_analyzer"
    return path if path.is_file() else None


def environment(install_dir: Path = INSTALL_DIR) -> dict[str, str]:
    libraries = str(install_dir / "nvidia" / "cuda_runtime" / "lib")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in (libraries, os.environ.get("LD_LIBRARY_PATH"))
                                                               if p)}


def version(install_dir: Path = INSTALL_DIR) -> str | None:
    path = binary(install_dir)
    if path is None:
        return None
    result = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=environment(install_dir),
                            timeout=30)
    found = re.search(r"Version (\d+\.\d+\.\d+)", result.stdout + result.stderr)  # "Perf Analyzer Version 2.41.0"
    return found.group(1) if found else None


def measure(url: str, protocol: str, model: str, input_shape: tuple[int, ...], districts: int, concurrency: int,
            window_ms: int, workdir: Path, install_dir: Path = INSTALL_DIR) -> dict:
    """One level: ``concurrency`` callers, ``districts`` per request; figures per request, as the driver reports."""
    path = binary(install_dir)
    if path is None:
        raise FileNotFoundError(INSTALL_HINT)
    report = workdir / f"perf-{protocol}-{districts}-{concurrency}.csv"
    command = [str(path), "-m", model, "-u", url, "-i", protocol, "-b", str(districts),
               "--shape", f"observations:{','.join(map(str, input_shape))}", "--input-data", "random",
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
               "--max-trials", "3", "--stability-percentage", "999", "--percentile", "99", "-f", str(report)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(install_dir),
                            timeout=60 + 10 * window_ms / 1000)
    if result.returncode != 0 or not report.is_file():
        return {"error": (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]}
    (row,) = list(csv.DictReader(io.StringIO(report.read_text())))
    per_request = float(row["Inferences/Second"]) / districts  # perf_analyzer counts rows (-b) as inferences
    return {"requests_per_s": per_request, "p50_ms": float(row["p50 latency"]) / 1e3,
            "p95_ms": float(row["p95 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3}
