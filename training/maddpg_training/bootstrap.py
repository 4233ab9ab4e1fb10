"""Before learning: roll the env once without control to estimate observation statistics, record the no-storage
counterfactual the team reward needs, and keep real observations for export.

The statistics are frozen for the whole run (a moving normaliser would shift the critic's inputs under it), and a
sample of the rollout's observations travels in every checkpoint so that ``export`` can validate the ONNX graph on real
env data without building an env.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from maddpg_core.layout import PolicyLayout
from maddpg_evaluation import citylearn_names as names
from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec, layout_from_env

from .checkpoint import Checkpoint
from .networks import ActorSpec, PolicyNetwork
from .safety import SafetySpec
from .team_reward import BaselineSeries

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


def no_storage_controller(layout: PolicyLayout) -> Controller:
    """What every KPI is a ratio to: batteries and chargers idle, appliances started as soon as they may (1.0).

    CityLearn's no-storage series follow the appliance as it actually ran, so a warm-up that never started it would
    record another baseline than the one a policy starting it is judged against (measured: building 1's no-storage
    cost over steps 100-300 was 27.2 without its appliance, 44.1 with it).
    """
    actions = np.zeros(layout.action_shape, dtype=np.float32)
    for i, agent in enumerate(layout.agents):
        for j, name in enumerate(agent.action_names or ()):
            if name.startswith(names.APPLIANCE_ACTION_PREFIX):
                actions[i, j] = 1.0
    return lambda _: actions


def observation_statistics(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-agent, per-slot mean and std over ``[steps, agents, width]``."""
    data = observations.astype(np.float64)
    return data.mean(axis=0).astype(np.float32), data.std(axis=0).astype(np.float32)


def reference_sample(observations: np.ndarray, rng: np.random.Generator, size: int = REFERENCE_SAMPLE) -> torch.Tensor:
    rows = rng.choice(len(observations), size=min(size, len(observations)), replace=False)
    return torch.from_numpy(observations[np.sort(rows)].astype(np.float32))


@dataclass
class Warmup:
    """What one no-control rollout of the training window tells us before learning starts."""

    layout: PolicyLayout
    observations: np.ndarray   # [steps + 1, agents, obs_width]
    baseline: BaselineSeries   # the no-storage counterfactual the team reward is measured against


def warmup(spec: EnvSpec, *, progress: bool = False) -> Warmup:
    """Roll the window once without storage: observation statistics, reference observations, reward baseline.

    Idle batteries and chargers make the no-storage series CityLearn records exactly the counterfactual; they do not
    depend on any policy that starts the appliance as soon as it may, as the safety layer and the teachers do.
    """
    env = spec.build()
    layout = layout_from_env(env, dataset=spec.dataset_name)
    adapter = CityLearnAdapter(layout, env, what="the new policy")
    observations = rollout_observations(env, adapter, no_storage_controller(layout), progress=progress)
    return Warmup(layout=layout, observations=observations, baseline=BaselineSeries.from_env(env))


def without_ev_discharge(layout: PolicyLayout) -> PolicyLayout:
    """The same layout with every EV charger action bounded below by 0 (charge only, never vehicle-to-grid)."""
    agents = []
    for agent in layout.agents:
        low = tuple(max(lo, 0.0) if name.startswith(names.CHARGER_ACTION_PREFIX) else lo
                    for name, lo in zip(agent.action_names or (), agent.action_low))
        agents.append(replace(agent, action_low=low or agent.action_low))
    return replace(layout, agents=tuple(agents))


def fresh_policy(layout: PolicyLayout, observations: np.ndarray, actor_spec: ActorSpec = ActorSpec(), *,
                 seed: int = 0, safety: SafetySpec | None = None) -> PolicyNetwork:
    """Randomly initialised actors behind a normaliser fitted to ``observations`` (and the safety layer, if any)."""
    torch.manual_seed(seed)
    policy = PolicyNetwork(layout, actor_spec, safety)
    policy.normaliser.set_statistics(*observation_statistics(observations))
    policy.features.set_district_statistics(observations)
    return policy


def initial_checkpoint(spec: EnvSpec, actor_spec: ActorSpec = ActorSpec(), *, seed: int = 0,
                       progress: bool = False) -> Checkpoint:
    """An untrained policy on the real env layout (no safety layer): for tests and benchmarks."""
    result = warmup(spec, progress=progress)
    policy = fresh_policy(result.layout, result.observations, actor_spec, seed=seed)
    return Checkpoint(
        layout=result.layout,
        actor_spec=actor_spec,
        policy=policy.state_dict(),
        reference_observations=reference_sample(result.observations, np.random.default_rng(seed)),
        summary={"trained": False, "seed": seed, "warmup_steps": int(len(result.observations) - 1)},
    )
