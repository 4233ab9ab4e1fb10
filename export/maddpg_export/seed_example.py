"""Write a checkpoint in the seed project's CooperativeMADDPG format, with random weights, to try the seed path with:

    python -m maddpg_export.seed_example runs/seed-example.pt            # 17 agents x 36 observations -> 3 actions
    maddpg-citylearn export runs/seed-example.pt --repository /tmp/seed-repository --model seed_cooperative

The file has every key and shape ``docs/seed-checkpoints.md`` documents (critics, targets and optimiser states
included, numpy float64 observation statistics), built from the seed's own module tree as that page describes it
(``nn.Linear``, ``nn.LayerNorm``, ``nn.MultiheadAttention``, one actor per building): written independently of the
exporter's re-implementation (:mod:`maddpg_export.seed_cooperative`), so the tests compare the two.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

H = 128  # the coordinator's width
N_AGENTS, OBS_DIM, ACTION_DIM = 17, 36, 3  # a citylearn 2.5.0-sized model (its buildings had fewer observations)


class DistrictAggregator(nn.Module):
    def __init__(self, obs_dim: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(obs_dim, H), nn.LayerNorm(H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.aggregator = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 16))


class AgentAttention(nn.Module):
    def __init__(self, obs_dim: int):
        super().__init__()
        self.query_encoder = nn.Linear(obs_dim, H)
        self.key_encoder = nn.Linear(obs_dim, H)
        self.value_encoder = nn.Linear(obs_dim, H)
        self.attention = nn.MultiheadAttention(H, 4, batch_first=True)
        self.output_proj = nn.Linear(H, H)


class Coordinator(nn.Module):
    def __init__(self, obs_dim: int):
        super().__init__()
        self.district_aggregator = DistrictAggregator(obs_dim)
        self.attention = AgentAttention(obs_dim)
        self.attention_proj = nn.Linear(H, 16)
        self.fusion = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32))
        # In the state_dict, not on the inference path (its exact shape is not documented; this one is plausible).
        self.mean_field = nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        district = self.district_aggregator.encoder(z).mean(dim=1)
        district = self.district_aggregator.aggregator(district).unsqueeze(1).repeat(1, z.shape[1], 1)
        a = self.attention
        attended, _ = a.attention(a.query_encoder(z), a.key_encoder(z), a.value_encoder(z))
        attended = self.attention_proj(a.output_proj(attended))
        return self.fusion(torch.cat([district, attended], dim=-1))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + 32, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256),
                                 nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, action_dim), nn.Tanh())
        self.net_local = nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, action_dim), nn.Tanh())


def randomised(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Default init plus noise on every parameter, so LayerNorm scales and biases are not trivially 1 and 0."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def seed_payload(*, n_agents: int = N_AGENTS, obs_dim: int = OBS_DIM, action_dim: int = ACTION_DIM,
                 seed: int = 0) -> dict:
    """A checkpoint dict with every documented key, as the seed project's ``torch.save`` writes it."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    critic_in = n_agents * (obs_dim + action_dim)
    agents = []
    for _ in range(n_agents):
        actor = randomised(Actor(obs_dim, action_dim), generator)
        critic = nn.Sequential(nn.Linear(critic_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        agents.append({
            "actor": actor.state_dict(),
            "critic": critic.state_dict(),
            "target_actor": copy.deepcopy(actor.state_dict()),
            "target_critic": copy.deepcopy(critic.state_dict()),
            "actor_optim": torch.optim.Adam(actor.parameters(), lr=1e-4).state_dict(),
            "critic_optim": torch.optim.Adam(critic.parameters(), lr=3e-4).state_dict(),
        })
    obs_count = 35040.0  # four years of hourly steps
    return {
        "n_agents": n_agents,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "coordination_dim": 32,
        "is_cooperative": True,
        "maddpg_config": {"gamma": 0.99, "tau": 0.005, "actor_lr": 1e-4, "critic_lr": 3e-4, "hidden_dim": 256,
                          "batch_size": 256, "buffer_size": 100_000, "episodes": 50, "noise": {"sigma": 0.1}},
        "coordinator": randomised(Coordinator(obs_dim), generator).state_dict(),
        "agents": agents,
        "obs_mean": rng.normal(0.0, 20.0, obs_dim),
        # Inference divides obs_var by obs_count: chosen so that its standard deviation is 0.5 .. 30.
        "obs_var": rng.uniform(0.5, 30.0, obs_dim) ** 2 * obs_count,
        "obs_count": obs_count,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maddpg_export.seed_example",
                                     description="Write a seed-format (CooperativeMADDPG) checkpoint with random weights.")
    parser.add_argument("out", type=Path, help="the .pt file to write")
    parser.add_argument("--agents", type=int, default=N_AGENTS)
    parser.add_argument("--obs-dim", type=int, default=OBS_DIM, help="observations per agent (zero-padded width)")
    parser.add_argument("--action-dim", type=int, default=ACTION_DIM)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.agents, args.obs_dim, args.action_dim) < 1:
        parser.error("--agents, --obs-dim and --action-dim must be positive")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seed_payload(n_agents=args.agents, obs_dim=args.obs_dim, action_dim=args.action_dim, seed=args.seed),
               args.out)
    print(f"wrote {args.out}: a seed-format checkpoint, {args.agents} agents x {args.obs_dim} observations -> "
          f"{args.action_dim} actions, random weights; export it with `maddpg-citylearn export {args.out} "
          f"--model seed_cooperative`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
