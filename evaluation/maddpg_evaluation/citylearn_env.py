"""CityLearn without surprises: build the env from a schema path or a dataset name, derive its layout, and translate
between CityLearn's per-building lists and the model's padded arrays.

``citylearn`` is imported lazily: a simulator that only calls Triton never needs it.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maddpg_core.errors import EnvironmentSetupError
from maddpg_core.layout import PolicyLayout, layout_from_names

DEFAULT_DATASET = "citylearn_challenge_2022_phase_all_plus_evs"
# CityLearn's own switches for offline use (see its DataSet class): we honour the same variables.
LOCAL_DATASETS_VARIABLE = "CITYLEARN_LOCAL_DATASETS_PATH"
OFFLINE_VARIABLE = "CITYLEARN_OFFLINE"


@dataclass(frozen=True)
class EnvSpec:
    """Which env to build: a schema path or a dataset name, and an optional inclusive window of time steps."""

    schema: str = DEFAULT_DATASET
    start: int | None = None
    end: int | None = None
    random_seed: int | None = None

    @classmethod
    def from_options(cls, schema: str | os.PathLike | None, dataset: str | None, start: int | None = None,
                     end: int | None = None, random_seed: int | None = None) -> "EnvSpec":
        if schema is not None and dataset is not None:
            raise EnvironmentSetupError("pass either --schema PATH or --dataset NAME, not both")
        return cls(schema=str(schema) if schema is not None else (dataset or DEFAULT_DATASET), start=start, end=end,
                   random_seed=random_seed)

    @property
    def dataset_name(self) -> str:
        path = Path(self.schema)
        return path.parent.name if path.suffix == ".json" else self.schema

    def resolve_schema(self) -> Path | str:
        """The schema.json path when it can be found locally, else the dataset name (CityLearn then downloads it)."""
        path = Path(self.schema).expanduser()
        if path.suffix == ".json" or os.sep in self.schema:
            if path.is_dir():
                path = path / "schema.json"
            if not path.is_file():
                raise EnvironmentSetupError(
                    f"schema file {path} does not exist: pass --schema with the path of a CityLearn schema.json, "
                    f"or --dataset NAME"
                )
            return path.resolve()
        local_root = os.environ.get(LOCAL_DATASETS_VARIABLE)
        if local_root:
            candidate = Path(local_root).expanduser() / self.schema / "schema.json"
            if candidate.is_file():
                return candidate.resolve()
        if os.environ.get(OFFLINE_VARIABLE, "").lower() in {"1", "true", "yes"}:
            where = f"{LOCAL_DATASETS_VARIABLE}={local_root}" if local_root else f"{LOCAL_DATASETS_VARIABLE} is not set"
            raise EnvironmentSetupError(
                f"dataset {self.schema!r} is not available offline ({where}, {OFFLINE_VARIABLE} is set): point "
                f"{LOCAL_DATASETS_VARIABLE} at a folder holding {self.schema}/schema.json, or pass --schema PATH"
            )
        return self.schema

    def episode_length(self) -> int | None:
        """Rows of data in the dataset (time steps of a full episode), when the schema is local."""
        schema = self.resolve_schema()
        if not isinstance(schema, Path):
            return None
        try:
            spec = json.loads(schema.read_text())
            root = schema.parent / (spec.get("root_directory") or "")  # absolute root_directory wins over the join
            first = next(iter(spec["buildings"].values()))
            with open(root / first["energy_simulation"], newline="") as handle:
                return sum(1 for _ in csv.reader(handle)) - 1
        except (OSError, KeyError, StopIteration, json.JSONDecodeError) as exc:
            raise EnvironmentSetupError(f"cannot read the dataset described by {schema}: {exc}") from exc

    def check_window(self) -> tuple[int, int] | None:
        """Validate ``start``/``end`` against the data before any long work; returns the inclusive window."""
        if self.start is None and self.end is None:
            return None
        length = self.episode_length()
        start = 0 if self.start is None else self.start
        end = (length - 1 if length else None) if self.end is None else self.end
        if end is None:
            raise EnvironmentSetupError("--end is required when the dataset is not available locally")
        if start < 0 or end < start:
            raise EnvironmentSetupError(f"window [{start}, {end}] is empty or negative: need 0 <= --start <= --end")
        if end - start < 1:
            raise EnvironmentSetupError(f"window [{start}, {end}] holds no step: --end must be at least --start + 1")
        if length is not None and end > length - 1:
            raise EnvironmentSetupError(
                f"window [{start}, {end}] ends outside the episode: the dataset has {length} time steps "
                f"(0..{length - 1}); lower --end"
            )
        return start, end

    def build(self):
        """Construct the CityLearn env (decentralised: one agent per building)."""
        window = self.check_window()
        schema = self.resolve_schema()
        kwargs: dict[str, Any] = {"central_agent": False}
        if window is not None:
            kwargs.update(simulation_start_time_step=window[0], simulation_end_time_step=window[1])
        if self.random_seed is not None:
            kwargs["random_seed"] = self.random_seed
        try:
            from citylearn.citylearn import CityLearnEnv
        except ImportError as exc:
            raise EnvironmentSetupError(
                "citylearn is not installed: `pip install --no-deps citylearn==3.0.2` and `pip install "
                "'maddpg-citylearn[env]'` (see README)"
            ) from exc
        try:
            return CityLearnEnv(str(schema), **kwargs)
        except (OSError, ValueError, KeyError) as exc:  # requests' ConnectionError is an OSError
            hint = (f"set {LOCAL_DATASETS_VARIABLE} to a folder holding {self.schema}/schema.json or pass --schema PATH"
                    if not isinstance(schema, Path) else "check the schema and its CSV files")
            raise EnvironmentSetupError(f"cannot build the CityLearn env from {schema}: {exc}; {hint}") from exc


def citylearn_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("citylearn")
    except Exception:  # noqa: BLE001 - metadata lookups fail in many ways; the version is informative only
        return None


def layout_from_env(env, dataset: str | None = None) -> PolicyLayout:
    """The env's layout: building names, per-building observation/action names and action bounds."""
    return layout_from_names(
        building_names=[b.name for b in env.buildings],
        observation_names=env.observation_names,
        action_names=env.action_names,
        action_low=[space.low.tolist() for space in env.action_space],
        action_high=[space.high.tolist() for space in env.action_space],
        dataset=dataset,
        citylearn_version=citylearn_version(),
    )


