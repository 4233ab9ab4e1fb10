"""The seed project's CooperativeMADDPG checkpoints: recognise one, check every entry inference needs, and rebuild its
inference path as one torch module that exports to a single ONNX graph.

The format and the inference path are described in ``docs/seed-checkpoints.md``; the shapes below are that
description written as a table. Inference is centralised at execution time (the coordinator reads all 17 rows), so the
module maps ``[batch, agents, obs_dim]`` raw observations to ``[batch, agents, action_dim]`` actions:

1. NaN -> 0, +inf -> 1, -inf -> -1 (before normalising, as the seed does);
2. ``(obs - obs_mean) / sqrt(obs_var / obs_count + 1e-8)`` clipped to [-5, 5], one statistic shared by all agents;
3. coordinator: district aggregator (mean over agents) and multi-head attention over agents, fused into 32 hints;
4. actor ``i`` on ``concat(normalised obs_i, hint_i)``, tanh;
5. clip to [-1, 1] (each building then keeps its first ``len(action_space)`` values: the client's adapter does that).

The 17 actors are stacked (one batched matmul per layer, as in ``maddpg_training.networks``) so the graph stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from numpy.core.multiarray import _reconstruct
from torch import nn

from maddpg_core.errors import CheckpointError
from maddpg_core.layout import AgentLayout, PolicyLayout
from maddpg_training.networks import StackedLinear

SEED_KIND = "seed-cooperative-maddpg"
# What a pickled float64 numpy array needs (the seed's checkpoints store their observation statistics so), by the name
# the pickle uses: admitted only for files that need them (see sources.py); numpy 2 writes _reconstruct under
# numpy._core. Any other global is still refused.
NUMPY_ARRAY_GLOBALS = {
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.dtypes.Float64DType": np.dtypes.Float64DType,
}
# What the seed project trained on (its users' checkpoints say nothing about the env themselves).
SEED_CITYLEARN_VERSION = "2.5.0"
SEED_DATASET = "citylearn_challenge_2022_phase_all_plus_evs"

COORDINATOR_HIDDEN = 128   # H
ATTENTION_HEADS = 4
HINT_PART = 16             # the district part and the attention part of a hint
COORDINATION_DIM = 2 * HINT_PART
ACTOR_HIDDEN = 256
OBSERVATION_CLIP = 5.0
VARIANCE_EPSILON = 1e-8
# The seed builds its LayerNorms with torch defaults; the checkpoint stores no eps.
LAYER_NORM_EPS = 1e-5

# Every top-level key inference needs. ``maddpg_config`` is documented too but only recorded, never required.
REQUIRED_KEYS = ("n_agents", "obs_dim", "action_dim", "coordination_dim", "is_cooperative", "coordinator", "agents",
                 "obs_mean", "obs_var", "obs_count")
# Documented per-agent entries besides ``actor``: training state (critics, target networks, optimisers), not exported.
TRAINING_ONLY_AGENT_KEYS = ("critic", "target_actor", "target_critic", "actor_optim", "critic_optim")
# Weights that exist in the seed's state dicts but are not on the inference path: dropped by name before the strict
# load, so any *other* extra key (a different architecture) is still refused.
UNUSED_COORDINATOR_PREFIX = "mean_field."
UNUSED_ACTOR_PREFIX = "net_local."

PADDING_IN_WORDS = ("observations zero-padded at the tail of each building's row, in env order, up to obs_dim; "
                    "each building acts with the first len(action_space) of the action_dim outputs")
UNKNOWN_IN_WORDS = ("building names (agents are the env's buildings in env order), observation names, action names, "
                    "per-building observation and action counts: the seed checkpoint does not record them, so an env "
                    "is checked by counts only")
VALIDATION_DATA_IN_WORDS = ("synthetic observations around obs_mean at the checkpoint's normalisation scale and at "
                            "sqrt(obs_var): the checkpoint carries no observations and the citylearn 2.5.0 env it was "
                            "trained on does not fit the installed citylearn")


def is_seed_checkpoint(payload: Mapping[str, Any]) -> bool:
    """A dict that looks like the seed's format, even with a key missing (so the refusal can name that key)."""
    if "format" in payload:  # our own format (or a foreign one that names itself)
        return False
    return sum(key in payload for key in REQUIRED_KEYS) >= len(REQUIRED_KEYS) // 2


