"""Cooperative MADDPG with centralised training and decentralised execution (CTDE), TD3-style.

The algorithm, per environment step ``t``::

    o_t            = every building's own observation (normalised with statistics frozen after the warm-up)
    a_t^i          = mu_i(o_t^i) + N(0, sigma_episode)          decentralised: actor i sees only building i
    r_t            = team_reward(t), split into shares r_t^j      one reward for the team, sum_j r_t^j
    store (o_t, a_t, r_t^., o_{t+1})
    every `update_every` steps, on a minibatch:
        a'   = clip(mu'(o') + clip(N(0, target_noise), +-c), +-1)          target policy smoothing
        y^j  = r^j + gamma * min(Q1'^j, Q2'^j)(o', a')                     clipped double Q, per share
        minimise sum_j (Q_k^j(o, a) - y^j)^2 for both critics              centralised critic sees all o and a
        every `policy_delay` critic updates:
            maximise sum_j Q1^j(o, mu(o)) - lambda * |pre-tanh mu(o)|^2    the team's Q; each actor gets dQ/da_i
                 (with a demonstration: alpha * Q / |Q| - |mu(o) - rule(o)|^2, TD3+BC)
            Polyak-average the targets (rate tau)

Episode ends are time limits, not terminal states: the target always bootstraps.

Before the first episode (``demonstration``, on by default) the replay buffer is seeded with one pass of a
self-consumption rule, the actors are cloned from it and the critic is fitted to it (DDPG from demonstrations): TD3
then improves on a sensible policy instead of starting from random weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm, trange

from maddpg_core.errors import CheckpointError
from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.kpis import district_kpis, headline_score, service_levels

from .bootstrap import fresh_policy, reference_sample, warmup, without_ev_discharge
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .demonstration import SelfConsumptionRule, clone, collect_demonstration
from .networks import ActorSpec, PolicyNetwork, TwinCentralCritic
from .replay import Batch, ReplayBuffer
from .team_reward import TeamReward
from .torch_policy import TorchPolicy

log = logging.getLogger(__name__)

ACTING_SYNC_UPDATES = 200  # GPU learner: refresh the CPU acting copy of the actors every this many updates


class MADDPG:
    """The learner: stacked actors (inside the deployable policy), a twin centralised critic, their targets."""

    def __init__(self, policy: PolicyNetwork, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device
        self.policy = policy.to(device)
        self.actors = policy.actors
        self.critic = TwinCentralCritic(policy.layout, config.critic_hidden).to(device)
        self.target_actors = copy.deepcopy(self.actors).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actors.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.action_mask = self.actors.action_mask
        # Acting happens every env step on the CPU: on a GPU learner a CPU copy of the actors is refreshed now and
        # then instead of moving every observation to the device and back.
        self.acting_actors = self.actors if device.type == "cpu" else copy.deepcopy(self.actors).cpu()
        self.updates = 0

    @torch.no_grad()
    def explore(self, z: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
        """Unit actions ``[agents, action_width]`` for one normalised observation, with Gaussian exploration."""
        unit = self.acting_actors(z.unsqueeze(0))[0]
        noise = torch.randn(unit.shape, generator=generator) * std
        return (unit + noise).clamp(-1.0, 1.0) * self.acting_actors.action_mask

    def update(self, batch: Batch, *, train_actors: bool = True) -> dict[str, float]:
        cfg = self.config
        z, a, r, z_next, guide = (t.to(self.device, non_blocking=True) for t in
                                  (batch.observations, batch.actions, batch.rewards, batch.next_observations,
                                   batch.guide_actions))
        with torch.no_grad():
            noise = (torch.randn_like(a) * cfg.target_noise).clamp(-cfg.target_noise_clip, cfg.target_noise_clip)
            a_next = (self.target_actors(z_next) + noise).clamp(-1.0, 1.0) * self.action_mask
            target = r + cfg.gamma * self.target_critic(z_next, a_next).min(dim=0).values  # [batch, shares]

        q = self.critic(z, a)
        critic_loss = (q - target.unsqueeze(0)).pow(2).mean(dim=1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
        self.critic_optimizer.step()
        self.updates += 1
        stats = {"critic_loss": critic_loss.item(), "q": q[0].detach().sum(dim=-1).mean().item()}

        if train_actors and self.updates % cfg.policy_delay == 0:
            self.critic.requires_grad_(False)  # the actor step must not leave gradients on the critic
            preactivation = self.actors.preactivation(z) * self.action_mask
            actions = torch.tanh(preactivation) * self.action_mask
            q = self.critic(z, actions)[0].sum(dim=-1)  # the team's Q
            # A small pull towards the unsaturated range: a saturated tanh has no gradient, and an actor pinned at
            # a bound early (e.g. "always discharge the EV") could never learn its way back.
            actor_loss = cfg.preactivation_penalty * preactivation.pow(2).mean()
            if cfg.demonstration and cfg.guide_alpha > 0:
                # TD3+BC (Fujimoto & Gu, 2021): Q normalised by its own scale, plus each agent's squared distance
                # to the demonstrator's action. The critic is wrong where the data never went (e.g. charging every
                # car at full power); this keeps the actors where it can be trusted while they improve on the rule.
                scale = cfg.guide_alpha / q.abs().mean().detach().clamp_min(1e-6)
                distance = (actions - guide).pow(2).sum(dim=(1, 2)).mean() / actions.shape[1]
                actor_loss = actor_loss - scale * q.mean() + distance
            else:
                actor_loss = actor_loss - q.mean()
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            nn.utils.clip_grad_norm_(self.actors.parameters(), cfg.grad_clip)
            self.actor_optimizer.step()
            self.critic.requires_grad_(True)
            _soft_update(self.target_actors, self.actors, cfg.tau)
            _soft_update(self.target_critic, self.critic, cfg.tau)
            stats["actor_loss"] = actor_loss.item()
            if self.acting_actors is not self.actors and self.updates % ACTING_SYNC_UPDATES == 0:
                self.acting_actors.load_state_dict(self.actors.state_dict())
        elif not train_actors:
            _soft_update(self.target_critic, self.critic, cfg.tau)
        return stats

    def actors_changed(self) -> None:
        """The actors were set from outside (behaviour cloning): targets and the acting copy follow at once."""
        self.target_actors.load_state_dict(self.actors.state_dict())
        if self.acting_actors is not self.actors:
            self.acting_actors.load_state_dict(self.actors.state_dict())

    def state_dict(self) -> dict:
        return {
            "critic": self.critic.state_dict(),
            "target_actors": self.target_actors.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target_actors.load_state_dict(state["target_actors"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.updates = int(state["updates"])


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so --resume continues from it."""

    episodes_done: int = 0
    env_steps: int = 0
    seconds: float = 0.0
    learning_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_score: float = math.inf
    best_episode: int | None = None
    demonstration: dict | None = None


