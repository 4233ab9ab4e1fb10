"""Where does the critic lead the actors? Actor steps of different strengths from one clone, each scored in the env.

Takes a clone written by `train --episodes 0` (its critic already warmed up), refills the replay with the cached
teacher pass, runs one fine-tuning collection pass (exploration 0.05, a critic update every step, then the critic
refit), and from that same starting point tries each variant: `--steps` actor updates at `--lr` with TD3+BC weight
alpha, scored deterministically on the training window after each checkpoint in `--steps`. Alpha 0 is the control:
the same updates with the critic's term switched off (cloning the labels only).

    python benchmarks/fine_tuning_probe.py runs/ablation/seed-0/clone/last.pt --config configs/ablation.toml \
        --alphas 0 0.01 0.1 --steps 25 100 300 --out runs/probe.json

Prints one line per (alpha, steps) and writes the table as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_training import trainer as T
from maddpg_training.bootstrap import warmup
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.config import TrainConfig
from maddpg_training.replay import LabelledStates, ReplayBuffer
from maddpg_training.team_reward import STATE_WIDTH

HEADLINE = ("cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="last.pt of a `train --episodes 0` run (the clone)")
    parser.add_argument("--config", type=Path, required=True, help="the config that run used")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100, 300])
    parser.add_argument("--lr", type=float, default=None, help="actor learning rate (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/probe.json"))
    args = parser.parse_args()

    config = TrainConfig.load(args.config)
    config = config.override(actor_lr=args.lr)
    checkpoint = load_checkpoint(args.checkpoint)
    spec = EnvSpec(schema=config.dataset, start=config.start, end=config.end)
    window = T._window(spec, warmup(spec, progress=False), checkpoint.layout, config, safety=checkpoint.safety)
    learner = T.MADDPG(checkpoint.build_policy().train(), config, window.reward.shares)
    learner.load_state_dict(checkpoint.trainer["learner"])
    layout = checkpoint.layout
    buffer = ReplayBuffer(config.buffer_size, layout.observation_shape, layout.action_shape, window.reward.shares,
                          STATE_WIDTH)
    heldout = ReplayBuffer(max(1, int(config.buffer_size * config.heldout_fraction)), layout.observation_shape,
                           layout.action_shape, window.reward.shares, STATE_WIDTH)
    labelled = LabelledStates(layout.observation_shape, layout.action_shape)
    generator = torch.Generator().manual_seed(args.seed)
    labels_file = args.checkpoint.parent / T.LABELS_FILE
    result = T.teacher_pass(window, learner, buffer, heldout, config, generator, 0, False)
    labelled.extend(*(T._load_labels(labels_file) if labels_file.is_file() else result.labels))

    def score() -> dict:
        check, _ = T.gate_check([window], learner, False)
        return {"score": check["score"], **{k: check["kpis"][k] for k in HEADLINE},
                "ev_departures_acceptable": check["ev_departures_acceptable"]}

    def sample(recent: int | None):
        return buffer.sample(config.batch_size, generator, n_step=config.n_step, gamma=config.gamma, recent=recent)

    rows = [{"alpha": None, "steps": 0, **score()}]
    print(f"clone: {rows[0]['score']:.4f}", flush=True)
    collected = T.rollout(window, lambda raw: learner.act(raw, config.exploration_start, generator), driver="probe",
                          episode=1000, buffer=buffer,
                          on_step=lambda: learner.update(sample(None), labelled, train_actors=False,
                                                         generator=generator))
    for _ in range(config.critic_refit_steps):
        learner.update(sample(collected.steps), labelled, train_actors=False, generator=generator)
    start = copy.deepcopy(learner.state_dict()), copy.deepcopy(learner.actors.state_dict())
    for alpha in args.alphas:
        learner.load_state_dict(copy.deepcopy(start[0]))
        learner.config = config.override(bc_alpha=alpha)
        learner.restore_actors(copy.deepcopy(start[1]))
        done = 0
        for target in sorted(args.steps):
            while done < target:
                learner.update(sample(collected.steps), labelled, train_actors=True, generator=generator)
                done += learner.updates % config.policy_delay == 0
            rows.append({"alpha": alpha, "steps": target, **score()})
            row = rows[-1]
            print(f"alpha {alpha:g}, {target} actor steps: {row['score']:.4f} (" +
                  " / ".join(f"{row[k]:.3f}" for k in HEADLINE) + ")", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "config": str(args.config),
                                    "lr": learner.config.actor_lr, "rows": rows}, indent=2) + "\n")
    print(f"clone {rows[0]['score']:.4f}; best {min(r['score'] for r in rows):.4f}; written {args.out}")


if __name__ == "__main__":
    main()
