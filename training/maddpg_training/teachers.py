"""Who the actors learn from before MADDPG refines them: a teacher labels the states the env is in.

A teacher answers ``actions(env, observations) -> [agents, action_width]`` (env scale, the model's padded layout) for
the env's *current* step, whatever controller brought the env there: that is what DAgger needs (the student drives,
the teacher labels what it visits). Two teachers:

* ``planner`` (default): the perfect-foresight receding-horizon LP of ``maddpg_evaluation.planner``, re-solved from
  the env's true state, with every car charged. It sees the future and the whole district; the students see neither,
  which is why they learn from its actions on their own states rather than copy its trajectory.
* ``rule``: self-consumption (store the solar surplus, cover imports from the battery), appliances started as soon
  as allowed, cars left to the safety layer. Instant, decentralised, and the baseline a learned policy must beat; the
  smoke configuration uses it so that tests never wait for an LP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from maddpg_core.layout import PolicyLayout
from maddpg_evaluation import citylearn_names as names
from maddpg_evaluation.ev_service import EvServiceRule

TEACHERS = ("planner", "rule")


class Teacher(Protocol):
    name: str

    def actions(self, env, observations: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class _RuleSlots:
    load: int
    solar: int
    battery_action: int | None
    appliance_actions: tuple[int, ...]


class SelfConsumptionRule:
    """Battery: charge the solar surplus, discharge what the building imports (as fractions of its nominal power).
    Appliances start when allowed; chargers idle (the safety layer charges the cars)."""

    name = "self-consumption rule"

    def __init__(self, layout: PolicyLayout, battery_power_kw: np.ndarray):
        self.layout = layout
        self.power = np.maximum(np.asarray(battery_power_kw, dtype=np.float64), 1e-6)
        self.slots = []
        for agent in layout.agents:
            observed, actions = list(agent.observation_names or ()), list(agent.action_names or ())
            needed = (names.NON_SHIFTABLE_LOAD, names.SOLAR_GENERATION)
            if any(name not in observed for name in needed):
                raise ValueError(f"{agent.building}: the self-consumption rule needs the observations {needed}")
            self.slots.append(_RuleSlots(
                load=observed.index(names.NON_SHIFTABLE_LOAD), solar=observed.index(names.SOLAR_GENERATION),
                battery_action=actions.index(names.BATTERY_ACTION) if names.BATTERY_ACTION in actions else None,
                appliance_actions=tuple(j for j, n in enumerate(actions)
                                        if n.startswith(names.APPLIANCE_ACTION_PREFIX))))
        self.low, self.high = layout.action_bounds()

    def act(self, observations: np.ndarray) -> np.ndarray:
        actions = np.zeros(self.layout.action_shape, dtype=np.float32)
        for i, slots in enumerate(self.slots):
            if slots.battery_action is not None:
                surplus = observations[i, slots.solar] - observations[i, slots.load]
                actions[i, slots.battery_action] = surplus / self.power[i]
            for j in slots.appliance_actions:
                actions[i, j] = 1.0
        return np.clip(actions, self.low, self.high)

    def actions(self, env, observations: np.ndarray) -> np.ndarray:
        return self.act(observations)


def battery_power(env) -> np.ndarray:
    """Each building's battery nominal power (kW; 0 without a battery): the battery action is a fraction of it."""
    return np.array([float(getattr(b.electrical_storage, "nominal_power", 0.0) or 0.0)
                     if getattr(b, "electrical_storage", None) is not None else 0.0 for b in env.buildings])


class PlannerTeacher:
    """The receding-horizon planner as a teacher (cars charged), built for one env window.

    Given the policy's EV service rule (its safety layer), the planner keeps its plans inside it: it demonstrates
    what the deployed policy can do, instead of plans the safety layer would overrule (measured on Aug-Sep before
    this: the planner's all-time peak 0.55 alone, 0.94 once the layer had forced the charging it had not planned).
    """

    name = "perfect-foresight planner"

    def __init__(self, env, *, horizon: int, objective: str, ev_rule: EvServiceRule | None = None):
        from maddpg_evaluation.planner import Planner

        self.planner = Planner(env, objective=objective, horizon=horizon, ev=True, ev_rule=ev_rule)
        self.name = f"planner ({objective}, {horizon} h, cars charged{', inside the EV rule' if ev_rule else ''})"

    def actions(self, env, observations: np.ndarray) -> np.ndarray:
        return np.asarray(self.planner.actions(env), dtype=np.float32)


def make_teacher(kind: str, env, layout: PolicyLayout, *, horizon: int = 48, objective: str = "balanced",
                 ev_rule: EvServiceRule | None = None) -> Teacher:
    if kind == "rule":
        return SelfConsumptionRule(layout, battery_power(env))
    if kind == "planner":
        return PlannerTeacher(env, horizon=horizon, objective=objective, ev_rule=ev_rule)
    raise ValueError(f"unknown teacher {kind!r}; choose one of {', '.join(TEACHERS)}")
