"""The guarantees the exported policy keeps whatever its actors learned: every car leaves charged, every appliance cycle
runs.

A learned actor can only be *asked* to charge cars; an operator needs it to be a property of the deployed model. So
the graph ends with a safety layer, computed from each building's own raw observations (decentralised, like the
actors):

* **EV charge floor.** For a connected car with ``d`` hours to departure the charger has ``d + 1`` steps left (the
  step at ``departure_time == 0`` still charges: its state of charge is the one CityLearn scores). If the energy the
  car still needs to reach its departure target cannot be delivered in the ``d`` steps after this one at full power,
  the charger runs now at the fraction that keeps it deliverable ("charge what can no longer wait"; least laxity).
  The actor may charge earlier and more (when energy is cheap or solar), never less. The target is the acceptable
  level CityLearn counts (required SOC - ``EV_SERVICE_TOLERANCE``) plus ``margin``; energy per step is the charger's
  power times a conservative efficiency (measured here: 0.834-0.852 from grid to car across charger powers, so 0.80).
  A floor below the charger's minimum power would deliver nothing: it is raised to that minimum.
  Some stays start without a departure time (``departure_time`` -1 while connected: 105 stays a year on five chargers
  of the shared dataset, 33-67 h long). CityLearn's KPI scores such a stay twice: once when its departure countdown
  appears (25-57 h after arrival, counted in the charger files), as if the car left then, and once at the real
  departure. So the car must be charged within about a day without knowing when that day ends: while its departure
  is unknown, the floor charges ``needed / unknown_departure_spread_hours`` (6) per step, which leaves less than
  2% of its battery to go after 24 h from any arrival charge. (Charging it at full power at once instead is a spike
  the district's peaks pay for: the planner's all-time peak on Aug-Sep went from 0.55 to 1.34.)
* **Appliance deadline.** A pending cycle that can start and has reached its latest start hour starts now.

Both only ever *raise* an action inside its bounds, so the layer cannot break the action contract; they read
sanitised observations, so NaN or 1e30 from a broken sensor cannot make them emit a non-finite action.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from maddpg_core.layout import PolicyLayout

# CityLearn 3.0.2 counts a departure as acceptable when SOC >= required - 0.05 (internal/kpi.py, service_tolerance).
EV_SERVICE_TOLERANCE = 0.05
DEFAULT_EV_MARGIN = 0.02
# Grid-to-car efficiency assumed by the floor; the measured one is higher, so the floor errs towards charging early.
DEFAULT_EV_EFFICIENCY = 0.80
# (5/6)^24 of the need is left after 24 h: under 2% of the battery from an arrival SOC of 0.2 (see above).
DEFAULT_UNKNOWN_DEPARTURE_SPREAD_HOURS = 6.0
# Bumped whenever the rules below change what they do: cached teacher passes (trainer.py) were guarded by them.
RULES_VERSION = 3
APPLIANCE_TRIGGER = 1.0  # the appliance starts on any action above 0.5 (DeferrableAppliance.trigger_threshold)

_CHARGER_STATE = re.compile(r"^electric_vehicle_charger_(?P<id>.+)_connected_state$")
_APPLIANCE_CAN_START = re.compile(r"^deferrable_appliance_(?P<id>.+)_can_start$")


@dataclass(frozen=True)
class ChargerSlot:
    agent: int
    action: int           # the charger's action slot in the agent's row
    connected: int        # observation slots of the agent's row
    departure_time: int
    required_soc: int
    soc: int
    battery_capacity: int
    max_power_kw: float
    min_power_kw: float


@dataclass(frozen=True)
class ApplianceSlot:
    agent: int
    action: int
    pending: int
    can_start: int
    hours_until_latest_start: int


@dataclass(frozen=True)
class SafetySpec:
    """Where the guarded slots are and what the chargers can do. Stored in checkpoints; rebuilt by export."""

    chargers: tuple[ChargerSlot, ...] = ()
    appliances: tuple[ApplianceSlot, ...] = ()
    ev_margin: float = DEFAULT_EV_MARGIN
    ev_efficiency: float = DEFAULT_EV_EFFICIENCY
    unknown_departure_spread_hours: float = DEFAULT_UNKNOWN_DEPARTURE_SPREAD_HOURS
    hours_per_step: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"chargers": [asdict(c) for c in self.chargers], "appliances": [asdict(a) for a in self.appliances],
                "ev_margin": self.ev_margin, "ev_efficiency": self.ev_efficiency,
                "unknown_departure_spread_hours": self.unknown_departure_spread_hours,
                "hours_per_step": self.hours_per_step,
                "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict) -> "SafetySpec":
        return cls(chargers=tuple(ChargerSlot(**c) for c in data.get("chargers", ())),
                   appliances=tuple(ApplianceSlot(**a) for a in data.get("appliances", ())),
                   ev_margin=float(data.get("ev_margin", DEFAULT_EV_MARGIN)),
                   ev_efficiency=float(data.get("ev_efficiency", DEFAULT_EV_EFFICIENCY)),
                   unknown_departure_spread_hours=float(data.get("unknown_departure_spread_hours",
                                                                 DEFAULT_UNKNOWN_DEPARTURE_SPREAD_HOURS)),
                   hours_per_step=float(data.get("hours_per_step", 1.0)), extra=dict(data.get("extra") or {}))


def safety_spec_from_env(env, layout: PolicyLayout, *, ev_margin: float = DEFAULT_EV_MARGIN,
                         ev_efficiency: float = DEFAULT_EV_EFFICIENCY) -> SafetySpec:
    """Find every charger and appliance in ``layout`` and read the chargers' power limits from the CityLearn env."""
    powers = {}
    for building in env.buildings:
        for charger in building.electric_vehicle_chargers or []:
            powers[charger.charger_id] = (float(charger.max_charging_power), float(charger.min_charging_power or 0.0))
    chargers, appliances = [], []
    for i, agent in enumerate(layout.agents):
        obs, act = list(agent.observation_names or ()), list(agent.action_names or ())
        for name in obs:
            match = _CHARGER_STATE.match(name)
            if match and f"electric_vehicle_storage_{match['id']}" in act and match["id"] in powers:
                car = f"connected_electric_vehicle_at_charger_{match['id']}_"
                chargers.append(ChargerSlot(
                    agent=i, action=act.index(f"electric_vehicle_storage_{match['id']}"), connected=obs.index(name),
                    departure_time=obs.index(car + "departure_time"), required_soc=obs.index(car + "required_soc_departure"),
                    soc=obs.index(car + "soc"), battery_capacity=obs.index(car + "battery_capacity"),
                    max_power_kw=powers[match["id"]][0], min_power_kw=powers[match["id"]][1]))
            match = _APPLIANCE_CAN_START.match(name)
            if match and f"deferrable_appliance_{match['id']}" in act:
                prefix = f"deferrable_appliance_{match['id']}_"
                appliances.append(ApplianceSlot(
                    agent=i, action=act.index(f"deferrable_appliance_{match['id']}"), pending=obs.index(prefix + "pending"),
                    can_start=obs.index(name), hours_until_latest_start=obs.index(prefix + "hours_until_latest_start")))
    return SafetySpec(chargers=tuple(chargers), appliances=tuple(appliances), ev_margin=ev_margin,
                      ev_efficiency=ev_efficiency, hours_per_step=float(env.seconds_per_time_step) / 3600.0)


