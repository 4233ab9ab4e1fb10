"""Does the critic's gradient point where the env says? dQ/da on the batteries against finite differences in the env.

The actors ascend the critic's team Q along dQ/da, so that gradient is all MADDPG tells them. At random (step,
building) pairs of a deterministic pass, the critic's dQ1/da for that building's battery action is compared with the
env's own answer: the env is copied at that step, the battery action nudged by +delta in one copy and -delta in the
other, both go on with the same deterministic policy for ``horizon`` steps, and the difference of their discounted
team returns over 2 delta is the finite difference. The batteries are the slots fine-tuning moves (``noise_slots``);
the policy's own actions go through the safety layer as always, the nudged action only through the env's limits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .learner import MADDPG, two_sided_slots
from .rollout import Window


class ProbeError(ValueError):
    """The window cannot hold the probe (shorter than its horizon, or no battery)."""


@dataclass(frozen=True)
class GradientPoint:
    step: int
    building: int
    slot: int
    critic: float          # dQ1/da (team Q) at the policy's action
    env: float             # (G(a + delta) - G(a - delta)) / (2 delta) over the horizon, discounted by gamma


def probe(learner: MADDPG, window: Window, *, points: int = 16, horizon: int = 48, delta: float = 0.2,
          within: int = 720, gamma: float | None = None, seed: int = 0) -> dict:
    """The sign agreement of the critic's dQ/da with the env's finite differences at ``points`` pairs among the
    first ``within`` steps of one deterministic pass over ``window`` (a fresh env; ``horizon`` steps of it per
    nudge). Points whose finite difference is below 1e-6 (a battery that cannot move either way) are not counted."""
    gamma = learner.config.gamma if gamma is None else gamma
    rng = np.random.default_rng(seed)
    window = window.fresh()
    env, adapter, reward = window.env, window.adapter, window.reward
    two_sided = two_sided_slots(learner.policy).numpy() > 0
    candidates = np.argwhere(two_sided)                       # (building, slot) pairs with a battery
    bounds = learner.policy.layout.action_bounds()
    last = min(within, env.time_steps - 1 - horizon)
    if last <= 0 or not len(candidates):
        raise ProbeError(f"window {window.label} is too short for a {horizon}-step probe, or has no battery")
    at = dict(zip(sorted(rng.choice(last, size=min(points, last), replace=False).tolist()),
                  candidates[rng.integers(len(candidates), size=min(points, last))].tolist()))

    def discounted_return(env_copy, reward_copy, first_actions: np.ndarray) -> float:
        total, actions = 0.0, first_actions
        for k in range(horizon):
            raw_list, *_ = env_copy.step(adapter.actions_to_lists(actions))
            shares, _ = reward_copy.step_env(env_copy)
            total += gamma ** k * float(shares.sum())
            actions = learner.act(adapter.observations_to_array(raw_list))
        return total

    found: list[GradientPoint] = []
    raw_list, _ = env.reset()
    reward.reset()
    step = 0
    while not env.terminated and step <= last:
        raw = adapter.observations_to_array(raw_list)
        actions = learner.act(raw)
        if step in at:
            building, slot = at[step]
            found.append(GradientPoint(step, building, slot, _critic_gradient(learner, raw, actions, reward.state(),
                                                                                building, slot),
                                       _env_gradient(env, reward, actions, building, slot, delta, bounds,
                                                     discounted_return)))
        raw_list, *_ = env.step(adapter.actions_to_lists(actions))
        reward.step_env(env)
        step += 1
    counted = [p for p in found if abs(p.env) > 1e-6]
    agree = [np.sign(p.critic) == np.sign(p.env) for p in counted]
    return {
        "points": len(found), "counted": len(counted), "horizon": horizon, "delta": delta,
        "sign_agreement": float(np.mean(agree)) if agree else float("nan"),
        "correlation": float(np.corrcoef([p.critic for p in counted], [p.env for p in counted])[0, 1])
        if len(counted) > 2 else float("nan"),
        "pairs": [p.__dict__ for p in found],
    }


def _critic_gradient(learner: MADDPG, raw: np.ndarray, actions: np.ndarray, state: np.ndarray, building: int,
                     slot: int) -> float:
    observations = torch.from_numpy(raw)[None]
    a = torch.from_numpy(np.asarray(actions, np.float32))[None].requires_grad_(True)
    state = torch.from_numpy(np.asarray(state, np.float32))[None]
    q = learner.critic(learner.policy.actor_inputs(observations), a, state)[0].sum()
    (gradient,) = torch.autograd.grad(q, a)
    return float(gradient[0, building, slot])


def _env_gradient(env, reward, actions: np.ndarray, building: int, slot: int, delta: float, bounds,
                  discounted_return) -> float:
    returns, moved = [], []
    low, high = bounds[0][building, slot], bounds[1][building, slot]
    for sign in (1.0, -1.0):
        nudged = np.array(actions, copy=True)
        nudged[building, slot] = np.clip(nudged[building, slot] + sign * delta, low, high)
        moved.append(nudged[building, slot])
        returns.append(discounted_return(copy.deepcopy(env), copy.deepcopy(reward), nudged))
    span = moved[0] - moved[1]
    return (returns[0] - returns[1]) / span if span > 0 else 0.0
