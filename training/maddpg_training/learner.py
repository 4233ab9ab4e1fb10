"""The learner of cooperative MADDPG: stacked decentralised actors, a twin centralised critic, their targets.

One actor objective for cloning and fine-tuning (TD3+BC): ``- alpha * Q(o, mu(o)) / mean|Q| + |mu(o_l) - teacher(o_l)|^2``
with ``alpha = 0`` meaning cloning alone; the same loss, the same optimiser (its moments carried from cloning into
fine-tuning), so the clone is not pushed elsewhere the moment fine-tuning starts.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from .config import TrainConfig
from .networks import PolicyNetwork, TwinCentralCritic
from .replay import Batch, LabelledStates
from .team_reward import STATE_WIDTH
from .trace import TrainingTrace

BC_TARGET_LIMIT = 0.98  # tanh actors cannot reach +-1: cloning a full-power action aims just inside it


def two_sided_slots(policy: PolicyNetwork) -> torch.Tensor:
    """``[agents, action_width]``: 1 where an action may go both ways (batteries), 0 on one-sided slots.

    Gaussian noise on a [0, 1] slot (an EV charger, the appliance) is clipped at 0 into extra charging: a bias, not
    exploration. Exploration and target smoothing therefore act on two-sided slots only (``noise_slots``).
    """
    low, high = policy.layout.action_bounds()
    return torch.as_tensor((np.asarray(low) < 0) & (np.asarray(high) > 0), dtype=torch.float32)


def charger_slots(policy: PolicyNetwork) -> torch.Tensor:
    """``[agents, action_width]``: 1 on the EV chargers' action slots (those the safety layer guards), else 0."""
    slots = torch.zeros(policy.layout.action_shape)
    for charger in policy.safety_spec.chargers if policy.safety_spec is not None else ():
        slots[charger.agent, charger.action] = 1.0
    return slots


