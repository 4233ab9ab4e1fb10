"""The critic's dQ/da against finite differences in the real env (training/maddpg_training/critic_probe.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_training.bootstrap import fresh_policy, warmup
from maddpg_training.config import TrainConfig
from maddpg_training.critic_probe import probe
from maddpg_training.learner import MADDPG, two_sided_slots
from maddpg_training.trainer import make_window

pytestmark = pytest.mark.citylearn


class LinearCritic(nn.Module):
    """Q = sum(weight * actions) in both heads: its dQ/da is ``weight`` wherever it is evaluated."""

    def __init__(self, weight: torch.Tensor, shares: int):
        super().__init__()
        self.weight, self.shares = weight, shares

    def forward(self, inputs, actions, state):
        q = (actions * self.weight).sum(dim=(-2, -1))[..., None] / self.shares
        return q.expand(*q.shape[:-1], self.shares).unsqueeze(0).expand(2, *q.shape[:-1], self.shares)


@pytest.fixture(scope="module")
def window_and_learner(schema_path):
    spec = EnvSpec(schema=str(schema_path), start=0, end=80)
    warm = warmup(spec)
    config = TrainConfig(dataset=str(schema_path), actor_hidden=(16,), critic_hidden=(16,))
    policy = fresh_policy(warm.layout, warm.observations, seed=0)
    window = make_window(spec, warm, warm.layout, config, teacher=False)
    return window, MADDPG(policy, config, window.reward.shares)


def test_one_step_later_charging_a_battery_never_pays(window_and_learner):
    """Over one step, more charge on a battery means as much or more import (cost, carbon, peaks): the env's finite
    difference is never positive. A sign convention turned round, or a nudge on the wrong slot, breaks this."""
    window, learner = window_and_learner
    found = probe(learner, window, points=8, horizon=1, within=60)
    assert found["points"] == 8 and found["counted"] >= 4
    assert all(p["env"] <= 1e-9 for p in found["pairs"])
    batteries = two_sided_slots(learner.policy)
    assert all(batteries[p["building"], p["slot"]] == 1 for p in found["pairs"])


def test_a_critic_whose_gradient_says_charging_costs_agrees_and_its_opposite_disagrees(window_and_learner):
    window, learner = window_and_learner
    critic = learner.critic
    try:
        for sign, agreement in ((-1.0, 1.0), (1.0, 0.0)):
            weight = sign * torch.ones(learner.policy.layout.action_shape)
            learner.critic = LinearCritic(weight, window.reward.shares)
            found = probe(learner, window, points=8, horizon=1, within=60)
            assert all(p["critic"] == pytest.approx(sign) for p in found["pairs"])
            assert found["sign_agreement"] == agreement
    finally:
        learner.critic = critic
