"""Does MADDPG earn its keep? The teacher-taught clone against clone + MADDPG fine-tuning, on several seeds.

For every seed, one `maddpg-citylearn train` run (the same config, seeds differ) gives both arms: its deterministic
evaluation after the teacher phases (episode 0: the clone, DAgger included, before any MADDPG actor step) and after
each fine-tuning episode. "clone + MADDPG" is the policy `train` keeps as best.pt among the fine-tuned episodes; the
clone is never a candidate for it here, so a fine-tuning that never beats the clone shows as such.

    python benchmarks/ablation.py --config configs/ctde.toml --seeds 0 1 2 --out runs/ablation
    python benchmarks/ablation.py --summarise-only --out runs/ablation    # re-read finished runs

Writes OUT/ablation.json and prints a table (mean of the four headline KPIs and EV service per arm and seed).
Runs that already finished (OUT/seed-N/summary.json) are not trained again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HEADLINE = ("cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average")


def score(kpis: dict) -> float:
    return sum(kpis[k] for k in HEADLINE) / len(HEADLINE)


def arms(summary: dict) -> dict:
    clone = summary["teaching"]
    tuned = [h for h in summary["history"] if "evaluation_kpis" in h]
    best = min(tuned, key=lambda h: score(h["evaluation_kpis"])) if tuned else None
    row = {
        "clone": {"kpis": clone["evaluation_kpis"], "service": clone["evaluation_service"],
                  "score": score(clone["evaluation_kpis"])},
        "episodes": [{"episode": h["episode"], "score": score(h["evaluation_kpis"]), "kpis": h["evaluation_kpis"],
                      "service": h["evaluation_service"]} for h in tuned],
        "training_seconds": summary["training_seconds"], "env_steps": summary["env_steps"],
    }
    if best is not None:
        row["clone_plus_maddpg"] = {"episode": best["episode"], "kpis": best["evaluation_kpis"],
                                    "service": best["evaluation_service"], "score": score(best["evaluation_kpis"])}
        row["maddpg_lowered_the_score"] = row["clone_plus_maddpg"]["score"] < row["clone"]["score"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ctde.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--summarise-only", action="store_true", help="only read the runs already in OUT")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `train` options, passed on")
    args = parser.parse_args()

    rows = {}
    for seed in args.seeds:
        run = args.out / f"seed-{seed}"
        if not (run / "summary.json").is_file():
            if args.summarise_only:
                continue
            command = [sys.executable, "-m", "maddpg_ops.cli", "train", "--config", args.config, "--seed", str(seed),
                       "--out", str(run), "--no-progress", *args.extra]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)
        rows[seed] = arms(json.loads((run / "summary.json").read_text()))

    print(f"{'seed':>4}  {'clone':>8}  {'+MADDPG':>8}  {'episode':>7}  {'EV ok clone':>11}  {'EV ok +MADDPG':>13}")
    for seed, row in rows.items():
        tuned = row.get("clone_plus_maddpg")
        print(f"{seed:>4}  {row['clone']['score']:8.4f}  {tuned['score'] if tuned else float('nan'):8.4f}  "
              f"{tuned['episode'] if tuned else '-':>7}  {row['clone']['service']['ev_departures_acceptable']:11.3f}  "
              f"{tuned['service']['ev_departures_acceptable'] if tuned else float('nan'):13.3f}")
    lowered = sum(1 for row in rows.values() if row.get("maddpg_lowered_the_score"))
    print(f"MADDPG fine-tuning lowered the mean headline KPI below the clone on {lowered} of {len(rows)} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps({"config": args.config, "seeds": rows,
                                                        "lowered_on": lowered}, indent=2) + "\n")


if __name__ == "__main__":
    main()
