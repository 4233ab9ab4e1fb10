"""Does a clone charge as its teacher does, on the teacher's own labels? Offline, from a training run's directory.

`train` keeps every labelled state it cloned on (``labels.pt``: observations and the teacher's actions). This runs
the run's final policy on them and reports, without the env:

* chargers: the teacher's and the clone's mean action (fraction of full power), and among the states where the
  teacher charged (action > 0.05) the share where the actors' mean output sat below 0 (clipped to 0: no cloning
  gradient unless ``clone_through_bounds``) and, for an ensemble, the share of members below 0;
* by hour of the day: the district's charging (kW) of teacher and clone, and the clone's battery error summed over
  the district (kW; positive: it charges its batteries more, or discharges less, than the teacher).

    python benchmarks/clone_bias.py runs/season-blind-paced-ensemble5-year --out docs/clone-bias/version-5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maddpg_evaluation import citylearn_names as names
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.learner import BC_TARGET_LIMIT

CHARGING = 0.05  # a teacher action above this charges


def clone_bias(run: Path, battery_kw: float) -> dict:
    checkpoint = load_checkpoint(run / "final.pt")
    policy = checkpoint.build_policy().eval()
    labels = torch.load(run / "labels.pt", weights_only=False)
    x, teacher = torch.as_tensor(labels["observations"]), torch.as_tensor(labels["targets"])
    mask = policy.actors.action_mask
    chargers = torch.zeros_like(mask)
    power = torch.zeros_like(mask)
    for charger in policy.safety_spec.chargers:
        chargers[charger.agent, charger.action] = 1.0
        power[charger.agent, charger.action] = charger.max_power_kw
    with torch.no_grad():
        inputs = policy.actor_inputs(x)
        k = policy.actors.ensemble
        members = policy.actors.members(inputs.unsqueeze(0).expand(k, *inputs.shape))    # [k, batch, agents, slots]
        clone = policy(x)
    slots = chargers.bool().expand_as(teacher)
    charged = teacher[slots] > CHARGING
    hour = x[:, 0, policy.layout.agents[0].observation_names.index(names.HOUR)]
    battery_error = (clone[..., 0] - teacher.clamp(-BC_TARGET_LIMIT, BC_TARGET_LIMIT)[..., 0]) * mask[:, 0] * battery_kw
    by_hour = {}
    for h in range(1, 25):
        at = hour == h
        by_hour[h % 24] = {"teacher_ev_kw": float((teacher * power)[at].sum((1, 2)).mean()),
                           "clone_ev_kw": float((clone * power)[at].sum((1, 2)).mean()),
                           "battery_error_kw": float(battery_error[at].sum(1).mean())}
    return {
        "run": str(run), "labelled_states": len(x), "ensemble": k,
        "teacher_charger_mean": float(teacher[slots].mean()), "clone_charger_mean": float(clone[slots].mean()),
        "teacher_charging_share_output_below_zero": float((members.mean(0)[slots][charged] < 0).float().mean()),
        "teacher_charging_share_members_below_zero": float(
            (torch.stack([m[slots] for m in members])[:, charged] < 0).float().mean()),
        "by_hour": by_hour,
    }


def markdown(result: dict) -> str:
    lines = [f"Clone against its teacher on its own labels, {result['run']} ({result['labelled_states']} states, "
             f"{result['ensemble']} actor(s) per building):", "",
             f"* chargers: teacher {result['teacher_charger_mean']:.3f}, clone {result['clone_charger_mean']:.3f} "
             f"of full power on average ({1 - result['clone_charger_mean'] / result['teacher_charger_mean']:.0%} less)",
             f"* where the teacher charged: the actors' mean output below 0 in "
             f"{result['teacher_charging_share_output_below_zero']:.0%} of the states, members below 0 in "
             f"{result['teacher_charging_share_members_below_zero']:.0%}", "",
             "| hour | teacher EV kW | clone EV kW | clone battery error kW |", "|--:|--:|--:|--:|"]
    for h in range(24):
        row = result["by_hour"][h]
        lines.append(f"| {h:02d} | {row['teacher_ev_kw']:.1f} | {row['clone_ev_kw']:.1f} | {row['battery_error_kw']:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `train` run directory (final.pt and labels.pt)")
    parser.add_argument("--battery-kw", type=float, default=5.0,
                        help="each battery's nominal power, kW (the dataset's 17 batteries: 5.0)")
    parser.add_argument("--out", type=Path, default=None, help="where clone-bias.{json,md} go (default: print)")
    args = parser.parse_args()
    for needed in ("final.pt", "labels.pt"):
        if not (args.run / needed).exists():
            parser.error(f"{args.run / needed} not found: pass a directory `maddpg-citylearn train` wrote")
    result = clone_bias(args.run, args.battery_kw)
    text = markdown(result)
    if args.out is None:
        print(text)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clone-bias.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "clone-bias.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
