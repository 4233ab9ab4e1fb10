"""How close is the training-only district model (training/maddpg_training/district_model.py) to CityLearn?

The model reads its data (loads, solar, prices, the cars' comings and goings) off one env pass with batteries and
chargers idle; a checkpoint's policy then drives a new env over the same window, deterministic, and the model replays
the policy's actions open loop from the same first state. Reported: the largest and mean errors of the batteries' and
parked cars' state of charge and of a building's net consumption over the window, and the model's objective over
the whole replay beside env.evaluate()'s KPIs of the policy's pass.

    python benchmarks/district_model_fidelity.py runs/season-blind-paced-ensemble5-year/final.pt --out docs/district-model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from maddpg_evaluation.citylearn_env import DEFAULT_DATASET, EnvSpec
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.district_model import DistrictModel, fidelity, record_pass, with_appliances_started
from maddpg_training.model_tuning import pass_rows, replayed_terms

TERMS = {"cost": "cost_total", "carbon": "carbon_emissions_total", "daily_peak": "daily_peak_average",
         "all_time_peak": "all_time_peak_average"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--start", type=int, default=None)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/district-model"))
    args = parser.parse_args()

    policy = load_checkpoint(args.checkpoint).build_policy().eval()
    spec = EnvSpec(schema=args.dataset, start=args.start, end=args.end)
    idle, _ = record_pass(spec, policy.layout, lambda t, raw: with_appliances_started(
        np.zeros(policy.layout.action_shape), policy.safety_spec))
    with torch.no_grad():
        driven, kpis = record_pass(spec, policy.layout, lambda t, raw: policy(torch.from_numpy(raw)[None])[0].numpy())
    model = DistrictModel.from_env(spec.build(), pass_rows(idle).numpy(), idle["actions"], policy.layout,
                                   policy.safety_spec)
    found = fidelity(model, driven)
    terms = replayed_terms(model, driven)
    result = {"checkpoint": str(args.checkpoint), "window": [args.start, args.end], **found,
              "objective_vs_env": {kpi: {"model": float(terms[term][0]), "env": kpis[kpi]}
                                   for term, kpi in TERMS.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# District model against CityLearn ({args.checkpoint}, steps {args.start or 0}..{args.end or 'end'})", "",
             f"Replayed open loop over {found['steps']} steps ({found['parked_car_steps']} parked-car steps):", "",
             "| quantity | largest error | mean error |", "|---|--:|--:|",
             f"| battery state of charge | {found['battery_soc_max']:.2e} | {found['battery_soc_mean']:.2e} |",
             f"| parked car state of charge | {found['car_soc_max']:.2e} | {found['car_soc_mean']:.2e} |",
             f"| building net consumption (kWh) | {found['net_kwh_max']:.3f} | {found['net_kwh_mean']:.2e} |", "",
             "| KPI | model's objective over the replay | env.evaluate() |", "|---|--:|--:|"]
    lines += [f"| {kpi} | {v['model']:.4f} | {v['env']:.4f} |" for kpi, v in result["objective_vs_env"].items()]
    (args.out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
