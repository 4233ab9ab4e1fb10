"""The checkpoint format: one ``torch.save`` of plain containers and tensors, loadable with ``weights_only=True``.

Format ``maddpg-citylearn.checkpoint`` version 2 (version 1, without ``safety``, is still read)::

    format, format_version     identify the file (anything else is refused as foreign)
    layout                     PolicyLayout as a JSON string (building, observation and action names, bounds, widths)
    actor_spec                 architecture needed to rebuild the PolicyNetwork (hidden sizes, in-graph features)
    safety                     SafetySpec as a plain dict (guarded charger and appliance slots), or None
    policy                     PolicyNetwork state_dict: normaliser statistics + stacked actor weights
    reference_observations     [n, agents, obs_width] float32 real env observations, used by export to validate
    trainer                    critic, target networks, optimisers, counters, config (for --resume); may be None
    summary                    JSON-able training summary (episodes, env steps, wall time, KPIs)

Writes are atomic (temp file + rename in the same directory): a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from maddpg_core.errors import CheckpointError
from maddpg_core.files import atomic_write, not_a_torch_file, sha256_file
from maddpg_core.layout import PolicyLayout

from .networks import ActorSpec, PolicyNetwork
from .safety import SafetySpec

CHECKPOINT_FORMAT = "maddpg-citylearn.checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Checkpoint:
    layout: PolicyLayout
    actor_spec: ActorSpec
    policy: dict[str, torch.Tensor]
    reference_observations: torch.Tensor | None = None
    safety: SafetySpec | None = None
    trainer: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # Set on load: where it came from and its sha256, for provenance in the exported layout.
    path: Path | None = None
    sha256: str | None = None

    def build_policy(self) -> PolicyNetwork:
        """The deployable torch policy with this checkpoint's weights, in eval mode."""
        policy = PolicyNetwork(self.layout, self.actor_spec, self.safety)
        try:
            policy.load_state_dict(self.policy, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {self.path or ''} has weights that do not match its own layout "
                f"({self.layout.n_agents} agents x {self.layout.obs_width} obs -> {self.layout.action_width} actions, "
                f"hidden {list(self.actor_spec.hidden_sizes)}): {_first_line(exc)}"
            ) from exc
        return policy.eval()


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically to ``path`` (parents created). Returns the path."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "layout": checkpoint.layout.to_json(),
        "actor_spec": checkpoint.actor_spec.to_dict(),
        "safety": None if checkpoint.safety is None else checkpoint.safety.to_dict(),
        "policy": {k: v.detach().cpu().contiguous() for k, v in checkpoint.policy.items()},
        "reference_observations": (
            None if checkpoint.reference_observations is None else checkpoint.reference_observations.detach().cpu()
        ),
        "trainer": checkpoint.trainer,
        "summary": json.loads(json.dumps(checkpoint.summary)),  # plain JSON types only: weights_only must load it
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def read_payload(path: str | os.PathLike, extra_globals: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """``torch.load(weights_only=True)`` with errors that say what is wrong. Returns (payload, sha256).

    ``extra_globals`` (pickle name -> object) are admitted besides tensors and plain containers: export passes the
    numpy array globals the seed format needs. Any other global is still refused.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the .pt file written by `maddpg-citylearn train`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory: pass the checkpoint file itself (e.g. {path}/final.pt)")
    why = not_a_torch_file(path)
    if why is not None:
        raise CheckpointError(f"{path} is not a checkpoint: {why}; pass the .pt file written by `maddpg-citylearn train`")
    digest = sha256_file(path)
    allowed = (torch.serialization.safe_globals([(obj, name) for name, obj in extra_globals.items()])
               if extra_globals else contextlib.nullcontext())
    try:
        with allowed:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} refused: loading it would need arbitrary unpickling (it references "
            f"{_unsafe_globals(path)}). Only tensors and plain containers are accepted; never load untrusted pickles"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({_first_line(exc)}); re-copy or re-train it"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload, digest


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and check a checkpoint written by :func:`save_checkpoint`."""
    payload, digest = read_payload(path)
    return checkpoint_from_payload(payload, path=Path(path), sha256=digest)


def checkpoint_from_payload(payload: dict[str, Any], *, path: Path | None = None, sha256: str | None = None) -> Checkpoint:
    where = f"checkpoint {path}" if path else "checkpoint"
    if payload.get("format") != CHECKPOINT_FORMAT:
        keys = ", ".join(sorted(map(str, payload))[:8])
        raise CheckpointError(
            f"{where} is not a maddpg-citylearn checkpoint (no format={CHECKPOINT_FORMAT!r}; keys: {keys}); "
            f"train one with `maddpg-citylearn train`"
        )
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where} has format version {version}; this maddpg-citylearn reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Use the maddpg-citylearn release that wrote it"
        )
    missing = [k for k in ("layout", "actor_spec", "policy") if k not in payload]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: it was not written completely; re-train it")
    try:
        layout = PolicyLayout.from_json(payload["layout"])
        spec = ActorSpec.from_dict(payload["actor_spec"])
        safety = None if payload.get("safety") is None else SafetySpec.from_dict(payload["safety"])
    except Exception as exc:  # noqa: BLE001 - any malformed field is the same user problem
        raise CheckpointError(f"{where} has a malformed layout or architecture: {_first_line(exc)}") from exc
    reference = payload.get("reference_observations")
    if reference is not None and tuple(reference.shape[1:]) != layout.observation_shape:
        raise CheckpointError(
            f"{where} has reference observations of shape {tuple(reference.shape)}, its layout says "
            f"[n, {layout.n_agents}, {layout.obs_width}]"
        )
    checkpoint = Checkpoint(
        layout=layout,
        actor_spec=spec,
        policy=dict(payload["policy"]),
        reference_observations=reference,
        safety=safety,
        trainer=payload.get("trainer"),
        summary=dict(payload.get("summary") or {}),
        path=path,
        sha256=sha256,
    )
    checkpoint.build_policy()  # fail now, with the message above, if weights and layout disagree
    return checkpoint


def _unsafe_globals(path: Path) -> str:
    """The Python objects a refused pickle names (read from the file without unpickling it)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the refusal stands; only the detail is missing
        return "objects outside the allowed set"
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "objects outside the allowed set"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
