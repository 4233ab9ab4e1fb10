"""Does MADDPG earn its keep? The planner-taught clone against clone + MADDPG, on several seeds.

For every seed, one `maddpg-citylearn train --episodes 0` run gives the clone (teacher pass, cloning, DAgger, critic
warm-up; its deterministic evaluation is the "clone" arm). Two copies of it are then fine-tuned with `--resume`:

    maddpg    the config's fine-tuning: critic refit, actor steps ascending the critic's team Q with the TD3+BC
              pull towards the teacher's labels, kept only if the deterministic training-window score drops
    cloning   the same steps with --bc-alpha 0: the actors only go on cloning the labels, the critic has no say.
              This is the control: whatever "maddpg" gains over it is the critic's doing, not more cloning's

An arm's result is the best deterministic evaluation among its fine-tuning episodes; a rejected episode restores
the clone, so an arm that never improves shows the clone's score.

    python benchmarks/ablation.py --config configs/ablation.toml --seeds 0 1 2 --out runs/ablation
    python benchmarks/ablation.py --summarise-only --out runs/ablation    # re-read finished runs

Writes OUT/ablation.json and prints a table (mean of the four headline KPIs and EV service per arm and seed).
Runs that already finished (their summary.json) are not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HEADLINE = ("cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average")
ARMS = {"maddpg": [], "cloning": ["--bc-alpha", "0"]}


def score(kpis: dict) -> float:
    return sum(kpis[k] for k in HEADLINE) / len(HEADLINE)


def result_of(summary: dict) -> dict:
    """The arm's best deterministic evaluation over its fine-tuning episodes (the clone's when there are none)."""
    tuned = [h for h in summary["history"] if "evaluation_kpis" in h]
    best = min(tuned, key=lambda h: score(h["evaluation_kpis"]), default=None)
    kpis = best["evaluation_kpis"] if best else summary["teaching"]["evaluation_kpis"]
    service = best["evaluation_service"] if best else summary["teaching"]["evaluation_service"]
    accepted = [h["episode"] for h in summary["history"] if h.get("gate", {}).get("accepted")]
    return {"score": score(kpis), "kpis": kpis, "service": service, "accepted_episodes": accepted,
            "episodes": [{"episode": h["episode"], "score": score(h["evaluation_kpis"]),
                          "gate": h.get("gate", {}).get("score")} for h in tuned],
            "training_seconds": summary["training_seconds"], "env_steps": summary["env_steps"]}


def train(*args: str) -> None:
    command = [sys.executable, "-m", "maddpg_ops.cli", "train", "--no-progress", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def run_seed(config: str, seed: int, root: Path, extra: list[str], summarise_only: bool) -> dict | None:
    clone_dir = root / "clone"
    if not (clone_dir / "summary.json").is_file():
        if summarise_only:
            return None
        train("--config", config, "--seed", str(seed), "--episodes", "0", "--out", str(clone_dir), *extra)
    clone = json.loads((clone_dir / "summary.json").read_text())["teaching"]
    row = {"clone": {"score": score(clone["evaluation_kpis"]), "kpis": clone["evaluation_kpis"],
                     "service": clone["evaluation_service"]}}
    for arm, options in ARMS.items():
        arm_dir = root / arm
        if not (arm_dir / "summary.json").is_file():
            if summarise_only:
                continue
            shutil.rmtree(arm_dir, ignore_errors=True)
            shutil.copytree(clone_dir, arm_dir)
            (arm_dir / "summary.json").unlink()
            train("--config", config, "--seed", str(seed), "--resume", str(arm_dir / "last.pt"), "--out",
                  str(arm_dir), *options, *extra)
        row[arm] = result_of(json.loads((arm_dir / "summary.json").read_text()))
    if "maddpg" in row:
        row["maddpg_lowered_the_score"] = row["maddpg"]["score"] < row["clone"]["score"]
        if "cloning" in row:
            row["maddpg_beat_cloning_alone"] = row["maddpg"]["score"] < row["cloning"]["score"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ablation.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--summarise-only", action="store_true", help="only read the runs already in OUT")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `train` options, passed on")
    args = parser.parse_args()

    rows = {}
    for seed in args.seeds:
        row = run_seed(args.config, seed, args.out / f"seed-{seed}", args.extra, args.summarise_only)
        if row is not None:
            rows[seed] = row

    def cell(row: dict, arm: str) -> str:
        return f"{row[arm]['score']:.4f} (EV {row[arm]['service']['ev_departures_acceptable']:.3f})" if arm in row \
            else "-"

    print(f"{'seed':>4}  {'clone':>20}  {'clone + MADDPG':>20}  {'clone + cloning only':>20}")
    for seed, row in rows.items():
        print(f"{seed:>4}  {cell(row, 'clone'):>20}  {cell(row, 'maddpg'):>20}  {cell(row, 'cloning'):>20}")
    lowered = sum(1 for row in rows.values() if row.get("maddpg_lowered_the_score"))
    beat = sum(1 for row in rows.values() if row.get("maddpg_beat_cloning_alone"))
    print(f"MADDPG fine-tuning lowered the mean headline KPI below the clone on {lowered} of {len(rows)} seeds, "
          f"and below cloning alone (same steps, --bc-alpha 0) on {beat}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps({"config": args.config, "seeds": rows, "lowered_on": lowered,
                                                        "beat_cloning_alone_on": beat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
