"""Cooperative MADDPG with centralised training and decentralised execution (CTDE), taught by a planner first.

The run, top to bottom (each phase is one function below, in this order)::

    prepare      a pass without storage per window: observation statistics, the KPI baseline, real observations
                 for export; the policy, the learner (learner.py), the replay
    teach        the teacher (perfect-foresight planner, cars charged) drives one pass per window: its transitions
                 seed the replay, every state it visits is labelled with its action
    clone        behaviour cloning: each actor fits the teacher's actions
    dagger x K   the clone drives (small noise on the batteries), the teacher labels the states the clone visits,
                 re-clone on every label
    critic       n-step TD on the replay with the actors held still; held-out days measure its error, and its
                 dQ/da on the batteries is checked against finite differences in the env (critic_probe.py)
    evaluate     the clone, deterministic, on the evaluation window (a new env): best.pt
    model_tune   (with `model_district`, first widen: every actor also reads a district feature, weights from 0)
                 M episodes of (model_tuning.py, district_model.py):
                   improve  `model_updates` actor updates, each on runs of `model_horizon` hours where the actors
                            drive a differentiable model of the district from states of their own last pass:
                              minimise  KPIs(those hours) + debt(energy left short at the end)
                                        + w * |mu(o_l) - teacher(o_l)|^2
                            (the gradient runs through every hour's state of charge back to every actor)
                   check    the actors deterministic on the training window(s) in the env: kept if they score
                            better (EV service held), else back to the best, half the updates
    fine_tune    MADDPG, E episodes of: evaluate the policy with the critic, improve it a little, keep what measures
                 better (a trust region checked in the env):
                   collect  a_t^i = mu_i(x_t^i) + N(0, sigma) on the batteries, then the safety layer
                            r_t   = team reward: the headline KPIs decomposed per step, in shares (team_reward.py)
                            every step a critic update, the actors held still:
                              y = sum_{j<n} gamma^j r_{t+j} + gamma^n Q'_k(o_{t+n}, mu'(o_{t+n}) + eps, g),
                                  k = the target head with the lower team Q (clipped double Q on the team's value)
                              minimise (Q_k(o_t, a_t, g_t) - y)^2 per share     centralised: sees every o, a, g
                   improve  `critic_refit_steps` critic updates on the whole replay (the deterministic checks'
                            passes included), then `actor_steps` actor updates on states of the whole replay:
                              minimise - alpha * Q1(o, mu(o), g) / mean|Q| + |mu(o_l) - teacher(o_l)|^2   (TD3+BC,
                              the same loss and optimiser as cloning); Polyak-average the targets (rate tau);
                            before the actor steps, dQ/da is checked against the env again
                   check    the actors deterministic on the training window(s): kept if their mean headline KPI is
                            lower than the best so far (EV service held), else back to the best, half the steps

``x_t^i`` is what actor ``i`` reads: its building's row, and with the ``district`` feature a few district aggregates
computed in the graph (networks.py). Episode ends are time limits, not terminal states: targets always bootstrap.
Every update, pass, critic check and evaluation is written to ``metrics.jsonl`` (``trace.py``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

from maddpg_core.errors import CheckpointError
from maddpg_core.files import atomic_write
from maddpg_core.layout import PolicyLayout
from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
from maddpg_evaluation.kpis import headline_score

from . import critic_probe, model_tuning, teacher_cache
from .bootstrap import fresh_policy, reference_sample, warmup, without_ev_discharge
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .learner import MADDPG
from .networks import ActorSpec, PolicyNetwork, widened
from .replay import LabelledStates, ReplayBuffer
from .rollout import Pass, Window, rollout
from .safety import SafetySpec, safety_spec_from_env
from .teachers import make_teacher
from .team_reward import STATE_WIDTH, TeamReward
from .trace import TrainingTrace

log = logging.getLogger(__name__)

# A fine-tuned policy is kept only if it still sends this share of the cars away charged (the bar).
EV_SERVICE_BAR = 0.95
LABELS_FILE = "labels.pt"  # every labelled state of the teacher phases, for the cloning term after --resume


# --- what a run holds -------------------------------------------------------------------------------------------
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
    model_tuning: dict | None = None  # fine-tuning through the district model: its gate, episodes, evaluation
    best_score: float = math.inf
    best_episode: int | None = None


@dataclass
class Run:
    config: TrainConfig
    out_dir: Path
    layout: PolicyLayout
    safety: SafetySpec | None
    actor_spec: ActorSpec
    policy: PolicyNetwork
    learner: MADDPG
    windows: list[Window]
    evaluation: EnvSpec
    buffer: ReplayBuffer
    heldout: ReplayBuffer
    labelled: LabelledStates
    generator: torch.Generator
    reference: torch.Tensor
    trace: TrainingTrace
    state: Progress
    progress: bool
    evaluation_window: Window | None = None
    teacher_records: dict[int, dict] = field(default_factory=dict)   # window index -> the teacher's recorded pass

    @property
    def evaluates_on_its_training_window(self) -> bool:
        """One training window that is also the evaluation window: a deterministic check's pass over it is the
        evaluation's pass, and need not be driven again."""
        return len(self.windows) == 1 and self.evaluation_window is self.windows[0]

    @property
    def uses_critic(self) -> bool:
        """Only fine-tuning reads the critic: a run without it skips the critic's phases."""
        return self.config.episodes > 0

    def write(self, name: str, summary: dict) -> Path:
        return save_checkpoint(self.out_dir / name, Checkpoint(
            layout=self.layout, actor_spec=self.actor_spec,
            policy={k: v.detach().cpu() for k, v in self.policy.state_dict().items()},
            reference_observations=self.reference, safety=self.safety, summary=summary,
            # Counters and history as plain JSON types: the checkpoint must load with weights_only=True.
            trainer={"learner": self.learner.state_dict(), "progress": json.loads(json.dumps(self.state.__dict__)),
                     "generator": self.generator.get_state(), "config": self.config.to_dict()},
        ))


