"""Networks of the cooperative MADDPG: 17 decentralised actors, one centralised twin critic, and the deployable policy.

All per-agent networks are *stacked*: agent ``i``'s weights are slice ``i`` of one tensor and every layer is one batched
matmul (``baddbmm``) over agents. That is the same maths as 17 separate MLPs, exports to ~a dozen ONNX nodes instead of
~170, and runs an update step several times faster than a Python loop over modules (see ``docs/model-card.md``).

Tensors inside the actors are *agent-major*: ``[agents, batch, features]``. The public interfaces take the contract's
batch-major ``[batch, agents, width]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from maddpg_core.layout import PolicyLayout

# Normalised observations are clipped to this many standard deviations: a sensor glitch (1e30, inf) cannot push an
# actor far outside what it saw in training.
OBSERVATION_CLIP = 5.0
# A feature whose training std is below this is treated as constant (std 1): no division by ~0.
MIN_STD = 1e-3


@dataclass(frozen=True)
class ActorSpec:
    """Architecture of the stacked actors (stored in checkpoints so export can rebuild them)."""

    hidden_sizes: tuple[int, ...] = (256, 256)

    def to_dict(self) -> dict:
        return {"hidden_sizes": list(self.hidden_sizes)}

    @classmethod
    def from_dict(cls, data: dict) -> "ActorSpec":
        return cls(hidden_sizes=tuple(int(h) for h in data["hidden_sizes"]))


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

    def __init__(self, layout: PolicyLayout):
        super().__init__()
        shape = layout.observation_shape
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("mask", torch.as_tensor(layout.observation_mask(), dtype=torch.float32))

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


class StackedActors(nn.Module):
    """One deterministic actor per building: normalised own observation -> tanh action in [-1, 1] per slot."""

    def __init__(self, layout: PolicyLayout, spec: ActorSpec):
        super().__init__()
        self.mlp = StackedMLP(layout.n_agents, layout.obs_width, spec.hidden_sizes, layout.action_width)
        self.register_buffer("action_mask", torch.as_tensor(layout.action_mask(), dtype=torch.float32))
        # Start near action 0 (DDPG's small final layer): no agent begins pinned at a bound.
        with torch.no_grad():
            self.mlp.layers[-1].weight.uniform_(-3e-3, 3e-3)
            self.mlp.layers[-1].bias.uniform_(-3e-3, 3e-3)

    def preactivation(self, z: torch.Tensor) -> torch.Tensor:
        """Actions before the tanh squashing, ``[batch, agents, action_width]``."""
        return self.mlp(z.transpose(0, 1)).transpose(0, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``[batch, agents, obs_width]`` normalised -> ``[batch, agents, action_width]`` in [-1, 1], padding 0."""
        return torch.tanh(self.preactivation(z)) * self.action_mask


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

    Decentralised execution: agent ``i``'s action depends only on agent ``i``'s observation row.
    """

    def __init__(self, layout: PolicyLayout, spec: ActorSpec = ActorSpec()):
        super().__init__()
        self.layout = layout
        self.spec = spec
        self.normaliser = ObservationNormaliser(layout)
        self.actors = StackedActors(layout, spec)
        self.scaler = ActionScaler(layout)

    def unit_actions(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actors(self.normaliser(observations))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.scaler(self.unit_actions(observations))


class TwinCentralCritic(nn.Module):
    """Centralised critic of CTDE: Q(all normalised observations, all unit actions), one value per reward share.

    The team reward is a sum of shares (each building's own terms, and the district's peak term: see
    ``team_reward.TeamReward.split``); the critic predicts the return of every share and the team's Q is their sum.
    Same inputs and the same objective as one scalar critic, but 18 learning targets instead of one: the share of a
    building responds to that building's action, which is the credit assignment MADDPG otherwise has to discover in a
    single number. Two independent critics (clipped double Q, TD3) are stacked into one batched MLP.
    """

    def __init__(self, layout: PolicyLayout, hidden_sizes: tuple[int, ...] = (256, 256)):
        super().__init__()
        in_features = layout.n_agents * (layout.obs_width + layout.action_width)
        self.shares = layout.n_agents + 1
        self.heads = StackedMLP(2, in_features, hidden_sizes, self.shares)

    def forward(self, z: torch.Tensor, unit_actions: torch.Tensor) -> torch.Tensor:
        """``[batch, agents, obs_width]`` and ``[batch, agents, action_width]`` -> ``[2, batch, shares]``."""
        x = torch.cat([z.flatten(1), unit_actions.flatten(1)], dim=1)
        return self.heads(x.unsqueeze(0).expand(2, -1, -1))
