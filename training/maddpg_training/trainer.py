"""Cooperative MADDPG with centralised training and decentralised execution (CTDE), taught by a planner first.

The run, top to bottom::

    warm-up      one pass without storage: observation statistics, the KPI baseline, real observations for export
    teach        the teacher (perfect-foresight planner, cars charged) drives one pass: its transitions seed the
                 replay, every state it visits is labelled with its action
    clone        behaviour cloning: each actor fits the teacher's actions from its own building's row only
    DAgger x K   the clone drives (small noise), the teacher labels the states the clone visits, re-clone on all
    critic       n-step TD on the replay with the actors held still; held-out transitions measure its error
    fine-tune    MADDPG, E episodes of: evaluate the policy with the critic, improve it a little, keep what measures
                 better (a trust region checked in the env):
                   collect  a_t^i = mu_i(o_t^i) + N(0, sigma), then the safety layer   decentralised: actor i sees o^i
                            r_t   = team reward: the headline KPIs decomposed per step, in shares (team_reward.py)
                            every step a critic update, the actors held still:
                              y = sum_{j<n} gamma^j r_{t+j} + gamma^n min(Q1', Q2')(o_{t+n}, mu'(o_{t+n}) + eps, g)
                              minimise (Q_k(o_t, a_t, g_t) - y)^2 per share     centralised: sees every o, a, g
                   improve  `critic_refit_steps` more critic updates, then `actor_steps` actor updates, on this
                            episode's transitions (where the critic has just been fitted):
                              maximise alpha * Q1(o, mu(o), g) / |Q|  -  |mu(o_l) - teacher(o_l)|^2   (TD3+BC)
                              Polyak-average the targets (rate tau)
                   check    the actors deterministic on the training window(s): kept if their mean headline KPI is
                            lower than the best so far (EV service held), else back to the best, half the steps

Episode ends are time limits, not terminal states: targets always bootstrap. Every update, pass, critic check and
evaluation is written to ``metrics.jsonl`` (``trace.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm, trange

from maddpg_core.errors import CheckpointError
from maddpg_core.files import atomic_write
from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_evaluation.kpis import district_kpis, headline_score, service_levels

from .bootstrap import Warmup, fresh_policy, reference_sample, warmup, without_ev_discharge
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .networks import ActorSpec, PolicyNetwork, TwinCentralCritic
from .replay import Batch, LabelledStates, ReplayBuffer
from .safety import RULES_VERSION, SafetySpec, safety_spec_from_env
from .teachers import Teacher, make_teacher
from .team_reward import STATE_WIDTH, TeamReward
from .trace import TrainingTrace

log = logging.getLogger(__name__)

# A fine-tuned policy is kept only if it still sends this share of the cars away charged (the bar).
EV_SERVICE_BAR = 0.95
BC_TARGET_LIMIT = 0.98  # tanh actors cannot reach +-1: cloning a full-power action aims just inside it
TEACHER_CACHE_VERSION = 1
LABELS_FILE = "labels.pt"  # every labelled state of the teacher phases, for the cloning term after --resume


class MADDPG:
    """The learner: stacked actors (inside the deployable policy), a twin centralised critic, their targets."""

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
            unit = (unit + torch.randn(unit.shape, generator=generator) * std).clamp(-1.0, 1.0) * self.mask
        return self.env_actions(x, unit)[0].numpy()

    # --- learning -------------------------------------------------------------------------------------------------
    def critic_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        inputs = self.policy.actor_inputs(batch.observations)
        with torch.no_grad():
            next_inputs = self.policy.actor_inputs(batch.next_observations)
            noise = (torch.randn(batch.actions.shape) * cfg.target_noise).clamp(-cfg.target_noise_clip,
                                                                              cfg.target_noise_clip)
            next_unit = (self.target_actors(next_inputs) + noise).clamp(-1.0, 1.0) * self.mask
            next_actions = self.env_actions(batch.next_observations, next_unit)
            bootstrap = self.target_critic(next_inputs, next_actions, batch.next_state).min(dim=0).values
            target = batch.returns + batch.discounts * bootstrap                      # [batch, shares]
        q = self.critic(inputs, batch.actions, batch.state)                           # [2, batch, shares]
        loss = (q - target.unsqueeze(0)).pow(2).mean(dim=1).sum()
        stats = {"critic_loss": loss.item(), "q": q[0].detach().sum(-1).mean().item(),
                 "target": target.sum(-1).mean().item(),
                 "td_error": (q[0].detach().sum(-1) - target.sum(-1)).abs().mean().item()}
        return loss, stats

    def cloning_loss(self, observations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between the deployed policy's actions (safety layer included) and the teacher's."""
        predicted = self.policy(observations)
        target = targets.clamp(-BC_TARGET_LIMIT, BC_TARGET_LIMIT) * self.mask
        return ((predicted - target) * self.mask).pow(2).sum() / self.mask.sum() / len(observations)

    def update(self, batch: Batch, labelled: LabelledStates | None = None, *, train_actors: bool = True,
               generator: torch.Generator | None = None) -> dict[str, float]:
        cfg = self.config
        loss, stats = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
        self.critic_optimizer.step()
        self.updates += 1

        if train_actors and self.updates % cfg.policy_delay == 0:
            self.critic.requires_grad_(False)  # the actor step must leave no gradient on the critic
            inputs = self.policy.actor_inputs(batch.observations)
            preactivation = self.actors.preactivation(inputs) * self.mask
            actions = self.env_actions(batch.observations, torch.tanh(preactivation) * self.mask)
            q = self.critic(inputs, actions, batch.state)[0]                           # [batch, shares]
            # The team's Q: every share, or the buildings' (the last two shares are the district's peaks).
            q = (q if cfg.actor_q_terms == "all" else q[..., :self.policy.layout.n_agents]).sum(dim=-1)
            scale = cfg.bc_alpha / q.abs().mean().detach().clamp_min(1e-6)
            # A small pull towards the unsaturated range: a saturated tanh has no gradient to learn back with.
            actor_loss = cfg.preactivation_penalty * preactivation.pow(2).mean() - scale * q.mean()
            cloning = torch.zeros(())
            if labelled is not None and len(labelled):
                cloning = self.cloning_loss(*labelled.sample(cfg.batch_size, generator))
                actor_loss = actor_loss + cloning
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            nn.utils.clip_grad_norm_(self.actors.parameters(), cfg.grad_clip)
            self.actor_optimizer.step()
            self.critic.requires_grad_(True)
            soft_update(self.target_actors, self.actors, cfg.tau)
            soft_update(self.target_critic, self.critic, cfg.tau)
            stats.update(actor_loss=actor_loss.item(), actor_q=q.mean().item(), cloning_loss=cloning.item(),
                         q_scale=scale.item())
        elif not train_actors:
            soft_update(self.target_critic, self.critic, cfg.tau)
        return stats

    def clone(self, labelled: LabelledStates, *, steps: int, generator: torch.Generator,
              trace: TrainingTrace | None = None, progress: bool = False) -> float:
        """Behaviour cloning of the actors on the teacher's labels; the target actors follow."""
        optimizer = torch.optim.Adam(self.actors.parameters(), lr=self.config.clone_lr)
        # Cosine decay to a twentieth: measured on Aug-Sep, 300 more cloning steps at a tenth of the rate lowered the
        # clone's mean headline KPI from 1.284 to 1.253, so a clone left at the full rate is not converged.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps),
                                                              eta_min=self.config.clone_lr / 20)
        loss = torch.tensor(math.nan)
        for step in trange(steps, desc="behaviour cloning", unit="update", disable=not progress, leave=False):
            loss = self.cloning_loss(*labelled.sample(self.config.batch_size, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if trace is not None and step % 50 == 0:
                trace.write("clone", step=step, loss=loss.item(), labelled=len(labelled))
        self.target_actors.load_state_dict(self.actors.state_dict())
        return loss.item()

    @torch.no_grad()
    def q_values(self, observations: torch.Tensor, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The team's Q (first critic, shares summed) of given transitions, in chunks."""
        out = []
        for i in range(0, len(observations), 1024):
            inputs = self.policy.actor_inputs(observations[i:i + 1024])
            out.append(self.critic(inputs, actions[i:i + 1024], state[i:i + 1024])[0].sum(-1))
        return torch.cat(out)

    def restore_actors(self, state: dict) -> None:
        """Back to earlier actors (a rejected improvement): targets follow, and the actor optimiser starts afresh so
        that no momentum of the rejected direction carries over."""
        self.actors.load_state_dict(state)
        self.target_actors.load_state_dict(state)
        self.actor_optimizer = torch.optim.Adam(self.actors.parameters(), lr=self.config.actor_lr)

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


# --- one pass over a window ----------------------------------------------------------------------------------------
@dataclass
class Window:
    """One training (or evaluation) window: its env, the translation to the model's arrays, its KPI baseline."""

    spec: EnvSpec
    warm: Warmup
    env: object
    adapter: CityLearnAdapter
    reward: TeamReward
    teacher: Teacher | None = None

    @property
    def label(self) -> str:
        return f"steps {self.spec.start or 0}..{self.spec.end if self.spec.end is not None else 'end'}"

    def fresh(self) -> "Window":
        """The same window on a newly built env, for deterministic scoring. citylearn 3.0.2's reset() leaves some
        state behind that the observations show: the same weights scored 1.4355, 1.4409 and 1.4334 on three
        successive passes of one env (steps 0..600), and 1.4355 on a new one, which is what `evaluate` builds."""
        env = self.spec.build()
        return Window(spec=self.spec, warm=self.warm, env=env,
                      adapter=CityLearnAdapter(self.adapter.model_layout, env, what="the policy being trained"),
                      reward=TeamReward(self.adapter.model_layout, self.warm.baseline, self.reward.weights))


@dataclass
class Pass:
    """What one pass over a window produced."""

    driver: str
    steps: int
    team_return: float
    terms: dict[str, float]
    kpis: dict[str, float]
    service: dict[str, float]
    labels: tuple[np.ndarray, np.ndarray] | None = None       # (raw observations, teacher actions)
    record: dict[str, np.ndarray] | None = None               # observations, actions, state, rewards per step
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"driver": self.driver, "steps": self.steps, "team_return": self.team_return, "terms": self.terms,
                "kpis": self.kpis, "service": self.service, "seconds": round(self.seconds, 1),
                "headline_score": headline_score(self.kpis)}


def rollout(window: Window, drive: Callable[[np.ndarray], np.ndarray], *, driver: str, episode: int = -1,
            buffer: ReplayBuffer | None = None, label_every: int = 0, record: bool = False,
            on_step: Callable[[], None] | None = None, progress: bool = False) -> Pass:
    """Step ``window``'s env to the end with ``drive`` (raw observation -> env actions).

    Every transition goes into ``buffer`` (when given); with ``label_every`` > 0 the window's teacher labels every
    that many visited states; ``record`` keeps the per-step arrays (for checking the critic against returns);
    ``on_step`` runs after every step (the fine-tuning updates).
    """
    started = time.perf_counter()
    env, adapter, reward = window.env, window.adapter, window.reward
    raw_list, _ = env.reset()
    reward.reset()
    raw, state = adapter.observations_to_array(raw_list), reward.state()
    labelled_obs, labelled_act = [], []
    recorded = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "state", "next_state")}
    team_return, terms_sum, step = 0.0, {}, 0
    bar = tqdm(total=env.time_steps - 1, desc=driver, unit="step", disable=not progress, leave=False)
    while not env.terminated:
        if label_every and step % label_every == 0:
            labelled_obs.append(raw)
            labelled_act.append(window.teacher.actions(env, raw))
        actions = drive(raw)
        raw_list, *_ = env.step(adapter.actions_to_lists(actions))
        next_raw = adapter.observations_to_array(raw_list)
        shares, terms = reward.step_env(env)
        next_state = reward.state()
        if buffer is not None:
            buffer.add(raw, actions, shares, next_raw, state, next_state, episode)
        if record:
            for key, value in (("observations", raw), ("actions", actions), ("rewards", shares),
                               ("next_observations", next_raw), ("state", state), ("next_state", next_state)):
                recorded[key].append(value)
        team_return += float(shares.sum())
        for key, value in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value
        raw, state, step = next_raw, next_state, step + 1
        if on_step is not None:
            on_step()
        bar.update()
    bar.close()
    return Pass(
        driver=driver, steps=step, team_return=team_return, terms=terms_sum, kpis=district_kpis(env),
        service=service_levels(env),
        labels=(np.stack(labelled_obs), np.stack(labelled_act)) if labelled_obs else None,
        record={k: np.stack(v) for k, v in recorded.items()} if record else None,
        seconds=time.perf_counter() - started,
    )


