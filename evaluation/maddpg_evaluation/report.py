"""A validation run, written for people: ``report.json``, a printed table, and ``report.png``.

The picture has two panels: the district's net load over the window under the policy and under no control (the
difference is what the controller does), and the KPI ratios of the policy beside the reference controllers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .evaluation import EvaluationReport
from .kpis import DISTRICT_KPIS

LABELS = {
    "cost_total": "cost",
    "carbon_emissions_total": "carbon emissions",
    "daily_peak_average": "daily peak",
    "all_time_peak_average": "all-time peak",
    "ramping_average": "ramping",
    "daily_one_minus_load_factor_average": "1 - load factor",
    "ev_departures_acceptable": "EV departures at acceptable charge",
    "appliance_service_level": "appliance cycles served",
}
COLUMN_NAMES = {"policy": "policy", "zero_actions": "zero actions", "basic_battery_rbc": "BasicBatteryRBC",
                "charge_on_arrival": "charge on arrival"}
RELATIVE_LABELS = {"cost_total": "cost", "carbon_emissions_total": "carbon emissions"}


def write_evaluation_report(report: EvaluationReport, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _finite_or_none(report.to_dict())
    paths = {"json": out_dir / "report.json", "plot": out_dir / "report.png"}
    data["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(data, indent=2, default=_json_default))
    plot_report(report, paths["plot"])
    return paths


def format_table(report: EvaluationReport) -> str:
    columns = {"policy": report.policy, **report.baselines}
    header = f"{'KPI (ratio to no control; lower is better)':<44}" + "".join(f"{COLUMN_NAMES.get(c, c):>19}" for c in columns)
    lines = [header, "-" * len(header)]
    for kpi in DISTRICT_KPIS:
        lines.append(f"{LABELS[kpi]:<44}" + "".join(f"{_fmt(r.kpis.get(kpi)):>19}" for r in columns.values()))
    lines.append(f"{'service (higher is better)':<44}")
    for key in ("ev_departures_acceptable", "appliance_service_level"):
        lines.append(f"  {LABELS[key]:<42}" + "".join(f"{_fmt(r.service.get(key)):>19}" for r in columns.values()))
    if "charge_on_arrival" in report.baselines:
        # No control never charges a car: against charge on arrival, a controller that serves the cars is not
        # punished for the energy they need.
        lines.append(f"{'relative to charge on arrival (lower is better)':<44}")
        relative = {name: report.relative_to_charge_on_arrival(r) or {} for name, r in columns.items()}
        for kpi, label in RELATIVE_LABELS.items():
            lines.append(f"  {label:<42}" + "".join(f"{_fmt(relative[name].get(kpi)):>19}" for name in columns))
    lines.append("")
    lines.append(f"ms per step: env {report.policy.env_ms_per_step:.2f}, inference {report.policy.inference_ms_per_step:.3f}")
    planner = report.throughput.get("planner")
    if planner:
        lines.append(f"planner: {planner['solves']} LP solve(s), {planner['ms_per_solve_mean']:.1f} ms per solve "
                     f"(build {planner['build_ms_mean']:.1f} + HiGHS {planner['solve_ms_mean']:.1f}; max "
                     f"{planner['ms_per_solve_max']:.0f}), {planner['seconds_total']:.0f} s in all")
    if report.policy.parity is not None:
        verdict = f"identical within {report.parity_tolerance:g}" if report.parity_ok else "DIFFERENT"
        lines.append(f"parity vs {report.reference_name}: max |action difference| = "
                     f"{report.policy.parity_max_abs_diff:.3g} over {report.policy.steps} steps ({verdict})")
    t = report.throughput
    if t and "envs" in t:
        line = (f"throughput: {t['envs']} simulator(s), {t['district_steps_per_second']:.0f} district steps/s "
                f"({t['agent_decisions_per_second']:.0f} agent decisions/s)")
        if "average_batch_size" in t:
            line += f", Triton average batch size {t['average_batch_size']:.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot_report(report: EvaluationReport, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Draw ``report`` into ``path``; returns what was drawn, read back from the figure: ``{"load": {label: y},
    "kpis": {label: bar heights}}`` (so a test can check the picture's data, not just that a file exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load_ax, kpi_ax) = plt.subplots(2, 1, figsize=(12, 8.5), gridspec_kw={"height_ratios": [3, 2]})
    steps = np.arange(report.policy.steps)
    zero = report.baselines.get("zero_actions")
    if zero is not None:
        load_ax.plot(steps, zero.district_load, color="0.55", lw=1.0, label="zero actions (no control)")
    load_ax.plot(steps, report.policy.district_load, color="tab:blue", lw=1.0, label=report.policy_name)
    load_ax.set_xlabel(f"time step (hours from {report.env.get('start') or 0})")
    load_ax.set_ylabel("district net load (kWh)")
    load_ax.set_title(f"District net electricity consumption, {report.env.get('dataset')}")
    load_ax.legend(loc="upper right")
    load_ax.grid(alpha=0.3)

    columns = {"policy": report.policy, **report.baselines}
    width = 0.8 / len(columns)
    x = np.arange(len(DISTRICT_KPIS))
    colours = {"policy": "tab:blue", "zero_actions": "0.55", "basic_battery_rbc": "tab:orange",
               "charge_on_arrival": "tab:green"}
    for i, (name, result) in enumerate(columns.items()):
        values = [result.kpis.get(k, math.nan) for k in DISTRICT_KPIS]
        kpi_ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=COLUMN_NAMES.get(name, name),
                   color=colours.get(name))
    kpi_ax.axhline(1.0, color="black", lw=0.8, ls="--")
    kpi_ax.set_xticks(x, [LABELS[k] for k in DISTRICT_KPIS])
    ev = {name: r.service.get("ev_departures_acceptable") for name, r in columns.items()}
    kpi_ax.set_title("KPIs; EV departures at acceptable charge: " + ", ".join(
        f"{COLUMN_NAMES.get(name, name) if name != 'policy' else report.policy_name} {_fmt(v)}"
        for name, v in ev.items()), fontsize=9)
    kpi_ax.set_ylabel("ratio to no control (lower is better)")
    kpi_ax.legend(loc="upper right")
    kpi_ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    drawn = {"load": {line.get_label(): np.asarray(line.get_ydata()) for line in load_ax.get_lines()},
             "kpis": {bars.get_label(): np.array([bar.get_height() for bar in bars]) for bars in kpi_ax.containers}}
    plt.close(fig)
    return drawn


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _finite_or_none(value):
    """JSON has no NaN: a KPI CityLearn cannot compute on a window is written as null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