@dataclass
class TrainResult:
    out_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path | None
    summary: dict


def train(config: TrainConfig, out_dir: str | Path, *, resume: str | Path | None = None, progress: bool = True,
          evaluation: EnvSpec | None = None, evaluate_every: int = 0,
          say: Callable[[str], None] = lambda _: None) -> TrainResult:
    """Train, checkpointing every episode; finish with a deterministic evaluation on ``evaluation`` (default: the
    whole dataset). ``evaluate_every`` > 0 also evaluates deterministically every that many episodes and keeps the
    best-scoring policy as ``best.pt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    spec = EnvSpec(schema=config.dataset, start=config.start, end=config.end, random_seed=config.seed)
    evaluation = evaluation or EnvSpec(schema=config.dataset, random_seed=config.seed)
    spec.check_window()
    evaluation.check_window()

    say(f"warm-up: one no-control pass over {spec.dataset_name} for observation statistics and the reward baseline")
    warm = warmup(spec, progress=progress)
    layout = warm.layout if config.allow_ev_discharge else without_ev_discharge(warm.layout)
    actor_spec = ActorSpec(hidden_sizes=config.actor_hidden)
    state = Progress()
    generator = torch.Generator().manual_seed(config.seed)
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        layout.require_compatible(checkpoint.layout, what=f"checkpoint {resume}")
        if checkpoint.trainer is None:
            raise CheckpointError(f"{resume} holds no trainer state (it is an exported or initial policy); cannot resume")
        layout = checkpoint.layout  # its action bounds are part of what was trained
        policy = checkpoint.build_policy()
        learner = MADDPG(policy, config, device)
        learner.load_state_dict(checkpoint.trainer["learner"])
        state = Progress(**checkpoint.trainer["progress"])
        generator.set_state(checkpoint.trainer["generator"])
        say(f"resuming after episode {state.episodes_done} ({state.env_steps} env steps) from {resume}")
    else:
        policy = fresh_policy(layout, warm.observations, actor_spec, seed=config.seed)
        learner = MADDPG(policy, config, device)
    reference = reference_sample(warm.observations, np.random.default_rng(config.seed))
    team_reward = TeamReward(layout, warm.baseline, config.reward, gamma=config.gamma)
    buffer = ReplayBuffer(config.buffer_size, layout.observation_shape, layout.action_shape, layout.n_agents + 1)
    env = spec.build()
    adapter = CityLearnAdapter(layout, env, what="the policy being trained")
    # Per-step work stays on the CPU (frozen normaliser, action scaling, acting copy of the actors): with a GPU
    # learner only the sampled minibatches cross to the device.
    normalise, to_env = copy.deepcopy(policy.normaliser).cpu(), copy.deepcopy(policy.scaler).cpu()

    def write(name: str, summary: dict) -> Path:
        return save_checkpoint(out_dir / name, Checkpoint(
            layout=layout, actor_spec=actor_spec, policy={k: v.cpu() for k, v in policy.state_dict().items()},
            reference_observations=reference, summary=summary,
            # Counters and history as plain JSON types: the checkpoint must load with weights_only=True.
            trainer={"learner": learner.state_dict(), "progress": json.loads(json.dumps(state.__dict__)),
                     "generator": generator.get_state(), "config": config.to_dict()},
        ))

    def evaluate():
        """The current policy, deterministic, through the evaluate command's runner."""
        return run_episode(evaluation.build(), TorchPolicy(copy.deepcopy(policy).cpu()), name="evaluation",
                           progress=progress)

    def evaluate_and_keep_best(episode: int) -> dict:
        """Deterministic evaluation; the best-scoring policy so far is kept as best.pt."""
        result = evaluate()
        score = headline_score(result.kpis)
        if score < state.best_score:
            state.best_score, state.best_episode = score, episode
            write("best.pt", {"trained": True, "episode": episode, "evaluation": result.kpis,
                              "evaluation_service": result.service})
        return {"evaluation_kpis": result.kpis, "evaluation_service": result.service}

    rule = SelfConsumptionRule(layout, warm.baseline.battery_capacity) if config.demonstration else None
    zero_guide = np.zeros(layout.action_shape, dtype=np.float32)
    if config.demonstration and resume is None:
        say(f"demonstration: one pass with the self-consumption rule, behaviour cloning, {config.dagger_rounds} "
            "DAgger round(s), critic warm-up")
        started = time.perf_counter()
        observations, targets = collect_demonstration(env, adapter, rule, team_reward, normalise, buffer,
                                                      noise=config.demonstration_noise, generator=generator,
                                                      progress=progress)
        state.env_steps += len(observations)

        def clone_actors() -> float:
            loss = clone(learner.actors, observations, targets, steps=config.clone_steps,
                         batch_size=config.batch_size, lr=config.clone_lr, generator=generator, progress=progress)
            learner.actors_changed()
            return loss

        clone_loss = clone_actors()
        for _ in range(config.dagger_rounds):
            visited, labels = collect_demonstration(
                env, adapter, rule, team_reward, normalise, buffer, noise=config.demonstration_noise,
                generator=generator, progress=progress,
                behaviour=lambda z: learner.acting_actors(z.unsqueeze(0))[0])
            state.env_steps += len(visited)
            observations, targets = torch.cat([observations, visited]), torch.cat([targets, labels])
            clone_loss = clone_actors()
        for _ in trange(config.critic_warmup_steps, desc="critic warm-up", unit="update", disable=not progress,
                        leave=False):
            learner.update(buffer.sample(config.batch_size, generator), train_actors=False)
        state.seconds += time.perf_counter() - started
        state.demonstration = {"env_steps": len(observations), "dagger_rounds": config.dagger_rounds,
                               "clone_loss": clone_loss,
                               "seconds": time.perf_counter() - started}
        if evaluate_every:
            state.demonstration.update(evaluate_and_keep_best(0))
            kpis = state.demonstration["evaluation_kpis"]
            say("cloned policy, deterministic: " + ", ".join(f"{k} {v:.3f}" for k, v in kpis.items()))

    for episode in range(state.episodes_done, config.episodes):
        started = time.perf_counter()
        learning_seconds = 0.0
        std = config.exploration_std(episode)
        raw_list, _ = env.reset()
        raw = adapter.observations_to_array(raw_list)
        with torch.no_grad():
            z = normalise(torch.from_numpy(raw)[None])[0]
        episode_return, parts_sum = 0.0, {}
        bar = tqdm(total=env.time_steps - 1, desc=f"episode {episode + 1}/{config.episodes}", unit="step",
                   disable=not progress, leave=False)
        while not env.terminated:
            if state.env_steps < config.learning_starts:  # a fresh run starts with uniform random actions
                unit = (torch.rand(layout.action_shape, generator=generator) * 2 - 1) * learner.acting_actors.action_mask
            else:
                unit = learner.explore(z, std, generator)
            with torch.no_grad():
                env_actions = to_env(unit[None])[0].numpy()
            # The demonstrator's action here: read only by the TD3+BC term of the actor update.
            guide = rule.act(raw) if rule is not None and config.guide_alpha > 0 else zero_guide
            raw_list, *_ = env.step(adapter.actions_to_lists(env_actions))
            next_raw = adapter.observations_to_array(raw_list)
            shares, parts = team_reward.step_reward(env, next_raw, raw)
            with torch.no_grad():
                z_next = normalise(torch.from_numpy(next_raw)[None])[0]
            buffer.add(z, unit, torch.from_numpy(shares.astype(np.float32)), z_next, torch.from_numpy(guide))
            reward = float(shares.sum())
            raw, z = next_raw, z_next
            state.env_steps += 1
            episode_return += reward
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            if len(buffer) >= max(config.batch_size, config.learning_starts) and state.env_steps % config.update_every == 0:
                tick = time.perf_counter()
                stats = learner.update(buffer.sample(config.batch_size, generator))
                learning_seconds += time.perf_counter() - tick
                if learner.updates % 50 == 0:
                    bar.set_postfix(ret=f"{episode_return:.1f}", q=f"{stats['q']:.2f}", std=f"{std:.2f}")
            bar.update()
        bar.close()
        seconds = time.perf_counter() - started
        kpis, service = district_kpis(env), service_levels(env)
        record = {"episode": episode + 1, "return": episode_return, "exploration_std": std,
                  "env_steps": state.env_steps, "seconds": seconds, "learning_seconds": learning_seconds,
                  "steps_per_second": (env.time_steps - 1) / seconds, "reward_terms": parts_sum,
                  "training_kpis": kpis, "training_service": service}
        if evaluate_every and (episode + 1) % evaluate_every == 0 and episode + 1 < config.episodes:
            record.update(evaluate_and_keep_best(episode + 1))
        state.history.append(record)
        state.episodes_done = episode + 1
        state.seconds += seconds
        state.learning_seconds += learning_seconds
        say(_episode_line(record))
        write("last.pt", {"trained": True, "episode": episode + 1})

    say("final deterministic evaluation" + (f" on steps {evaluation.start}..{evaluation.end}" if evaluation.start is not None else " on the whole dataset"))
    result = evaluate()
    final_score = headline_score(result.kpis)
    final_is_best = final_score <= state.best_score
    if final_is_best:
        state.best_score, state.best_episode = final_score, state.episodes_done
    summary = {
        "trained": state.episodes_done > 0,
        "algorithm": "MADDPG (CTDE, twin centralised critic, TD3 stabilisers), cooperative team reward",
        "config": config.to_dict(),
        "episodes": state.episodes_done,
        "env_steps": state.env_steps,
        "training_seconds": round(state.seconds, 1),
        "learning_seconds": round(state.learning_seconds, 1),
        "evaluation_window": [evaluation.start, evaluation.end],
        "evaluation": result.kpis,
        "evaluation_service": result.service,
        "demonstration": state.demonstration,
        "history": state.history,
        "best_episode": state.best_episode,
    }
    final = write("final.pt", summary)
    best = out_dir / "best.pt"
    if final_is_best:  # best.pt is always the policy to ship
        write("best.pt", {**summary, "episode": state.episodes_done})
    return TrainResult(out_dir=out_dir, final_checkpoint=final, best_checkpoint=best if best.exists() else None,
                       summary=summary)


def _episode_line(record: dict) -> str:
    k, s = record["training_kpis"], record["training_service"]
    line = (f"episode {record['episode']}: return {record['return']:.1f}, {record['steps_per_second']:.0f} steps/s, "
            f"cost {k['cost_total']:.3f} carbon {k['carbon_emissions_total']:.3f} daily peak "
            f"{k['daily_peak_average']:.3f} all-time peak {k['all_time_peak_average']:.3f} "
            f"EV ok {s['ev_departures_acceptable']:.3f}")
    if "evaluation_kpis" in record:
        e = record["evaluation_kpis"]
        line += (f" | deterministic: cost {e['cost_total']:.3f} carbon {e['carbon_emissions_total']:.3f} "
                 f"daily peak {e['daily_peak_average']:.3f} all-time peak {e['all_time_peak_average']:.3f}")
    return line
