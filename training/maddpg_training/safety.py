"""The guarantees the exported policy keeps whatever its actors learned: every car leaves charged, every appliance cycle
runs.

A learned actor can only be *asked* to charge cars; an operator needs it to be a property of the deployed model. So
the graph ends with a safety layer, computed from each building's own raw observations (decentralised, like the
actors):

* **EV charge floor**: the rule of :mod:`maddpg_evaluation.ev_service` (charge what can no longer wait; stays
  without a departure time within a day), here in torch. The actor may charge earlier and more, never less.
* **Appliance deadline**: a pending cycle that can start and has reached its latest start hour starts now.

Both only ever *raise* an action inside its bounds, so the layer cannot break the action contract; they read
sanitised observations, so NaN or 1e30 from a broken sensor cannot make them emit a non-finite action.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from maddpg_core.layout import PolicyLayout
from maddpg_evaluation import citylearn_names as names
from maddpg_evaluation.ev_service import EvServiceRule

APPLIANCE_TRIGGER = 1.0  # the appliance starts on any action above 0.5 (DeferrableAppliance.trigger_threshold)
# Bumped whenever the rules change what they do: cached teacher passes (trainer.py) were guarded by them.
RULES_VERSION = 4



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
    ev_rule: EvServiceRule = field(default_factory=EvServiceRule)

    def to_dict(self) -> dict:
        return {"chargers": [asdict(c) for c in self.chargers], "appliances": [asdict(a) for a in self.appliances],
                "ev_rule": self.ev_rule.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SafetySpec":
        return cls(chargers=tuple(ChargerSlot(**c) for c in data.get("chargers", ())),
                   appliances=tuple(ApplianceSlot(**a) for a in data.get("appliances", ())),
                   ev_rule=EvServiceRule(**data.get("ev_rule", {})))


def safety_spec_from_env(env, layout: PolicyLayout, *, ev_margin: float = 0.02, ev_pace: float = 1.0) -> SafetySpec:
    """Find every charger and appliance in ``layout`` and read the chargers' power limits from the CityLearn env."""
    powers = {}
    for building in env.buildings:
        for charger in building.electric_vehicle_chargers or []:
            powers[charger.charger_id] = (float(charger.max_charging_power), float(charger.min_charging_power or 0.0))
    chargers, appliances = [], []
    for i, agent in enumerate(layout.agents):
        obs, act = list(agent.observation_names or ()), list(agent.action_names or ())
        for name in obs:
            match = names.CHARGER_CONNECTED.match(name)
            if match and names.charger_action(match["id"]) in act and match["id"] in powers:
                car = {field: obs.index(names.car_observation(match["id"], field)) for field in names.CAR_FIELDS}
                chargers.append(ChargerSlot(
                    agent=i, action=act.index(names.charger_action(match["id"])), connected=obs.index(name),
                    departure_time=car["departure_time"], required_soc=car["required_soc_departure"],
                    soc=car["soc"], battery_capacity=car["battery_capacity"],
                    max_power_kw=powers[match["id"]][0], min_power_kw=powers[match["id"]][1]))
            match = names.APPLIANCE_CAN_START.match(name)
            if match and names.appliance_action(match["id"]) in act:
                appliances.append(ApplianceSlot(
                    agent=i, action=act.index(names.appliance_action(match["id"])),
                    pending=obs.index(names.appliance_observation(match["id"], "pending")), can_start=obs.index(name),
                    hours_until_latest_start=obs.index(names.appliance_observation(match["id"],
                                                                                   "hours_until_latest_start"))))
    rule = EvServiceRule(margin=ev_margin, hours_per_step=float(env.seconds_per_time_step) / 3600.0, pace=ev_pace)
    return SafetySpec(chargers=tuple(chargers), appliances=tuple(appliances), ev_rule=rule)


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
        rule = spec.ev_rule
        constant("ev_step_kwh", torch.tensor([float(rule.step_kwh(s.max_power_kw)) for s in c]))
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
        self.target_offset = rule.target_offset
        self.pace = rule.pace
        self.unknown_spread_steps = rule.unknown_spread_hours / rule.hours_per_step

    def ev_floor(self, flat_obs: torch.Tensor) -> torch.Tensor:
        """``[batch, chargers]``: the least charging fraction each charger must run at now
        (:meth:`maddpg_evaluation.ev_service.EvServiceRule.floor`, in torch)."""
        x = flat_obs[:, self.ev_obs]                                     # [batch, chargers, 5]
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        connected = x[..., 0] >= 0.5
        known = x[..., 1] >= 0.0                                          # -1: the stay has no departure time
        steps_after_this = torch.clamp(x[..., 1], 0.0, 1e4)             # departure_time: hours after this step
        target = torch.clamp(x[..., 2], 0.0, 1.0) + self.target_offset
        soc = torch.clamp(x[..., 3], 0.0, 1.0)
        capacity = torch.clamp(x[..., 4], 0.0, 1e3)
        needed_kwh = torch.clamp(target - soc, min=0.0) * capacity
        least_laxity = (needed_kwh - steps_after_this * self.pace * self.ev_step_kwh) / self.ev_step_kwh
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
