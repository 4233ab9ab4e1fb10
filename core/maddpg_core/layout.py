"""The tensor contract shared by the exported graph, Triton, the client and the env adapter.

One model takes ``observations`` FP32 ``[batch, agents, obs_width]`` (raw env values, zero-padded at the tail of each
agent's row) and returns ``actions`` FP32 ``[batch, agents, action_width]`` (each agent uses the first
``len(actions)`` slots; padded slots are 0). The :class:`PolicyLayout` says which building each agent row is, what each
observation and action slot means, and the action bounds. It travels with the model: in the checkpoint, and as JSON
in the Triton model config ``parameters`` under :data:`LAYOUT_PARAMETER`, so any client can read it from any server.

Widths are derived from the env the checkpoint was trained on, never hard-coded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import LayoutMismatchError

INPUT_NAME = "observations"
OUTPUT_NAME = "actions"
DEFAULT_MODEL_NAME = "maddpg_ctde"
LAYOUT_PARAMETER = "layout"
LAYOUT_FORMAT = "maddpg-citylearn.layout"
LAYOUT_VERSION = 1

# How an agent's shorter rows map onto the padded widths. Both this project's models and the seed project's use it:
# observations fill the first slots in env order and the rest are 0; an agent acts with the first len(actions) slots.
TAIL_PADDING = "tail"


@dataclass(frozen=True)
class AgentLayout:
    """One agent (building): what its observation and action slots mean.

    ``observation_names``/``action_names`` are ``None`` when the model does not record them (seed checkpoints): then
    only counts can be checked against an env.
    """

    building: str | None
    observation_names: tuple[str, ...] | None
    action_names: tuple[str, ...] | None
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.action_low) != len(self.action_high):
            raise ValueError(f"agent {self.building}: {len(self.action_low)} lower bounds but {len(self.action_high)} upper")
        if self.action_names is not None and len(self.action_names) != len(self.action_low):
            raise ValueError(f"agent {self.building}: {len(self.action_names)} action names but {len(self.action_low)} bounds")
        for lo, hi in zip(self.action_low, self.action_high):
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"agent {self.building}: action bounds [{lo}, {hi}] are not a finite interval")

    @property
    def action_count(self) -> int:
        return len(self.action_low)

    @property
    def observation_count(self) -> int | None:
        return None if self.observation_names is None else len(self.observation_names)


@dataclass(frozen=True)
class PolicyLayout:
    """Agents, padded widths and provenance of one policy. Immutable; serialises to and from JSON."""

    agents: tuple[AgentLayout, ...]
    obs_width: int
    action_width: int
    dataset: str | None = None
    citylearn_version: str | None = None
    padding: str = TAIL_PADDING
    # Provenance: checkpoint kind and digest, training summary. Free-form but JSON-serialisable.
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError("a layout needs at least one agent")
        if self.padding != TAIL_PADDING:
            raise ValueError(f"unknown padding convention {self.padding!r}; this version understands {TAIL_PADDING!r}")
        for agent in self.agents:
            if agent.observation_count is not None and agent.observation_count > self.obs_width:
                raise ValueError(f"agent {agent.building} has {agent.observation_count} observations > obs_width {self.obs_width}")
            if agent.action_count > self.action_width:
                raise ValueError(f"agent {agent.building} has {agent.action_count} actions > action_width {self.action_width}")

    # --- shapes ---------------------------------------------------------------------------------------------------
    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def observation_shape(self) -> tuple[int, int]:
        return (self.n_agents, self.obs_width)

    @property
    def action_shape(self) -> tuple[int, int]:
        return (self.n_agents, self.action_width)

    @property
    def building_names(self) -> tuple[str | None, ...]:
        return tuple(a.building for a in self.agents)

    def observation_mask(self) -> np.ndarray:
        """``[agents, obs_width]`` bool: True where a slot holds a real observation (all True when counts unknown)."""
        mask = np.zeros(self.observation_shape, dtype=bool)
        for i, agent in enumerate(self.agents):
            mask[i, : agent.observation_count if agent.observation_count is not None else self.obs_width] = True
        return mask

    def action_mask(self) -> np.ndarray:
        """``[agents, action_width]`` bool: True where a slot is a real action of that agent."""
        mask = np.zeros(self.action_shape, dtype=bool)
        for i, agent in enumerate(self.agents):
            mask[i, : agent.action_count] = True
        return mask

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)``, each ``[agents, action_width]`` float32; padded slots are ``[0, 0]``."""
        low = np.zeros(self.action_shape, dtype=np.float32)
        high = np.zeros(self.action_shape, dtype=np.float32)
        for i, agent in enumerate(self.agents):
            low[i, : agent.action_count] = agent.action_low
            high[i, : agent.action_count] = agent.action_high
        return low, high

    # --- comparison with an env -------------------------------------------------------------------------------------
    def first_difference(self, env: "PolicyLayout") -> str | None:
        """Describe the first way ``env`` (a layout derived from a live env) does not fit this model, or ``None``.

        Names are compared where the model records them; where it does not (seed checkpoints), only counts are: an
        env row longer than the model's width cannot be fed to it.
        """
        if env.n_agents != self.n_agents:
            return f"the env has {env.n_agents} buildings, the model was trained on {self.n_agents}"
        for i, (model_agent, env_agent) in enumerate(zip(self.agents, env.agents)):
            label = env_agent.building or f"agent {i}"
            if model_agent.building is not None and env_agent.building != model_agent.building:
                return f"agent {i}: the env has building {env_agent.building!r}, the model expects {model_agent.building!r}"
            diff = _first_name_difference("observation", label, model_agent.observation_names, env_agent.observation_names)
            if diff:
                return diff
            if model_agent.observation_names is None and (env_agent.observation_count or 0) > self.obs_width:
                return (
                    f"{label}: the env has {env_agent.observation_count} observations but the model takes at most "
                    f"{self.obs_width} (trained on citylearn {self.citylearn_version or 'unknown'}; "
                    f"this env is citylearn {env.citylearn_version or 'unknown'})"
                )
            diff = _first_name_difference("action", label, model_agent.action_names, env_agent.action_names)
            if diff:
                return diff
            if model_agent.action_names is None and env_agent.action_count > self.action_width:
                return f"{label}: the env has {env_agent.action_count} actions but the model outputs {self.action_width}"
        return None

    def require_compatible(self, env: "PolicyLayout", *, what: str = "the served model") -> None:
        """Raise :class:`LayoutMismatchError` naming the first difference between ``env`` and this model."""
        diff = self.first_difference(env)
        if diff is not None:
            raise LayoutMismatchError(
                f"the env does not fit {what}: {diff}. Use the dataset the model was trained on "
                f"({self.dataset or 'unknown'}, citylearn {self.citylearn_version or 'unknown'}) or export a model "
                f"trained on this env."
            )

    # --- (de)serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["agents"] = [_agent_to_dict(a) for a in self.agents]
        return {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, **body}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyLayout":
        if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
            raise LayoutMismatchError(
                "the model carries no maddpg-citylearn layout (expected a JSON object with "
                f"format={LAYOUT_FORMAT!r}); was it exported by `maddpg-citylearn export`?"
            )
        if data.get("version") != LAYOUT_VERSION:
            raise LayoutMismatchError(
                f"layout version {data.get('version')} is not understood by this client (it reads version "
                f"{LAYOUT_VERSION}); upgrade maddpg-citylearn"
            )
        try:
            agents = tuple(_agent_from_dict(a) for a in data["agents"])
            return cls(
                agents=agents,
                obs_width=int(data["obs_width"]),
                action_width=int(data["action_width"]),
                dataset=data.get("dataset"),
                citylearn_version=data.get("citylearn_version"),
                padding=data.get("padding", TAIL_PADDING),
                source=dict(data.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutMismatchError(f"the model's layout is malformed ({exc}); re-export the model") from exc

    @classmethod
    def from_json(cls, text: str) -> "PolicyLayout":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutMismatchError(f"the model's layout parameter is not valid JSON ({exc}); re-export the model") from exc
        return cls.from_dict(data)

    def with_source(self, **entries: Any) -> "PolicyLayout":
        return replace(self, source={**self.source, **entries})


def layout_from_names(
    building_names: Sequence[str],
    observation_names: Sequence[Sequence[str]],
    action_names: Sequence[Sequence[str]],
    action_low: Sequence[Sequence[float]],
    action_high: Sequence[Sequence[float]],
    *,
    dataset: str | None = None,
    citylearn_version: str | None = None,
) -> PolicyLayout:
    """Build a layout from per-building name lists; the padded widths are the per-agent maxima."""
    agents = tuple(
        AgentLayout(
            building=str(b),
            observation_names=tuple(map(str, obs)),
            action_names=tuple(map(str, act)),
            action_low=tuple(float(x) for x in lo),
            action_high=tuple(float(x) for x in hi),
        )
        for b, obs, act, lo, hi in zip(building_names, observation_names, action_names, action_low, action_high, strict=True)
    )
    return PolicyLayout(
        agents=agents,
        obs_width=max(len(a.observation_names or ()) for a in agents),
        action_width=max(a.action_count for a in agents),
        dataset=dataset,
        citylearn_version=citylearn_version,
    )


def _first_name_difference(kind: str, label: str, model: Iterable[str] | None, env: Iterable[str] | None) -> str | None:
    if model is None or env is None:
        return None
    model, env = list(model), list(env)
    for j, (m, e) in enumerate(zip(model, env)):
        if m != e:
            return f"{label}: {kind} {j} is {e!r} in the env but {m!r} in the model"
    if len(model) != len(env):
        return f"{label}: the env has {len(env)} {kind}s, the model {len(model)}"
    return None


def _agent_to_dict(agent: AgentLayout) -> dict[str, Any]:
    return {
        "building": agent.building,
        "observations": None if agent.observation_names is None else list(agent.observation_names),
        "actions": None if agent.action_names is None else list(agent.action_names),
        "action_low": list(agent.action_low),
        "action_high": list(agent.action_high),
    }


def _agent_from_dict(data: dict[str, Any]) -> AgentLayout:
    obs, act = data.get("observations"), data.get("actions")
    return AgentLayout(
        building=data.get("building"),
        observation_names=None if obs is None else tuple(obs),
        action_names=None if act is None else tuple(act),
        action_low=tuple(float(x) for x in data["action_low"]),
        action_high=tuple(float(x) for x in data["action_high"]),
    )
