"""What can be exported: recognise a checkpoint file and turn it into a torch policy plus its layout.

Every source yields the same thing, a :class:`PolicySource`: a torch module mapping raw ``observations [batch, agents,
obs_width]`` to ``actions [batch, agents, action_width]`` with sanitising, normalisation, clipping and padding inside it,
the layout that describes it, and real env observations to validate the ONNX graph against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from maddpg_client.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_client.errors import CheckpointError
from maddpg_client.layout import PolicyLayout

from maddpg_training.bootstrap import rollout_observations
from maddpg_training.checkpoint import CHECKPOINT_FORMAT, checkpoint_from_payload, read_payload

# Steps of env rollout used as validation data when a checkpoint carries no observations of its own (one week).
VALIDATION_ROLLOUT_STEPS = 168


@dataclass
class PolicySource:
    kind: str
    layout: PolicyLayout
    policy: torch.nn.Module
    reference_observations: np.ndarray


def load_policy_source(path: str | os.PathLike, *, env_spec: EnvSpec | None = None,
                       say: Callable[[str], None] = lambda _: None) -> PolicySource:
    payload, digest = read_payload(path)
    if payload.get("format") == CHECKPOINT_FORMAT:
        checkpoint = checkpoint_from_payload(payload, path=Path(path), sha256=digest)
        layout = checkpoint.layout.with_source(
            kind="maddpg-ctde",
            checkpoint_sha256=digest,
            checkpoint_file=Path(path).name,
            training=checkpoint.summary,
        )
        policy = checkpoint.build_policy()
        observations = checkpoint.reference_observations
        if observations is None:
            observations = collect_observations(policy, layout, env_spec, say)
        else:
            observations = observations.numpy()
        return PolicySource("maddpg-ctde", layout, policy, observations)
    raise CheckpointError(
        f"{path} is not a checkpoint this tool can export (keys: {', '.join(sorted(map(str, payload))[:8])}); "
        f"expected a maddpg-citylearn checkpoint from `maddpg-citylearn train`"
    )


def collect_observations(policy: torch.nn.Module, layout: PolicyLayout, env_spec: EnvSpec | None,
                         say: Callable[[str], None]) -> np.ndarray:
    """Real observations for validation: roll ``policy`` through one week of the env it was trained on."""
    if env_spec is None:
        if not layout.dataset:
            raise CheckpointError(
                "the checkpoint carries no observations to validate against and names no dataset: "
                "pass --schema PATH or --dataset NAME"
            )
        env_spec = EnvSpec(schema=layout.dataset)
    spec = EnvSpec(schema=env_spec.schema, start=0, end=VALIDATION_ROLLOUT_STEPS - 1)
    say(f"collecting validation observations from {spec.dataset_name} (one week)")
    env = spec.build()
    adapter = CityLearnAdapter(layout, env, what="the checkpoint")

    def act(row: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy(torch.from_numpy(row[None]))[0].numpy()

    return rollout_observations(env, adapter, act)