@dataclass
class TrainResult:
    out_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path
    summary: dict


def train(config: TrainConfig, out_dir: str | Path, *, resume: str | Path | None = None, progress: bool = True,
          evaluation: EnvSpec | None = None, evaluate_every: int = 1) -> TrainResult:
    """Train and checkpoint; evaluate deterministically on ``evaluation`` (default: the config's evaluation window)
    after the teacher phases and every ``evaluate_every`` fine-tuning episodes (0: only at the end), keeping the
    best-scoring policy as ``best.pt``."""
    run = prepare(config, Path(out_dir), resume=resume, evaluation=evaluation, progress=progress)
    if resume is None:
        started = time.perf_counter()
        teaching = teach(run)
        clone_loss = run.learner.clone(run.labelled, steps=config.clone_steps, generator=run.generator,
                                       trace=run.trace, progress=progress)
        for round_ in range(config.dagger_rounds):
            teaching["passes"] += dagger(run, round_)
            clone_loss = run.learner.clone(run.labelled, steps=config.clone_steps, generator=run.generator,
                                           trace=run.trace, progress=progress)
        teaching.update(labelled_states=len(run.labelled), clone_loss=clone_loss, heldout_check=warm_up_critic(run),
                        seconds=round(time.perf_counter() - started, 1))
        run.state.teaching = teaching
        run.state.seconds += time.perf_counter() - started
        teaching.update(evaluate(run, 0, "clone (teacher phases done)"))
        _save_labels(run.out_dir / LABELS_FILE, run.labelled)
        run.write("last.pt", {"trained": True, "episode": 0})
    else:
        reteach(run, Path(resume))
    model_tune(run)
    fine_tune(run, evaluate_every)
    return finish(run)