def needs_numpy_arrays(unsafe_globals: list[str]) -> bool:
    """Whether a file's non-default pickle globals include the numpy array ones the seed format stores."""
    return any(name in NUMPY_ARRAY_GLOBALS for name in unsafe_globals)


def coordinator_shapes(obs_dim: int) -> dict[str, tuple[int, ...]]:
    """The coordinator state_dict inference reads (``mean_field.*`` excluded), key -> shape."""
    h, part, c = COORDINATOR_HIDDEN, HINT_PART, COORDINATION_DIM
    shapes = {}
    shapes.update(_linear("district_aggregator.encoder.0", obs_dim, h))
    shapes.update(_norm("district_aggregator.encoder.1", h))
    shapes.update(_linear("district_aggregator.encoder.3", h, h))
    shapes.update(_linear("district_aggregator.aggregator.0", h, h))
    shapes.update(_linear("district_aggregator.aggregator.2", h, part))
    for encoder in ("query_encoder", "key_encoder", "value_encoder"):
        shapes.update(_linear(f"attention.{encoder}", obs_dim, h))
    shapes["attention.attention.in_proj_weight"] = (3 * h, h)
    shapes["attention.attention.in_proj_bias"] = (3 * h,)
    shapes.update(_linear("attention.attention.out_proj", h, h))
    shapes.update(_linear("attention.output_proj", h, h))
    shapes.update(_linear("attention_proj", h, part))
    shapes.update(_linear("fusion.0", c, c))
    shapes.update(_norm("fusion.1", c))
    shapes.update(_linear("fusion.3", c, c))
    return shapes


def actor_shapes(obs_dim: int, action_dim: int) -> dict[str, tuple[int, ...]]:
    """One actor's state_dict inference reads (``net_local.*`` excluded), key -> shape."""
    shapes = {}
    shapes.update(_linear("net.0", obs_dim + COORDINATION_DIM, ACTOR_HIDDEN))
    shapes.update(_norm("net.1", ACTOR_HIDDEN))
    shapes.update(_linear("net.3", ACTOR_HIDDEN, ACTOR_HIDDEN))
    shapes.update(_norm("net.4", ACTOR_HIDDEN))
    shapes.update(_linear("net.6", ACTOR_HIDDEN, action_dim))
    return shapes


