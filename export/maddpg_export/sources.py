"""What can be exported: recognise a checkpoint file and turn it into a torch policy plus its layout.

Every source yields the same thing, a :class:`PolicySource`: a torch module mapping raw ``observations [batch, agents,
obs_width]`` to ``actions [batch, agents, action_width]`` with sanitising, normalisation, clipping and padding inside it,
the layout that describes it, and observations to validate the ONNX graph against (real env observations where the
source allows it).

Two kinds are recognised: this project's checkpoints (``maddpg-ctde``) and the seed project's CooperativeMADDPG
checkpoints (``seed-cooperative-maddpg``, see :mod:`maddpg_export.seed_cooperative`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maddpg_core.errors import CheckpointError
from maddpg_core.files import not_a_torch_file
from maddpg_core.layout import PolicyLayout
from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_training.bootstrap import rollout_observations
from maddpg_training.checkpoint import CHECKPOINT_FORMAT, checkpoint_from_payload, read_payload

from .seed_cooperative import NUMPY_ARRAY_GLOBALS, SEED_KIND, SeedCheckpoint, is_seed_checkpoint, needs_numpy_arrays

log = logging.getLogger(__name__)

# Steps of env rollout used as validation data when a checkpoint carries no observations of its own (one week).
VALIDATION_ROLLOUT_STEPS = 168


@dataclass
class PolicySource:
    kind: str
    layout: PolicyLayout
    policy: torch.nn.Module
    reference_observations: np.ndarray
    reference_description: str = "real env observations"  # what reference_observations are, for messages


def load_policy_source(path: str | os.PathLike, *, env_spec: EnvSpec | None = None) -> PolicySource:
    if Path(path).is_file() and (why := not_a_torch_file(path)):
        raise CheckpointError(f"{path} is not a checkpoint: {why}. Pass a .pt file written by `maddpg-citylearn "
                              f"train` or a seed-project CooperativeMADDPG checkpoint")
    payload, digest = read_payload(path, NUMPY_ARRAY_GLOBALS if _stores_numpy_arrays(path) else None)
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
            observations = collect_observations(policy, layout, env_spec)
        else:
            observations = observations.numpy()
        return PolicySource("maddpg-ctde", layout, policy, observations)
    if is_seed_checkpoint(payload):
        log.info("recognised a CooperativeMADDPG checkpoint of the seed project")
        seed = SeedCheckpoint.from_payload(payload, where=f"seed checkpoint {path}")
        if env_spec is not None:
            log.warning("--schema/--dataset are not used for seed checkpoints: their env (citylearn 2.5.0) is not "
                        "installed")
        # Validation data: the file carries no observations, and real ones would need the citylearn 2.5.0 env it was
        # trained on (citylearn 3.0.2's buildings have more observations than a 2.5.0 model takes). Parity of ONNX
        # and torch is a numerical property, so synthetic observations at the training data's scale (from the
        # checkpoint's own statistics) prove it; the layout records that this is what was used.
        layout = seed.layout(sha256=digest, checkpoint_file=Path(path).name)
        return PolicySource(SEED_KIND, layout, seed.build_policy(), seed.validation_observations(),
                            "synthetic observations at the checkpoint's own normalisation scale")
    raise CheckpointError(
        f"{path} is not a checkpoint this tool can export (keys: {', '.join(sorted(map(str, payload))[:8])}); "
        f"expected a maddpg-citylearn checkpoint from `maddpg-citylearn train` or a seed-project CooperativeMADDPG "
        f"checkpoint"
    )


def _stores_numpy_arrays(path: str | os.PathLike) -> bool:
    """Whether the file pickles numpy arrays (the seed format does): only then are their globals allow-listed.

    The pickle is inspected without loading it; if that fails, the strict load reports what is wrong with the file.
    """
    try:
        return needs_numpy_arrays(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - missing, truncated, not a zip: read_payload says which
        return False


def collect_observations(policy: torch.nn.Module, layout: PolicyLayout, env_spec: EnvSpec | None) -> np.ndarray:
    """Real observations for validation: roll ``policy`` through one week of the env it was trained on."""
    if env_spec is None:
        if not layout.dataset:
            raise CheckpointError(
                "the checkpoint carries no observations to validate against and names no dataset: "
                "pass --schema PATH or --dataset NAME"
            )
        env_spec = EnvSpec(schema=layout.dataset)
    spec = EnvSpec(schema=env_spec.schema, start=0, end=VALIDATION_ROLLOUT_STEPS - 1)
    log.info("collecting validation observations from %s (one week)", spec.dataset_name)
    env = spec.build()
    adapter = CityLearnAdapter(layout, env, what="the checkpoint")

    def act(row: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy(torch.from_numpy(row[None]))[0].numpy()

    return rollout_observations(env, adapter, act)