class SafetyLayer(nn.Module):
    """``(raw observations [batch, agents, obs_width], actions [batch, agents, action_width]) -> actions``.

    Gathers the slots it reads by flat index and writes its floors back with a constant scatter matrix: a handful of
    ONNX nodes, whatever the number of chargers.
    """

    def __init__(self, layout: PolicyLayout, spec: SafetySpec):
        super().__init__()
        self.spec = spec
        obs_width, action_width, n = layout.obs_width, layout.action_width, layout.n_agents
        _, high = layout.action_bounds()

        def flat_obs(agent: int, slot: int) -> int:
            return agent * obs_width + slot

        def scatter(slots: list[tuple[int, int]]) -> torch.Tensor:
            matrix = torch.zeros(len(slots), n * action_width)
            for k, (agent, slot) in enumerate(slots):
                matrix[k, agent * action_width + slot] = 1.0
            return matrix

        def constant(name: str, value: torch.Tensor) -> None:
            # Derived from the spec and the layout, so not part of the state dict: checkpoints store the spec.
            self.register_buffer(name, value, persistent=False)

        c = spec.chargers
        constant("ev_obs", torch.tensor([[flat_obs(s.agent, getattr(s, f)) for f in (
            "connected", "departure_time", "required_soc", "soc", "battery_capacity")] for s in c],
            dtype=torch.long).reshape(len(c), 5))
        constant("ev_step_kwh", torch.tensor([s.max_power_kw * spec.ev_efficiency * spec.hours_per_step for s in c]))
        constant("ev_min_fraction", torch.tensor(
            [min(1.0, s.min_power_kw / s.max_power_kw + 0.01) if s.min_power_kw > 0 else 0.0 for s in c]))
        constant("ev_high", torch.tensor([float(high[s.agent, s.action]) for s in c]))
        constant("ev_scatter", scatter([(s.agent, s.action) for s in c]))
        a = spec.appliances
        constant("app_obs", torch.tensor([[flat_obs(s.agent, getattr(s, f)) for f in (
            "pending", "can_start", "hours_until_latest_start")] for s in a], dtype=torch.long).reshape(len(a), 3))
        constant("app_high", torch.tensor([float(high[s.agent, s.action]) for s in a]))
        constant("app_scatter", scatter([(s.agent, s.action) for s in a]))
        guarded = (self.ev_scatter.sum(0) + self.app_scatter.sum(0)) > 0
        constant("guarded", guarded)
        self.active = bool(guarded.any())  # a plain bool: the exported graph has no data-dependent branch
        self.target_offset = spec.ev_margin - EV_SERVICE_TOLERANCE
        self.unknown_spread_steps = spec.unknown_departure_spread_hours / spec.hours_per_step

    def ev_floor(self, flat_obs: torch.Tensor) -> torch.Tensor:
        """``[batch, chargers]``: the least charging fraction each charger must run at now."""
        x = flat_obs[:, self.ev_obs]                                     # [batch, chargers, 5]
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        connected = x[..., 0] >= 0.5
        known = x[..., 1] >= 0.0                                          # -1: the stay has no departure time
        steps_after_this = torch.clamp(x[..., 1], 0.0, 1e4)             # departure_time: hours after this step
        target = torch.clamp(x[..., 2], 0.0, 1.0) + self.target_offset
        soc = torch.clamp(x[..., 3], 0.0, 1.0)
        capacity = torch.clamp(x[..., 4], 0.0, 1e3)
        needed_kwh = torch.clamp(target - soc, min=0.0) * capacity
        least_laxity = (needed_kwh - steps_after_this * self.ev_step_kwh) / self.ev_step_kwh
        spread = needed_kwh / (self.unknown_spread_steps * self.ev_step_kwh)
        fraction = torch.clamp(torch.where(known, least_laxity, spread), 0.0, 1.0)
        fraction = torch.where(fraction > 0, torch.maximum(fraction, self.ev_min_fraction), fraction)
        return torch.where(connected, torch.minimum(fraction, self.ev_high), torch.zeros_like(fraction))

    def appliance_start(self, flat_obs: torch.Tensor) -> torch.Tensor:
        """``[batch, appliances]``: 1 where a pending cycle must start at this step, else 0."""
        x = flat_obs[:, self.app_obs]
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        due = (x[..., 0] >= 0.5) & (x[..., 1] >= 0.5) & (x[..., 2] < 0.5)
        return torch.where(due, torch.clamp(torch.full_like(x[..., 0], APPLIANCE_TRIGGER), max=self.app_high),
                           torch.zeros_like(x[..., 0]))

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return actions
        batch = observations.shape[0]
        flat_obs = observations.reshape(batch, -1)
        flat = actions.reshape(batch, -1)
        floors = self.ev_floor(flat_obs) @ self.ev_scatter + self.appliance_start(flat_obs) @ self.app_scatter
        guarded = torch.maximum(flat, floors)
        return torch.where(self.guarded, guarded, flat).reshape(actions.shape)
