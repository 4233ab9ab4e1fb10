"""The comparison server: what the seed project served, rebuilt in its style so the two stacks meet on equal ground.

FastAPI + PyTorch on uvicorn, ``GET /health``, ``GET /ready``, ``POST /predict`` with
``{"observations": [{"obs": [...]}, ...]}`` (one entry per building, one district per request) ->
``{"actions": [[...], ...]}`` (each building's own action count). Inference is the seed's: non-finite values
replaced (NaN -> 0, +inf -> 1, -inf -> -1), one normalisation clipped to [-5, 5], then a Python loop calling 17
separate actor modules, one per building, each of the seed's actor shape (Linear(obs+32, 256), LayerNorm, ReLU,
Linear(256, 256), LayerNorm, ReLU, Linear(256, actions), Tanh).

What is left out favours this server: the seed's coordinator (its 32 hints per building are zeros here instead of an
attention network's output) and uvicorn's access log. It runs with what was fastest here: an ``async`` endpoint and one
torch thread (``bench`` measures it against a thread-pool endpoint with torch's default threads). Weights are random:
speed does not depend on them.

Run: ``python -m maddpg_benchmarks.seed_server --layout layout.json --port 8000``. :class:`SeedServerProcess` starts
it as a subprocess on a free port and stops it by PID.
"""

# No `from __future__ import annotations`: FastAPI reads the request model from the real annotation of `predict`.
import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maddpg_core.layout import PolicyLayout
from maddpg_serving import processes

SEED_HIDDEN = 256          # the seed's maddpg_config hidden_dim
SEED_COORDINATION = 32     # the seed's coordination_dim: hints appended to each actor's input
OBSERVATION_CLIP = 5.0


def seed_actor(obs_dim: int, action_dim: int, hidden: int = SEED_HIDDEN):
    """One building's actor, layer for layer as the seed's ``net``."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(obs_dim + SEED_COORDINATION, hidden), nn.LayerNorm(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
        nn.Linear(hidden, action_dim), nn.Tanh(),
    )


class SeedStylePolicy:
    """17 torch actors called one building at a time, as the seed's ``/predict`` did."""

    def __init__(self, layout: PolicyLayout, hidden: int = SEED_HIDDEN, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.layout = layout
        self.actors = [seed_actor(layout.obs_width, layout.action_width, hidden).eval() for _ in layout.agents]
        self.action_counts = [agent.action_count for agent in layout.agents]
        self.obs_mean = np.zeros(layout.obs_width)
        self.obs_std = np.ones(layout.obs_width)
        self.hints = torch.zeros(1, SEED_COORDINATION)

    def act(self, observations: np.ndarray) -> list[list[float]]:
        """``[agents, obs_width]`` raw observations -> each building's actions."""
        torch = self.torch
        obs = np.nan_to_num(observations, nan=0.0, posinf=1.0, neginf=-1.0)
        z = np.clip((obs - self.obs_mean) / self.obs_std, -OBSERVATION_CLIP, OBSERVATION_CLIP)
        actions = []
        with torch.no_grad():
            for i, actor in enumerate(self.actors):
                x = torch.cat([torch.as_tensor(z[i], dtype=torch.float32).unsqueeze(0), self.hints], dim=1)
                action = torch.clamp(actor(x), -1.0, 1.0)[0]
                actions.append(action[: self.action_counts[i]].tolist())
        return actions

    def pad(self, rows: list[list[float]]) -> np.ndarray:
        obs = np.zeros(self.layout.observation_shape)
        for i, row in enumerate(rows[: self.layout.n_agents]):
            obs[i, : len(row)] = row[: self.layout.obs_width]
        return obs


ENDPOINTS = ("async", "sync")


def create_app(layout: PolicyLayout, hidden: int = SEED_HIDDEN, endpoint: str = "async", torch_threads: int = 1):
    """The FastAPI app. ``endpoint="async"`` runs ``predict`` on the event loop, ``"sync"`` in FastAPI's thread pool;
    ``torch_threads=0`` keeps torch's default (one thread per core)."""
    import torch
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)

    class BuildingObservation(BaseModel):
        obs: list[float]

    class PredictRequest(BaseModel):
        observations: list[BuildingObservation]

    class PredictResponse(BaseModel):
        actions: list[list[float]]

    app = FastAPI(title="maddpg-citylearn seed-style comparison server")
    policy = SeedStylePolicy(layout, hidden)  # loaded before uvicorn listens: ready means ready

    @app.get("/health")
    def health() -> dict:
        return {"status": "healthy"}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready", "n_agents": layout.n_agents}

    def predict(request: PredictRequest) -> PredictResponse:
        if len(request.observations) != layout.n_agents:
            raise HTTPException(status_code=422, detail=f"expected {layout.n_agents} buildings")
        return PredictResponse(actions=policy.act(policy.pad([b.obs for b in request.observations])))

    async def predict_on_loop(request: PredictRequest) -> PredictResponse:
        return predict(request)

    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}")
    app.post("/predict", response_model=PredictResponse)(predict if endpoint == "sync" else predict_on_loop)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="layout.json of the policy (buildings, widths)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=SEED_HIDDEN)
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="async")
    parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (one per core)")
    args = parser.parse_args(argv)
    import uvicorn

    layout = PolicyLayout.from_json(Path(args.layout).read_text())
    app = create_app(layout, args.hidden, args.endpoint, args.torch_threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


@dataclass
class SeedServerProcess:
    """The comparison server as a subprocess on ``port`` (own process group), stopped by PID."""

    layout: PolicyLayout
    port: int
    host: str = "127.0.0.1"
    endpoint: str = "async"
    torch_threads: int = 1
    hidden: int = SEED_HIDDEN

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout: float = 60.0) -> "SeedServerProcess":
        self._workdir = Path(tempfile.mkdtemp(prefix="maddpg-seed-server-"))
        layout_file = self._workdir / "layout.json"
        layout_file.write_text(self.layout.to_json())
        self.log_path = self._workdir / "server.log"
        env = dict(os.environ)
        # This package may run from a source checkout: make it importable in the child whatever the install.
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "maddpg_benchmarks.seed_server", "--layout", str(layout_file),
                   "--host", self.host, "--port", str(self.port), "--hidden", str(self.hidden),
                   "--endpoint", self.endpoint, "--torch-threads", str(self.torch_threads)]
        with open(self.log_path, "wb") as handle:
            self.process = processes.start_group(command, output=handle, env=env)
        try:
            processes.wait_ready(self.process, self.is_ready, timeout)
        except processes.ProcessExited as exited:
            self.stop()
            raise RuntimeError(f"the comparison server exited with status {exited.returncode}:\n{self.log_tail()}") \
                from None
        except processes.ReadyTimeout:
            self.stop()
            raise RuntimeError(f"the comparison server was not ready after {timeout:.0f} s:\n{self.log_tail()}") \
                from None
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ready", timeout=1.0) as response:
                return response.status == 200 and json.loads(response.read()).get("status") == "ready"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            processes.stop_group(self.process, timeout, name="comparison server")
            self.process = None
        if self._workdir is not None:
            import shutil

            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


if __name__ == "__main__":
    main()