# --- the phases -----------------------------------------------------------------------------------------------------
def prepare(config: TrainConfig, out_dir: Path, *, resume: str | Path | None, evaluation: EnvSpec | None,
            progress: bool) -> Run:
    """Check everything that can fail fast first (settings, windows, a resumed checkpoint), then the warm-up pass
    of every window, the policy, the learner and the buffers."""
    if config.device != "cpu":
        raise CheckpointError(f"--device {config.device}: this trainer learns on the CPU (its updates are small "
                              f"batched matmuls; see benchmarks/training_speed.py); use --device cpu")
    specs = [EnvSpec(schema=config.dataset, start=a, end=b) for a, b in config.training_windows()]
    evaluation = evaluation or EnvSpec(schema=config.dataset, start=config.evaluation_window()[0],
                                       end=config.evaluation_window()[1])
    for spec in (*specs, evaluation):
        spec.check_window()
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume)    # a broken or foreign file fails here, before any env work
        if checkpoint.trainer is None:
            raise CheckpointError(f"{resume} holds no trainer state (it is an exported or initial policy); cannot resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    log.info("warm-up: a pass without storage over %d window(s) for observation statistics and the KPI baseline",
             len(specs))
    warms = [warmup(spec, progress=progress) for spec in specs]
    observations = np.concatenate([w.observations for w in warms])
    layout = warms[0].layout if config.allow_ev_discharge else without_ev_discharge(warms[0].layout)
    first_env = specs[0].build()
    safety = safety_spec_from_env(first_env, layout, ev_margin=config.ev_margin,
                                  ev_pace=config.ev_pace) if config.safety else None
    actor_spec = ActorSpec(hidden_sizes=config.actor_hidden, features=config.features, ignore=config.ignore,
                           ensemble=config.ensemble)
    if checkpoint is not None:
        layout.require_compatible(checkpoint.layout, what=f"checkpoint {resume}")
        layout, safety, actor_spec = checkpoint.layout, checkpoint.safety, checkpoint.actor_spec
        policy = checkpoint.build_policy().train()
    else:
        policy = fresh_policy(layout, observations, actor_spec, seed=config.seed, safety=safety)
    windows = [make_window(spec, warm, layout, config, env=first_env if i == 0 else None, safety=safety)
               for i, (spec, warm) in enumerate(zip(specs, warms))]
    shares = windows[0].reward.shares
    learner = MADDPG(policy, config, shares)
    run = Run(
        config=config, out_dir=out_dir, layout=layout, safety=safety, actor_spec=actor_spec, policy=policy,
        learner=learner, windows=windows, evaluation=evaluation,
        buffer=ReplayBuffer(config.buffer_size, layout.observation_shape, layout.action_shape, shares, STATE_WIDTH),
        heldout=ReplayBuffer(max(1, int(config.buffer_size * config.heldout_fraction)), layout.observation_shape,
                             layout.action_shape, shares, STATE_WIDTH),
        labelled=LabelledStates(layout.observation_shape, layout.action_shape),
        generator=torch.Generator().manual_seed(config.seed),
        reference=reference_sample(observations, np.random.default_rng(config.seed)),
        trace=TrainingTrace(out_dir), state=Progress(), progress=progress,
        evaluation_window=next((w for w in windows if (w.spec.start, w.spec.end) == (evaluation.start, evaluation.end)),
                               None),
    )
    if checkpoint is not None:
        learner.load_state_dict(checkpoint.trainer["learner"])
        run.state = Progress(**checkpoint.trainer["progress"])
        run.generator.set_state(checkpoint.trainer["generator"])
        log.info("resuming after episode %d (%d env steps) from %s", run.state.episodes_done, run.state.env_steps,
                 resume)
    return run


def teach(run: Run) -> dict:
    """The teacher drives each window once (cached on disk); its states are labelled, its transitions replayed."""
    teaching: dict = {"teacher": run.config.teacher, "passes": []}
    for episode_id, window in enumerate(run.windows):
        log.info("teacher: %s drives %s", window.teacher.name, window.label)
        result = teacher_pass(run, window, episode_id)
        run.labelled.extend(*result.labels)
        run.state.env_steps += result.steps
        run.trace.write("rollout", phase="teach", window=window.label, **result.summary())
        teaching["passes"].append({"phase": "teach", "window": window.label, **result.summary()})
    return teaching


def teacher_pass(run: Run, window: Window, episode_id: int) -> Pass:
    """One teacher pass (its actions through the safety layer), every state labelled; from the cache when it holds
    the window. Whole days of the pass go to the held-out set that measures the critic's error."""
    whole_spec = replace(window.spec, start=None, end=None)
    whole_path = teacher_cache.cache_path(whole_spec, run.policy, run.config, start=None, end=None)
    if run.config.teacher_whole_year and whole_spec != window.spec and whole_path and not whole_path.is_file():
        log.info("teacher: no cached pass over the whole dataset to cut %s from; the teacher drives all of it "
                 "first (teacher_whole_year), once for every run on this dataset", window.label)
        drive_teacher(run, make_window(whole_spec, warmup(whole_spec, progress=run.progress), run.layout, run.config,
                                       safety=run.safety))
    result = teacher_cache.cached_teacher_pass(window, run.policy, run.config)
    if result is None:
        result = drive_teacher(run, window)
    run.teacher_records[episode_id] = result.record   # the district model reads its data off it
    if not result.kpis:
        # Cut from a longer pass: its rewards were scaled to that pass's episode, not this window's. Its labels
        # teach the actors (and its data the district model); the critic learns from this run's own passes.
        log.info("teacher: %s cut from the cached pass over the whole dataset (labels only)", window.label)
        return result
    rec = result.record
    days = len(rec["rewards"]) // 24 + 1
    rng = np.random.default_rng(run.config.seed + episode_id)
    heldout_days = set(rng.choice(days, size=int(days * run.config.heldout_fraction), replace=False).tolist())
    for t in range(len(rec["rewards"])):
        (run.heldout if t // 24 in heldout_days else run.buffer).add(
            rec["observations"][t], rec["actions"][t], rec["rewards"][t], rec["next_observations"][t],
            rec["state"][t], rec["next_state"][t], episode_id, result.first_step + t)
    return result


