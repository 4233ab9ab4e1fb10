"""The cooperative team reward: the evaluation's headline KPIs, decomposed exactly into per-step terms.

CityLearn's schema reward gives 0 to the 10 buildings without a charger, and no CityLearn reward is a team reward. The
district is judged by ``env.evaluate()`` (citylearn 3.0.2, ``internal/kpi.py``); over an episode of ``T`` steps:

* ``cost_total`` = mean over buildings of ``sum_t max(0, c_bt) / sum_t max(0, c0_bt)`` (``c0`` = the same building
  without storage); ``carbon_emissions_total`` likewise with emissions;
* ``daily_peak_average`` = mean over 24-step groups (from the window's start) of the district load's maximum,
  divided by the same for ``L0`` (the district without storage);
* ``all_time_peak_average`` = ``max_t L_t / max_t L0_t``.

Each of them is a sum of per-step terms, exactly:

* cost, building ``b``, step ``t``: ``(max(0, c_bt) - max(0, c0_bt)) / C0_b / n`` with ``C0_b = sum_t max(0, c0_bt)``;
* daily peak: the rise of the day's running maximum, ``(M_t - M_{t-1}) - (M0_t - M0_{t-1})``, over
  ``n_days * mean daily peak of L0`` (``M`` starts each day at 0, so its rises sum to the day's maximum);
* all-time peak: the rise of the episode's running maximum ``A``, likewise, over ``max L0``.

Summed over the episode, ``-scale *`` those terms give ``-scale * sum_k w_k (KPI_k - 1)``: maximising the return is
minimising the weighted KPIs, with nothing else in the reward to trade against them (the safety layer, not a
penalty, keeps the cars charged and the appliance served). ``scale`` is the episode length by default, so one step
carries about one KPI point's worth of a step and returns are comparable across windows. The no-storage terms depend
only on the data (CityLearn computes them from the same run: they move with the appliance but not with batteries or
chargers), so subtracting them changes no policy's ranking and only removes variance.

The peak terms are Markov only with the running maxima, which no building observes: :meth:`TeamReward.state` gives
them to the centralised critic. Shares: one per building (its cost and emissions: what its own actions change), then
the district's daily and all-time peak terms; they sum to the team reward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from maddpg_core.layout import PolicyLayout

DAY = 24  # the window of daily_peak_average (CityLearn's default: 24 steps from the window's start)
STATE_WIDTH = 5  # see TeamReward.state
PEAK_SHARES = ("daily_peak", "all_time_peak")


@dataclass(frozen=True)
class TeamRewardWeights:
    """How much each headline KPI counts (``balanced``: all 1). A KPI point is worth the same in every term."""

    cost: float = 1.0
    emissions: float = 1.0
    daily_peak: float = 1.0
    all_time_peak: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BaselineSeries:
    """The no-storage counterfactual of one episode: ``[steps, buildings]`` per quantity, aligned with env steps."""

    consumption: np.ndarray
    cost: np.ndarray
    emissions: np.ndarray
    battery_capacity: np.ndarray  # [buildings] kWh of each building's electrical storage (0 without one)

    @classmethod
    def from_env(cls, env) -> "BaselineSeries":
        """Read from an env that has run to the end of its episode (CityLearn fills these as it steps)."""
        def stack(attribute: str) -> np.ndarray:
            return np.stack([np.asarray(getattr(b, attribute), dtype=np.float64) for b in env.buildings], axis=1)

        steps = env.time_steps - 1
        return cls(
            consumption=stack("net_electricity_consumption_without_storage")[:steps],
            cost=stack("net_electricity_consumption_cost_without_storage")[:steps],
            emissions=stack("net_electricity_consumption_emission_without_storage")[:steps],
            battery_capacity=np.array([float(getattr(b.electrical_storage, "capacity", 0.0) or 0.0)
                                       if getattr(b, "electrical_storage", None) is not None else 0.0
                                       for b in env.buildings]),
        )

    @property
    def steps(self) -> int:
        return len(self.consumption)


@dataclass(frozen=True)
class StepSeries:
    """One env step's values per building: with the policy (``consumption``, ...) and without storage (``*0``)."""

    consumption: np.ndarray
    cost: np.ndarray
    emissions: np.ndarray
    consumption0: np.ndarray
    cost0: np.ndarray
    emissions0: np.ndarray

    @classmethod
    def read(cls, env, t: int) -> "StepSeries":
        def column(attribute: str) -> np.ndarray:
            return np.fromiter((getattr(b, attribute)[t] for b in env.buildings), float, len(env.buildings))

        return cls(*(column(f"net_electricity_consumption{kind}{suffix}")
                     for suffix in ("", "_without_storage") for kind in ("", "_cost", "_emission")))