def _linear(name: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def _norm(name: str, features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (features,), f"{name}.bias": (features,)}


@dataclass
class SeedCheckpoint:
    """The parts of a seed checkpoint that inference uses, checked against the documented format."""

    n_agents: int
    obs_dim: int
    action_dim: int
    coordinator: dict[str, torch.Tensor]
    actors: list[dict[str, torch.Tensor]]
    obs_mean: np.ndarray
    obs_var: np.ndarray
    obs_count: float
    maddpg_config: dict[str, Any]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], where: str = "seed checkpoint") -> "SeedCheckpoint":
        missing = [key for key in REQUIRED_KEYS if key not in payload]
        if missing:
            raise CheckpointError(f"{where} lacks key {missing[0]!r} (the CooperativeMADDPG format needs "
                                  f"{', '.join(REQUIRED_KEYS)}); re-save it from the seed project")
        n_agents, obs_dim, action_dim = (_positive_int(payload, key, where) for key in ("n_agents", "obs_dim", "action_dim"))
        if payload["coordination_dim"] != COORDINATION_DIM:
            raise CheckpointError(f"{where} has coordination_dim {payload['coordination_dim']!r}, the CooperativeMADDPG "
                                  f"coordinator produces {COORDINATION_DIM}: this is not a checkpoint of that model")
        if payload["is_cooperative"] is not True:
            raise CheckpointError(f"{where} has is_cooperative={payload['is_cooperative']!r}: only the cooperative "
                                  f"model (coordinator + hinted actors) is supported")
        agents = payload["agents"]
        if not isinstance(agents, (list, tuple)) or len(agents) != n_agents:
            found = len(agents) if isinstance(agents, (list, tuple)) else type(agents).__name__
            raise CheckpointError(f"{where} key 'agents' holds {found} entries, n_agents says {n_agents}")
        coordinator = _checked_state_dict(payload["coordinator"], "coordinator", coordinator_shapes(obs_dim),
                                          UNUSED_COORDINATOR_PREFIX, where)
        actors = []
        for i, agent in enumerate(agents):
            if not isinstance(agent, Mapping) or "actor" not in agent:
                raise CheckpointError(f"{where} lacks key agents[{i}]['actor'] (each of the {n_agents} agents needs "
                                      f"its actor state_dict)")
            actors.append(_checked_state_dict(agent["actor"], f"agents[{i}]['actor']",
                                              actor_shapes(obs_dim, action_dim), UNUSED_ACTOR_PREFIX, where))
        obs_mean = _checked_statistic(payload, "obs_mean", obs_dim, where)
        obs_var = _checked_statistic(payload, "obs_var", obs_dim, where)
        if (obs_var < 0).any():
            raise CheckpointError(f"{where} key 'obs_var' has negative entries (first at index "
                                  f"{int(np.argmax(obs_var < 0))}): not a variance")
        count = payload["obs_count"]
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count <= 0:
            raise CheckpointError(f"{where} key 'obs_count' is {count!r}, expected a positive finite number")
        config = payload.get("maddpg_config")
        return cls(n_agents, obs_dim, action_dim, coordinator, actors, obs_mean, obs_var, float(count),
                   dict(config) if isinstance(config, Mapping) else {})

    def build_policy(self) -> "SeedCooperativePolicy":
        policy = SeedCooperativePolicy(self.n_agents, self.obs_dim, self.action_dim)
        policy.load_seed(self)
        return policy.eval()

    def layout(self, *, sha256: str, checkpoint_file: str) -> PolicyLayout:
        """What the model is known to be, and what is not (see :data:`UNKNOWN_IN_WORDS`)."""
        agent = AgentLayout(building=None, observation_names=None, action_names=None,
                            action_low=(-1.0,) * self.action_dim, action_high=(1.0,) * self.action_dim)
        return PolicyLayout(
            agents=(agent,) * self.n_agents,
            obs_width=self.obs_dim,
            action_width=self.action_dim,
            dataset=SEED_DATASET,
            citylearn_version=SEED_CITYLEARN_VERSION,
            source={
                "kind": SEED_KIND,
                "checkpoint_sha256": sha256,
                "checkpoint_file": checkpoint_file,
                "padding_convention": PADDING_IN_WORDS,
                "unknown": UNKNOWN_IN_WORDS,
                "validation_observations": VALIDATION_DATA_IN_WORDS,
                "not_exported": "coordinator mean_field.*, actor net_local.*, critics, target networks, optimisers",
                "training": {"maddpg_config": _json_scalars(self.maddpg_config), "obs_count": self.obs_count},
            },
        )

    def validation_observations(self, rows: int = 1024, seed: int = 0) -> np.ndarray:
        """``[rows, agents, obs_dim]`` float32 synthetic observations at the scale of the training data.

        The file does not say whether ``obs_var`` is a per-feature variance or a sum of squares (the formula divides it
        by ``obs_count``), so half the rows spread at the scale inference divides by (the clip at +-5 is mostly not
        reached there: the whole network is exercised) and half at ``sqrt(obs_var)``.
        """
        rng = np.random.default_rng(seed)
        shape = (rows, self.n_agents, self.obs_dim)
        model_scale = np.sqrt(self.obs_var / self.obs_count + VARIANCE_EPSILON)
        spread = np.where(np.arange(rows)[:, None, None] < rows // 2, 2.0 * model_scale, np.sqrt(self.obs_var))
        return (self.obs_mean + rng.standard_normal(shape) * spread).astype(np.float32)


def _positive_int(payload: Mapping[str, Any], key: str, where: str) -> int:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} key {key!r} is {value!r}, expected a positive integer")
    return value