def drive_teacher(run: Run, window: Window) -> Pass:
    """The teacher drives ``window`` (its actions through the safety layer), every state labelled; the pass is
    cached when the config caches demonstrations."""
    def drive(raw: np.ndarray) -> np.ndarray:
        teacher_actions = window.teacher.actions(window.env, raw)
        with torch.no_grad():
            return run.policy.guard(torch.from_numpy(raw)[None], torch.from_numpy(teacher_actions)[None])[0].numpy()

    result = rollout(window, drive, driver=f"teacher {window.label}", label_every=1, record=True,
                     progress=run.progress)
    path = teacher_cache.cache_path(window.spec, run.policy, run.config, start=window.spec.start, end=window.spec.end)
    if path is not None:
        teacher_cache.save(path, result)
    return result


def dagger(run: Run, round_: int) -> list[dict]:
    """The clone drives every window (noise on the batteries), the teacher labels every ``label_every``-th state."""
    phase = f"dagger {round_ + 1}"
    results = clone_drives(run, driver=f"DAgger {round_ + 1}", phase=phase,
                           first_episode=len(run.windows) * (round_ + 1), label_every=run.config.label_every)
    return [{"phase": phase, "window": window.label, **result.summary()} for window, result in zip(run.windows, results)]


def clone_drives(run: Run, *, driver: str, phase: str, first_episode: int, label_every: int = 0) -> list[Pass]:
    """One pass per window with the clone driving (DAgger's noise on the batteries), its transitions into the
    replay; with ``label_every``, the teacher labels every that many visited states."""
    results = []
    for i, window in enumerate(run.windows):
        result = rollout(window, lambda raw: run.learner.act(raw, run.config.dagger_noise, run.generator),
                         driver=driver, episode=first_episode + i, buffer=run.buffer, label_every=label_every,
                         progress=run.progress)
        if result.labels is not None:
            run.labelled.extend(*result.labels)
        run.state.env_steps += result.steps
        run.trace.write("rollout", phase=phase, window=window.label, **result.summary())
        log.info("%s (%s), the clone driving: %s", driver, window.label, _kpi_line(result.kpis, result.service))
        results.append(result)
    return results


def warm_up_critic(run: Run) -> dict:
    """n-step TD on everything collected so far, the actors held still; returns the held-out check."""
    config = run.config
    if not run.uses_critic:
        log.info("critic warm-up skipped: no fine-tuning episodes read the critic (episodes = 0)")
        return {}
    for step in trange(config.critic_warmup_steps, desc="critic warm-up", unit="update", disable=not run.progress,
                       leave=False):
        stats = run.learner.update(run.buffer.sample(config.batch_size, run.generator, n_step=config.n_step,
                                                     gamma=config.gamma), train_actors=False)
        if step % 10 == 0:
            run.trace.write("update", phase="critic_warmup", update=run.learner.updates, **stats)
    check = heldout_check(run)
    run.trace.write("critic_check", episode=0, phase="critic_warmup", data="held-out teacher transitions", **check)
    return {**check, "gradient": gradient_check(run, episode=0, phase="critic_warmup")}


