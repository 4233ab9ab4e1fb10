"""The protocol's fold policies, weights unchanged, behind a safety layer whose EV floor is paced: the rule's share.

The `season-blind+paced-ev` arm changes two things at once: the safety layer's EV floor (``ev_pace``: a car the actor
left short is charged from earlier at part power instead of at full power in its last hours) and the teacher, which
plans inside that floor. This rescores an unpaced arm's final policies on their fold's test months with only the
floor changed, so the arm's gain splits into what the rule does alone and what the relabelled teacher adds:

    python benchmarks/rescore_ev_pace.py --runs runs/protocol --arm season-blind --ev-pace 0.5 \
        --out docs/rescore-ev-pace

Each row is a pass over the test months in the published env (about a minute for three months); the unpaced score
is the run's own ``heldout.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.kpis import headline_score
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.protocol import HELDOUT_FILE, REFERENCES_FILE, Protocol, run_directory
from maddpg_training.torch_policy import TorchPolicy


def paced_policy(checkpoint: Path, pace: float) -> TorchPolicy:
    """The checkpoint's actors with the EV floor of its safety layer at ``pace``."""
    saved = load_checkpoint(checkpoint)
    if saved.safety is None:
        raise SystemExit(f"{checkpoint} has no safety layer: there is no EV floor to pace")
    rule = dataclasses.replace(saved.safety.ev_rule, pace=pace)
    return TorchPolicy(dataclasses.replace(saved, safety=dataclasses.replace(saved.safety, ev_rule=rule)).build_policy())


def row(kpis: dict, service: dict, coa: dict) -> dict:
    return {"score": headline_score(kpis), "cost_vs_charge_on_arrival": kpis["cost_total"] / coa["cost_total"],
            "carbon_vs_charge_on_arrival": kpis["carbon_emissions_total"] / coa["carbon_emissions_total"],
            "daily_peak_average": kpis["daily_peak_average"], "all_time_peak_average": kpis["all_time_peak_average"],
            "ev_departures_acceptable": service["ev_departures_acceptable"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/protocol"), help="the protocol's --out")
    parser.add_argument("--protocol", type=Path, default=Path("configs/protocol.toml"))
    parser.add_argument("--arm", default="season-blind", help="an arm trained with the unpaced floor")
    parser.add_argument("--ev-pace", type=float, default=0.5, help="the floor's pace to rescore with (0 < pace < 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/rescore-ev-pace"))
    args = parser.parse_args()
    if not 0 < args.ev_pace < 1:
        raise SystemExit(f"--ev-pace {args.ev_pace}: must be in (0, 1); 1 is the floor the arm was trained with")

    protocol = Protocol.load(args.protocol)
    results: dict = {"arm": args.arm, "ev_pace": args.ev_pace, "folds": {}}
    lines = [f"# `{args.arm}`'s fold policies with the EV floor paced at {args.ev_pace:g} (weights unchanged)", "",
             "Test months of each fold, the published env; ratios to charge on arrival (CoA) on the same months.", "",
             "| fold | seed | score as trained | score paced | difference | cost / CoA | carbon / CoA | daily peak | "
             "all-time peak | EV ok |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for fold in protocol.folds:
        references = args.runs / fold.name / REFERENCES_FILE
        if not references.is_file():
            continue
        coa = json.loads(references.read_text())["charge on arrival"]["kpis"]
        for seed in protocol.seeds:
            directory = run_directory(args.runs, fold.name, args.arm, seed)
            if not (directory / HELDOUT_FILE).is_file():
                continue
            trained = json.loads((directory / HELDOUT_FILE).read_text())["scores"]["published"]["score"]
            result = run_episode(EnvSpec(schema=protocol.config(args.arm, fold, seed).dataset, start=fold.test[0],
                                         end=fold.test[1]).build(), paced_policy(directory / "final.pt", args.ev_pace))
            paced = row(result.kpis, result.service, coa)
            results["folds"].setdefault(fold.name, {})[seed] = {"trained_score": trained, "paced": paced}
            lines.append(f"| {fold.name} | {seed} | {trained:.4f} | {paced['score']:.4f} | "
                         f"{paced['score'] - trained:+.4f} | {paced['cost_vs_charge_on_arrival']:.3f} | "
                         f"{paced['carbon_vs_charge_on_arrival']:.3f} | {paced['daily_peak_average']:.3f} | "
                         f"{paced['all_time_peak_average']:.3f} | {paced['ev_departures_acceptable']:.3f} |")
            print(lines[-1], flush=True)
    if not results["folds"]:
        raise SystemExit(f"no finished runs of arm {args.arm!r} under {args.runs}: run `maddpg-citylearn protocol` first")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rescore-ev-pace.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "rescore-ev-pace.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
