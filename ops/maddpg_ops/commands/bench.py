"""``maddpg-citylearn bench``: the served policy measured against the seed-style server and in-process floors."""

from __future__ import annotations

import shlex
import sys

import click


def _levels(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        levels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 1,4,16,64)") from None
    if not levels or min(levels) < 1 or max(levels) > 1024:
        raise click.BadParameter("levels must be between 1 and 1024")
    return levels


@click.command("bench")
@click.option("--duration", type=click.FloatRange(0.05, 600), default=None, metavar="SECONDS",
              help="Measured seconds per contender and level (split over --rounds). [default: 4; --quick 0.6]")
@click.option("--levels", callback=_levels, default=None, metavar="N,N,...",
              help="Concurrency levels. [default: 1,4,16,64; --quick 1,16]")
@click.option("--districts", "districts", callback=_levels, default=None, metavar="N,N,...",
              help="Districts per request. [default: 1,64]")
@click.option("--rounds", type=click.IntRange(1, 20), default=None,
              help="Interleaved rounds per level. [default: 4; --quick 1]")
@click.option("--max-requests", type=click.IntRange(1), default=None,
              help="At most this many requests per contender and level. [default: 200000]")
@click.option("--perf-analyzer/--no-perf-analyzer", "perf", default=True, show_default=True,
              help="Also measure the Triton rows with Triton's perf_analyzer (installed by `make setup`).")
@click.option("--repository", "-r", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
              help="Benchmark this model repository instead of a fresh policy exported to a temp dir.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "python"]), default="auto", show_default=True,
              help="Triton's backend for the Triton rows (the other one runs as a contender over HTTP). auto: "
                   "onnxruntime when `make setup` has built it, as `serve` does.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/bench", show_default=True,
              help="Where benchmark-results.md, benchmarks.json and benchmarks.png go (docs/ holds the committed run: "
                   "--out docs replaces it).")
@click.option("--quick", is_flag=True, help="A smoke run of about a minute: two levels, short windows.")
@click.option("--progress/--no-progress", default=True)
def bench(duration, levels, districts, rounds, max_requests, perf, repository, backend, out_dir, quick, progress):
    """Benchmark the served policy against what users would otherwise run, and write the report.

    \b
    One run measures, on this machine and side by side:
      - local Triton (the bundled tritonserver, served defaults; Triton's onnxruntime backend when built) over
        HTTP and gRPC, 1 and 64 districts per request, at concurrency 1/4/16/64, and the other backend over HTTP;
      - a FastAPI + PyTorch server in the seed project's style (POST /predict, one actor call per building);
      - in-process onnxruntime and torch: the floor no network server can beat (back to back, and paced like
        the served requests);
      - Triton's rows again with perf_analyzer, Triton's own load generator;
    then writes OUT/benchmark-results.md (goals, tables, perf_analyzer beside the driver, machine, command),
    OUT/benchmarks.json and OUT/benchmarks.png (decisions/s against p99 latency); docs/benchmarks.md explains them.
    Tuning the served settings is `python benchmarks/tune.py`. Everything runs on 127.0.0.1.

    \b
    Examples:
      maddpg-citylearn bench --out docs           # the run behind docs/benchmark-results.md (~5 minutes)
      maddpg-citylearn bench --quick --out /tmp/bench
      maddpg-citylearn bench --levels 1,16 --duration 2 --no-perf-analyzer
    """
    from pathlib import Path

    from maddpg_benchmarks.report import write_benchmark_report
    from maddpg_benchmarks.runner import Bench, BenchOptions

    given = {key: value for key, value in dict(
        duration_s=duration, levels=levels, districts=districts, rounds=rounds, max_requests=max_requests,
        perf_analyzer=perf).items() if value is not None}
    command = shlex.join(["maddpg-citylearn", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else ""
    common = dict(repository=Path(repository) if repository else None, backend=backend, command=command,
                  progress=progress)
    options = BenchOptions.quick(**given, **common) if quick else BenchOptions(**given, **common)
    say = lambda message: click.echo(message, err=True)  # noqa: E731 - progress lines on stderr
    data = Bench(options, say=say).run()
    paths = write_benchmark_report(data, Path(out_dir))
    for goal in data["goals"]:
        verdict = {True: "met", False: "NOT met", None: "reported"}[goal["met"]]
        ratio = f"{goal['ratio']:.2f}x" if goal["ratio"] is not None else "-"
        click.echo(f"{verdict:>8}  {ratio:>8}  {goal['goal']}: {goal['measured']}")
    errors = sum(r["errors"] for r in data["results"])
    click.echo(f"wrote {paths['markdown']}, {paths['json'].name}, {paths['plot'].name} in {data['seconds'] / 60:.1f} "
               f"minutes; {errors} failed request(s)")
