"""Before learning: roll the env once to estimate observation statistics and keep real observations for export.

The statistics are frozen for the whole run (a moving normaliser would shift the critic's inputs under it), and a
sample of the rollout's observations travels in every checkpoint so that ``export`` can validate the ONNX graph on real
env data without building an env.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from maddpg_client.citylearn_env import CityLearnAdapter, EnvSpec, layout_from_env
from maddpg_client.layout import PolicyLayout

from .checkpoint import Checkpoint
from .networks import ActorSpec, PolicyNetwork

REFERENCE_SAMPLE = 256

Controller = Callable[[np.ndarray], np.ndarray]  # [agents, obs_width] -> [agents, action_width]


def rollout_observations(env, adapter: CityLearnAdapter, act: Controller, *, progress: bool = False,
                         description: str = "warm-up rollout") -> np.ndarray:
    """Step ``env`` to the end of its episode with ``act``; returns every observation ``[steps + 1, agents, width]``."""
    observations, _ = env.reset()
    seen = [adapter.observations_to_array(observations)]
    bar = tqdm(total=env.time_steps - 1, desc=description, unit="step", disable=not progress, leave=False)
    while not env.terminated:
        observations, *_ = env.step(adapter.actions_to_lists(act(seen[-1])))
        seen.append(adapter.observations_to_array(observations))
        bar.update()
    bar.close()
    return np.stack(seen)


def random_controller(layout: PolicyLayout, rng: np.random.Generator) -> Controller:
    """Uniform actions inside each slot's bounds (padded slots 0): visits storage states that zero actions never do."""
    low, high = layout.action_bounds()

    def act(_: np.ndarray) -> np.ndarray:
        return rng.uniform(low, high).astype(np.float32)

    return act


def observation_statistics(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-agent, per-slot mean and std over ``[steps, agents, width]``."""
    data = observations.astype(np.float64)
    return data.mean(axis=0).astype(np.float32), data.std(axis=0).astype(np.float32)


def reference_sample(observations: np.ndarray, rng: np.random.Generator, size: int = REFERENCE_SAMPLE) -> torch.Tensor:
    rows = rng.choice(len(observations), size=min(size, len(observations)), replace=False)
    return torch.from_numpy(observations[np.sort(rows)].astype(np.float32))


def initial_checkpoint(spec: EnvSpec, actor_spec: ActorSpec = ActorSpec(), *, seed: int = 0,
                       progress: bool = False) -> tuple[Checkpoint, np.ndarray]:
    """A freshly initialised policy on the real env layout, with statistics from a random-action warm-up rollout.

    Returns the checkpoint (no trainer state) and the warm-up observations.
    """
    env = spec.build()
    layout = layout_from_env(env, dataset=spec.dataset_name)
    adapter = CityLearnAdapter(layout, env, what="the new policy")
    rng = np.random.default_rng(seed)
    observations = rollout_observations(env, adapter, random_controller(layout, rng), progress=progress)
    torch.manual_seed(seed)
    policy = PolicyNetwork(layout, actor_spec)
    policy.normaliser.set_statistics(*observation_statistics(observations))
    checkpoint = Checkpoint(
        layout=layout,
        actor_spec=actor_spec,
        policy=policy.state_dict(),
        reference_observations=reference_sample(observations, rng),
        summary={"trained": False, "seed": seed, "warmup_steps": int(len(observations) - 1)},
    )
    return checkpoint, observations
