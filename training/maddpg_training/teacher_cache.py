"""The teacher's own pass, kept on disk: it is deterministic, and the planner takes most of an hour for a year.

A window inside a cached longer pass (a held-out fold's training months inside the full year) is cut from it: the
planner labels states from the env's true state and the data ahead, so its labels on those steps are the same
whichever window the pass started in; only the first hours differ (the battery charge the window starts with).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from maddpg_core import files
from maddpg_core.files import atomic_write
from maddpg_evaluation.citylearn_env import EnvSpec

from .config import TrainConfig
from .networks import PolicyNetwork
from .rollout import Pass, Window
from .safety import RULES_VERSION

TEACHER_CACHE_VERSION = 1


def cache_root() -> Path:
    return files.cache_root() / "teacher-passes"


def cache_path(spec: EnvSpec, policy: PolicyNetwork, config: TrainConfig, *, start: int | None,
               end: int | None) -> Path | None:
    """Where the teacher's pass over ``start..end`` of ``spec``'s dataset is kept (None: not cached)."""
    if not config.cache_demonstration or config.teacher == "rule":
        return None  # the rule is instant: nothing to cache
    key = json.dumps({
        "version": TEACHER_CACHE_VERSION, "schema": str(spec.resolve_schema()), "start": start, "end": end,
        "teacher": config.teacher, "horizon": config.planner_horizon, "objective": config.planner_objective,
        "layout": policy.layout.to_json(),
        "safety": None if policy.safety_spec is None else policy.safety_spec.to_dict(), "rules": RULES_VERSION,
        "citylearn": policy.layout.citylearn_version,
    }, sort_keys=True)
    return cache_root() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def cached_teacher_pass(window: Window, policy: PolicyNetwork, config: TrainConfig) -> Pass | None:
    """The window's own cached pass, else the window cut from a cached pass over the whole dataset, else None.
    With ``config.teacher_whole_year`` the cut comes first: a window's own pass is used only where no whole pass is
    cached (and the trainer computes the whole pass before it comes to that)."""
    own = cache_path(window.spec, policy, config, start=window.spec.start, end=window.spec.end)
    if own is None:
        return None
    whole = cache_path(window.spec, policy, config, start=None, end=None)
    if own.is_file() and (own == whole or not (config.teacher_whole_year and whole.is_file())):
        return load(own)
    if own != whole and whole.is_file():
        start = window.first_step
        end = window.spec.end if window.spec.end is not None else start + window.env.time_steps - 1
        return cut(load(whole), start, end)
    return None


def cut(result: Pass, start: int, end: int) -> Pass:
    """Steps ``start .. end - 1`` (the transitions of the inclusive window ``start..end``) of a longer pass."""
    a, b = start - result.first_step, end - result.first_step
    if a < 0 or b > result.steps:
        raise ValueError(f"window {start}..{end} is not inside the cached pass ({result.first_step}.."
                         f"{result.first_step + result.steps})")
    labels = None if result.labels is None else tuple(x[a:b] for x in result.labels)
    record = {k: v[a:b] for k, v in result.record.items()}
    return Pass(driver=f"{result.driver} (steps {start}..{end} of a cached pass)", steps=b - a,
                team_return=float(record["rewards"].sum()), terms={}, kpis={}, service={}, labels=labels,
                record=record, seconds=0.0, first_step=start)


def save(path: Path, result: Pass) -> None:
    payload = {"summary": json.loads(json.dumps(result.summary())), "first_step": result.first_step,
               "labels": [torch.from_numpy(a) for a in result.labels],
               "record": {k: torch.from_numpy(np.asarray(v)) for k, v in result.record.items()}}
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load(path: Path) -> Pass:
    payload = torch.load(path, weights_only=True)
    s = payload["summary"]
    return Pass(driver=s["driver"], steps=s["steps"], team_return=s["team_return"], terms=s["terms"], kpis=s["kpis"],
                service=s["service"], labels=tuple(t.numpy() for t in payload["labels"]),
                record={k: v.numpy() for k, v in payload["record"].items()}, seconds=s["seconds"],
                first_step=int(payload.get("first_step", 0)))