# --- the run -------------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so --resume continues from it."""

    episodes_done: int = 0
    env_steps: int = 0
    seconds: float = 0.0
    learning_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    teaching: dict | None = None
    gate: dict | None = None          # fine-tuning's trust region: best training-window score, its episode, steps
    best_score: float = math.inf
    best_episode: int | None = None


@dataclass
class TrainResult:
    out_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path | None
    summary: dict


def train(config: TrainConfig, out_dir: str | Path, *, resume: str | Path | None = None, progress: bool = True,
          evaluation: EnvSpec | None = None, evaluate_every: int = 1,
          say: Callable[[str], None] = lambda _: None) -> TrainResult:
    """Train and checkpoint; evaluate deterministically on ``evaluation`` (default: the whole dataset) after the
    teacher phases and every ``evaluate_every`` fine-tuning episodes (0: only at the end), keeping the best-scoring
    policy as ``best.pt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device != "cpu":
        raise CheckpointError(f"--device {config.device}: this trainer learns on the CPU (its updates are small "
                              f"batched matmuls; see benchmarks/training_speed.py); use --device cpu")
    torch.manual_seed(config.seed)
    # The env as published (its schema's own random seed): the one `evaluate` and the planner see. The run's seed
    # varies the networks, the exploration and the sampling, not the district.
    specs = [EnvSpec(schema=config.dataset, start=a, end=b) for a, b in config.training_windows()]
    evaluation = evaluation or EnvSpec(schema=config.dataset)
    for spec in (*specs, evaluation):
        spec.check_window()

    say(f"warm-up: a pass without storage over {len(specs)} window(s) for observation statistics and the KPI baseline")
    warms = [warmup(spec, progress=progress) for spec in specs]
    observations = np.concatenate([w.observations for w in warms])
    layout = warms[0].layout if config.allow_ev_discharge else without_ev_discharge(warms[0].layout)
    first_env = specs[0].build()
    safety = safety_spec_from_env(first_env, layout, ev_margin=config.ev_margin) if config.safety else None
    actor_spec = ActorSpec(hidden_sizes=config.actor_hidden, features=config.features)
    state = Progress()
    generator = torch.Generator().manual_seed(config.seed)
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        layout.require_compatible(checkpoint.layout, what=f"checkpoint {resume}")
        if checkpoint.trainer is None:
            raise CheckpointError(f"{resume} holds no trainer state (it is an exported or initial policy); cannot resume")
        layout, safety, actor_spec = checkpoint.layout, checkpoint.safety, checkpoint.actor_spec
        policy = checkpoint.build_policy().train()
    else:
        policy = fresh_policy(layout, observations, actor_spec, seed=config.seed, safety=safety)
    windows = [_window(spec, warm, layout, config, env=first_env if i == 0 else None, safety=safety)
               for i, (spec, warm) in enumerate(zip(specs, warms))]
    shares = windows[0].reward.shares
    learner = MADDPG(policy, config, shares)
    buffer = ReplayBuffer(config.buffer_size, layout.observation_shape, layout.action_shape, shares, STATE_WIDTH)
    labelled = LabelledStates(layout.observation_shape, layout.action_shape)
    heldout = ReplayBuffer(max(1, int(config.buffer_size * config.heldout_fraction)), layout.observation_shape,
                           layout.action_shape, shares, STATE_WIDTH)
    if resume is not None:
        learner.load_state_dict(checkpoint.trainer["learner"])
        state = Progress(**checkpoint.trainer["progress"])
        generator.set_state(checkpoint.trainer["generator"])
        say(f"resuming after episode {state.episodes_done} ({state.env_steps} env steps) from {resume}")
    reference = reference_sample(observations, np.random.default_rng(config.seed))
    trace = TrainingTrace(out_dir)
    evaluation_window = next((w for w in windows if (w.spec.start, w.spec.end) == (evaluation.start, evaluation.end)),
                             None)

    def write(name: str, summary: dict) -> Path:
        return save_checkpoint(out_dir / name, Checkpoint(
            layout=layout, actor_spec=actor_spec, policy={k: v.detach().cpu() for k, v in policy.state_dict().items()},
            reference_observations=reference, safety=safety, summary=summary,
            # Counters and history as plain JSON types: the checkpoint must load with weights_only=True.
            trainer={"learner": learner.state_dict(), "progress": json.loads(json.dumps(state.__dict__)),
                     "generator": generator.get_state(), "config": config.to_dict()},
        ))

    def evaluate(episode: int, phase: str, result: Pass | None = None) -> dict:
        """The current policy, deterministic, on the evaluation window (``result``: that pass, when it was just
        made by the fine-tuning check); the best so far is kept as best.pt."""
        nonlocal evaluation_window
        if evaluation_window is None:
            say(f"evaluation window {evaluation.start}..{evaluation.end}: a pass without storage for its baseline")
            evaluation_window = _window(evaluation, warmup(evaluation, progress=progress), layout, config,
                                        teacher=False)
        if result is None:
            result = rollout(evaluation_window.fresh(), lambda raw: learner.act(raw), driver="evaluation",
                             record=True, progress=progress)
        score = headline_score(result.kpis)
        check = critic_check(learner, result, config.gamma)
        trace.write("evaluation", episode=episode, phase=phase, **result.summary())
        trace.write("critic_check", episode=episode, phase=phase, data="evaluation rollout (same policy)", **check)
        if score < state.best_score:
            state.best_score, state.best_episode = score, episode
            write("best.pt", {"trained": True, "episode": episode, "phase": phase, "evaluation": result.kpis,
                              "evaluation_service": result.service})
        say(f"{phase}, deterministic: " + _kpi_line(result.kpis, result.service))
        return {"evaluation_kpis": result.kpis, "evaluation_service": result.service,
                "evaluation_return": result.team_return, "critic_check": check}

    teaching_started = time.perf_counter()
    if resume is None:
        # --- teach, clone, DAgger --------------------------------------------------------------------------------
        teaching: dict = {"teacher": config.teacher, "passes": []}
        for episode_id, window in enumerate(windows):
            say(f"teacher: {window.teacher.name} drives {window.label}")
            result = teacher_pass(window, learner, buffer, heldout, config, generator, episode_id, progress)
            labelled.extend(*result.labels)
            state.env_steps += result.steps
            trace.write("rollout", phase="teach", window=window.label, **result.summary())
            teaching["passes"].append({"phase": "teach", "window": window.label, **result.summary()})
        clone_loss = learner.clone(labelled, steps=config.clone_steps, generator=generator, trace=trace,
                                   progress=progress)
        for round_ in range(config.dagger_rounds):
            for window in windows:
                result = rollout(window, lambda raw: learner.act(raw, config.dagger_noise, generator),
                                 driver=f"DAgger {round_ + 1}", episode=len(windows) * (round_ + 1) + windows.index(window),
                                 buffer=buffer, label_every=config.label_every, progress=progress)
                labelled.extend(*result.labels)
                state.env_steps += result.steps
                trace.write("rollout", phase=f"dagger {round_ + 1}", window=window.label, **result.summary())
                teaching["passes"].append({"phase": f"dagger {round_ + 1}", "window": window.label,
                                           **result.summary()})
                say(f"DAgger {round_ + 1} ({window.label}), the clone driving: " + _kpi_line(result.kpis, result.service))
            clone_loss = learner.clone(labelled, steps=config.clone_steps, generator=generator, trace=trace,
                                       progress=progress)
        # --- critic warm-up on everything so far, the actors held still ---------------------------------------
        for step in trange(config.critic_warmup_steps, desc="critic warm-up", unit="update", disable=not progress,
                           leave=False):
            stats = learner.update(buffer.sample(config.batch_size, generator, n_step=config.n_step,
                                                 gamma=config.gamma), train_actors=False)
            if step % 10 == 0:
                trace.write("update", phase="critic_warmup", update=learner.updates, **stats)
        check = heldout_check(learner, heldout, config, generator)
        trace.write("critic_check", episode=0, phase="critic_warmup", data="held-out teacher transitions", **check)
        teaching.update(labelled_states=len(labelled), clone_loss=clone_loss, heldout_check=check,
                        seconds=round(time.perf_counter() - teaching_started, 1))
        state.teaching = teaching
        state.seconds += time.perf_counter() - teaching_started
        teaching.update(evaluate(0, "clone (teacher phases done)"))
        _save_labels(out_dir / LABELS_FILE, labelled)
        write("last.pt", {"trained": True, "episode": 0})
    else:
        # The cloning term of fine-tuning needs every label (teacher and DAgger): they are kept beside the run.
        # The teacher's transitions seed the replay again (the buffer itself is not checkpointed).
        labels_path = Path(resume).parent / LABELS_FILE
        say("re-reading the teacher's pass for the replay" + (f" and the labels from {labels_path}"
                                                           if labels_path.is_file() else " and its labels"))
        for episode_id, window in enumerate(windows):
            result = teacher_pass(window, learner, buffer, heldout, config, generator, episode_id, progress)
            if not labels_path.is_file():
                labelled.extend(*result.labels)
        if labels_path.is_file():
            labelled.extend(*_load_labels(labels_path))
            if labels_path.parent.resolve() != out_dir.resolve():
                _save_labels(out_dir / LABELS_FILE, labelled)
        trace.write("resume", episode=state.episodes_done, labelled_states=len(labelled), replay=len(buffer))

    # --- MADDPG fine-tuning ----------------------------------------------------------------------------------------
    # With one training window that is also the evaluation window, the check's pass is the evaluation's.
    same_window = len(windows) == 1 and evaluation_window is windows[0]
    if state.gate is None:
        start = gate_check(windows, learner, progress)[0]
        start_score = start["score"]
        state.gate = {"best_score": start_score, "best_episode": 0, "actor_steps": config.actor_steps,
                      "start": start}
        trace.write("gate", episode=0, accepted=True, best_episode=0, next_actor_steps=config.actor_steps, **start)
        say(f"fine-tuning starts from the clone's training-window score {state.gate['best_score']:.4f}")
    best_actors = copy.deepcopy(learner.actors.state_dict())
    for episode in range(state.episodes_done, config.episodes):
        window = windows[episode % len(windows)]
        std = config.exploration_std(episode)
        result, learning_seconds = finetune_episode(window, learner, buffer, labelled, state, trace, generator,
                                                    episode=episode, std=std, actor_steps=state.gate["actor_steps"],
                                                    progress=progress)
        check, passes = gate_check(windows, learner, progress)
        accepted = check["score"] < state.gate["best_score"] and check["ev_departures_acceptable"] >= EV_SERVICE_BAR
        if accepted:
            state.gate.update(best_score=check["score"], best_episode=episode + 1)
            best_actors = copy.deepcopy(learner.actors.state_dict())
        else:
            learner.restore_actors(best_actors)
            state.gate["actor_steps"] = max(1, state.gate["actor_steps"] // 2)
        trace.write("gate", episode=episode + 1, accepted=accepted, best_episode=state.gate["best_episode"],
                    next_actor_steps=state.gate["actor_steps"], **check)
        record = {"episode": episode + 1, "window": window.label, "exploration_std": std,
                  "learning_seconds": learning_seconds, "gate": {"accepted": accepted, **check}, **result.summary()}
        trace.write("rollout", phase="finetune", **record)
        if evaluate_every and (episode + 1) % evaluate_every == 0:
            record.update(evaluate(episode + 1, f"episode {episode + 1}",
                                   result=passes[0] if accepted and same_window else None))
        state.history.append(record)
        state.episodes_done = episode + 1
        state.seconds += result.seconds
        state.learning_seconds += learning_seconds
        say(f"episode {episode + 1}: team return {result.team_return:.1f} exploring; training-window score "
            f"{check['score']:.4f} -> {'kept' if accepted else 'back to episode ' + str(state.gate['best_episode'])}")
        write("last.pt", {"trained": True, "episode": episode + 1})

    final_evaluation = state.history[-1] if state.history and "evaluation_kpis" in state.history[-1] else None
    if final_evaluation is None:
        final_evaluation = evaluate(state.episodes_done, "final")
    trace.close()
    summary = {
        "trained": True,
        "algorithm": "MADDPG (CTDE, twin centralised critic, TD3 stabilisers, n-step), taught by "
                     f"{config.teacher} + DAgger, TD3+BC fine-tuning; team reward = the headline KPIs per step",
        "config": config.to_dict(),
        "episodes": state.episodes_done,
        "env_steps": state.env_steps,
        "training_seconds": round(state.seconds, 1),
        "learning_seconds": round(state.learning_seconds, 1),
        "evaluation_window": [evaluation.start, evaluation.end],
        "evaluation": final_evaluation["evaluation_kpis"],
        "evaluation_service": final_evaluation["evaluation_service"],
        "teaching": state.teaching,
        # The policy fine-tuning started from (the clone), scored like every fine-tuning check: on new envs.
        "fine_tuning_start": (state.gate or {}).get("start"),
        "history": state.history,
        "best_episode": state.best_episode,
        "best_score": state.best_score,
    }
    final = write("final.pt", summary)
    best = out_dir / "best.pt"
    return TrainResult(out_dir=out_dir, final_checkpoint=final, best_checkpoint=best if best.exists() else None,
                       summary=summary)


def _window(spec: EnvSpec, warm: Warmup, layout, config: TrainConfig, *, env=None, teacher: bool = True,
            safety: SafetySpec | None = None) -> Window:
    env = env if env is not None else spec.build()
    adapter = CityLearnAdapter(layout, env, what="the policy being trained")
    window = Window(spec=spec, warm=warm, env=env, adapter=adapter,
                    reward=TeamReward(layout, warm.baseline, config.reward))
    if teacher:
        window.teacher = make_teacher(config.teacher, env, layout, horizon=config.planner_horizon,
                                      objective=config.planner_objective,
                                      ev_rule=safety.ev_rule if safety is not None else None)
    return window


def teacher_pass(window: Window, learner: MADDPG, buffer: ReplayBuffer, heldout: ReplayBuffer, config: TrainConfig,
                 generator: torch.Generator, episode_id: int, progress: bool) -> Pass:
    """The teacher drives one pass (its actions through the safety layer); every state is labelled. Cached on disk:
    the pass is deterministic, and an LP teacher takes minutes for a year."""
    cache = _teacher_cache_path(window, learner.policy, config)
    if cache is not None and cache.is_file():
        result = _load_teacher_pass(cache)
    else:
        def drive(raw: np.ndarray) -> np.ndarray:
            teacher_actions = window.teacher.actions(window.env, raw)
            with torch.no_grad():
                return learner.policy.guard(torch.from_numpy(raw)[None], torch.from_numpy(teacher_actions)[None])[0].numpy()

        result = rollout(window, drive, driver=f"teacher {window.label}", label_every=1, record=True,
                         progress=progress)
        if cache is not None:
            _save_teacher_pass(cache, result)
    # Whole days go to the held-out set, so that its transitions are not the neighbours of trained ones.
    rec = result.record
    days = len(rec["rewards"]) // 24 + 1
    rng = np.random.default_rng(config.seed + episode_id)
    heldout_days = set(rng.choice(days, size=int(days * config.heldout_fraction), replace=False).tolist())
    for t in range(len(rec["rewards"])):
        (heldout if t // 24 in heldout_days else buffer).add(
            rec["observations"][t], rec["actions"][t], rec["rewards"][t], rec["next_observations"][t],
            rec["state"][t], rec["next_state"][t], episode_id)
    return result


def finetune_episode(window: Window, learner: MADDPG, buffer: ReplayBuffer, labelled: LabelledStates,
                     state: Progress, trace: TrainingTrace, generator: torch.Generator, *, episode: int, std: float,
                     actor_steps: int, progress: bool) -> tuple[Pass, float]:
    """Collect (the actors explore, the critic learns every step), then improve (critic refit, then `actor_steps`
    actor updates on this episode's transitions). Returns the pass and the seconds spent learning."""
    config = learner.config
    learning_seconds = 0.0

    def drive(raw: np.ndarray) -> np.ndarray:
        state.env_steps += 1
        return learner.act(raw, std, generator)

    def learn(recent: int | None = None, train_actors: bool = False, phase: str = "collect") -> None:
        nonlocal learning_seconds
        tick = time.perf_counter()
        stats = learner.update(buffer.sample(config.batch_size, generator, n_step=config.n_step, gamma=config.gamma,
                                             recent=recent), labelled, train_actors=train_actors, generator=generator)
        learning_seconds += time.perf_counter() - tick
        trace.write("update", phase="finetune", stage=phase, episode=episode + 1, update=learner.updates, **stats)

    def collect_step() -> None:
        if len(buffer) >= config.batch_size and state.env_steps % config.update_every == 0:
            learn()

    result = rollout(window, drive, driver=f"episode {episode + 1}/{config.episodes}", episode=1000 + episode,
                     buffer=buffer, on_step=collect_step, progress=progress)
    for _ in trange(config.critic_refit_steps, desc="critic refit", unit="update", disable=not progress, leave=False):
        learn(recent=result.steps, phase="critic refit")
    for _ in trange(actor_steps * config.policy_delay, desc="actor steps", unit="update", disable=not progress,
                    leave=False):
        learn(recent=result.steps, train_actors=True, phase="improve")
    return result, learning_seconds


def gate_check(windows: list[Window], learner: MADDPG, progress: bool) -> tuple[dict, list[Pass]]:
    """The actors, deterministic, on every training window: the step-weighted mean headline score, EV service,
    and the passes themselves."""
    passes = [rollout(w.fresh(), lambda raw: learner.act(raw), driver="check", record=True, progress=progress)
              for w in windows]
    steps = sum(p.steps for p in passes)
    check = {"score": sum(headline_score(p.kpis) * p.steps for p in passes) / steps,
             "ev_departures_acceptable": min(p.service["ev_departures_acceptable"] for p in passes),
             "kpis": passes[0].kpis if len(passes) == 1 else {w.label: p.kpis for w, p in zip(windows, passes)}}
    return check, passes


def heldout_check(learner: MADDPG, heldout: ReplayBuffer, config: TrainConfig, generator: torch.Generator) -> dict:
    """The critic's TD error on teacher transitions it never trained on, beside its error on the training buffer."""
    if len(heldout) == 0:
        return {}
    with torch.no_grad():
        index = torch.arange(len(heldout))
        batch = heldout.sample(0, generator, n_step=config.n_step, gamma=config.gamma, index=index)
        _, stats = learner.critic_loss(batch)
    return {"heldout_td_error": stats["td_error"], "heldout_q": stats["q"], "heldout_target": stats["target"],
            "heldout_transitions": len(heldout)}


def critic_check(learner: MADDPG, result: Pass, gamma: float) -> dict:
    """Q of the policy's own deterministic transitions against their Monte-Carlo discounted returns.

    Returns near the window's end are truncated, so only steps at least ``5 / (1 - gamma)`` from it are compared.
    """
    rec = result.record
    rewards = rec["rewards"].sum(axis=1)
    returns = np.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    keep = max(0, len(rewards) - int(5 / (1 - gamma)))
    if keep < 10:
        return {}
    q = learner.q_values(torch.from_numpy(rec["observations"][:keep]), torch.from_numpy(rec["actions"][:keep]),
                         torch.from_numpy(rec["state"][:keep])).numpy()
    g = returns[:keep]
    return {"q_mean": float(q.mean()), "mc_return_mean": float(g.mean()), "bias": float((q - g).mean()),
            "rmse": float(np.sqrt(((q - g) ** 2).mean())), "correlation": float(np.corrcoef(q, g)[0, 1]),
            "steps": int(keep)}


# --- the teacher pass cache -----------------------------------------------------------------------------------------
def _cache_root() -> Path:
    base = os.environ.get("MADDPG_CITYLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maddpg-citylearn")
    return Path(base) / "teacher-passes"


def _teacher_cache_path(window: Window, policy: PolicyNetwork, config: TrainConfig) -> Path | None:
    if not config.cache_demonstration or config.teacher == "rule":
        return None  # the rule is instant: nothing to cache
    key = json.dumps({
        "version": TEACHER_CACHE_VERSION, "schema": str(window.spec.resolve_schema()), "start": window.spec.start,
        "end": window.spec.end, "teacher": config.teacher, "horizon": config.planner_horizon,
        "objective": config.planner_objective, "layout": policy.layout.to_json(),
        "safety": None if policy.safety_spec is None else policy.safety_spec.to_dict(), "rules": RULES_VERSION,
        "citylearn": policy.layout.citylearn_version,
    }, sort_keys=True)
    return _cache_root() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def _save_teacher_pass(path: Path, result: Pass) -> None:
    payload = {"summary": json.loads(json.dumps(result.summary())),
               "labels": [torch.from_numpy(a) for a in result.labels],
               "record": {k: torch.from_numpy(np.asarray(v)) for k, v in result.record.items()}}
    atomic_write(path, lambda handle: torch.save(payload, handle))


def _load_teacher_pass(path: Path) -> Pass:
    payload = torch.load(path, weights_only=True)
    s = payload["summary"]
    return Pass(driver=s["driver"], steps=s["steps"], team_return=s["team_return"], terms=s["terms"], kpis=s["kpis"],
                service=s["service"], labels=tuple(t.numpy() for t in payload["labels"]),
                record={k: v.numpy() for k, v in payload["record"].items()}, seconds=s["seconds"])


def _save_labels(path: Path, labelled: LabelledStates) -> None:
    atomic_write(path, lambda handle: torch.save({"observations": labelled.observations,
                                                  "targets": labelled.targets}, handle))


def _load_labels(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    payload = torch.load(path, weights_only=True)
    return payload["observations"], payload["targets"]


def _kpi_line(kpis: dict, service: dict) -> str:
    return (f"cost {kpis['cost_total']:.3f} carbon {kpis['carbon_emissions_total']:.3f} daily peak "
            f"{kpis['daily_peak_average']:.3f} all-time peak {kpis['all_time_peak_average']:.3f} "
            f"EV ok {service['ev_departures_acceptable']:.3f} appliance {service['appliance_service_level']:.3f}")

