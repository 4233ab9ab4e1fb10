"""The cooperative team reward: one number per step, shared by all 17 agents.

CityLearn's schema reward (``Electric_Vehicles_Reward_Function``) gives 0 to the 10 buildings without a charger, and no
CityLearn reward is a team reward. This one is built from what the evaluation measures (``env.evaluate()``):

* **cost** and **emissions**: each building's KPI is ``sum_t max(0, x_bt) / sum_t max(0, x0_bt)`` (``x0`` = no storage)
  and the district KPI is their mean. So each building's step term is its positive cost (emissions) minus the
  no-storage one, divided by that building's average no-storage value, averaged over buildings.
* **peak**: the district's daily and all-time peaks are maxima of the district net load; a smooth surrogate is the
  squared positive district load, minus the no-storage one, in units of the average no-storage load.
* **EV service**: what counts is the shortfall (fraction of capacity below the state of charge the EV asked for)
  when it leaves. Paid out densely instead: every step a plugged-in EV's shortfall grows is penalised, every step it
  shrinks is credited (at ``ev_charge_credit`` of the penalty rate). The critic sees the consequence of charging or
  draining a car at once instead of hours later (measured: with a penalty only at departure the policy learned to
  drain parked cars, service 0.006). The asymmetry makes "never drain a car below its target" a firm rule and
  "charge it" an opportunity taken when energy is cheap: no-control never charges cars, so every kWh charged raises
  the cost ratio.
* **appliance service**: a deferrable appliance cycle whose start window closed without it running.
* **stored energy** (shaping): ``gamma * phi(s') - phi(s)`` with ``phi`` = the energy in the batteries valued at
  what a kWh of each building's average import costs in the cost and emission terms. Potential-based shaping does not
  change which policy is best (Ng et al., 1999); it pays for charging when the energy goes in instead of hours later
  when it is used, which is what the critic otherwise has to discover by itself (measured without it: actors pinned
  at "discharge" with empty batteries).

Subtracting the no-storage terms does not change which policy is best: they depend only on the exogenous data (loads,
solar, prices), identical under every policy, so they only remove variance from the returns the critic must learn.

Reward = -(w_cost * cost + w_emissions * emissions + w_peak * peak + w_ev * ev + w_appliance * appliance)
         + w_storage * (gamma * phi(s') - phi(s)).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from maddpg_core.layout import PolicyLayout


@dataclass(frozen=True)
class TeamRewardWeights:
    cost: float = 1.0
    emissions: float = 1.0
    peak: float = 0.25
    # One unit of EV shortfall is a whole car battery (40-80 kWh): draining it must cost far more than that energy
    # saves in the building, or the policy learns to drain parked cars (measured at weight 5: it did) ...
    ev: float = 20.0
    # ... while charging towards the target earns only this fraction of that: enough to charge when energy is cheap
    # or free (solar surplus), not to charge at any price (measured at 1.0: EV service 0.47 but cost 1.7; at 0.1:
    # EV service 0.25, cost 1.30).
    ev_charge_credit: float = 0.01
    appliance: float = 2.0
    # The shaping values a stored kWh below an average import (round-trip losses, and the discount while it waits):
    # charging from the grid then costs more than it is credited, charging from surplus solar still pays.
    storage: float = 0.6

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

        return cls(
            consumption=stack("net_electricity_consumption_without_storage"),
            cost=stack("net_electricity_consumption_cost_without_storage"),
            emissions=stack("net_electricity_consumption_emission_without_storage"),
            battery_capacity=np.array([float(getattr(b.electrical_storage, "capacity", 0.0) or 0.0)
                                       if getattr(b, "electrical_storage", None) is not None else 0.0
                                       for b in env.buildings]),
        )

    def scales(self) -> "RewardScales":
        positive = lambda x: np.clip(x, 0.0, None)  # noqa: E731
        district = positive(self.consumption.sum(axis=1))
        return RewardScales(
            cost=np.maximum(positive(self.cost).mean(axis=0), 1e-6),
            emissions=np.maximum(positive(self.emissions).mean(axis=0), 1e-6),
            district_load=max(float(district.mean()), 1e-6),
            # A kWh drawn from storage instead of the grid saves about 1/(average import) of a building's step
            # in both the cost and the emission term, which average over the buildings.
            stored_kwh_value=2.0 / (np.maximum(positive(self.consumption).mean(axis=0), 1e-6) * self.cost.shape[1]),
        )


@dataclass(frozen=True)
class RewardScales:
    cost: np.ndarray        # [buildings] average positive no-storage cost per step
    emissions: np.ndarray   # [buildings] average positive no-storage emissions per step
    district_load: float    # average positive no-storage district load per step
    stored_kwh_value: np.ndarray  # [buildings] reward units per kWh held in the building's battery


@dataclass(frozen=True)
class _ChargerSlots:
    agent: int
    connected: int
    departure_time: int
    required_soc: int
    soc: int


@dataclass(frozen=True)
class _ApplianceSlots:
    agent: int
    can_start: int
    running: int


class TeamReward:
    """Computes the team reward of a step from the env's per-building series and the new observations."""

    def __init__(self, layout: PolicyLayout, baseline: BaselineSeries, weights: TeamRewardWeights = TeamRewardWeights(),
                 gamma: float = 0.99):
        self.layout = layout
        self.baseline = baseline
        self.scales = baseline.scales()
        self.weights = weights
        self.gamma = gamma
        self.chargers = _find_chargers(layout)
        self.appliances = _find_appliances(layout)
        self.battery_soc = _find_slots(layout, "electrical_storage_soc")

    def stored_energy(self, observations: np.ndarray) -> np.ndarray:
        """phi(s) per building: the energy in its battery, in reward units."""
        value = np.zeros(self.layout.n_agents)
        for agent, slot in self.battery_soc:
            value[agent] = (observations[agent, slot] * self.baseline.battery_capacity[agent]
                            * self.scales.stored_kwh_value[agent])
        return value

    def terms(self, t: int, consumption: np.ndarray, cost: np.ndarray, emissions: np.ndarray,
              observations: np.ndarray, previous: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """Unweighted terms of the step that produced series index ``t``: per building and the district peak.

        ``consumption``/``cost``/``emissions``: ``[buildings]`` values of that step under the policy;
        ``observations``/``previous``: ``[agents, obs_width]`` after and before the step. Penalties are >= 0 when
        worse than no storage; ``storage`` is the shaping credit.
        """
        b, n = self.baseline, self.layout.n_agents
        # Means over buildings, as the district KPIs are: each building carries 1/n of them.
        per_building = {
            "cost": (np.maximum(cost, 0) - np.maximum(b.cost[t], 0)) / self.scales.cost / n,
            "emissions": (np.maximum(emissions, 0) - np.maximum(b.emissions[t], 0)) / self.scales.emissions / n,
            "ev": np.zeros(n),
            "appliance": np.zeros(n),
            "storage": self.gamma * self.stored_energy(observations) - self.stored_energy(previous),
        }
        for c in self.chargers:
            now, before = observations[c.agent], previous[c.agent]
            # The same EV stayed plugged in through this step (it was not on its last connected step before).
            if now[c.connected] >= 0.5 and before[c.connected] >= 0.5 and before[c.departure_time] >= 0.5:
                change = _shortfall(now, c) - _shortfall(before, c)
                per_building["ev"][c.agent] += change if change > 0 else self.weights.ev_charge_credit * change
        for a in self.appliances:
            window_closed = previous[a.agent, a.can_start] >= 0.5 and observations[a.agent, a.can_start] < 0.5
            if window_closed and observations[a.agent, a.running] < 0.5 and previous[a.agent, a.running] < 0.5:
                per_building["appliance"][a.agent] += 1.0
        load = max(float(consumption.sum()), 0.0) / self.scales.district_load
        load0 = max(float(b.consumption[t].sum()), 0.0) / self.scales.district_load
        return per_building, load**2 - load0**2

    def split(self, per_building: dict[str, np.ndarray], peak: float) -> np.ndarray:
        """The weighted team reward as ``[buildings + 1]`` shares: each building's own terms, then the district's.

        The shares sum to the team reward. A building's share depends only on its own actions (its cost, emissions,
        car, appliance and battery); the district share (the peak) on everyone's. The critic learns one value per
        share, which tells each actor what its own action did.
        """
        w = self.weights
        own = (w.storage * per_building["storage"]
               - (w.cost * per_building["cost"] + w.emissions * per_building["emissions"]
                  + w.ev * per_building["ev"] + w.appliance * per_building["appliance"]))
        return np.append(own, -w.peak * peak)

    def components(self, t: int, consumption: np.ndarray, cost: np.ndarray, emissions: np.ndarray,
                   observations: np.ndarray, previous: np.ndarray) -> dict[str, float]:
        """Unweighted district totals of each term (for logs and tests)."""
        per_building, peak = self.terms(t, consumption, cost, emissions, observations, previous)
        return {**{name: float(values.sum()) for name, values in per_building.items()}, "peak": float(peak)}

    def reward(self, components: dict[str, float]) -> float:
        w = self.weights
        return (w.storage * components["storage"]
                - (w.cost * components["cost"] + w.emissions * components["emissions"] + w.peak * components["peak"]
                   + w.ev * components["ev"] + w.appliance * components["appliance"]))

    def step_reward(self, env, observations: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The step the env just took: its reward shares ``[buildings + 1]`` (summing to the team reward) and the
        unweighted district totals of each term. Reads the env's per-building series at that step."""
        t = env.time_step - 1
        buildings = env.buildings
        consumption = np.fromiter((b.net_electricity_consumption[t] for b in buildings), float, len(buildings))
        cost = np.fromiter((b.net_electricity_consumption_cost[t] for b in buildings), float, len(buildings))
        emissions = np.fromiter((b.net_electricity_consumption_emission[t] for b in buildings), float, len(buildings))
        per_building, peak = self.terms(t, consumption, cost, emissions, observations, previous)
        totals = {**{name: float(values.sum()) for name, values in per_building.items()}, "peak": float(peak)}
        return self.split(per_building, peak), totals


def _shortfall(row: np.ndarray, c: "_ChargerSlots") -> float:
    return max(0.0, float(row[c.required_soc] - row[c.soc]))


_CHARGER = re.compile(r"^electric_vehicle_charger_(?P<id>.+)_connected_state$")
_APPLIANCE = re.compile(r"^deferrable_appliance_(?P<id>.+)_can_start$")


def _find_chargers(layout: PolicyLayout) -> list[_ChargerSlots]:
    found = []
    for i, agent in enumerate(layout.agents):
        names = list(agent.observation_names or ())
        for name in names:
            match = _CHARGER.match(name)
            if not match:
                continue
            cid = match["id"]
            prefix = f"connected_electric_vehicle_at_charger_{cid}_"
            try:
                found.append(_ChargerSlots(
                    agent=i,
                    connected=names.index(name),
                    departure_time=names.index(prefix + "departure_time"),
                    required_soc=names.index(prefix + "required_soc_departure"),
                    soc=names.index(prefix + "soc"),
                ))
            except ValueError:
                continue  # a charger without the EV observations: no service term for it
    return found


def _find_slots(layout: PolicyLayout, name: str) -> list[tuple[int, int]]:
    return [(i, agent.observation_names.index(name)) for i, agent in enumerate(layout.agents)
            if agent.observation_names and name in agent.observation_names]


def _find_appliances(layout: PolicyLayout) -> list[_ApplianceSlots]:
    found = []
    for i, agent in enumerate(layout.agents):
        names = list(agent.observation_names or ())
        for name in names:
            match = _APPLIANCE.match(name)
            running = f"deferrable_appliance_{match['id']}_running" if match else None
            if match and running in names:
                found.append(_ApplianceSlots(agent=i, can_start=names.index(name), running=names.index(running)))
    return found
