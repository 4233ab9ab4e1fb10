"""Run a policy through a CityLearn episode (or window), deterministically, and collect what it did.

Any object with a ``layout`` (:class:`PolicyLayout`) and ``act(observations [agents, obs_width]) -> actions
[agents, action_width]`` is a policy here: the Triton policies, the local onnxruntime policy, the checkpoint's torch
actors, the reference controllers. A ``reference`` policy can be stepped in lockstep on the same observations; the
per-step max abs action difference is then recorded (parity).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from tqdm.auto import tqdm

from maddpg_core.errors import PolicyError
from maddpg_core.layout import PolicyLayout

from .citylearn_env import CityLearnAdapter
from .kpis import district_kpis, service_levels


class Policy(Protocol):
    layout: PolicyLayout

    def act(self, observations: np.ndarray) -> np.ndarray: ...


@dataclass
class EpisodeResult:
    name: str
    steps: int
    kpis: dict[str, float]
    service: dict[str, float]
    district_load: np.ndarray                  # [steps] district net electricity consumption, kWh
    env_seconds: float
    inference_seconds: float
    actions: np.ndarray | None = None          # [steps, agents, action_width] when recorded
    parity: np.ndarray | None = None           # [steps] max |policy - reference| per step
    extra: dict = field(default_factory=dict)

    @property
    def env_ms_per_step(self) -> float:
        return 1000.0 * self.env_seconds / max(self.steps, 1)

    @property
    def inference_ms_per_step(self) -> float:
        return 1000.0 * self.inference_seconds / max(self.steps, 1)

    @property
    def parity_max_abs_diff(self) -> float | None:
        return None if self.parity is None or self.parity.size == 0 else float(self.parity.max())


def run_episode(env, policy: Policy, *, reference: Policy | None = None, name: str = "policy",
                progress: bool = False, record_actions: bool = False,
                before_act: Callable[[], None] | None = None) -> EpisodeResult:
    """Reset ``env`` and step it to the end with ``policy``; the env's names are checked against the layout first.

    ``before_act`` runs before every policy call (simulators stepping in lockstep wait on a shared barrier there).
    A policy that fails (a server that stayed away longer than the client's retries) ends the episode with the same
    error type, saying at which step: there is no partial result.
    """
    adapter = CityLearnAdapter(policy.layout, env, what=name)
    if reference is not None:
        reference.layout.require_compatible(adapter.env_layout, what="the reference policy")
    observations, _ = env.reset()
    total = env.time_steps - 1
    actions_seen, parity = [], []
    env_seconds = inference_seconds = 0.0
    bar = tqdm(total=total, desc=name, unit="step", disable=not progress, leave=False)
    started_at = time.time()  # wall clock: comparable across the processes of a multi-simulator run
    step = 0
    while not env.terminated:
        step += 1
        row = adapter.observations_to_array(observations)
        if before_act is not None:
            before_act()
        started = time.perf_counter()
        try:
            actions = np.asarray(policy.act(row))
        except PolicyError as exc:
            bar.close()
            raise type(exc)(f"{name} failed at step {step} of {total}: {exc}") from exc
        inference_seconds += time.perf_counter() - started
        if reference is not None:
            parity.append(float(np.abs(actions - np.asarray(reference.act(row))).max()))
        if record_actions:
            actions_seen.append(actions)
        started = time.perf_counter()
        observations, *_ = env.step(adapter.actions_to_lists(actions))
        env_seconds += time.perf_counter() - started
        bar.update()
    bar.close()
    stepped_at = time.time()
    return EpisodeResult(
        name=name,
        steps=total,
        kpis=district_kpis(env),
        service=service_levels(env),
        district_load=np.asarray(env.net_electricity_consumption, dtype=np.float64)[:total],
        env_seconds=env_seconds,
        inference_seconds=inference_seconds,
        actions=np.stack(actions_seen) if record_actions and actions_seen else None,
        parity=np.asarray(parity) if reference is not None else None,
        extra={"started_at": started_at, "stepped_at": stepped_at},
    )
