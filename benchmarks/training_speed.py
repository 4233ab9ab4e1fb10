"""How fast does training run on this machine, and why the networks are stacked.

Measures, on the same env window:
  1. the env alone (zero actions),
  2. a fine-tuning episode without learning (acting, safety layer, team reward, replay; no update),
  3. a fine-tuning episode with learning (one critic update per step, an actor update every second one),
and, outside the env, the cost of one learning update with the stacked networks this project uses against the
seed project's layout (17 separate critics and a Python loop of 17 actor updates).

    python benchmarks/training_speed.py --steps 720 --out docs/training-speed.json

Numbers are from a shared machine: compare ratios within one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec, layout_from_env
from maddpg_training.bootstrap import no_storage_controller, rollout_observations
from maddpg_training.config import TrainConfig
from maddpg_training.learner import MADDPG
from maddpg_training.networks import ActorSpec, PolicyNetwork
from maddpg_training.replay import ReplayBuffer
from maddpg_training.team_reward import STATE_WIDTH
from maddpg_training.trainer import train


def env_only(spec: EnvSpec) -> float:
    env = spec.build()
    layout = layout_from_env(env)
    started = time.perf_counter()
    rollout_observations(env, CityLearnAdapter(layout, env), no_storage_controller(layout))
    return (env.time_steps - 1) / (time.perf_counter() - started)


def training_rate(spec: EnvSpec, learning: bool, out: Path) -> float:
    """Env steps per second of one fine-tuning episode (acting, safety layer, team reward, replay, and with
    ``learning`` one critic update per step and an actor update every second one). The rule teacher and tiny teacher
    phases keep the rest short; they are not what is measured."""
    steps = spec.end - spec.start
    config = TrainConfig(dataset=spec.schema, start=spec.start, end=spec.end, episodes=1, teacher="rule",
                         dagger_rounds=0, clone_steps=10, critic_warmup_steps=10, model_episodes=0,
                         update_every=1 if learning else steps + 1)
    evaluation = EnvSpec(schema=spec.schema, start=spec.start, end=spec.start + 24)
    result = train(config, out, progress=False, evaluation=evaluation, evaluate_every=0)
    episode = result.summary["history"][0]
    return episode["steps"] / episode["seconds"]


class SeedStyleLearner:
    """The seed project's update layout: per agent, a critic on everything and an actor, updated in a Python loop."""

    def __init__(self, n: int, obs: int, act: int, hidden: int = 256):
        def mlp(i, o, out=None):
            layers = [nn.Linear(i, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, o)]
            return nn.Sequential(*layers, *(out or []))

        joint = n * (obs + act)
        self.actors = [mlp(obs, act, [nn.Tanh()]) for _ in range(n)]
        self.critics = [mlp(joint, 1) for _ in range(n)]
        self.targets = [(copy.deepcopy(a), copy.deepcopy(c)) for a, c in zip(self.actors, self.critics)]
        self.actor_opt = [torch.optim.Adam(a.parameters(), 1e-4) for a in self.actors]
        self.critic_opt = [torch.optim.Adam(c.parameters(), 3e-4) for c in self.critics]

    def update(self, z, a, r, z_next):
        n = len(self.actors)
        with torch.no_grad():
            a_next = torch.stack([t[0](z_next[:, i]) for i, t in enumerate(self.targets)], 1)
        for i in range(n):
            with torch.no_grad():
                y = r + 0.99 * self.targets[i][1](torch.cat([z_next.flatten(1), a_next.flatten(1)], 1)).squeeze(-1)
            q = self.critics[i](torch.cat([z.flatten(1), a.flatten(1)], 1)).squeeze(-1)
            loss = (q - y).pow(2).mean()
            self.critic_opt[i].zero_grad()
            loss.backward()
            self.critic_opt[i].step()
            actions = [a[:, j] if j != i else self.actors[i](z[:, i]) for j in range(n)]
            actor_loss = -self.critics[i](torch.cat([z.flatten(1), torch.stack(actions, 1).flatten(1)], 1)).mean()
            self.actor_opt[i].zero_grad()
            actor_loss.backward()
            self.actor_opt[i].step()


def update_cost(layout, batch_size: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    shares = layout.n_agents + 2
    buffer = ReplayBuffer(batch_size * 4, layout.observation_shape, layout.action_shape, shares, STATE_WIDTH)
    for t in range(batch_size * 4):
        buffer.add(torch.randn(layout.observation_shape), torch.rand(layout.action_shape) * 2 - 1,
                   torch.randn(shares) * 0.1, torch.randn(layout.observation_shape), torch.rand(STATE_WIDTH),
                   torch.rand(STATE_WIDTH), episode=t // 200, time_step=t)
    # policy_delay=1: every update also updates the actors, like the seed's loop (an upper bound for ours).
    stacked = MADDPG(PolicyNetwork(layout, ActorSpec(features=("hour_cycle",))), TrainConfig(policy_delay=1), shares)
    seed_style = SeedStyleLearner(layout.n_agents, layout.obs_width, layout.action_width)
    timings = {}
    for name, step in (("stacked (this project)", lambda b: stacked.update(b)),
                       ("17 separate networks, Python loop (seed style)",
                        lambda b: seed_style.update(b.observations, b.actions, b.returns.sum(-1), b.next_observations))):
        step(buffer.sample(batch_size, generator, n_step=12))  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            step(buffer.sample(batch_size, generator, n_step=12))
        timings[name] = 1000 * (time.perf_counter() - started) / repeats
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="citylearn_challenge_2022_phase_all_plus_evs")
    parser.add_argument("--steps", type=int, default=720, help="env steps per measurement (from time step 0)")
    parser.add_argument("--repeats", type=int, default=20, help="updates timed per network layout")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    spec = EnvSpec(schema=args.dataset, start=0, end=args.steps)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"maddpg-training-speed-{os.getpid()}"
    results = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "steps": args.steps,
        "env_only_steps_per_second": env_only(spec),
        "training_without_learning_steps_per_second": training_rate(spec, False, scratch / "acting"),
        "training_with_learning_steps_per_second": training_rate(spec, True, scratch / "learning"),
        "update_ms_batch_256": update_cost(layout_from_env(spec.build()), 256, args.repeats),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
