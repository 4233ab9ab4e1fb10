"""Networks of the cooperative MADDPG: 17 decentralised actors, one centralised twin critic, and the deployable policy.

All per-agent networks are *stacked*: agent ``i``'s weights are slice ``i`` of one tensor and every layer is one batched
matmul (``baddbmm``) over agents. That is the same maths as 17 separate MLPs, exports to ~a dozen ONNX nodes instead of
~170, and runs an update step several times faster than a Python loop over modules (see ``docs/model-card.md``).

Tensors inside the actors are *agent-major*: ``[agents, batch, features]``. The public interfaces take the contract's
batch-major ``[batch, agents, width]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from maddpg_core.layout import PolicyLayout
from maddpg_evaluation.citylearn_names import (
    BATTERY_SOC,
    HOUR,
    NET_ELECTRICITY_CONSUMPTION,
    NON_SHIFTABLE_LOAD,
    SOLAR_GENERATION,
)
from maddpg_evaluation.ev_service import EvServiceRule

from .safety import SafetyLayer, SafetySpec

# Normalised observations are clipped to this many standard deviations: a sensor glitch (1e30, inf) cannot push an
# actor far outside what it saw in training.
OBSERVATION_CLIP = 5.0
# A feature whose training std is below this is treated as constant (std 1): no division by ~0.
MIN_STD = 1e-3


FEATURES = ("hour_cycle", "ev_slack", "district", "district_ev")
# Observations that name the season rather than the situation: the month, the weather and its forecasts. Held-out
# months bring values of these the training months never had (measured: a clone reading them fitted its training
# labels to a mean squared error of 0.0008 and November-January's to 0.047). ``ActorSpec.ignore = ("season",)``
# leaves them out of what the actors read; solar generation and the loads, which the weather acts through, stay.
OBSERVATION_GROUPS = {
    "season": ("month", "outdoor_dry_bulb_temperature", "outdoor_relative_humidity", "diffuse_solar_irradiance",
               "direct_solar_irradiance"),
    # The building's net consumption of the last step includes what its own battery and chargers did then: an echo
    # of the actor's previous action. A clone that reads it can copy the teacher's last action instead of learning
    # why (the copycat problem of behaviour cloning), and on its own trajectory it copies its own errors. The loads
    # and solar generation it is made of stay.
    "own_actions": (NET_ELECTRICITY_CONSUMPTION,),
}
# The district signal (feature ``district``): what the planner knows about the rest of the district now and a
# building does not. Computed in the graph from all rows, the same numbers broadcast to every actor.
DISTRICT_SIGNALS = ("base_load_kw", "net_load_kw", "ev_need_kwh", "cars_connected", "least_ev_slack_days",
                    "battery_soc")
# Feature ``district_ev``: the district's cars only. Loads and charge follow the season (held-out winter loads are
# values the training months rarely show); the cars' energy need, how many are parked and the least slack do not.
DISTRICT_EV_SIGNALS = ("ev_need_kwh", "cars_connected", "least_ev_slack_days")
# Which district signals each district feature broadcasts (at most one of them per actor).
DISTRICT_FEATURES = {"district": DISTRICT_SIGNALS, "district_ev": DISTRICT_EV_SIGNALS}


@dataclass(frozen=True)
class ActorSpec:
    """Architecture of the stacked actors (stored in checkpoints so export can rebuild them).

    ``features`` are computed inside the graph from the raw observations and appended to each building's
    normalised row (see :class:`ObservationFeatures`); () is the plain architecture of format-1 checkpoints.
    ``hour_cycle`` and ``ev_slack`` read the building's own row only; ``district`` and ``district_ev`` read every row.
    """

    hidden_sizes: tuple[int, ...] = (256, 256)
    features: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()          # groups of OBSERVATION_GROUPS the actors do not read (set to their mean)
    ensemble: int = 1                     # actors per building, each fitted on its own, their actions averaged

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise ValueError(f"ensemble = {self.ensemble}: a building needs at least one actor")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown actor feature(s) {unknown}; this version computes {list(FEATURES)}")
        if len(set(self.features) & set(DISTRICT_FEATURES)) > 1:
            raise ValueError(f"features {list(self.features)}: choose one district signal of {list(DISTRICT_FEATURES)}")
        unknown = sorted(set(self.ignore) - set(OBSERVATION_GROUPS))
        if unknown:
            raise ValueError(f"unknown observation group(s) to ignore {unknown}; choose from {list(OBSERVATION_GROUPS)}")

    @property
    def decentralised(self) -> bool:
        """Whether actor ``i`` reads building ``i``'s row only."""
        return not set(self.features) & set(DISTRICT_FEATURES)

    def ignored(self, name: str) -> bool:
        """Whether the actors leave observation ``name`` out (a group's names and their ``_predicted_k``)."""
        return any(name == base or name.startswith(base + "_predicted")
                   for group in self.ignore for base in OBSERVATION_GROUPS[group])

    def to_dict(self) -> dict:
        data = {"hidden_sizes": list(self.hidden_sizes), "features": list(self.features), "ignore": list(self.ignore)}
        if self.ensemble != 1:  # one actor per building writes what checkpoints before ensembles wrote
            data["ensemble"] = self.ensemble
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ActorSpec":
        return cls(hidden_sizes=tuple(int(h) for h in data["hidden_sizes"]),
                   features=tuple(str(f) for f in data.get("features", ())),
                   ignore=tuple(str(g) for g in data.get("ignore", ())), ensemble=int(data.get("ensemble", 1)))


