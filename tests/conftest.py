"""Shared fixtures: the real dataset, a checkpoint made by the project itself, an exported repository, a real server.

Expensive things are session-scoped and built once: an initialised policy on the real env layout (one-week warm-up),
its export, and a tritonserver on free ports (one per backend, in turn) that is stopped by PID when its tests are done.
``local_server`` starts any other server a test needs, the same way.

Without the CityLearn dataset the session still runs: the tests that need the env fail, each saying where the
dataset was looked for; the others (manifests, the client against a server, processes) are unaffected.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "citylearn_challenge_2022_phase_all_plus_evs"
ONE_WEEK = (0, 167)
# How long a test waits for a server it started to be ready (the machine may be busy).
SERVER_READY_TIMEOUT_S = 120


def _dataset_candidates() -> list[Path]:
    configured = os.environ.get("CITYLEARN_LOCAL_DATASETS_PATH")
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO_ROOT.parent / "shared" / "citylearn" / "datasets")
    return candidates


def _datasets_root() -> Path | None:
    for candidate in _dataset_candidates():
        if (candidate / DATASET / "schema.json").is_file():
            return candidate.resolve()
    return None


def pytest_configure(config):
    # Tests never reach the internet: CityLearn must read the local copy (or fail at once without it).
    root = _datasets_root()
    if root is not None:
        os.environ["CITYLEARN_LOCAL_DATASETS_PATH"] = str(root)
    os.environ["CITYLEARN_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def schema_path() -> Path:
    root = _datasets_root()
    if root is None:
        pytest.fail(f"the CityLearn dataset {DATASET} was not found (looked in "
                    f"{', '.join(map(str, _dataset_candidates()))}): set CITYLEARN_LOCAL_DATASETS_PATH to the folder "
                    f"that holds it (../shared/citylearn/datasets in CI)", pytrace=False)
    return root / DATASET / "schema.json"


@pytest.fixture(scope="session")
def local_server():
    """``with local_server(repository, backend=..., ...) as server:`` a real tritonserver (bundled in nvidia-pytriton)
    on free ports, ready, stopped by PID on the way out. Keyword arguments are :class:`LocalTritonServer`'s."""
    from maddpg_serving.local_triton import LocalTritonServer, free_ports

    @contextlib.contextmanager
    def start(repository, **options):
        options.setdefault("ports", free_ports())
        server = LocalTritonServer(Path(repository), **options)
        server.start(timeout=SERVER_READY_TIMEOUT_S)
        try:
            yield server
        finally:
            server.stop()

    return start


@pytest.fixture(scope="session")
def week_spec(schema_path):
    from maddpg_evaluation.citylearn_env import EnvSpec

    return EnvSpec(schema=str(schema_path), start=ONE_WEEK[0], end=ONE_WEEK[1])


@pytest.fixture(scope="session")
def initial_checkpoint_path(tmp_path_factory, week_spec) -> Path:
    """An untrained policy on the real env layout, written by the project's own checkpoint code."""
    from maddpg_training.bootstrap import initial_checkpoint
    from maddpg_training.checkpoint import save_checkpoint
    from maddpg_training.networks import ActorSpec

    path = tmp_path_factory.mktemp("checkpoints") / "initial.pt"
    # Small hidden layers keep the suite fast; the contract does not depend on them.
    save_checkpoint(path, initial_checkpoint(week_spec, ActorSpec(hidden_sizes=(64, 64)), seed=7))
    return path


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory, initial_checkpoint_path) -> Path:
    from maddpg_export.pipeline import export_checkpoint

    repository = tmp_path_factory.mktemp("model_repository")
    export_checkpoint(initial_checkpoint_path, repository)
    return repository


# Both backends the local server can run; `make setup` builds the onnxruntime one, the python one is the fallback.
SERVER_BACKENDS = ("onnxruntime", "python")


@pytest.fixture(scope="session", params=SERVER_BACKENDS)
def triton_server(request, exported_repository, local_server):
    """A real tritonserver (bundled in nvidia-pytriton) on free ports, once per backend: every test that uses it runs
    against Triton's onnxruntime backend (configs/cpu.pbtxt) and the python backend (configs/local.pbtxt)."""
    from maddpg_serving.onnxruntime_backend import installed

    if request.param == "onnxruntime" and installed() is None:
        pytest.fail("Triton's onnxruntime backend is not built: run `make setup` (it builds it), or "
                    "`python -m maddpg_serving.onnxruntime_backend build --sources ../shared/triton-src`")
    with local_server(exported_repository, backend=request.param) as server:
        yield server


@pytest.fixture(scope="session")
def saturated_checkpoint_path(tmp_path_factory, initial_checkpoint_path) -> Path:
    """The same policy with a last actor layer thousands of times larger than a fresh one's (+-3e-3): weights +-5 and
    biases +-30, so most actors' tanh is saturated and their served actions sit on the bounds (the case the bounds
    checks exist for), while many still vary with the input. Larger weights would break the export's torch parity
    (1e-5): float32 rounding grows with the size of the terms summed."""
    from dataclasses import replace

    import torch

    from maddpg_training.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(initial_checkpoint_path)
    layers = sorted({int(k.split(".")[3]) for k in checkpoint.policy if k.startswith("actors.mlp.layers.")})
    weights = dict(checkpoint.policy)
    for name, scale, seed in (("weight", 5.0, 3), ("bias", 30.0, 4)):
        key = f"actors.mlp.layers.{layers[-1]}.{name}"
        weights[key] = torch.empty_like(weights[key]).uniform_(-scale, scale, generator=torch.Generator().manual_seed(seed))
    path = tmp_path_factory.mktemp("checkpoints") / "saturated.pt"
    save_checkpoint(path, replace(checkpoint, policy=weights, path=None, sha256=None,
                                  summary={**checkpoint.summary, "saturated_for_tests": True}))
    return path


@pytest.fixture(scope="session")
def saturated_repository(tmp_path_factory, saturated_checkpoint_path) -> Path:
    from maddpg_export.pipeline import export_checkpoint

    repository = tmp_path_factory.mktemp("saturated_repository")
    export_checkpoint(saturated_checkpoint_path, repository)
    return repository