class TeamReward:
    """Per-step shares of the KPI decomposition, for one episode at a time (call :meth:`reset` at its start)."""

    def __init__(self, layout: PolicyLayout, baseline: BaselineSeries,
                 weights: TeamRewardWeights = TeamRewardWeights(), scale: float | None = None):
        self.layout, self.weights = layout, weights
        self.n = layout.n_agents
        positive = np.clip
        self.cost_total0 = np.maximum(positive(baseline.cost, 0, None).sum(axis=0), 1e-9)
        self.emissions_total0 = positive(baseline.emissions, 0, None).sum(axis=0)
        district0 = baseline.consumption.sum(axis=1)
        days = [district0[i:i + DAY] for i in range(0, len(district0), DAY)]
        self.days = len(days)
        self.daily_peak0 = max(float(np.mean([d.max() for d in days])), 1e-9)
        self.all_time_peak0 = max(float(district0.max()), 1e-9)
        self.scale = float(baseline.steps if scale is None else scale)
        self.shares = self.n + len(PEAK_SHARES)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.day_max = self.day_max0 = 0.0
        self.all_max = self.all_max0 = 0.0

    def state(self) -> np.ndarray:
        """What the critic needs besides the observations (before the next step): the day's and the episode's
        running district maxima, with and without storage, over the baseline's peaks, and the phase within the day."""
        phase = (self.t % DAY) / DAY
        return np.array([self.day_max / self.daily_peak0, self.all_max / self.all_time_peak0,
                         (self.day_max - self.day_max0) / self.daily_peak0,
                         (self.all_max - self.all_max0) / self.all_time_peak0, phase], dtype=np.float32)

    def step(self, series: StepSeries) -> tuple[np.ndarray, dict[str, float]]:
        """Shares ``[buildings + 2]`` of the step just taken (they sum to the team reward) and the unweighted terms."""
        w = self.weights
        cost = (np.maximum(series.cost, 0) - np.maximum(series.cost0, 0)) / self.cost_total0 / self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            emissions = np.where(self.emissions_total0 > 0,
                                 (np.maximum(series.emissions, 0) - np.maximum(series.emissions0, 0))
                                 / np.maximum(self.emissions_total0, 1e-9) / self.n, 0.0)
        load, load0 = float(series.consumption.sum()), float(series.consumption0.sum())
        first_of_day, first = self.t % DAY == 0, self.t == 0
        day_rise = (load if first_of_day else max(load - self.day_max, 0.0)) \
            - (load0 if first_of_day else max(load0 - self.day_max0, 0.0))
        all_rise = (load if first else max(load - self.all_max, 0.0)) - (load0 if first else max(load0 - self.all_max0, 0.0))
        self.day_max = load if first_of_day else max(self.day_max, load)
        self.day_max0 = load0 if first_of_day else max(self.day_max0, load0)
        self.all_max = load if first else max(self.all_max, load)
        self.all_max0 = load0 if first else max(self.all_max0, load0)
        self.t += 1
        daily = day_rise / (self.days * self.daily_peak0)
        all_time = all_rise / self.all_time_peak0
        shares = -self.scale * np.concatenate([w.cost * cost + w.emissions * emissions,
                                               [w.daily_peak * daily, w.all_time_peak * all_time]])
        terms = {"cost": float(cost.sum()), "emissions": float(emissions.sum()), "daily_peak": daily,
                 "all_time_peak": all_time}
        return shares, terms

    def step_env(self, env) -> tuple[np.ndarray, dict[str, float]]:
        """:meth:`step` on the values CityLearn recorded for the step ``env`` just took."""
        return self.step(StepSeries.read(env, env.time_step - 1))
