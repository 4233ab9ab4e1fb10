"""Where a trained policy loses to its teacher on months it never saw: the chargers or the batteries, and when.

The protocol scores a fold's policy and, beside it, the planner's own actions on the same test months (the teacher
replayed from the cached full-year pass). This splits the gap between them, in the real env:

* **swaps**: the policy with the teacher's charger actions in place of its own, then with the teacher's battery
  actions: what each group of actions costs;
* **daily peaks**: at each day's peak hour of the district's net load, how much is base load (everything but the
  batteries and the chargers), batteries and EV charging, and how often a charger ran because the safety floor
  forced it (the floor raised the actor's action there);
* **daily profile**: the mean kW by hour of the day of net load, EV charging and batteries, policy and teacher.

    python benchmarks/heldout_gap.py --checkpoint runs/protocol/nov-jan/season-blind/seed-0/final.pt \
        --out docs/heldout-gap/nov-jan

The test months default to the checkpoint's fold in configs/protocol.toml; the full-year planner pass must be in the
cache (a `train` run over the year writes it). Four passes over the months: about five minutes for three months.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from maddpg_evaluation import citylearn_names as names
from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.kpis import headline_score
from maddpg_training import teacher_cache
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.learner import charger_slots
from maddpg_training.networks import PolicyNetwork
from maddpg_training.protocol import Protocol, ReplayedActions


class Mixed:
    """The policy's actions, with the teacher's where ``from_teacher`` is set; records how far the floor raised the
    chargers (the safety layer's action minus the actor's own, summed over chargers, per step) and their action."""

    def __init__(self, policy: PolicyNetwork, teacher: np.ndarray, from_teacher: np.ndarray, chargers: np.ndarray):
        self.layout, self.policy, self.teacher = policy.layout, policy, teacher
        self.from_teacher, self.chargers, self.step, self.forced, self.charging = from_teacher, chargers, 0, [], []

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(observations, dtype=torch.float32)[None]
        own = self.policy.scaler(self.policy.actors(self.policy.actor_inputs(x)))
        guarded = self.policy.guard(x, own)[0].numpy()
        self.forced.append(float(np.clip(guarded - own[0].numpy(), 0.0, None)[self.chargers].sum()))
        actions = np.where(self.from_teacher, self.teacher[self.step], guarded)
        self.charging.append(float(np.clip(actions, 0.0, None)[self.chargers].sum()))
        self.step += 1
        return actions


def action_groups(policy: PolicyNetwork) -> dict[str, np.ndarray]:
    """``[agents, action_width]`` masks of the charger slots (those the safety layer guards) and the battery slots."""
    batteries = np.array([[name == names.BATTERY_ACTION for name in agent.action_names or ()]
                          + [False] * (policy.layout.action_width - len(agent.action_names or ()))
                          for agent in policy.layout.agents])
    return {"chargers": charger_slots(policy).bool().numpy(), "batteries": batteries}


def loads(env) -> dict[str, np.ndarray]:
    """The district's net load and its EV and battery parts (kW per hourly step), over whole days."""
    net = np.asarray(env.net_electricity_consumption, dtype=np.float64)
    n = len(net) // 24 * 24
    battery = sum(np.asarray(b.electrical_storage.electricity_consumption) for b in env.buildings)
    ev = sum(np.asarray(c.electricity_consumption) for b in env.buildings for c in (b.electric_vehicle_chargers or []))
    return {"net": net[:n], "ev": np.asarray(ev)[:n], "battery": np.asarray(battery)[:n]}


def daily_peaks(parts: dict[str, np.ndarray], forced: np.ndarray | None, first_hour: int) -> dict:
    net = parts["net"]
    peaks = np.arange(0, len(net), 24) + net.reshape(-1, 24).argmax(axis=1)
    row = {"days": len(peaks), "peak_kw": net[peaks].mean(), "battery_kw": parts["battery"][peaks].mean(),
           "ev_kw": parts["ev"][peaks].mean(),
           "base_kw": (net - parts["battery"] - parts["ev"])[peaks].mean(),
           "peaks_with_ev_charging": (parts["ev"][peaks] > 0.1).mean(),
           "peak_hour_counts": np.bincount((peaks + first_hour) % 24, minlength=24).tolist()}
    if forced is not None:
        row["peaks_with_a_forced_charger"] = (forced[peaks] > 0.01).mean()
    return {k: (round(float(v), 3) if not isinstance(v, list) else v) for k, v in row.items()}