class StackedLinear(nn.Module):
    """``n`` independent linear layers applied as one batched matmul: ``[n, batch, in] -> [n, batch, out]``."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        # nn.Linear's default initialisation, per stacked member.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class StackedMLP(nn.Module):
    """``n`` MLPs with ReLU between layers, evaluated together (agent-major in and out)."""

    def __init__(self, n: int, in_features: int, hidden_sizes: tuple[int, ...], out_features: int):
        super().__init__()
        sizes = (in_features, *hidden_sizes, out_features)
        self.layers = nn.ModuleList(StackedLinear(n, a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class ObservationNormaliser(nn.Module):
    """Raw env observations -> finite, standardised, clipped, padding-masked actor inputs.

    NaN becomes the feature's mean (0 after standardising); +-inf and huge values saturate at +-OBSERVATION_CLIP.
    Statistics are per agent and per slot, frozen after the warm-up rollout that estimated them.
    """

    def __init__(self, layout: PolicyLayout, spec: ActorSpec = ActorSpec()):
        super().__init__()
        shape = layout.observation_shape
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        # Padding slots, and the observations the spec ignores, read as 0: their mean.
        mask = layout.observation_mask()
        for i, agent in enumerate(layout.agents):
            for j, name in enumerate(agent.observation_names or ()):
                mask[i, j] &= not spec.ignored(name)
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))

    @torch.no_grad()
    def set_statistics(self, mean: np.ndarray, std: np.ndarray) -> None:
        mask = self.mask.bool()
        mean = torch.as_tensor(mean, dtype=torch.float32) * mask
        std = torch.as_tensor(std, dtype=torch.float32)
        std = torch.where(mask & (std >= MIN_STD), std, torch.ones_like(std))
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        z = (observations - self.mean) / self.std
        z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
        return torch.clamp(z, -OBSERVATION_CLIP, OBSERVATION_CLIP) * self.mask


def _slots(layout: PolicyLayout, name: str) -> tuple[list[int], list[float]]:
    """Per agent, the observation slot called ``name`` (0 when absent) and whether it is there."""
    found = [agent.observation_names.index(name) if agent.observation_names and name in agent.observation_names
             else -1 for agent in layout.agents]
    return [max(i, 0) for i in found], [float(i >= 0) for i in found]


class ObservationFeatures(nn.Module):
    """What an actor reads besides its normalised observations, computed inside the graph from raw observations.

    * ``hour_cycle`` (own row): sin and cos of the hour of day (23:00 and 00:00 are neighbours, which a normalised
      hour hides);
    * ``ev_slack`` (own row): per charger of the building, the hours a connected car can still wait before the
      safety layer's floor must charge it (``d + 1 - needed / energy per step``), in days, clipped to [-1, 2]; 0
      without a car, 1 for a stay without a departure time. The actor cannot see the future, but it can see how
      urgent each car is;
    * ``district`` (every row, the same values for every actor): the district's base load (non-shiftable load minus
      solar) and net load, the energy the connected cars still need, how many are connected, the least EV slack in
      the district, the batteries' mean state of charge (``DISTRICT_SIGNALS``), standardised with statistics of the
      warm-up pass (stored with the weights). A building cannot see that every other car is charging too; with this
      it can;
    * ``district_ev`` (every row, the same for every actor): the cars' three of those signals only
      (``DISTRICT_EV_SIGNALS``), the ones that do not follow the season.

    Agent-major widths: every agent gets the same number of columns (chargers padded with zeros).
    """

    def __init__(self, layout: PolicyLayout, names: tuple[str, ...], safety: SafetySpec | None):
        super().__init__()
        self.names = names
        hour, has_hour = _slots(layout, HOUR)
        self.register_buffer("hour_slot", torch.tensor(hour), persistent=False)
        self.register_buffer("has_hour", torch.tensor(has_hour), persistent=False)
        chargers = list(safety.chargers) if safety is not None else []
        per_agent = max([sum(1 for c in chargers if c.agent == i) for i in range(layout.n_agents)], default=0)
        district = [name for name in names if name in DISTRICT_FEATURES]
        self.charger_columns = per_agent if "ev_slack" in names or district else 0
        self.ev_columns = per_agent if "ev_slack" in names else 0
        # [agents, charger_columns, 5] observation slots (-1: no charger in that column) and energy per step.
        slots = torch.full((layout.n_agents, max(self.charger_columns, 1), 5), -1, dtype=torch.long)
        energy = torch.ones(layout.n_agents, max(self.charger_columns, 1))
        filled = [0] * layout.n_agents
        for c in chargers if self.charger_columns else []:
            k = filled[c.agent]
            slots[c.agent, k] = torch.tensor([c.connected, c.departure_time, c.required_soc, c.soc, c.battery_capacity])
            energy[c.agent, k] = float(safety.ev_rule.step_kwh(c.max_power_kw))
            filled[c.agent] += 1
        self.register_buffer("ev_slots", slots.clamp_min(0), persistent=False)
        self.register_buffer("ev_present", (slots[..., 0] >= 0).float(), persistent=False)
        self.register_buffer("ev_step_kwh", energy, persistent=False)
        self.target_offset = (safety.ev_rule if safety is not None else EvServiceRule()).target_offset
        self.district = bool(district)
        # Which of the DISTRICT_SIGNALS the actors read (indices), none without a district feature.
        self.district_signals_read = DISTRICT_FEATURES[district[0]] if district else ()
        self.register_buffer("district_index", torch.tensor([DISTRICT_SIGNALS.index(signal)
                                                             for signal in self.district_signals_read],
                                                            dtype=torch.long), persistent=False)
        if self.district:
            for name, observation in (("load", NON_SHIFTABLE_LOAD), ("solar", SOLAR_GENERATION),
                                      ("net", NET_ELECTRICITY_CONSUMPTION), ("soc", BATTERY_SOC)):
                slot, present = _slots(layout, observation)
                self.register_buffer(f"{name}_slot", torch.tensor(slot), persistent=False)
                self.register_buffer(f"has_{name}", torch.tensor(present), persistent=False)
            # Standardisation of the district signals, fitted on the warm-up pass (set_district_statistics).
            self.register_buffer("district_mean", torch.zeros(len(self.district_signals_read)))
            self.register_buffer("district_std", torch.ones(len(self.district_signals_read)))
        self.width = (2 if "hour_cycle" in names else 0) + self.ev_columns + len(self.district_signals_read)

    def _column(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``[batch, agents]``: each agent's observation ``name`` (0 where it has none), bounded."""
        index = getattr(self, f"{name}_slot").view(1, -1, 1).expand(x.shape[0], -1, 1)
        return torch.clamp(torch.gather(x, 2, index)[..., 0], -1e4, 1e4) * getattr(self, f"has_{name}")

    def _chargers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per charger column ``[batch, agents, columns]``: a car connected, the kWh it still needs, its slack."""
        batch, agents = x.shape[0], x.shape[1]
        index = self.ev_slots.reshape(1, agents, -1).expand(batch, -1, -1)
        picked = torch.gather(x, 2, index).reshape(batch, agents, self.charger_columns, 5)
        connected = (picked[..., 0] >= 0.5) & (self.ev_present > 0)
        known = picked[..., 1] >= 0.0
        steps_left = torch.clamp(picked[..., 1], 0.0, 1e4) + 1.0
        target = torch.clamp(picked[..., 2], 0.0, 1.0) + self.target_offset
        needed = torch.clamp(target - torch.clamp(picked[..., 3], 0.0, 1.0), min=0.0) * torch.clamp(picked[..., 4], 0.0, 1e3)
        slack = torch.clamp((steps_left - needed / self.ev_step_kwh) / 24.0, -1.0, 2.0)
        slack = torch.where(known, slack, torch.ones_like(slack))  # no departure time: these stays are long
        return connected, torch.where(connected, needed, torch.zeros_like(needed)), slack

    def district_signals(self, observations: torch.Tensor) -> torch.Tensor:
        """``[batch, signals read]`` in physical units, before standardisation."""
        x = torch.where(torch.isnan(observations), torch.zeros_like(observations), observations)
        return self._district(x, self._chargers(x) if self.charger_columns else None)

    def _district(self, x: torch.Tensor, chargers: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """The district signals the actors read, of sanitised observations, given their chargers (see _chargers)."""
        base = (self._column(x, "load") - self._column(x, "solar")).sum(dim=1)
        net = self._column(x, "net").sum(dim=1)
        soc = self._column(x, "soc").sum(dim=1) / self.has_soc.sum().clamp_min(1.0)
        if chargers is not None:
            connected, needed, slack = chargers
            need = needed.sum(dim=(1, 2))
            cars = connected.float().sum(dim=(1, 2))
            least = torch.where(connected, slack, torch.full_like(slack, 2.0)).flatten(1).min(dim=1).values
        else:
            need = cars = torch.zeros_like(base)
            least = torch.full_like(base, 2.0)
        return torch.stack([base, net, need, cars, least, soc], dim=-1).index_select(-1, self.district_index)

    @torch.no_grad()
    def set_district_statistics(self, observations: np.ndarray) -> None:
        """Standardise the district signals with their mean and std over ``[steps, agents, width]`` observations."""
        if not self.district:
            return
        signals = self.district_signals(torch.as_tensor(observations, dtype=torch.float32)).double()
        self.district_mean.copy_(signals.mean(dim=0).float())
        std = signals.std(dim=0).float()
        self.district_std.copy_(torch.where(std >= MIN_STD, std, torch.ones_like(std)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """``[batch, agents, obs_width]`` raw -> ``[batch, agents, width]``."""
        x = torch.where(torch.isnan(observations), torch.zeros_like(observations), observations)
        parts = []
        if "hour_cycle" in self.names:
            index = self.hour_slot.view(1, -1, 1).expand(x.shape[0], -1, 1)
            angle = torch.clamp(torch.gather(x, 2, index), -1e3, 1e3) * (2 * math.pi / 24.0)
            parts += [torch.sin(angle) * self.has_hour.view(1, -1, 1), torch.cos(angle) * self.has_hour.view(1, -1, 1)]
        # Computed once for the EV slack and the district signal alike.
        chargers = self._chargers(x) if self.charger_columns else None
        if self.ev_columns:
            connected, _, slack = chargers
            parts.append(torch.where(connected, slack, torch.zeros_like(slack)) * self.ev_present)
        if self.district:
            z = torch.clamp((self._district(x, chargers) - self.district_mean) / self.district_std,
                            -OBSERVATION_CLIP, OBSERVATION_CLIP)
            parts.append(z.unsqueeze(1).expand(-1, x.shape[1], -1))
        return torch.cat(parts, dim=-1) if parts else x[..., :0]


class StackedActors(nn.Module):
    """One deterministic actor per building: normalised own observation (+ features) -> tanh action per slot.

    With ``spec.ensemble = K`` each building has K actors, stacked member-major (member k of agent i is MLP
    ``k * agents + i``), fitted each on its own minibatches (``members``); the policy's action is their mean. Every
    member reads building i's row only, so the mean is as decentralised as one actor.
    """

    def __init__(self, layout: PolicyLayout, spec: ActorSpec, in_features: int | None = None):
        super().__init__()
        width = layout.obs_width if in_features is None else in_features
        self.ensemble = spec.ensemble
        self.mlp = StackedMLP(layout.n_agents * spec.ensemble, width, spec.hidden_sizes, layout.action_width)
        self.register_buffer("action_mask", torch.as_tensor(layout.action_mask(), dtype=torch.float32))
        # Start near action 0 (DDPG's small final layer): no agent begins pinned at a bound.
        with torch.no_grad():
            self.mlp.layers[-1].weight.uniform_(-3e-3, 3e-3)
            self.mlp.layers[-1].bias.uniform_(-3e-3, 3e-3)

    def members(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``[members, batch, agents, width]`` (member k reads ``z[k]``) -> each member's actions
        ``[members, batch, agents, action_width]`` in [-1, 1], padding 0."""
        k, batch, agents, width = z.shape
        x = z.permute(0, 2, 1, 3).reshape(k * agents, batch, width)
        out = self.mlp(x).reshape(k, agents, batch, -1).permute(0, 2, 1, 3)
        return torch.tanh(out) * self.action_mask

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``[batch, agents, obs_width]`` normalised -> ``[batch, agents, action_width]`` in [-1, 1], padding 0."""
        if self.ensemble == 1:  # the graph of one actor per building, as versions 1-3 were exported
            return torch.tanh(self.mlp(z.transpose(0, 1)).transpose(0, 1)) * self.action_mask
        return self.members(z.unsqueeze(0).expand(self.ensemble, *z.shape)).mean(dim=0)


class ActionScaler(nn.Module):
    """Unit actions in [-1, 1] -> env actions: the same numbers, clipped to each slot's bounds.

    Clipping rather than stretching [-1, 1] onto [low, high] keeps 0 meaning "do nothing" in every slot: an actor at
    rest (tanh 0) leaves batteries, chargers and appliances alone. (Stretching would make the rest point of a [0, 1]
    slot 0.5: every EV charged at half power; measured: cost ratio 1.5.) Padded slots have bounds [0, 0]: always 0.
    """

    def __init__(self, layout: PolicyLayout):
        super().__init__()
        low, high = layout.action_bounds()
        self.register_buffer("low", torch.as_tensor(low))
        self.register_buffer("high", torch.as_tensor(high))

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(unit, self.low), self.high)


class PolicyNetwork(nn.Module):
    """What gets exported: raw ``observations [batch, agents, obs_width]`` -> ``actions [batch, agents, action_width]``.

    normalise (+ features) -> 17 stacked actors -> clip to each slot's bounds -> safety layer (every car leaves
    charged, every appliance cycle runs; see ``safety.py``). Without the ``district`` feature, execution is
    decentralised: agent ``i``'s action depends only on agent ``i``'s observation row, safety layer included. With it,
    every actor also reads the same few district aggregates, computed in the graph from all rows.
    """

    def __init__(self, layout: PolicyLayout, spec: ActorSpec = ActorSpec(), safety: SafetySpec | None = None):
        super().__init__()
        self.layout = layout
        self.spec = spec
        self.safety_spec = safety
        self.normaliser = ObservationNormaliser(layout, spec)
        self.features = ObservationFeatures(layout, spec.features, safety)
        self.actors = StackedActors(layout, spec, layout.obs_width + self.features.width)
        self.scaler = ActionScaler(layout)
        self.safety = SafetyLayer(layout, safety) if safety is not None else None

    def actor_inputs(self, observations: torch.Tensor) -> torch.Tensor:
        """``[batch, agents, obs_width + features]``: what each actor (and the centralised critic) reads."""
        z = self.normaliser(observations)
        return torch.cat([z, self.features(observations)], dim=-1) if self.features.width else z

    def guard(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Env actions after the safety layer (the identity without one)."""
        return actions if self.safety is None else self.safety(observations, actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.guard(observations, self.scaler(self.actors(self.actor_inputs(observations))))


def widened(policy: PolicyNetwork, district: str, observations: np.ndarray) -> PolicyNetwork:
    """``policy`` with every actor also reading the district feature ``district`` (see ``ObservationFeatures``): its
    columns come last in what an actor reads and their first-layer weights start at 0, so the actions are the same
    until training moves them. The signals are standardised over ``observations`` ``[steps, agents, width]``."""
    if district not in DISTRICT_FEATURES:
        raise ValueError(f"{district!r} is not a district feature; choose one of {list(DISTRICT_FEATURES)}")
    spec = replace(policy.spec, features=(*policy.spec.features, district))
    wide = PolicyNetwork(policy.layout, spec, policy.safety_spec)
    state, first = wide.state_dict(), "actors.mlp.layers.0.weight"
    for name, value in policy.state_dict().items():
        if name == first:
            state[name] = torch.cat([value, torch.zeros_like(state[name][:, value.shape[1]:])], dim=1)
        elif state[name].shape != value.shape:
            raise ValueError(f"{name}: {tuple(value.shape)} does not fit the widened policy's {tuple(state[name].shape)}")
        else:
            state[name] = value
    wide.load_state_dict(state)
    wide.features.set_district_statistics(observations)
    return wide.train(policy.training)


class TwinCentralCritic(nn.Module):
    """Centralised critic of CTDE: Q(every actor's inputs, every applied action, district state), one value per share.

    The team reward is a sum of shares (each building's cost and emissions, and the district's peak terms: see
    ``team_reward.TeamReward``); the critic predicts the return of every share and the team's Q is their sum. Same
    objective as one scalar critic, but one learning target per share: a building's share responds to that building's
    action, which is the credit assignment MADDPG otherwise has to discover in a single number. The district state
    (running daily and all-time peaks, the district load) is what makes the peak terms Markov: no single building
    observes it, but the critic may (centralised training). Two critics (clipped double Q, TD3) are stacked into one
    batched MLP.
    """

    def __init__(self, layout: PolicyLayout, inputs_per_agent: int, shares: int, state_width: int = 0,
                 hidden_sizes: tuple[int, ...] = (256, 256)):
        super().__init__()
        in_features = layout.n_agents * (inputs_per_agent + layout.action_width) + state_width
        self.shares = shares
        self.heads = StackedMLP(2, in_features, hidden_sizes, shares)

    def forward(self, inputs: torch.Tensor, actions: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, agents, inputs]``, ``[batch, agents, action_width]``, ``[batch, state]`` -> ``[2, batch, shares]``."""
        parts = [inputs.flatten(1), actions.flatten(1)] + ([state] if state is not None and state.shape[1] else [])
        x = torch.cat(parts, dim=1)
        return self.heads(x.unsqueeze(0).expand(2, -1, -1))
