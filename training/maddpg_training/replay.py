"""Uniform replay of joint transitions (all agents' normalised observations and unit actions, the team reward's shares)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    observations: torch.Tensor       # [batch, agents, obs_width], normalised
    actions: torch.Tensor            # [batch, agents, action_width], unit scale [-1, 1]
    rewards: torch.Tensor            # [batch, shares]: the team reward split into shares that sum to it
    next_observations: torch.Tensor  # [batch, agents, obs_width], normalised
    guide_actions: torch.Tensor      # [batch, agents, action_width]: what the demonstrator would have done there


class ReplayBuffer:
    """A ring buffer of preallocated tensors: adding a step is a copy, sampling is one gather."""

    def __init__(self, capacity: int, observation_shape: tuple[int, int], action_shape: tuple[int, int], shares: int):
        self.capacity = capacity
        self.observations = torch.zeros((capacity, *observation_shape))
        self.next_observations = torch.zeros((capacity, *observation_shape))
        self.actions = torch.zeros((capacity, *action_shape))
        self.rewards = torch.zeros((capacity, shares))
        self.guide_actions = torch.zeros((capacity, *action_shape))
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, observation: torch.Tensor, action: torch.Tensor, reward, next_observation: torch.Tensor,
            guide_action: torch.Tensor) -> None:
        i = self._next
        self.guide_actions[i] = guide_action
        self.observations[i] = observation
        self.actions[i] = action
        self.rewards[i] = torch.as_tensor(reward)
        self.next_observations[i] = next_observation
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return Batch(self.observations[index], self.actions[index], self.rewards[index], self.next_observations[index],
                     self.guide_actions[index])