def profile(parts: dict[str, np.ndarray], first_hour: int) -> dict[str, list[float]]:
    """Mean kW by hour of the day (index 0 = 00:00)."""
    return {k: np.round(np.roll(v.reshape(-1, 24).mean(axis=0), first_hour), 2).tolist() for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a fold's trained policy (final.pt)")
    parser.add_argument("--protocol", type=Path, default=Path("configs/protocol.toml"))
    parser.add_argument("--fold", default=None, help="the fold whose test months to use (default: the checkpoint's "
                                                     "directory names it, e.g. runs/protocol/nov-jan/...)")
    parser.add_argument("--out", type=Path, default=None, help="where heldout-gap.{json,md} go "
                                                                  "(default: docs/heldout-gap/<fold>)")
    args = parser.parse_args()

    protocol = Protocol.load(args.protocol)
    fold_name = args.fold or next((f.name for f in protocol.folds if f.name in args.checkpoint.parts), None)
    if fold_name is None:
        raise SystemExit(f"--fold: none of {[f.name for f in protocol.folds]} in {args.checkpoint}; name the fold")
    fold = protocol.fold(fold_name)
    out_dir = args.out or Path("docs/heldout-gap") / fold.name
    config = protocol.config("local", fold, 0)
    policy = load_checkpoint(args.checkpoint).build_policy().eval()
    spec = EnvSpec(schema=config.dataset, start=fold.test[0], end=fold.test[1])
    cached = teacher_cache.cache_path(EnvSpec(schema=config.dataset), policy, config, start=None, end=None)
    if cached is None or not cached.is_file():
        raise SystemExit(f"no cached full-year planner pass ({cached}): run `maddpg-citylearn train` over the year first")
    whole = teacher_cache.load(cached)
    teacher = whole.record["actions"][fold.test[0] - whole.first_step:]
    groups = action_groups(policy)

    runs, details = [], {}
    for label, swapped in (("policy", ()), ("policy, the teacher's chargers", ("chargers",)),
                           ("policy, the teacher's batteries", ("batteries",)), ("teacher replayed", None)):
        env = spec.build()
        if swapped is None:
            driver, forced = ReplayedActions(policy.layout, teacher), None
        else:
            mask = np.zeros(policy.layout.action_shape, bool)
            for group in swapped:
                mask |= groups[group]
            driver = Mixed(policy, teacher, mask, groups["chargers"])
        result = run_episode(env, driver, name=label)
        runs.append({"run": label, "score": round(headline_score(result.kpis), 4),
                     **{k: round(v, 4) for k, v in result.kpis.items()},
                     "ev_departures_acceptable": round(result.service["ev_departures_acceptable"], 4)})
        print(json.dumps(runs[-1]), flush=True)
        if label in ("policy", "teacher replayed"):
            first_hour = int(env.buildings[0].energy_simulation.hour[0]) % 24   # CityLearn's hour 24 is 00:00
            parts = loads(env)
            forced = None if swapped is None else np.asarray(driver.forced)[:len(parts["net"])]
            details[label] = {"daily_peaks": daily_peaks(parts, forced, first_hour),
                              "profile_kw": profile(parts, first_hour)}
            if forced is not None:
                details[label]["forced_share_of_charging"] = round(sum(driver.forced) / max(sum(driver.charging), 1e-9), 3)
            print(json.dumps({label: details[label]["daily_peaks"]}), flush=True)

    out = {"checkpoint": str(args.checkpoint), "fold": fold.name, "test": list(fold.test), "runs": runs, **details}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heldout-gap.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"Held-out gap, fold {fold.name} (steps {fold.test[0]}..{fold.test[1]}), {args.checkpoint}:", "",
             "| run | score | cost | carbon | daily peak | all-time peak | EV acceptable |", "|---|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['run']} | {r['score']:.4f} | {r['cost_total']:.3f} | {r['carbon_emissions_total']:.3f} | "
              f"{r['daily_peak_average']:.3f} | {r['all_time_peak_average']:.3f} | {r['ev_departures_acceptable']:.3f} |"
              for r in runs]
    lines += ["", "At each day's peak hour (means over the days):", "",
              "| run | peak kW | base kW | batteries kW | EV kW | peaks with EV charging | peaks with a forced charger |",
              "|---|--:|--:|--:|--:|--:|--:|"]
    for label, d in details.items():
        p = d["daily_peaks"]
        lines.append(f"| {label} | {p['peak_kw']:.1f} | {p['base_kw']:.1f} | {p['battery_kw']:.1f} | {p['ev_kw']:.1f} | "
                     f"{p['peaks_with_ev_charging']:.2f} | {p.get('peaks_with_a_forced_charger', '-')} |")
    lines += [f"\nOf all the policy's charging (actions summed over the months), the safety floor forced "
              f"{details['policy']['forced_share_of_charging']:.1%}: charging the actors had put off until the floor required it."]
    lines += ["", "Mean kW by hour of the day (00:00 first):", "", "| run | load | " +
              " | ".join(f"{h:02d}" for h in range(24)) + " |", "|---|---|" + "--:|" * 24]
    for label, d in details.items():
        for part, values in d["profile_kw"].items():
            lines.append(f"| {label} | {part} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    (out_dir / "heldout-gap.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
