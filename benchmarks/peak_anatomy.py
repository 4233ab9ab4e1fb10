"""What the district's highest hours are made of, under the served policy or the perfect-foresight planner.

Runs one controller through the real env over a window (default: the full year) and splits the district's net load
at its highest hours and at each day's peak into what drew it: the buildings' own loads, solar, the deferrable
appliance, EV charging and the batteries, with the batteries' mean state of charge the hour before. The all-time
peak KPI is one hour of the year; this says which devices made that hour.

    python benchmarks/peak_anatomy.py --repository model_repository --out docs/peak-anatomy/version-7
    python benchmarks/peak_anatomy.py --planner --out docs/peak-anatomy/planner

The policy runs in process (onnxruntime, the repository's newest version, the graph Triton serves); about three
minutes for the year. The planner (48 h, balanced, every car charged, as `maddpg-citylearn plan --ev`): about ten.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.evaluation import LocalPolicy
from maddpg_evaluation.planner import Planner, PlannerPolicy

PARTS = ("load", "solar", "appliance", "ev", "battery")


def district_parts(env, steps: int) -> dict[str, np.ndarray]:
    """kWh per step, summed over the district: net load and each part of it."""
    def total(series_of) -> np.ndarray:
        out = np.zeros(steps)
        for building in env.buildings:
            for series in series_of(building):
                out += np.asarray(series, dtype=np.float64)[:steps]
        return out

    return {
        "net": np.asarray(env.net_electricity_consumption, dtype=np.float64)[:steps],
        "load": total(lambda b: [b.non_shiftable_load_electricity_consumption]),
        "solar": total(lambda b: [b.solar_generation]),
        "appliance": total(lambda b: [d.electricity_consumption for d in b.deferrable_appliances or []]),
        "ev": total(lambda b: [c.electricity_consumption for c in b.electric_vehicle_chargers or []]),
        "battery": total(lambda b: [b.electrical_storage.electricity_consumption]),
        "battery_soc": np.mean([np.asarray(b.electrical_storage.soc, dtype=np.float64)[:steps]
                                for b in env.buildings], axis=0),
    }


def anatomy(parts: dict[str, np.ndarray], hours: np.ndarray, top: int) -> dict:
    net = parts["net"]

    def hour_row(step: int) -> dict:
        row = {"step": int(step), "hour": int(hours[step]), "net": net[step]}
        row.update({name: parts[name][step] for name in PARTS})
        row["battery_soc_before"] = parts["battery_soc"][max(step - 1, 0)]
        return {k: round(float(v), 3) if not isinstance(v, int) else v for k, v in row.items()}

    highest = [hour_row(s) for s in np.argsort(net)[::-1][:top]]
    whole_days = len(net) // 24 * 24
    peaks = np.arange(0, whole_days, 24) + net[:whole_days].reshape(-1, 24).argmax(axis=1)
    daily = {"net": net[peaks].mean()}
    daily.update({name: parts[name][peaks].mean() for name in PARTS})
    daily["with_an_appliance_cycle"] = (parts["appliance"][peaks] > 0.1).mean()
    daily["with_ev_charging"] = (parts["ev"][peaks] > 0.1).mean()
    daily["battery_soc_before"] = parts["battery_soc"][np.maximum(peaks - 1, 0)].mean()
    daily = {"days": int(peaks.size), **{k: round(float(v), 3) for k, v in daily.items()}}
    daily["peak_hour_counts"] = np.bincount(hours[peaks], minlength=24).tolist()
    return {"highest_hours": highest,
            "highest_hours_with_an_appliance_cycle": sum(row["appliance"] > 0.1 for row in highest),
            "daily_peaks": daily}


def markdown(name: str, kpis: dict, result: dict) -> str:
    lines = [f"# Peak anatomy: {name}", "",
             f"Daily peak {kpis['daily_peak_average']:.3f}, all-time peak {kpis['all_time_peak_average']:.3f} "
             f"(ratios to no control). kWh in the hour; battery < 0 is discharge; SOC is the batteries' mean the hour "
             f"before.", "", "| step | hour | net | load | solar | appliance | EV | battery | SOC before |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in result["highest_hours"]:
        lines.append(f"| {row['step']} | {row['hour']:02d}:00 | {row['net']:.1f} | {row['load']:.1f} | "
                     f"{row['solar']:.1f} | {row['appliance']:.1f} | {row['ev']:.1f} | {row['battery']:.1f} | "
                     f"{row['battery_soc_before']:.2f} |")
    d = result["daily_peaks"]
    lines += ["", f"At each day's peak ({d['days']} days), on average: net {d['net']:.1f}, load {d['load']:.1f}, "
              f"solar {d['solar']:.1f}, appliance {d['appliance']:.1f}, EV {d['ev']:.1f}, battery {d['battery']:.1f}, "
              f"SOC before {d['battery_soc_before']:.2f}; {d['with_an_appliance_cycle']:.0%} of them with an "
              f"appliance cycle running, {d['with_ev_charging']:.0%} with EV charging.",
              f"Peak hours (00-23): {d['peak_hour_counts']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--repository", type=Path, help="a Triton model repository: its newest version runs")
    chosen.add_argument("--planner", action="store_true", help="the perfect-foresight planner (48 h, every car)")
    parser.add_argument("--model", default="maddpg_ctde")
    parser.add_argument("--start", type=int, default=None)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--top", type=int, default=10, help="how many of the highest hours to list")
    parser.add_argument("--out", type=Path, required=True, help="where peak-anatomy.{json,md} go")
    args = parser.parse_args()

    spec = EnvSpec(start=args.start, end=args.end)
    spec.check_window()
    env = spec.build()
    if args.planner:
        name, policy = "planner (48 h, balanced, every car charged)", PlannerPolicy(Planner(env), env)
    else:
        name, policy = f"{args.model} newest version in {args.repository}", LocalPolicy(str(args.repository),
                                                                                        args.model)
    result = run_episode(env, policy, name=name, progress=True)
    steps = result.steps
    hours = np.asarray([int(env.buildings[0].energy_simulation.hour[t]) % 24 for t in range(steps)])
    out = {"controller": name, "env": {"start": spec.start, "end": spec.end, "steps": steps},
           "kpis": result.kpis, **anatomy(district_parts(env, steps), hours, args.top)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peak-anatomy.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "peak-anatomy.md").write_text(markdown(name, result.kpis, out))
    print((args.out / "peak-anatomy.md").read_text())


if __name__ == "__main__":
    main()
