"""Replay of joint transitions with n-step returns, and the teacher's labelled states for behaviour cloning.

A transition is what every agent saw and did at one step: raw observations (the policy normalises them itself, so the
safety layer and the in-graph features can be recomputed on a sample), the applied actions (after the safety layer:
what the env really did), the team reward's shares, the district state the critic reads, the episode it belongs to
and its time step, so that n-step returns never cross from one episode into the next, nor over steps that are not in
the buffer (days held out of a pass, a window's end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    observations: torch.Tensor       # [batch, agents, obs_width] raw
    actions: torch.Tensor            # [batch, agents, action_width] applied (env scale, after the safety layer)
    returns: torch.Tensor            # [batch, shares]: sum_j<m gamma^j r_{t+j} per share
    discounts: torch.Tensor          # [batch, 1]: gamma^m, the weight of the bootstrap value
    state: torch.Tensor              # [batch, state_width] district state before the step
    next_observations: torch.Tensor  # [batch, agents, obs_width] raw, m steps later
    next_state: torch.Tensor         # [batch, state_width]


class ReplayBuffer:
    """A ring buffer of preallocated tensors: adding a step is a copy; sampling gathers n steps per sample."""

    def __init__(self, capacity: int, observation_shape: tuple[int, int], action_shape: tuple[int, int], shares: int,
                 state_width: int):
        self.capacity = capacity
        self.observations = torch.zeros((capacity, *observation_shape))
        self.next_observations = torch.zeros((capacity, *observation_shape))
        self.actions = torch.zeros((capacity, *action_shape))
        self.rewards = torch.zeros((capacity, shares))
        self.state = torch.zeros((capacity, state_width))
        self.next_state = torch.zeros((capacity, state_width))
        self.episode = torch.full((capacity,), -1, dtype=torch.long)
        self.time_step = torch.full((capacity,), -1, dtype=torch.long)
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, observation, action, reward, next_observation, state, next_state, episode: int, time_step: int
            ) -> None:
        i = self._next
        self.observations[i] = torch.as_tensor(observation)
        self.actions[i] = torch.as_tensor(action)
        self.rewards[i] = torch.as_tensor(reward)
        self.next_observations[i] = torch.as_tensor(next_observation)
        self.state[i] = torch.as_tensor(state)
        self.next_state[i] = torch.as_tensor(next_state)
        self.episode[i] = episode
        self.time_step[i] = time_step
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator, *, n_step: int = 1, gamma: float = 0.99,
               index: torch.Tensor | None = None, recent: int | None = None) -> Batch:
        """Uniform samples (of the ``recent`` newest steps only, or those at ``index``) with up to ``n_step``-step
        returns over consecutive time steps of their own episode."""
        if index is None and recent is not None:
            back = torch.randint(0, max(1, min(recent, self.size)), (batch_size,), generator=generator)
            index = (self._next - 1 - back) % self.capacity
        elif index is None:
            index = torch.randint(0, self.size, (batch_size,), generator=generator)
        offsets = torch.arange(n_step)
        steps = (index[:, None] + offsets[None, :]) % self.capacity               # [batch, n]
        # A step counts while it is written, in the same episode, the next time step (not over a gap), and not past
        # the write head (the newest step).
        newest = (self._next - 1) % self.capacity
        distance_to_head = (newest - index) % self.capacity
        same = ((self.episode[steps] == self.episode[index][:, None])
                & (self.time_step[steps] == self.time_step[index][:, None] + offsets[None, :])
                & (offsets[None, :] <= distance_to_head[:, None]))
        valid = torch.cumprod(same.long(), dim=1).bool()                          # contiguous from the first step
        length = valid.sum(dim=1)                                                  # m >= 1
        weights = (gamma ** offsets.float())[None, :] * valid.float()              # [batch, n]
        returns = (self.rewards[steps] * weights[..., None]).sum(dim=1)
        last = steps[torch.arange(len(index)), length - 1]
        return Batch(
            observations=self.observations[index], actions=self.actions[index], returns=returns,
            discounts=(gamma ** length.float())[:, None], state=self.state[index],
            next_observations=self.next_observations[last], next_state=self.next_state[last],
        )


class LabelledStates:
    """States the teacher labelled (raw observations and the teacher's env actions), for behaviour cloning."""

    def __init__(self, observation_shape: tuple[int, int], action_shape: tuple[int, int]):
        self.observations = torch.zeros((0, *observation_shape))
        self.targets = torch.zeros((0, *action_shape))

    def __len__(self) -> int:
        return len(self.observations)

    def extend(self, observations: torch.Tensor, targets: torch.Tensor) -> None:
        self.observations = torch.cat([self.observations, torch.as_tensor(observations, dtype=torch.float32)])
        self.targets = torch.cat([self.targets, torch.as_tensor(targets, dtype=torch.float32)])

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.observations[index], self.targets[index]
