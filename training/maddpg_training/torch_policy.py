"""The checkpoint's torch actors behind the client's ``Policy`` interface (reference for parity, evaluation)."""

from __future__ import annotations

import numpy as np
import torch

from maddpg_core.layout import PolicyLayout

from .networks import PolicyNetwork


class TorchPolicy:
    def __init__(self, network: PolicyNetwork):
        self.network = network.eval()
        self.layout: PolicyLayout = network.layout

    @classmethod
    def from_checkpoint(cls, path) -> "TorchPolicy":
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(path).build_policy())

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(observations, dtype=np.float32))
        single = x.ndim == 2
        actions = self.network(x[None] if single else x)
        return (actions[0] if single else actions).numpy()