class CityLearnAdapter:
    """Translates between one env and one model layout, after checking that they fit.

    Observations are written into the first slots of each agent's row (the model's tail-padding convention); actions
    are read from the first ``len(env actions)`` slots of each agent's row.
    """

    def __init__(self, model_layout: PolicyLayout, env, *, what: str = "the served model"):
        self.model_layout = model_layout
        self.env_layout = layout_from_env(env)
        model_layout.require_compatible(self.env_layout, what=what)
        self._obs_counts = [len(names) for names in env.observation_names]
        self._action_counts = [len(names) for names in env.action_names]

    def observations_to_array(self, observations: Sequence[Sequence[float]]) -> np.ndarray:
        """CityLearn's list of per-building lists -> ``[agents, obs_width]`` float32, zero-padded."""
        out = np.zeros(self.model_layout.observation_shape, dtype=np.float32)
        for i, (row, count) in enumerate(zip(observations, self._obs_counts, strict=True)):
            if len(row) != count:
                raise EnvironmentSetupError(f"agent {i} returned {len(row)} observations, its space has {count}")
            out[i, :count] = row
        return out

    def actions_to_lists(self, actions: np.ndarray) -> list[list[float]]:
        """``[agents, action_width]`` -> the per-building lists of exact length that ``env.step`` accepts."""
        actions = np.asarray(actions)
        if actions.shape != self.model_layout.action_shape:
            raise EnvironmentSetupError(f"actions have shape {actions.shape}, expected {self.model_layout.action_shape}")
        return [actions[i, :count].astype(float).tolist() for i, count in enumerate(self._action_counts)]