def reteach(run: Run, resume: Path) -> None:
    """After --resume: the teacher's passes seed the replay again (the buffer is not checkpointed) and the cloning
    term gets every label back (labels.pt beside the resumed checkpoint)."""
    labels_path = resume.parent / LABELS_FILE
    log.info("re-reading the teacher's pass for the replay%s",
             f" and the labels from {labels_path}" if labels_path.is_file() else " and its labels")
    for episode_id, window in enumerate(run.windows):
        result = teacher_pass(run, window, episode_id)
        if not labels_path.is_file():
            run.labelled.extend(*result.labels)
    if labels_path.is_file():
        run.labelled.extend(*_load_labels(labels_path))
    if labels_path.parent.resolve() != run.out_dir.resolve():
        if labels_path.is_file():
            _save_labels(run.out_dir / LABELS_FILE, run.labelled)
        # Every run directory holds a best.pt: the resumed run's best until this run measures a better one.
        best = resume.parent / "best.pt"
        if not (run.out_dir / "best.pt").exists():
            if best.is_file():
                shutil.copyfile(best, run.out_dir / "best.pt")
            else:
                run.write("best.pt", {"trained": True, "episode": run.state.episodes_done, "phase": "resumed"})
    run.trace.write("resume", episode=run.state.episodes_done, labelled_states=len(run.labelled),
                    replay=len(run.buffer))
    if run.uses_critic and run.learner.updates == 0:
        # A run trained without fine-tuning (the shipped recipe) never fitted its critic. The replay is not kept in
        # checkpoints and passes cut from a longer cached one bring labels only, so the clone drives each window
        # once as DAgger does (noise on the batteries, nothing labelled), then the critic warms up on that.
        log.info("the resumed run's critic was never trained: the clone drives each window for its data, then "
                 "the critic's warm-up")
        clone_drives(run, driver="critic data", phase="critic data", first_episode=500)
        run.state.teaching = {**(run.state.teaching or {}), "heldout_check": warm_up_critic(run)}


def evaluate(run: Run, episode: int, phase: str, result: Pass | None = None) -> dict:
    """The current policy, deterministic, on the evaluation window (``result``: that pass, when the fine-tuning
    check has just made it); the best so far is kept as best.pt."""
    if run.evaluation_window is None:
        log.info("evaluation window %s..%s: a pass without storage for its baseline", run.evaluation.start,
                 run.evaluation.end)
        run.evaluation_window = make_window(run.evaluation, warmup(run.evaluation, progress=run.progress),
                                            run.layout, run.config, teacher=False)
    if result is None:
        result = rollout(run.evaluation_window.fresh(), lambda raw: run.learner.act(raw), driver="evaluation",
                         record=True, progress=run.progress)
    score = headline_score(result.kpis)
    check = critic_check(run.learner, result, run.config.gamma) if run.uses_critic else {}
    run.trace.write("evaluation", episode=episode, phase=phase, **result.summary())
    run.trace.write("critic_check", episode=episode, phase=phase, data="evaluation rollout (same policy)", **check)
    if score < run.state.best_score:
        run.state.best_score, run.state.best_episode = score, episode
        run.write("best.pt", {"trained": True, "episode": episode, "phase": phase, "evaluation": result.kpis,
                              "evaluation_service": result.service})
    log.info("%s, deterministic: %s", phase, _kpi_line(result.kpis, result.service))
    return {"evaluation_kpis": result.kpis, "evaluation_service": result.service,
            "evaluation_return": result.team_return, "critic_check": check}


