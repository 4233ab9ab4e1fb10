"""What CTDE rests on, on a 2-agent layout: decentralised actors, a centralised critic the actor step leaves alone,
targets that move by tau, n-step returns that stay inside their episode, cloning that moves towards the teacher."""

from __future__ import annotations

import numpy as np
import torch

from maddpg_core.layout import layout_from_names
from maddpg_training.config import TrainConfig
from maddpg_training.networks import ActorSpec, PolicyNetwork
from maddpg_training.replay import LabelledStates, ReplayBuffer
from maddpg_training.safety import ChargerSlot, SafetySpec
from maddpg_training.trainer import MADDPG

CAR = ["electric_vehicle_charger_c_connected_state", "connected_electric_vehicle_at_charger_c_departure_time",
       "connected_electric_vehicle_at_charger_c_required_soc_departure", "connected_electric_vehicle_at_charger_c_soc",
       "connected_electric_vehicle_at_charger_c_battery_capacity"]
SHARES, STATE = 4, 5


def two_agents(seed: int = 0):
    layout = layout_from_names(["A", "B"], [["hour", "load", *CAR], ["hour", "load"]],
                               [["electrical_storage", "electric_vehicle_storage_c"], ["electrical_storage"]],
                               [[-1, 0], [-1]], [[1, 1], [1]])
    safety = SafetySpec(chargers=(ChargerSlot(0, 1, 2, 3, 4, 5, 6, max_power_kw=7.0, min_power_kw=0.0),))
    torch.manual_seed(seed)
    policy = PolicyNetwork(layout, ActorSpec((16, 16), ("hour_cycle", "ev_slack")), safety)
    config = TrainConfig(batch_size=8, tau=0.1, policy_delay=1, actor_lr=1e-2, critic_lr=1e-2, n_step=3)
    return layout, policy, MADDPG(policy, config, SHARES)


def observations(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2, 7)).astype(np.float32)
    x[:, 0, 0] = rng.integers(1, 25, n)
    x[:, 0, 2:7] = [1.0, 5.0, 0.9, 0.5, 40.0]  # a connected car, 5 h to departure
    x[:, 1, 2:] = 0.0                            # B's row is 2 observations long
    return torch.from_numpy(x)


def filled_buffer(layout, learner, n: int = 40) -> ReplayBuffer:
    buffer = ReplayBuffer(100, layout.observation_shape, layout.action_shape, SHARES, STATE)
    obs = observations(n + 1)
    for t in range(n):
        buffer.add(obs[t], learner.act(obs[t].numpy()), np.full(SHARES, float(t)), obs[t + 1], np.zeros(STATE),
                   np.zeros(STATE), episode=t // 20)
    return buffer


def test_each_actor_reads_only_its_own_buildings_row():
    _, policy, _ = two_agents()
    x = observations(5)
    before = policy(x).detach()
    changed = x.clone()
    changed[:, 1, :2] += 3.0                       # building B's observations move ...
    after = policy(changed).detach()
    assert torch.equal(after[:, 0], before[:, 0])  # ... A's actions (safety layer included) do not
    assert not torch.equal(after[:, 1], before[:, 1])


def test_the_critic_sees_every_agent():
    layout, policy, learner = two_agents()
    x = observations(4)
    actions = policy(x).detach()
    inputs = policy.actor_inputs(x).detach()
    q = learner.critic(inputs, actions, torch.zeros(4, STATE))
    other = actions.clone()
    other[:, 1, 0] += 0.5                          # only B's action changes
    assert not torch.allclose(q, learner.critic(inputs, other, torch.zeros(4, STATE)))


def test_after_an_actor_step_the_targets_have_moved_by_tau():
    layout, policy, learner = two_agents()
    buffer = filled_buffer(layout, learner)
    generator = torch.Generator().manual_seed(0)
    learner.update(buffer.sample(8, generator, n_step=3), train_actors=False)  # the critic has a history first
    actors_before = [p.clone() for p in learner.target_actors.parameters()]
    critic_before = [p.clone() for p in learner.target_critic.parameters()]
    stats = learner.update(buffer.sample(8, generator, n_step=3), train_actors=True)
    assert "actor_loss" in stats
    for before, now, source in zip(actors_before, learner.target_actors.parameters(), learner.actors.parameters()):
        assert torch.allclose(now, 0.9 * before + 0.1 * source, atol=1e-6)
    for before, now, source in zip(critic_before, learner.target_critic.parameters(), learner.critic.parameters()):
        assert torch.allclose(now, 0.9 * before + 0.1 * source, atol=1e-6)


def test_the_actor_step_puts_no_gradient_on_the_critic():
    layout, policy, learner = two_agents()
    buffer = filled_buffer(layout, learner)
    generator = torch.Generator().manual_seed(1)
    seen, critic_step = [], learner.critic_optimizer.step

    def step_then_watch(*args, **kwargs):
        # After the critic's own step, any gradient reaching a critic parameter comes from the actor's loss.
        result = critic_step(*args, **kwargs)
        for parameter in learner.critic.parameters():
            parameter.register_hook(lambda grad: seen.append(grad))
        return result

    learner.critic_optimizer.step = step_then_watch
    stats = learner.update(buffer.sample(8, generator, n_step=3), train_actors=True)
    assert "actor_loss" in stats and stats["actor_q"] != 0.0
    assert seen == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.actors.parameters())