def _checked_statistic(payload: Mapping[str, Any], key: str, obs_dim: int, where: str) -> np.ndarray:
    value = payload[key]
    if not isinstance(value, (np.ndarray, torch.Tensor)):
        raise CheckpointError(f"{where} key {key!r} is a {type(value).__name__}, expected a numpy array of shape ({obs_dim},)")
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (obs_dim,):
        raise CheckpointError(f"{where} key {key!r} has shape {array.shape}, expected ({obs_dim},) (obs_dim)")
    if not np.isfinite(array).all():
        raise CheckpointError(f"{where} key {key!r} has non-finite entries (first at index "
                              f"{int(np.argmax(~np.isfinite(array)))})")
    return array


def _checked_state_dict(state: Any, name: str, expected: dict[str, tuple[int, ...]], unused_prefix: str,
                        where: str) -> dict[str, torch.Tensor]:
    """``state`` without its documented unused entries; every expected key present with its shape, nothing else."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} key {name} is a {type(state).__name__}, expected a state_dict")
    used = {k: v for k, v in state.items() if not str(k).startswith(unused_prefix)}
    for key, shape in expected.items():
        if key not in used:
            raise CheckpointError(f"{where} lacks {name} weight {key!r} (expected shape {shape})")
        value = used[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{where} {name} weight {key!r} is not a floating-point tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{where} {name} weight {key!r} has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where} {name} weight {key!r} has non-finite values")
    extra = sorted(set(map(str, used)) - set(expected))
    if extra:
        raise CheckpointError(f"{where} {name} has unexpected weight {extra[0]!r}: not the documented "
                              f"CooperativeMADDPG architecture")
    return {k: used[k].detach().to(torch.float32) for k in expected}


def _json_scalars(config: Mapping[str, Any]) -> dict[str, Any]:
    """The plain settings of ``maddpg_config`` (numbers, strings, booleans): what a layout can carry as JSON."""
    return {str(k): v for k, v in config.items() if isinstance(v, (bool, int, float, str)) and
            not (isinstance(v, float) and not math.isfinite(v))}


# --- the inference path as a graph-friendly module ---------------------------------------------------------------------
class AttentionOverAgents(nn.Module):
    """``torch.nn.MultiheadAttention(H, heads, batch_first=True)`` at inference, written out in matmuls.

    Parameter names are MultiheadAttention's, so the seed's weights load strictly; the explicit form exports to a few
    plain ONNX nodes instead of the exporter's rendering of the fused kernel.
    """

    def __init__(self, embed_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        h = query.shape[-1]
        # Rows [0, H), [H, 2H), [2H, 3H) of the packed projection are q, k, v. Slices (not chunk) so the exporter
        # folds them into three constant weights.
        q, k, v = (F.linear(x, self.in_proj_weight[i * h:(i + 1) * h], self.in_proj_bias[i * h:(i + 1) * h])
                   .unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [batch, agents, H] -> [batch, heads, agents, H/heads]
                   for i, x in enumerate((query, key, value)))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mixed = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out_proj(mixed.transpose(1, 2).flatten(2))


class SeedCoordinator(nn.Module):
    """Normalised observations of all agents -> one 32-wide hint per agent. Module names are the seed's."""

    def __init__(self, obs_dim: int):
        super().__init__()
        h, part, c = COORDINATOR_HIDDEN, HINT_PART, COORDINATION_DIM
        self.district_aggregator = nn.Module()
        self.district_aggregator.encoder = nn.Sequential(
            nn.Linear(obs_dim, h), nn.LayerNorm(h, eps=LAYER_NORM_EPS), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.district_aggregator.aggregator = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, part))
        self.attention = nn.Module()
        self.attention.query_encoder = nn.Linear(obs_dim, h)
        self.attention.key_encoder = nn.Linear(obs_dim, h)
        self.attention.value_encoder = nn.Linear(obs_dim, h)
        self.attention.attention = AttentionOverAgents(h, ATTENTION_HEADS)
        self.attention.output_proj = nn.Linear(h, h)
        self.attention_proj = nn.Linear(h, part)
        self.fusion = nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c, eps=LAYER_NORM_EPS), nn.ReLU(), nn.Linear(c, c))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        district = self.district_aggregator.aggregator(self.district_aggregator.encoder(z).mean(dim=1))
        district = district.unsqueeze(1).expand(-1, z.shape[1], -1)
        att = self.attention
        mixed = att.attention(att.query_encoder(z), att.key_encoder(z), att.value_encoder(z))
        attended = self.attention_proj(att.output_proj(mixed))
        return self.fusion(torch.cat([district, attended], dim=-1))