class MADDPG:
    def __init__(self, policy: PolicyNetwork, config: TrainConfig, shares: int):
        self.config = config
        self.policy = policy
        self.actors = policy.actors
        inputs = policy.layout.obs_width + policy.features.width
        self.critic = TwinCentralCritic(policy.layout, inputs, shares, STATE_WIDTH, config.critic_hidden)
        self.target_actors = copy.deepcopy(self.actors).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actors.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.mask = self.actors.action_mask
        self.noise_mask = self.mask * (two_sided_slots(policy) if config.noise_slots == "two-sided" else 1.0)
        self.undercharge_extra = (config.undercharge_weight - 1.0) * charger_slots(policy) * self.mask
        self.updates = 0

    # --- acting ---------------------------------------------------------------------------------------------------
    def env_actions(self, observations: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Unit actions -> what the env gets: clipped to the bounds, then the safety layer."""
        return self.policy.guard(observations, self.policy.scaler(unit))

    @torch.no_grad()
    def act(self, raw: np.ndarray, std: float = 0.0, generator: torch.Generator | None = None) -> np.ndarray:
        """Env actions ``[agents, action_width]`` for one raw observation, with Gaussian exploration when ``std`` > 0."""
        x = torch.from_numpy(raw)[None]
        unit = self.actors(self.policy.actor_inputs(x))
        if std > 0:
            unit = (unit + torch.randn(unit.shape, generator=generator) * std * self.noise_mask).clamp(-1.0, 1.0)
        return self.env_actions(x, unit * self.mask)[0].numpy()

    # --- the critic -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_actions(self, next_observations: torch.Tensor, next_inputs: torch.Tensor) -> torch.Tensor:
        """The target actors' actions with TD3's smoothing noise (two-sided slots only), through the safety layer."""
        cfg = self.config
        noise = (torch.randn((len(next_observations), *self.mask.shape)) * cfg.target_noise).clamp(
            -cfg.target_noise_clip, cfg.target_noise_clip) * self.noise_mask
        unit = (self.target_actors(next_inputs) + noise).clamp(-1.0, 1.0) * self.mask
        return self.env_actions(next_observations, unit)

    @torch.no_grad()
    def bootstrap(self, next_observations: torch.Tensor, next_state: torch.Tensor) -> torch.Tensor:
        """``[batch, shares]``: clipped double Q on the team's value. The head whose team Q (the sum of shares, what
        the actors maximise) is lower supplies every share; a min taken per share would mix the two heads and be
        more pessimistic than either."""
        next_inputs = self.policy.actor_inputs(next_observations)
        q = self.target_critic(next_inputs, self.target_actions(next_observations, next_inputs), next_state)
        lower = q.sum(dim=-1).argmin(dim=0)                                        # [batch]: which head
        return q.gather(0, lower.view(1, -1, 1).expand(1, -1, q.shape[-1]))[0]

    def critic_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        target = batch.returns + batch.discounts * self.bootstrap(batch.next_observations, batch.next_state)
        q = self.critic(self.policy.actor_inputs(batch.observations), batch.actions, batch.state)  # [2, batch, shares]
        loss = (q - target.unsqueeze(0)).pow(2).mean(dim=1).sum()
        stats = {"critic_loss": loss.item(), "q": q[0].detach().sum(-1).mean().item(),
                 "target": target.sum(-1).mean().item(),
                 "td_error": (q[0].detach().sum(-1) - target.sum(-1)).abs().mean().item()}
        return loss, stats

    @torch.no_grad()
    def q_values(self, observations: torch.Tensor, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The team's Q (first critic, shares summed) of given transitions, in chunks."""
        out = []
        for i in range(0, len(observations), 1024):
            inputs = self.policy.actor_inputs(observations[i:i + 1024])
            out.append(self.critic(inputs, actions[i:i + 1024], state[i:i + 1024])[0].sum(-1))
        return torch.cat(out)

    # --- the actors -----------------------------------------------------------------------------------------------
    def cloning_loss(self, observations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between the deployed policy's actions (safety layer included) and the teacher's; a
        charger below the teacher's action weighs ``undercharge_weight`` times (1: the plain mean squared error).
        An ensemble's members each fit their own slice of the batch (``label_batch``), not their mean: averaging
        members fitted apart is what lowers the variance of the clone.

        The applied action is the actor's output clipped to the slot's bounds, then raised to the safety floor; both
        are flat where they bind, so a charger output below 0 gets no gradient from a label that charges. With
        ``clone_through_bounds`` the applied action's error is passed straight through to the output, and an
        output beyond its bounds is pulled back to them (so that members averaged before the clip, as the graph
        does, agree with the members fitted after it)."""
        k = self.actors.ensemble
        if len(observations) % k:
            raise ValueError(f"{len(observations)} labelled states cannot be split evenly among an ensemble of {k} "
                             f"actors per building: pass a multiple of {k} (label_batch() is one)")
        inputs = self.policy.actor_inputs(observations)
        unit = self.actors.members(inputs.reshape(k, -1, *inputs.shape[1:])).reshape(observations.shape[0],
                                                                                     *self.mask.shape)
        target = targets.clamp(-BC_TARGET_LIMIT, BC_TARGET_LIMIT) * self.mask
        applied = self.env_actions(observations, unit)
        outside = torch.zeros(())
        if self.config.clone_through_bounds:
            applied = unit + (applied - unit).detach()
            outside = (unit - self.policy.scaler(unit)).mul(self.mask).pow(2).sum()
        error = (applied - target) * self.mask
        weight = 1.0 + self.undercharge_extra * (error < 0)
        return ((weight * error.pow(2)).sum() + outside) / self.mask.sum() / len(observations)

    def label_batch(self) -> int:
        """Labelled states per actor step: a batch for each member of an ensemble."""
        return self.config.batch_size * self.actors.ensemble

    def team_q_of_actors(self, observations: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``[batch]``: the first critic's team Q of the current actors' (deterministic) actions."""
        inputs = self.policy.actor_inputs(observations)
        q = self.critic(inputs, self.env_actions(observations, self.actors(inputs)), state)[0]   # [batch, shares]
        # The team's Q: every share, or the buildings' (the last two shares are the district's peaks).
        return (q if self.config.actor_q_terms == "all" else q[..., :self.policy.layout.n_agents]).sum(dim=-1)

    def actor_loss(self, batch: Batch | None, labelled: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """TD3+BC: ``- alpha * Q / mean|Q| + cloning``. With alpha 0 (or no batch) it *is* the cloning loss."""
        loss, stats = torch.zeros(()), {}
        if batch is not None and self.config.bc_alpha > 0:
            q = self.team_q_of_actors(batch.observations, batch.state)
            scale = self.config.bc_alpha / q.abs().mean().detach().clamp_min(1e-6)
            loss = loss - scale * q.mean()
            stats.update(actor_q=q.mean().item(), q_scale=scale.item())
        if labelled is not None:
            cloning = self.cloning_loss(*labelled)
            loss = loss + cloning
            stats["cloning_loss"] = cloning.item()
        stats["actor_loss"] = loss.item()
        return loss, stats

    def update(self, batch: Batch, labelled: LabelledStates | None = None, *, train_actors: bool = True,
               generator: torch.Generator | None = None) -> dict[str, float]:
        """One critic step; every ``policy_delay``-th, an actor step and the Polyak averaging of the targets."""
        cfg = self.config
        loss, stats = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
        self.critic_optimizer.step()
        self.updates += 1

        if train_actors and self.updates % cfg.policy_delay == 0:
            self.critic.requires_grad_(False)  # the actor step must leave no gradient on the critic
            sample = labelled.sample(self.label_batch(), generator) if labelled is not None and len(labelled) else None
            actor_loss, actor_stats = self.actor_loss(batch, sample)
            if actor_loss.requires_grad:  # alpha 0 and no labels: nothing moves the actors
                self.actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                nn.utils.clip_grad_norm_(self.actors.parameters(), cfg.grad_clip)
                self.actor_optimizer.step()
            self.critic.requires_grad_(True)
            soft_update(self.target_actors, self.actors, cfg.tau)
            soft_update(self.target_critic, self.critic, cfg.tau)
            stats.update(actor_stats)
        elif not train_actors:
            soft_update(self.target_critic, self.critic, cfg.tau)
        return stats

    def clone(self, labelled: LabelledStates, *, steps: int, generator: torch.Generator,
              trace: TrainingTrace | None = None, progress: bool = False) -> float:
        """Behaviour cloning (the actor objective with alpha 0), cosine-decayed from ``clone_lr`` to ``actor_lr``;
        fine-tuning then goes on with this optimiser at ``actor_lr``: same loss, same moments, same rate."""
        cfg = self.config
        optimizer = torch.optim.Adam(self.actors.parameters(), lr=cfg.clone_lr)
        # Measured on Aug-Sep: 300 more cloning steps at a tenth of the rate lowered the clone's mean headline KPI
        # from 1.284 to 1.253, so a clone left at the full rate is not converged.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps),
                                                              eta_min=min(cfg.actor_lr, cfg.clone_lr))
        loss = torch.tensor(math.nan)
        for step in trange(steps, desc="behaviour cloning", unit="update", disable=not progress, leave=False):
            loss, _ = self.actor_loss(None, labelled.sample(self.label_batch(), generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if trace is not None and step % 50 == 0:
                trace.write("clone", step=step, loss=loss.item(), labelled=len(labelled))
        for group in optimizer.param_groups:
            group["lr"] = cfg.actor_lr
        self.actor_optimizer = optimizer
        self.target_actors.load_state_dict(self.actors.state_dict())
        return loss.item()

    def restore_actors(self, state: dict, optimizer_state: dict) -> None:
        """Back to earlier actors (a rejected improvement), their targets and their optimiser's moments."""
        self.actors.load_state_dict(state)
        self.target_actors.load_state_dict(state)
        self.actor_optimizer.load_state_dict(optimizer_state)

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "target_actors": self.target_actors.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target_actors.load_state_dict(state["target_actors"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.updates = int(state["updates"])


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)