def test_n_step_returns_sum_discounted_rewards_and_stop_at_the_episode_end():
    layout, policy, learner = two_agents()
    buffer = filled_buffer(layout, learner)   # rewards t at step t; steps 0-19 episode 0, 20-39 episode 1
    batch = buffer.sample(0, None, n_step=3, gamma=0.5, index=torch.tensor([0, 18, 19, 39]))
    expected = torch.tensor([0 + 0.5 * 1 + 0.25 * 2, 18 + 0.5 * 19, 19.0, 39.0])
    assert torch.allclose(batch.returns[:, 0], expected)
    assert torch.allclose(batch.discounts[:, 0], torch.tensor([0.125, 0.25, 0.5, 0.5]))
    assert torch.equal(batch.next_observations[1], buffer.next_observations[19])  # bootstraps from its own episode


def test_cloning_moves_the_deployed_policy_towards_the_teacher():
    layout, policy, learner = two_agents()
    x = observations(64, seed=3)
    teacher = torch.zeros((64, 2, 2))
    teacher[:, 0, 0], teacher[:, 1, 0] = 0.6, -0.4
    labelled = LabelledStates(layout.observation_shape, layout.action_shape)
    labelled.extend(x, teacher)
    generator = torch.Generator().manual_seed(0)
    before = learner.cloning_loss(x, teacher).item()
    learner.clone(labelled, steps=200, generator=generator)
    assert learner.cloning_loss(x, teacher).item() < 0.1 * before
    assert all(torch.equal(a, b) for a, b in zip(learner.target_actors.parameters(), learner.actors.parameters()))


def test_with_alpha_zero_fine_tuning_is_cloning_only():
    layout, policy, learner = two_agents()
    learner.config = TrainConfig(batch_size=8, policy_delay=1, bc_alpha=0.0, preactivation_penalty=0.0)
    buffer = filled_buffer(layout, learner)
    stats = learner.update(buffer.sample(8, torch.Generator().manual_seed(0), n_step=3))
    assert stats["q_scale"] == 0.0


class _PeaksOnlyCritic(torch.nn.Module):
    """A critic whose building shares ignore the actions and whose two peak shares follow them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, inputs, actions, state):
        a = actions.sum(dim=(1, 2)) * self.weight
        q = torch.stack([torch.zeros_like(a), torch.zeros_like(a), a, a], dim=-1)   # [batch, 2 buildings + 2 peaks]
        return torch.stack([q, q])


def test_actors_ascend_only_the_building_shares_when_asked():
    moved = {}
    for terms in ("all", "buildings"):
        layout, policy, learner = two_agents()
        buffer = filled_buffer(layout, learner)
        learner.config = TrainConfig(batch_size=8, policy_delay=1, bc_alpha=1.0, preactivation_penalty=0.0,
                                     actor_lr=1e-2, actor_q_terms=terms)
        learner.critic, learner.target_critic = _PeaksOnlyCritic(), _PeaksOnlyCritic()
        learner.critic_optimizer = torch.optim.Adam(learner.critic.parameters())
        before = [p.detach().clone() for p in learner.actors.parameters()]
        learner.update(buffer.sample(8, torch.Generator().manual_seed(0), n_step=3))
        moved[terms] = any(not torch.equal(b, p) for b, p in zip(before, learner.actors.parameters()))
    assert moved == {"all": True, "buildings": False}
