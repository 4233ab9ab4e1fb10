"""The comparison server, in the seed project's style (docs/benchmarks.md, "What is measured"): FastAPI + PyTorch on
uvicorn, ``GET /health``, ``GET /ready``, ``POST /predict`` with ``{"observations": [{"obs": [...]}, ...]}`` (one
district) -> ``{"actions": [[...], ...]}`` (each building's own action count). Random weights: speed does not depend
on them. Run: ``python -m maddpg_benchmarks.seed_server --layout layout.json --port 8000``."""

# No `from __future__ import annotations`: FastAPI reads the request model from the real annotation of `predict`.
import argparse
import json
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maddpg_core.layout import PolicyLayout
from maddpg_serving import processes

from .load import Target

SEED_HIDDEN = 256          # the seed's maddpg_config hidden_dim
SEED_COORDINATION = 32     # the seed's hints per actor input, zeros: its coordinator is left out, in this server's favour
ENDPOINTS = ("async", "sync")


class SeedStylePolicy:
    """17 torch actors, layer for layer the seed's ``net``, called one building at a time as its ``/predict`` did."""

    def __init__(self, layout: PolicyLayout, seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.layout, self.hints = layout, torch.zeros(1, SEED_COORDINATION)
        self.actors = [nn.Sequential(nn.Linear(layout.obs_width + SEED_COORDINATION, SEED_HIDDEN),
                                     nn.LayerNorm(SEED_HIDDEN), nn.ReLU(), nn.Linear(SEED_HIDDEN, SEED_HIDDEN),
                                     nn.LayerNorm(SEED_HIDDEN), nn.ReLU(), nn.Linear(SEED_HIDDEN, layout.action_width),
                                     nn.Tanh()).eval() for _ in layout.agents]
        self.obs_mean, self.obs_std = np.zeros(layout.obs_width), np.ones(layout.obs_width)

    def act(self, observations: np.ndarray) -> list[list[float]]:
        """``[agents, obs_width]`` raw observations -> each building's actions."""
        import torch

        obs = np.nan_to_num(observations, nan=0.0, posinf=1.0, neginf=-1.0)  # the seed's sanitising, normalisation
        z = np.clip((obs - self.obs_mean) / self.obs_std, -5.0, 5.0)
        actions = []
        with torch.no_grad():
            for i, (actor, agent) in enumerate(zip(self.actors, self.layout.agents)):
                x = torch.cat([torch.as_tensor(z[i], dtype=torch.float32).unsqueeze(0), self.hints], dim=1)
                actions.append(torch.clamp(actor(x), -1.0, 1.0)[0][: agent.action_count].tolist())
        return actions


def create_app(layout: PolicyLayout, endpoint: str = "async", torch_threads: int = 1):
    """``endpoint="async"`` runs ``predict`` on the event loop, ``"sync"`` in FastAPI's thread pool;
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
    policy = SeedStylePolicy(layout)  # loaded before uvicorn listens: ready means ready

    @app.get("/health")
    def health() -> dict:
        return {"status": "healthy"}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready", "n_agents": layout.n_agents}

    def predict(request: PredictRequest) -> PredictResponse:
        if len(request.observations) != layout.n_agents:
            raise HTTPException(status_code=422, detail=f"expected {layout.n_agents} buildings")
        obs = np.zeros(layout.observation_shape)  # the seed pads short rows and cuts long ones
        for i, building in enumerate(request.observations):
            row = building.obs[: layout.obs_width]
            obs[i, : len(row)] = row
        return PredictResponse(actions=policy.act(obs))

    async def predict_on_loop(request: PredictRequest) -> PredictResponse:
        return predict(request)

    app.post("/predict", response_model=PredictResponse)(predict if endpoint == "sync" else predict_on_loop)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="layout.json of the policy (buildings, widths)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="async")
    parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (one per core)")
    args = parser.parse_args(argv)
    import uvicorn

    app = create_app(PolicyLayout.from_json(Path(args.layout).read_text()), args.endpoint, args.torch_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


@dataclass
class SeedServerProcess:
    """The comparison server as a subprocess on 127.0.0.1:``port``, started and stopped like the local Triton."""

    layout: PolicyLayout
    endpoint: str = "async"
    torch_threads: int = 1
    port: int = field(default_factory=lambda: processes.reserve_ports(1)[0])
    process = workdir = None  # while started

    def start(self, timeout: float = 60.0) -> "SeedServerProcess":
        self.workdir = Path(tempfile.mkdtemp(prefix="maddpg-seed-server-"))
        (self.workdir / "layout.json").write_text(self.layout.to_json())
        command = [sys.executable, "-m", "maddpg_benchmarks.seed_server", "--layout", str(self.workdir / "layout.json"),
                   "--port", str(self.port), "--endpoint", self.endpoint, "--torch-threads", str(self.torch_threads)]
        with open(self.workdir / "server.log", "wb") as log:
            self.process = processes.start_group(command, output=log)
        try:
            processes.wait_ready(self.process, self.is_ready, timeout)
        except BaseException as exc:
            tail = "\n".join((self.workdir / "server.log").read_text(errors="replace").splitlines()[-15:])
            self.stop()
            if isinstance(exc, (processes.ProcessExited, processes.ReadyTimeout)):
                raise RuntimeError(f"the comparison server did not start ({exc}):\n{tail}") from None
            raise
        return self

    def target(self, config: str) -> Target:
        """What the load driver measures: this server, its process group's CPU time."""
        return Target("seed-fastapi", self.port, server_pid=self.process.pid, config=config)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1.0) as response:
                return response.status == 200 and json.loads(response.read()).get("status") == "ready"
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            processes.stop_group(self.process, timeout, name="comparison server")
            self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


if __name__ == "__main__":
    main()
