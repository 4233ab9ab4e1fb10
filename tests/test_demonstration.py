"""The demonstrator the actors start from: what it does with batteries, cars and appliances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maddpg_core.layout import layout_from_names
from maddpg_training.demonstration import SelfConsumptionRule

NAMES = ["hour", "non_shiftable_load", "solar_generation"]


def rule(discharge_hours=(16, 23)):
    layout = layout_from_names(
        ["A", "B"], [NAMES, NAMES],
        [["electrical_storage", "electric_vehicle_storage_charger_a", "deferrable_appliance_a"], ["electrical_storage"]],
        [[-1, 0, 0], [-1]], [[1, 1, 1], [1]],
    )
    return SelfConsumptionRule(layout, np.array([6.4, 6.4]), discharge_hours=discharge_hours)


def observe(hour, load, solar):
    return np.array([[hour, load, solar], [hour, load, solar]], dtype=np.float32)


def test_solar_surplus_is_stored_at_the_rate_it_is_produced():
    actions = rule().act(observe(hour=12, load=1.0, solar=4.2))
    assert np.allclose(actions[:, 0], 3.2 / 6.4)
    assert np.allclose(rule().act(observe(hour=12, load=0.0, solar=20.0))[:, 0], 1.0)  # clipped at full charge


def test_imports_are_covered_from_the_battery_in_the_evening_only():
    assert np.allclose(rule().act(observe(hour=19, load=3.2, solar=0.0))[:, 0], -0.5)
    assert np.allclose(rule().act(observe(hour=3, load=3.2, solar=0.0))[:, 0], 0.0)  # kept for the evening
    assert np.allclose(rule(discharge_hours=None).act(observe(hour=3, load=3.2, solar=0.0))[:, 0], -0.5)


def test_cars_are_left_alone_and_appliances_start_when_allowed():
    actions = rule().act(observe(hour=19, load=3.2, solar=0.0))
    assert actions[0, 1] == 0.0 and actions[0, 2] == 1.0
    assert actions[1, 1] == actions[1, 2] == 0.0  # padded slots of B


@pytest.mark.citylearn
def test_in_a_dagger_pass_the_clone_acts_and_the_rule_labels_what_it_visits(week_spec):
    from maddpg_evaluation.citylearn_env import CityLearnAdapter
    from maddpg_training.bootstrap import warmup
    from maddpg_training.demonstration import collect_demonstration
    from maddpg_training.replay import ReplayBuffer
    from maddpg_training.team_reward import TeamReward

    warm = warmup(week_spec)
    layout, env = warm.layout, week_spec.build()
    demonstrator = SelfConsumptionRule(layout, warm.baseline.battery_capacity)
    buffer = ReplayBuffer(1_000, layout.observation_shape, layout.action_shape, layout.n_agents + 1)

    def idle_clone(z: torch.Tensor) -> torch.Tensor:  # a clone that learned nothing: it never moves a battery
        return torch.zeros(layout.action_shape)

    visited, labels = collect_demonstration(
        env, CityLearnAdapter(layout, env, what="test"), demonstrator, TeamReward(layout, warm.baseline),
        torch.nn.Identity(), buffer, noise=0.0, generator=torch.Generator().manual_seed(0), behaviour=idle_clone)

    assert len(visited) == len(buffer) == week_spec.end - week_spec.start
    assert torch.all(buffer.actions[:len(buffer)] == 0), "the clone acted, not the rule"
    # The labels are the rule's actions on the states the clone visited (raw here: the normaliser is the identity).
    expected = torch.stack([torch.from_numpy(demonstrator.act(o.numpy())) for o in visited])
    assert torch.equal(labels, expected) and torch.equal(buffer.guide_actions[:len(buffer)], expected)
    assert (labels[:, :, 0] > 0).any() and (labels[:, :, 0] < 0).any(), "the rule would have charged and discharged"