def model_tune(run: Run) -> None:
    """Fine-tuning through the district model (model_tuning.py): episodes of actor updates on imagined runs from the
    actors' own states, each kept only if the actors, deterministic, score better on the training window(s) in the
    env (EV service held), else back to the best with half the updates (the same trust region as fine_tune's)."""
    config, state = run.config, run.state
    tuning = state.model_tuning or {}
    if config.model_episodes <= 0 or tuning.get("episodes_done", 0) >= config.model_episodes:
        return
    if run.safety is None:
        raise CheckpointError("fine-tuning through the district model needs the safety layer (safety = true): the "
                              "model finds the chargers through it")
    if config.model_district and config.model_district not in run.actor_spec.features:
        widen(run, config.model_district)
    actors = run.learner.actors
    phase_started = time.perf_counter()
    check, passes = gate_check(run.windows, run.learner, progress=run.progress)
    if not tuning:
        tuning = {"start": check, "best_score": check["score"], "best_episode": 0, "updates": config.model_updates,
                  "episodes_done": 0, "history": []}
        log.info("district-model fine-tuning starts from the training-window score %.4f", check["score"])
    rollouts = [model_tuning.window_rollouts(w.env, run.teacher_records[i], p.record, run.policy)
                for i, (w, p) in enumerate(zip(run.windows, passes))]
    weights = torch.tensor([float(r.model.steps) for r in rollouts])
    optimizer = torch.optim.Adam(actors.parameters(), lr=config.model_lr)
    district_step = model_tuning.DistrictStep(run.policy, config.model_district_step)
    best = (copy.deepcopy(actors.state_dict()), copy.deepcopy(optimizer.state_dict()))
    best_passes = passes
    for episode in range(tuning["episodes_done"], config.model_episodes):
        started = time.perf_counter()
        for update in trange(tuning["updates"], desc=f"district model {episode + 1}/{config.model_episodes}",
                             unit="update", disable=not run.progress, leave=False):
            which = int(torch.multinomial(weights, 1, generator=run.generator))
            imagined, terms = model_tuning.loss(run.policy, rollouts[which], batch=config.model_batch,
                                                horizon=config.model_horizon, generator=run.generator,
                                                through_bounds=config.model_through_bounds,
                                                peak_share=config.model_peak_share,
                                                load_spread=config.model_load_spread)
            clone = run.learner.cloning_loss(*run.labelled.sample(run.learner.label_batch(), run.generator))
            optimizer.zero_grad(set_to_none=True)
            (imagined + config.model_clone_weight * clone).backward()
            torch.nn.utils.clip_grad_norm_(actors.parameters(), config.grad_clip)
            district_step.step(optimizer)
            if update % 10 == 0:
                run.trace.write("update", phase="model", episode=episode + 1, update=update, loss=imagined.item(),
                                clone=clone.item(), **terms)
        seconds = time.perf_counter() - started
        state.learning_seconds += seconds
        check, passes = gate_check(run.windows, run.learner, progress=run.progress)
        accepted = check["score"] < tuning["best_score"] and check["ev_departures_acceptable"] >= EV_SERVICE_BAR
        if accepted:
            tuning.update(best_score=check["score"], best_episode=episode + 1)
            best = (copy.deepcopy(actors.state_dict()), copy.deepcopy(optimizer.state_dict()))
            best_passes = passes
            rollouts = [replace(r, rows=model_tuning.pass_rows(p.record)) for r, p in zip(rollouts, passes)]
        else:
            actors.load_state_dict(best[0])
            optimizer.load_state_dict(best[1])
            tuning["updates"] = max(1, tuning["updates"] // 2)
        run.learner.target_actors.load_state_dict(actors.state_dict())
        tuning["history"].append({"episode": episode + 1, "accepted": accepted, "score": check["score"],
                                  "ev_departures_acceptable": check["ev_departures_acceptable"],
                                  "kpis": check["kpis"], "learning_seconds": round(seconds, 1)})
        tuning["episodes_done"] = episode + 1
        state.model_tuning = tuning
        run.trace.write("gate", phase="model", episode=episode + 1, accepted=accepted,
                        best_episode=tuning["best_episode"], next_updates=tuning["updates"], **check)
        log.info("district model, episode %d: training-window score %.4f -> %s", episode + 1, check["score"],
                 "kept" if accepted else f"back to episode {tuning['best_episode']}")
        run.write("last.pt", {"trained": True, "episode": state.episodes_done, "model_episodes": episode + 1})
    state.seconds += time.perf_counter() - phase_started
    tuning.update(evaluate(run, state.episodes_done, "district-model fine-tuning done",
                           result=best_passes[0] if run.evaluates_on_its_training_window else None))
    state.model_tuning = tuning


def widen(run: Run, district: str) -> None:
    """From here on every actor also reads the district feature ``district`` (networks.widened: its weights start
    at 0, the actions unchanged). The learner is built anew over the widened actors; its critic, which reads what
    the actors read, starts afresh (the district-model tuning does not use it)."""
    observations = np.concatenate([w.warm.observations for w in run.windows])
    run.policy = widened(run.policy, district, observations)
    run.actor_spec = run.policy.spec
    run.learner = MADDPG(run.policy, run.config, run.windows[0].reward.shares)
    log.info("the actors now read the district feature %r too (its weights start at 0); no longer decentralised",
             district)


def fine_tune(run: Run, evaluate_every: int) -> None:
    """MADDPG episodes, each kept only if the deterministic training-window score drops (a trust region)."""
    config, state = run.config, run.state
    if state.episodes_done >= config.episodes:
        return
    if state.gate is None:
        start = gate_check(run.windows, run.learner, progress=run.progress)[0]
        state.gate = {"best_score": start["score"], "best_episode": 0, "actor_steps": config.actor_steps,
                      "start": start}
        run.trace.write("gate", episode=0, accepted=True, best_episode=0, next_actor_steps=config.actor_steps, **start)
        log.info("fine-tuning starts from the clone's training-window score %.4f", start["score"])
    best = (copy.deepcopy(run.learner.actors.state_dict()), copy.deepcopy(run.learner.actor_optimizer.state_dict()))
    for episode in range(state.episodes_done, config.episodes):
        window = run.windows[episode % len(run.windows)]
        std = config.exploration_std(episode)
        result, learning_seconds, gradient = finetune_episode(run, window, episode=episode, std=std,
                                                              actor_steps=state.gate["actor_steps"])
        check, passes = gate_check(run.windows, run.learner, progress=run.progress, buffer=run.buffer,
                                   replay_episode=2000 + episode)
        accepted = check["score"] < state.gate["best_score"] and check["ev_departures_acceptable"] >= EV_SERVICE_BAR
        if accepted:
            state.gate.update(best_score=check["score"], best_episode=episode + 1)
            best = (copy.deepcopy(run.learner.actors.state_dict()),
                    copy.deepcopy(run.learner.actor_optimizer.state_dict()))
        else:
            run.learner.restore_actors(*best)
            state.gate["actor_steps"] = max(1, state.gate["actor_steps"] // 2)
        run.trace.write("gate", episode=episode + 1, accepted=accepted, best_episode=state.gate["best_episode"],
                        next_actor_steps=state.gate["actor_steps"], **check)
        record = {"episode": episode + 1, "window": window.label, "exploration_std": std,
                  "learning_seconds": learning_seconds, "gate": {"accepted": accepted, **check},
                  "critic_gradient": gradient, **result.summary()}
        run.trace.write("rollout", phase="finetune", **record)
        if evaluate_every and (episode + 1) % evaluate_every == 0:
            record.update(evaluate(run, episode + 1, f"episode {episode + 1}",
                                   result=passes[0] if accepted and run.evaluates_on_its_training_window else None))
        state.history.append(record)
        state.episodes_done = episode + 1
        state.seconds += result.seconds
        state.learning_seconds += learning_seconds
        log.info("episode %d: team return %.1f exploring; training-window score %.4f -> %s", episode + 1,
                 result.team_return, check["score"],
                 "kept" if accepted else f"back to episode {state.gate['best_episode']}")
        run.write("last.pt", {"trained": True, "episode": episode + 1})


def finetune_episode(run: Run, window: Window, *, episode: int, std: float, actor_steps: int
                     ) -> tuple[Pass, float, dict]:
    """Collect (the actors explore, the critic learns every step), then improve (critic refit, then `actor_steps`
    actor updates), both on the whole replay. Returns the pass, the seconds spent learning and the check of the
    gradient the actor steps followed."""
    config, learner = run.config, run.learner
    learning_seconds = 0.0

    def learn(train_actors: bool = False, stage: str = "collect") -> None:
        nonlocal learning_seconds
        tick = time.perf_counter()
        stats = learner.update(run.buffer.sample(config.batch_size, run.generator, n_step=config.n_step,
                                                 gamma=config.gamma), run.labelled, train_actors=train_actors,
                               generator=run.generator)
        learning_seconds += time.perf_counter() - tick
        run.trace.write("update", phase="finetune", stage=stage, episode=episode + 1, update=learner.updates, **stats)

    def drive(raw: np.ndarray) -> np.ndarray:
        run.state.env_steps += 1
        return learner.act(raw, std, run.generator)

    def collect_step() -> None:
        if len(run.buffer) >= config.batch_size and run.state.env_steps % config.update_every == 0:
            learn()

    result = rollout(window, drive, driver=f"episode {episode + 1}/{config.episodes}", episode=1000 + episode,
                     buffer=run.buffer, on_step=collect_step, progress=run.progress)
    for _ in trange(config.critic_refit_steps, desc="critic refit", unit="update", disable=not run.progress,
                    leave=False):
        learn(stage="critic refit")
    gradient = gradient_check(run, episode=episode + 1, phase="finetune (before the actor steps)")
    for _ in trange(actor_steps * config.policy_delay, desc="actor steps", unit="update", disable=not run.progress,
                    leave=False):
        learn(train_actors=True, stage="improve")
    return result, learning_seconds, gradient


def gate_check(windows: list[Window], learner: MADDPG, *, progress: bool = False, buffer: ReplayBuffer | None = None,
               replay_episode: int = 0) -> tuple[dict, list[Pass]]:
    """The actors, deterministic, on every training window (new envs): the step-weighted mean headline score, EV
    service, and the passes. With ``buffer``, their transitions join the replay: the critic is then refitted on the
    deterministic policy's data, not only on the exploring one's."""
    passes = [rollout(w.fresh(), lambda raw: learner.act(raw), driver="check", record=True, progress=progress,
                      buffer=buffer, episode=replay_episode * 10 + i)
              for i, w in enumerate(windows)]
    steps = sum(p.steps for p in passes)
    check = {"score": sum(headline_score(p.kpis) * p.steps for p in passes) / steps,
             "ev_departures_acceptable": min(p.service["ev_departures_acceptable"] for p in passes),
             "kpis": passes[0].kpis if len(passes) == 1 else {w.label: p.kpis for w, p in zip(windows, passes)}}
    return check, passes


def finish(run: Run) -> TrainResult:
    state = run.state
    final_evaluation = state.history[-1] if state.history and "evaluation_kpis" in state.history[-1] else None
    if final_evaluation is None and not state.history and state.model_tuning and "evaluation_kpis" in state.model_tuning:
        final_evaluation = state.model_tuning   # tuned through the district model, not fine-tuned after
    if final_evaluation is None and not state.history and state.teaching and "evaluation_kpis" in state.teaching:
        final_evaluation = state.teaching   # no fine-tuning: the clone's evaluation is the final one
    if final_evaluation is None:
        final_evaluation = evaluate(run, state.episodes_done, "final")
    run.trace.close()
    summary = {
        "trained": True,
        "algorithm": "MADDPG (CTDE, twin centralised critic, TD3 stabilisers, n-step), taught by "
                     f"{run.config.teacher} + DAgger, TD3+BC fine-tuning; team reward = the headline KPIs per step",
        "config": run.config.to_dict(),
        "episodes": state.episodes_done,
        "env_steps": state.env_steps,
        "training_seconds": round(state.seconds, 1),
        "learning_seconds": round(state.learning_seconds, 1),
        "evaluation_window": [run.evaluation.start, run.evaluation.end],
        "evaluation": final_evaluation["evaluation_kpis"],
        "evaluation_service": final_evaluation["evaluation_service"],
        "teaching": state.teaching,
        # The policy fine-tuning started from (the clone), scored like every fine-tuning check: on new envs.
        "fine_tuning_start": (state.gate or {}).get("start"),
        "model_tuning": None if state.model_tuning is None else {
            k: v for k, v in state.model_tuning.items() if k not in ("evaluation_kpis", "evaluation_service")},
        "history": state.history,
        "best_episode": state.best_episode,
        "best_score": state.best_score,
    }
    final = run.write("final.pt", summary)
    return TrainResult(out_dir=run.out_dir, final_checkpoint=final, best_checkpoint=run.out_dir / "best.pt",
                       summary=summary)


# --- checks of the critic ---------------------------------------------------------------------------------------------
def heldout_check(run: Run) -> dict:
    """The critic's TD error on teacher transitions it never trained on."""
    if len(run.heldout) == 0:
        return {}
    with torch.no_grad():
        batch = run.heldout.sample(0, run.generator, n_step=run.config.n_step, gamma=run.config.gamma,
                                   index=torch.arange(len(run.heldout)))
        _, stats = run.learner.critic_loss(batch)
    return {"heldout_td_error": stats["td_error"], "heldout_q": stats["q"], "heldout_target": stats["target"],
            "heldout_transitions": len(run.heldout)}


def gradient_check(run: Run, *, episode: int, phase: str) -> dict:
    """The sign of the critic's dQ/da on the batteries against finite differences in the env (critic_probe.py), on
    the first training window; the pairs go to the trace, the agreement is returned."""
    if not run.config.gradient_check_points:
        return {}
    try:
        found = critic_probe.probe(run.learner, run.windows[0], points=run.config.gradient_check_points,
                                   seed=run.config.seed + episode)
    except critic_probe.ProbeError as exc:
        log.info("critic dQ/da check skipped: %s", exc)
        return {}
    run.trace.write("critic_gradient", episode=episode, phase=phase, **found)
    log.info("critic dQ/da on the batteries (%s): sign agrees with the env's finite differences at %d of %d points",
             phase, round(found["sign_agreement"] * found["counted"]) if found["counted"] else 0, found["counted"])
    return {k: v for k, v in found.items() if k != "pairs"}


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


# --- small helpers ------------------------------------------------------------------------------------------------------
def make_window(spec: EnvSpec, warm, layout, config: TrainConfig, *, env=None, teacher: bool = True,
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
