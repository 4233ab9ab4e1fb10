"""A validation run, written for people: ``report.json``, a printed table, and ``report.png``.

The picture shows what a reader looks for: each day's peak of the district's net load over the window and the week
around the policy's all-time peak, policy against no control (a year of hourly load drawn as one line is a solid
block); the KPI ratios to no control of the policy beside the reference controllers; and cost and carbon relative to
charge on arrival, the fair comparison for controllers that charge the cars (no control never does).
"""

from __future__ import annotations

import json
import math
import textwrap
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
NO_CONTROL = "no control (zero actions)"
HOURS_PER_DAY, HOURS_PER_WEEK = 24, 168
COLOURS = {"policy": "tab:blue", "zero_actions": "0.55", "basic_battery_rbc": "tab:orange",
           "charge_on_arrival": "tab:green"}


def column_names(report: EvaluationReport) -> dict[str, str]:
    """Column key -> the name a table or legend shows: the policy by its own name (``maddpg_ctde v2``, ``planner``)."""
    return {"policy": report.policy_label, **{name: COLUMN_NAMES.get(name, name) for name in report.baselines}}


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
    names = column_names(report)
    header = f"{'KPI (ratio to no control; lower is better)':<44}" + "".join(f"{names[c]:>19}" for c in columns)
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


def daily_peaks(load: np.ndarray) -> np.ndarray:
    """The highest hour of each day of the window (days of 24 steps from its start; the last may be shorter)."""
    load = np.asarray(load, dtype=np.float64)
    return np.array([load[i:i + HOURS_PER_DAY].max() for i in range(0, len(load), HOURS_PER_DAY)])


def peak_week(load: np.ndarray) -> slice:
    """The steps of the week (168 h, fewer in a shorter window) centred on the all-time peak of ``load``."""
    length = min(HOURS_PER_WEEK, len(load))
    start = int(np.clip(int(np.argmax(load)) - length // 2, 0, len(load) - length))
    return slice(start, start + length)


def plot_report(report: EvaluationReport, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Draw ``report`` into ``path``; returns what was drawn, read back from the figure: ``{"daily_peaks": {label: y},
    "peak_week": {label: y}, "kpis": {label: bar heights}, "relative": {label: bar heights}}`` (so a test can check
    the picture's data, not just that a file exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = column_names(report)
    columns = {"policy": report.policy, **report.baselines}
    start = report.env.get("start") or 0
    fig = plt.figure(figsize=(13, 11), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 1.1], width_ratios=[2, 1])
    days_ax, week_ax = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, :])
    kpi_ax, relative_ax = fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1])
    who = names["policy"] if report.policy_name in (names["policy"], "policy") else f"{names['policy']} ({report.policy_name})"
    fig.suptitle(f"{who} on {report.env.get('dataset')}, steps {start}..{start + report.policy.steps}")

    # What a controller does to the load: each day's peak over the window, and the hours around its highest peak.
    zero = report.baselines.get("zero_actions")
    loads = {names["policy"]: (report.policy.district_load, COLOURS["policy"])}
    if zero is not None:
        loads = {NO_CONTROL: (zero.district_load, COLOURS["zero_actions"]), **loads}
    for label, (load, colour) in loads.items():
        peaks = daily_peaks(load)
        days_ax.plot(np.arange(len(peaks)), peaks, color=colour, lw=1.2, marker="." if len(peaks) < 60 else None,
                     label=label)
    days_ax.set_xlabel(f"day of the window (24 h from step {start})")
    days_ax.set_ylabel("daily peak net load (kWh)")
    days_ax.set_title("Each day's peak of the district's net electricity consumption")
    week = peak_week(report.policy.district_load)
    hours = np.arange(week.start, week.stop) + start
    for label, (load, colour) in loads.items():
        week_ax.plot(hours, np.asarray(load)[week], color=colour, lw=1.2, label=label)
    week_ax.set_xlabel("time step (hour)")
    week_ax.set_ylabel("net load (kWh)")
    week_ax.set_title(f"The week around the all-time peak of {names['policy']} "
                      f"(step {int(np.argmax(report.policy.district_load)) + start})")
    for ax in (days_ax, week_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)  # beside the lines, never over them

    width = 0.8 / len(columns)
    x = np.arange(len(DISTRICT_KPIS))
    for i, (name, result) in enumerate(columns.items()):
        values = [result.kpis.get(k, math.nan) for k in DISTRICT_KPIS]
        kpi_ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=names[name],
                   color=COLOURS.get(name))
    kpi_ax.axhline(1.0, color="black", lw=0.8, ls="--")
    kpi_ax.set_xticks(x, [textwrap.fill(LABELS[k], 10) for k in DISTRICT_KPIS], fontsize=8)
    kpi_ax.set_title("KPIs, ratio to no control (lower is better)", fontsize=10)
    kpi_ax.set_ylabel("ratio to no control")
    kpi_ax.grid(axis="y", alpha=0.3)
    # Which controllers serve the cars, where the bars are named: ratios to no control reward leaving them uncharged.
    served = {name: f"{names[name]}: {_fmt(r.service.get('ev_departures_acceptable'))}" for name, r in columns.items()}
    legend = dict(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title_fontsize=8,
                  title="EV departures at\nacceptable charge")

    if "charge_on_arrival" in report.baselines:
        relative = {name: report.relative_to_charge_on_arrival(r) or {} for name, r in columns.items()}
        x_rel = np.arange(len(RELATIVE_LABELS))
        for i, name in enumerate(columns):
            values = [relative[name].get(k, math.nan) for k in RELATIVE_LABELS]
            relative_ax.bar(x_rel + (i - (len(columns) - 1) / 2) * width, values, width, label=served[name],
                            color=COLOURS.get(name))
        relative_ax.axhline(1.0, color="black", lw=0.8, ls="--")
        relative_ax.set_xticks(x_rel, [textwrap.fill(label, 10) for label in RELATIVE_LABELS.values()], fontsize=8)
        relative_ax.set_title("cost and carbon relative to charge on\narrival (it charges every car; lower is better)",
                              fontsize=10)
        relative_ax.set_ylabel("ratio to charge on arrival")
        relative_ax.grid(axis="y", alpha=0.3)
        relative_ax.legend(**legend)
    else:
        relative_ax.set_axis_off()
        relative_ax.text(0.5, 0.5, "charge on arrival was not run\n(--no-baselines):\nno comparison with it",
                         ha="center", va="center", fontsize=9)
        kpi_ax.legend(handles=kpi_ax.containers, labels=[served[name] for name in columns], **legend)
    fig.savefig(path, dpi=110)

    def bars(ax) -> dict[str, np.ndarray]:  # one container per column, in order
        return {names[name]: np.array([bar.get_height() for bar in b]) for name, b in zip(columns, ax.containers)}

    drawn = {"daily_peaks": {line.get_label(): np.asarray(line.get_ydata()) for line in days_ax.get_lines()},
             "peak_week": {line.get_label(): np.asarray(line.get_ydata()) for line in week_ax.get_lines()},
             "kpis": bars(kpi_ax), "relative": bars(relative_ax)}
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
