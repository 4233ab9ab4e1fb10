"""One pass over a window of the env: who drives, what it produced (return, KPIs, service, transitions, labels)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_evaluation.kpis import district_kpis, headline_score, service_levels

from .bootstrap import Warmup
from .replay import ReplayBuffer
from .teachers import Teacher
from .team_reward import TeamReward

RECORDED = ("observations", "actions", "rewards", "next_observations", "state", "next_state")


@dataclass
class Window:
    """One training (or evaluation) window: its env, the translation to the model's arrays, its KPI baseline."""

    spec: EnvSpec
    warm: Warmup
    env: object
    adapter: CityLearnAdapter
    reward: TeamReward
    teacher: Teacher | None = None

    @property
    def label(self) -> str:
        return f"steps {self.spec.start or 0}..{self.spec.end if self.spec.end is not None else 'end'}"

    @property
    def first_step(self) -> int:
        return self.spec.start or 0

    def fresh(self) -> "Window":
        """The same window on a newly built env, for deterministic scoring. citylearn 3.0.2's reset() leaves some
        state behind that the observations show: the same weights scored 1.4355, 1.4409 and 1.4334 on three
        successive passes of one env (steps 0..600), and 1.4355 on a new one, which is what `evaluate` builds."""
        env = self.spec.build()
        return Window(spec=self.spec, warm=self.warm, env=env,
                      adapter=CityLearnAdapter(self.adapter.model_layout, env, what="the policy being trained"),
                      reward=TeamReward(self.adapter.model_layout, self.warm.baseline, self.reward.weights))


@dataclass
class Pass:
    """What one pass over a window produced."""

    driver: str
    steps: int
    team_return: float
    terms: dict[str, float]
    kpis: dict[str, float]
    service: dict[str, float]
    labels: tuple[np.ndarray, np.ndarray] | None = None       # (raw observations, teacher actions)
    record: dict[str, np.ndarray] | None = None               # observations, actions, state, rewards per step
    seconds: float = 0.0
    first_step: int = 0                                       # the window's first time step

    def summary(self) -> dict:
        return {"driver": self.driver, "steps": self.steps, "team_return": self.team_return, "terms": self.terms,
                "kpis": self.kpis, "service": self.service, "seconds": round(self.seconds, 1),
                "headline_score": headline_score(self.kpis)}


def rollout(window: Window, drive: Callable[[np.ndarray], np.ndarray], *, driver: str, episode: int = -1,
            buffer: ReplayBuffer | None = None, label_every: int = 0, record: bool = False,
            on_step: Callable[[], None] | None = None, progress: bool = False) -> Pass:
    """Step ``window``'s env to the end with ``drive`` (raw observation -> env actions).

    Every transition goes into ``buffer`` (when given) with its time step; with ``label_every`` > 0 the window's
    teacher labels every that many visited states; ``record`` keeps the per-step arrays; ``on_step`` runs after every
    step (the fine-tuning updates).
    """
    started = time.perf_counter()
    env, adapter, reward = window.env, window.adapter, window.reward
    raw_list, _ = env.reset()
    reward.reset()
    raw, state = adapter.observations_to_array(raw_list), reward.state()
    labelled_obs, labelled_act = [], []
    recorded = {key: [] for key in RECORDED}
    team_return, terms_sum, step = 0.0, {}, 0
    bar = tqdm(total=env.time_steps - 1, desc=driver, unit="step", disable=not progress, leave=False)
    while not env.terminated:
        if label_every and step % label_every == 0:
            labelled_obs.append(raw)
            labelled_act.append(window.teacher.actions(env, raw))
        actions = drive(raw)
        raw_list, *_ = env.step(adapter.actions_to_lists(actions))
        next_raw = adapter.observations_to_array(raw_list)
        shares, terms = reward.step_env(env)
        next_state = reward.state()
        if buffer is not None:
            buffer.add(raw, actions, shares, next_raw, state, next_state, episode, window.first_step + step)
        if record:
            for key, value in zip(RECORDED, (raw, actions, shares, next_raw, state, next_state)):
                recorded[key].append(value)
        team_return += float(shares.sum())
        for key, value in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value
        raw, state, step = next_raw, next_state, step + 1
        if on_step is not None:
            on_step()
        bar.update()
    bar.close()
    return Pass(
        driver=driver, steps=step, team_return=team_return, terms=terms_sum, kpis=district_kpis(env),
        service=service_levels(env),
        labels=(np.stack(labelled_obs), np.stack(labelled_act)) if labelled_obs else None,
        record={k: np.stack(v) for k, v in recorded.items()} if record else None,
        seconds=time.perf_counter() - started, first_step=window.first_step,
    )
