"""CityLearn without surprises: build the env from a schema path or a dataset name, derive its layout, and translate
between CityLearn's per-building lists and the model's padded arrays.

``citylearn`` is imported lazily: a simulator that only calls Triton never needs it.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maddpg_core.errors import EnvironmentSetupError
from maddpg_core.layout import PolicyLayout, layout_from_names

log = logging.getLogger(__name__)

DEFAULT_DATASET = "citylearn_challenge_2022_phase_all_plus_evs"
# CityLearn's own switches for offline use (see its DataSet class): we honour the same variables.
LOCAL_DATASETS_VARIABLE = "CITYLEARN_LOCAL_DATASETS_PATH"
OFFLINE_VARIABLE = "CITYLEARN_OFFLINE"
# Without $CITYLEARN_LOCAL_DATASETS_PATH, a dataset copy is looked for here, beside the working directory and beside
# this source checkout (the layout the README and CI use: ../shared next to the clone).
SHARED_DATASETS = Path("shared") / "citylearn" / "datasets"
# What CityLearn downloads a dataset from; asked once, briefly, before CityLearn would retry it for half a minute.
DOWNLOAD_PROBE_URL = "https://api.github.com/"
DOWNLOAD_PROBE_TIMEOUT_S = 5.0


def local_dataset_roots() -> tuple[list[Path], bool]:
    """Folders that may hold ``<dataset>/schema.json``, and whether they were configured (else found).

    ``$CITYLEARN_LOCAL_DATASETS_PATH`` (several folders joined by ``os.pathsep``, as CityLearn reads it) when set;
    otherwise ``../shared/citylearn/datasets`` beside the working directory or beside this source checkout.
    """
    configured = os.environ.get(LOCAL_DATASETS_VARIABLE)
    if configured:
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p.strip()], True
    checkout = Path(__file__).resolve().parents[2]
    found = []
    for candidate in (Path.cwd().parent / SHARED_DATASETS, checkout.parent / SHARED_DATASETS):
        if candidate.is_dir() and all(candidate.resolve() != f.resolve() for f in found):
            found.append(candidate.absolute())
    return found, False


def local_dataset_names(roots: Sequence[Path]) -> list[str]:
    names = set()
    for root in roots:
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if (p / "schema.json").is_file())
    return sorted(names)


def offline() -> bool:
    return os.environ.get(OFFLINE_VARIABLE, "").lower() in {"1", "true", "yes"}


@functools.lru_cache(maxsize=4)
def download_blocked(url: str | None = None) -> str | None:
    """Why CityLearn could not download a dataset from here (e.g. "Name or service not known"), or None if it can.

    One short request (proxies from the environment are honoured); any HTTP answer, even an error status, means the
    network works. Asked once per process.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url or DOWNLOAD_PROBE_URL, method="HEAD"),
                                    timeout=DOWNLOAD_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(getattr(exc.reason, "strerror", None) or exc.reason)
    except OSError as exc:  # a timeout, a reset
        return str(exc) or type(exc).__name__


def _citylearn_cached(name: str) -> bool:
    """Whether CityLearn already downloaded ``name`` into its own cache (it then needs no network)."""
    try:
        from citylearn.data import DataSet

        return (Path(DataSet().cache_directory) / "datasets" / name / "schema.json").is_file()
    except Exception:  # noqa: BLE001 - not installed, or a cache it cannot create: then it is not cached
        return False


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_announced: set[Path] = set()


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
        roots, configured = local_dataset_roots()
        for root in roots:
            candidate = root / self.schema / "schema.json"
            if candidate.is_file():
                if not configured and root not in _announced:
                    _announced.add(root)
                    log.info("CityLearn datasets: using the copy in %s (set %s to use another)", root,
                             LOCAL_DATASETS_VARIABLE)
                return candidate.absolute()
        hint = _did_you_mean(self.schema, local_dataset_names(roots))
        if configured:
            where = f"not in {LOCAL_DATASETS_VARIABLE}={os.environ[LOCAL_DATASETS_VARIABLE]}"
        elif roots:
            where = f"not in {', '.join(map(str, roots))}, found beside the checkout; {LOCAL_DATASETS_VARIABLE} is not set"
        else:
            where = f"{LOCAL_DATASETS_VARIABLE} is not set and no ../{SHARED_DATASETS} was found"
        fix = (f"point {LOCAL_DATASETS_VARIABLE} at a folder holding {self.schema}/schema.json (a copy of the "
               f"dataset, such as ../{SHARED_DATASETS}) and set {OFFLINE_VARIABLE}=1, or pass --schema PATH")
        if offline():
            raise EnvironmentSetupError(f"dataset {self.schema!r} is not available offline ({where}, "
                                        f"{OFFLINE_VARIABLE} is set){hint}: {fix}")
        if not _citylearn_cached(self.schema):
            # CityLearn would download it, retrying for about half a minute where there is no network: ask once.
            blocked = download_blocked()
            if blocked:
                raise EnvironmentSetupError(f"dataset {self.schema!r} is not on this machine ({where}){hint} and "
                                            f"CityLearn cannot download it ({DOWNLOAD_PROBE_URL}: {blocked}): {fix}")
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
        from citylearn.citylearn import Error as CityLearnError

        try:
            return CityLearnEnv(str(schema), **kwargs)
        except CityLearnError as exc:  # UnknownSchemaError: a dataset name CityLearn does not know
            known = local_dataset_names(local_dataset_roots()[0])
            raise EnvironmentSetupError(
                f"CityLearn does not know the dataset {self.schema!r}{_did_you_mean(self.schema, known)}: pass "
                f"--dataset with one it has ({', '.join(known) or 'see citylearn.data.DataSet().get_dataset_names()'})"
                f" or --schema PATH ({_first_line(exc)})") from exc
        except (OSError, ValueError, KeyError) as exc:  # requests' ConnectionError is an OSError
            hint = (f"set {LOCAL_DATASETS_VARIABLE} to a folder holding {self.schema}/schema.json or pass --schema PATH"
                    if not isinstance(schema, Path) else "check the schema and its CSV files")
            raise EnvironmentSetupError(f"cannot build the CityLearn env from {schema}: {_first_line(exc)}; "
                                        f"{hint}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
