"""How well does a clone of the planner carry over to months it never saw? Offline, from the cached teacher pass.

The held-out protocol found the clone's KPIs on November-January far from the teacher's. This asks why, without the
env: each variant (actor size, inputs) is cloned on the planner's labels of a fold's training months, one month of
them held back, and scored by the cloning loss (the masked mean squared error of the deployed policy's actions,
safety layer included, against the teacher's) on its training labels, on the held-back month (validation: inside the
training months, so it may choose a variant) and on the fold's test months (reported, never used to choose).

    python benchmarks/clone_generalisation.py --checkpoint runs/protocol/nov-jan/local/seed-0/final.pt --out docs

The checkpoint supplies the layout, the safety rules and the observation statistics of the fold's training months
(any run of the fold: the protocol writes them); the full-year planner pass must be in the cache (a `train` run over
the year writes it). Every variant starts from the same seed and takes the same number of cloning steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_training import teacher_cache
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.config import TrainConfig
from maddpg_training.learner import MADDPG
from maddpg_training.networks import ActorSpec, PolicyNetwork
from maddpg_training.protocol import Protocol
from maddpg_training.replay import LabelledStates

VARIANTS = (  # (actor hidden sizes, observation groups ignored)
    ((256, 256), ()),            # the shipped recipe's actors
    ((256, 256), ("season",)),
    ((64, 64), ()),
    ((64, 64), ("season",)),
    ((32,), ("season",)),
)


def cloning_losses(learner: MADDPG, observations: torch.Tensor, targets: torch.Tensor, splits: dict) -> dict:
    """The learner's cloning loss (the masked mean squared error of the deployed actions against the teacher's) on
    each split of the labelled steps."""
    with torch.no_grad():
        return {name: learner.cloning_loss(observations[steps], targets[steps]).item() for name, steps in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run of the fold (layout, safety, statistics)")
    parser.add_argument("--protocol", type=Path, default=Path("configs/protocol.toml"))
    parser.add_argument("--fold", default="nov-jan")
    parser.add_argument("--validation", type=int, nargs=2, default=(5832, 6551), metavar=("START", "END"),
                        help="held-back steps inside the training months (default: April)")
    parser.add_argument("--steps", type=int, default=3000, help="cloning steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()

    protocol = Protocol.load(args.protocol)
    fold = protocol.fold(args.fold)
    config = protocol.config("local", fold, args.seed)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = MADDPG(checkpoint.build_policy(), TrainConfig(actor_hidden=checkpoint.actor_spec.hidden_sizes), shares=1)
    cached = teacher_cache.cache_path(EnvSpec(schema=config.dataset), trained.policy, config, start=None, end=None)
    if cached is None or not cached.is_file():
        raise SystemExit(f"no cached full-year planner pass ({cached}): run `maddpg-citylearn train` over the year first")
    observations, targets = (torch.as_tensor(a) for a in teacher_cache.load(cached).labels)
    v0, v1 = args.validation
    if not any(a <= v0 and v1 <= b for a, b in fold.train):
        raise SystemExit(f"--validation {v0} {v1} must lie inside the fold's training months {fold.train}")
    train = np.concatenate([np.arange(a, b + 1) for a, b in fold.train])
    train = train[(train < v0) | (train > v1)]
    train = train[train < len(observations)]
    validation, test = np.arange(v0, v1 + 1), np.arange(fold.test[0], min(fold.test[1] + 1, len(observations)))

    # The checkpoint itself, as the protocol trained it (every training month, DAgger's labels too): April is
    # in-sample for it, so its "validation" is not one.
    splits = {"training": train, "validation": validation, "test": test}
    rows = [{"hidden": list(checkpoint.actor_spec.hidden_sizes), "ignore": list(checkpoint.actor_spec.ignore),
             "source": f"{args.checkpoint} (April in its training data)",
             **cloning_losses(trained, observations, targets, splits), "seconds": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for hidden, ignore in VARIANTS:
        torch.manual_seed(args.seed)
        policy = PolicyNetwork(checkpoint.layout, ActorSpec(hidden, ("hour_cycle", "ev_slack"), ignore),
                               checkpoint.safety)
        policy.normaliser.mean.copy_(checkpoint.policy["normaliser.mean"])
        policy.normaliser.std.copy_(checkpoint.policy["normaliser.std"])
        learner = MADDPG(policy, TrainConfig(actor_hidden=hidden), shares=1)
        labelled = LabelledStates(checkpoint.layout.observation_shape, checkpoint.layout.action_shape)
        labelled.extend(observations[train].numpy(), targets[train].numpy())
        started = time.perf_counter()
        learner.clone(labelled, steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
        row = {"hidden": list(hidden), "ignore": list(ignore), "source": f"cloned here, {args.steps} steps",
               **cloning_losses(learner, observations, targets, splits),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"fold": fold.name, "train": [list(w) for w in fold.train], "validation": [v0, v1],
              "test": list(fold.test), "steps": args.steps, "seed": args.seed, "checkpoint": str(args.checkpoint),
              "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clone-generalisation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Cloning loss (masked MSE of the deployed actions against the planner's), fold {fold.name}: trained on "
             f"its training months without steps {v0}..{v1}, {args.steps} cloning steps, seed {args.seed}.", "",
             "| actors | ignores | source | training | validation (held-back month) | test months |",
             "|---|---|---|--:|--:|--:|"]
    lines += [f"| {'x'.join(map(str, r['hidden']))} | {', '.join(r['ignore']) or '-'} | {r['source']} | "
              f"{r['training']:.4f} | {r['validation']:.4f} | {r['test']:.4f} |" for r in rows]
    (args.out / "clone-generalisation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