class StackedLayerNorm(nn.Module):
    """``n`` LayerNorms with their own affine parameters, agent-major ``[n, batch, features]``."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * self.weight + self.bias


class StackedSeedActors(nn.Module):
    """The seed's 17 hinted actors (``net``: Linear, LayerNorm, ReLU, Linear, LayerNorm, ReLU, Linear, Tanh) stacked.

    Attribute suffixes are the seed's ``net.<index>`` numbers.
    """

    def __init__(self, n_agents: int, in_features: int, action_dim: int):
        super().__init__()
        self.linear_0 = StackedLinear(n_agents, in_features, ACTOR_HIDDEN)
        self.norm_1 = StackedLayerNorm(n_agents, ACTOR_HIDDEN)
        self.linear_3 = StackedLinear(n_agents, ACTOR_HIDDEN, ACTOR_HIDDEN)
        self.norm_4 = StackedLayerNorm(n_agents, ACTOR_HIDDEN)
        self.linear_6 = StackedLinear(n_agents, ACTOR_HIDDEN, action_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)  # [batch, agents, features] -> agent-major
        h = torch.relu(self.norm_1(self.linear_0(h)))
        h = torch.relu(self.norm_4(self.linear_3(h)))
        return torch.tanh(self.linear_6(h)).transpose(0, 1)

    @staticmethod
    def stacked_state_dict(actors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-agent seed state dicts -> this module's state dict (Linear weights transposed to ``[in, out]``)."""
        state = {}
        for index in (0, 3, 6):
            state[f"linear_{index}.weight"] = torch.stack([a[f"net.{index}.weight"].T for a in actors])
            state[f"linear_{index}.bias"] = torch.stack([a[f"net.{index}.bias"][None] for a in actors])
        for index in (1, 4):
            for part in ("weight", "bias"):
                state[f"norm_{index}.{part}"] = torch.stack([a[f"net.{index}.{part}"][None] for a in actors])
        return state


class SeedCooperativePolicy(nn.Module):
    """Raw ``observations [batch, agents, obs_dim]`` -> ``actions [batch, agents, action_dim]`` in [-1, 1]."""

    def __init__(self, n_agents: int, obs_dim: int, action_dim: int):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_scale", torch.ones(obs_dim))
        self.coordinator = SeedCoordinator(obs_dim)
        self.actors = StackedSeedActors(n_agents, obs_dim + COORDINATION_DIM, action_dim)

    @torch.no_grad()
    def load_seed(self, seed: SeedCheckpoint) -> None:
        # The scale is formed in float64 like the seed's numpy statistics, then used in float32 like the served graph.
        self.obs_mean.copy_(torch.from_numpy(seed.obs_mean))
        self.obs_scale.copy_(torch.from_numpy(np.sqrt(seed.obs_var / seed.obs_count + VARIANCE_EPSILON)))
        self.coordinator.load_state_dict(seed.coordinator, strict=True)
        self.actors.load_state_dict(StackedSeedActors.stacked_state_dict(seed.actors), strict=True)

    def normalise(self, observations: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(observations, nan=0.0, posinf=1.0, neginf=-1.0)
        return torch.clamp((x - self.obs_mean) / self.obs_scale, -OBSERVATION_CLIP, OBSERVATION_CLIP)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        z = self.normalise(observations)
        hints = self.coordinator(z)
        actions = self.actors(torch.cat([z, hints], dim=-1))
        return torch.clamp(actions, -1.0, 1.0)

