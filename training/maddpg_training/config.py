"""Every training setting in one typed place, loadable from a TOML file (``--config``) and overridable by options.

The defaults are the shipped recipe (docs/model-card.md): ``maddpg-citylearn train`` with no config trains it. TOML
files under configs/ hold variants only (a smoke run, the held-out folds, the experiments of the protocol).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_evaluation.citylearn_env import DEFAULT_DATASET

from .team_reward import TeamRewardWeights

OBJECTIVES = ("balanced", "cost", "carbon", "peak")


ACTOR_Q_TERMS = ("all", "buildings")
NOISE_SLOTS = ("two-sided", "all")

@dataclass(frozen=True)
class TrainConfig:
    # --- what to learn on --------------------------------------------------------------------------------------------
    dataset: str = DEFAULT_DATASET        # dataset name or schema.json path
    start: int | None = None              # training window (inclusive time steps); None = whole dataset
    end: int | None = None
    # Several training windows instead of start/end, e.g. [[0, 1464], [3673, 8759]] (January to September of the
    # shared dataset, which starts on 1 August): episodes go through them in turn.
    windows: tuple[tuple[int, int], ...] = ()
    # Window of the deterministic evaluations (best.pt): default the training window when there is one, else the
    # whole dataset. A held-out fold sets its test months here.
    eval_start: int | None = None
    eval_end: int | None = None
    episodes: int = 0                     # MADDPG fine-tuning passes over the window(s), after the teacher phases;
                                          # 0 ships the planner-taught clone (the protocol's verdict on fine-tuning)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None            # torch intra-op threads; None = torch's default

    # --- networks ----------------------------------------------------------------------------------------------------
    actor_hidden: tuple[int, ...] = (64, 64)   # small actors generalise to months training never showed (the protocol)
    ensemble: int = 5                     # actors per building, each cloned on its own minibatches, their actions
                                          # averaged in the graph: three beat one on both folds, five beat three in
                                          # summer and tied in winter (the protocol)
    critic_hidden: tuple[int, ...] = (256, 256)
    features: tuple[str, ...] = ("hour_cycle", "ev_slack")  # computed in the graph from each building's own row
    ignore: tuple[str, ...] = ("season",) # observation groups the actors do not read (networks.py): no month or
                                          # weather, whose held-out values training never showed

    # --- what the policy may do ----------------------------------------------------------------------------------------
    # False narrows every EV charger action to [0, 1]: the policy charges parked cars but never discharges them into
    # the building (vehicle-to-grid needs the owner's consent).
    allow_ev_discharge: bool = False
    safety: bool = True                   # the in-graph safety layer: cars leave charged, appliance cycles run
    ev_margin: float = 0.02               # the safety layer charges cars to required SOC - 0.05 + this
    ev_pace: float = 0.5                  # ... counting on this share of full power for the hours left (ev_service.py:
                                          # 1 charges a late car at full power in its last hours, where every car's
                                          # floor lands at once; 0.5 starts earlier at about half power)

    # --- the teacher (learning from demonstrations, then DAgger) -------------------------------------------------------
    teacher: str = "planner"              # planner | rule (see teachers.py)
    planner_horizon: int = 48             # hours of perfect foresight
    planner_objective: str = "balanced"   # balanced | cost | carbon | peak
    dagger_rounds: int = 1                # passes where the clone drives and the teacher labels, each then re-cloned
    label_every: int = 8                  # the teacher labels every k-th state of a DAgger pass (an LP each,
                                          # ~0.4 s here: 8 keeps a fold's DAgger pass under 10 minutes)
    dagger_noise: float = 0.05            # exploration of the driving clone in DAgger passes (unit action scale)
    clone_steps: int = 3_000              # behaviour-cloning steps per cloning
    clone_lr: float = 1e-3
    undercharge_weight: float = 1.0       # cloning: a charger's action below the teacher's counts this many times
                                          # (>1 fits an upper expectile: a car charged late meets the safety floor
                                          # in its last hours, where every car's floor lands at once: the peaks)
    clone_through_bounds: bool = True     # cloning: the error of the applied action reaches the actor's own output
                                          # even where the bounds or the safety floor overrode it (straight through),
                                          # and outputs beyond a slot's bounds are pulled back inside. False: a
                                          # charger output below 0 is clipped to 0 with no gradient, so a clone that
                                          # once undershoots a charging label never learns it back (learner.py)
    cache_demonstration: bool = True      # keep the teacher's own pass on disk (runs/.cache): seeds share it
    teacher_whole_year: bool = False      # windows inside the dataset are labelled by a cut of the teacher's pass over
                                          # the whole dataset, computed (and cached) first where it is not cached: the
                                          # labels, hence the clone, then do not depend on what the cache held (a
                                          # window's own pass differs in its first hours, where the battery starts)

    # --- fine-tuning through the district model (model_tuning.py) -------------------------------------------------------
    # Each episode: `model_updates` actor updates, each on `model_batch` runs of `model_horizon` hours where the actors
    # drive a differentiable model of the district (district_model.py) from states of their own last pass, scored on
    # the headline KPIs of those hours plus `model_clone_weight` times the cloning loss; then the actors,
    # deterministic, on the training window(s) in the env: kept if they score better (EV service held), else back to
    # the best and half the updates. 0 episodes: the clone as the teacher phases left it. Three episodes of 100
    # updates beat the clone held out on both folds, every seed (the protocol): version 6. Through the bounds, on
    # spread loads, with the district read from the first update: version 7 (better than version 6's recipe).
    model_episodes: int = 3
    model_updates: int = 100
    model_horizon: int = 48
    model_batch: int = 16
    model_lr: float = 1e-4
    model_clone_weight: float = 1.0
    model_through_bounds: bool = True     # the model's gradient passes the flat parts of action -> energy straight
                                          # through: the clip to a slot's bounds and a charger's minimum power (an
                                          # output outside its bounds is pulled back inside). False: a charger whose
                                          # output sits below 0, or under its minimum power, learns nothing from the
                                          # district's KPIs (the safety floor's max stays exact either way)
    model_peak_share: float = 0.0         # share of each batch's runs started so that one of the window's highest
                                          # daily peaks (own pass; the highest tenth of days) falls inside the run:
                                          # the all-time peak is one hour, rarely in 16 runs drawn uniformly
    model_load_spread: float = 0.25       # each run's loads and solar generation scaled by factors drawn from
                                          # [1 - spread, 1 + spread] (domain randomisation: days the training
                                          # months do not hold); 0: the data as it is
    model_district: str = "district"      # "district" or "district_ev": from the first tuning update every actor
                                          # also reads that district feature, its input weights starting at 0 (the
                                          # clone's actions unchanged): only the district's KPIs teach its use,
                                          # not the teacher's labels. "": none (actors read their own row only)
    model_district_step: float = 1.0      # Adam's steps on the first-layer weights reading the district feature,
                                          # times this (the rest of the actor at model_lr): from 0, at model_lr,
                                          # they moved 0.0035 in version 7's tuning against the clone's 0.078

    # --- MADDPG fine-tuning (TD3-style, centralised critic, n-step returns) --------------------------------------------
    # Each episode: the actors drive (exploring) while the critic learns every step; then `critic_refit_steps` more
    # critic updates and `actor_steps` actor updates on that episode's transitions; then a deterministic check on
    # the training window(s) keeps the new actors only if they score better, else returns to the best and halves
    # `actor_steps` (a trust region measured in the env, not assumed).
    actor_steps: int = 300
    critic_refit_steps: int = 2_000
    gamma: float = 0.99
    n_step: int = 12                      # returns over n steps before bootstrapping (peaks answer hours later)
    tau: float = 0.005                    # Polyak rate of the target networks
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    batch_size: int = 256
    buffer_size: int = 60_000
    critic_warmup_steps: int = 6_000      # critic updates on the teacher's and DAgger data, actors held still
    update_every: int = 1                 # env steps per critic update while fine-tuning
    policy_delay: int = 2                 # critic updates per actor (and target) update
    target_noise: float = 0.1             # target policy smoothing (unit action scale)
    target_noise_clip: float = 0.3
    exploration_start: float = 0.05       # Gaussian exploration std (unit action scale), decayed linearly ...
    exploration_end: float = 0.05
    exploration_decay_episodes: int = 4   # ... over this many episodes, then held
    # Which action slots exploration and target smoothing perturb: "two-sided" (batteries; noise on a [0, 1] charger
    # is clipped at 0 into extra charging, a bias) or "all".
    noise_slots: str = "two-sided"
    bc_alpha: float = 2.5                 # TD3+BC: weight of the |Q|-normalised Q term against cloning the teacher
                                          # (2.5 is TD3+BC's); 0 = cloning only (no MADDPG step changes the actors)
    actor_q_terms: str = "all"            # which shares of the team Q the actors ascend: "all", or "buildings" (the
                                          # per-building cost and carbon shares; the peak shares stay with cloning)
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1         # teacher transitions kept out of critic training, to measure its error
    gradient_check_points: int = 16       # (step, battery) pairs where the critic's dQ/da is checked against the
                                          # env's finite differences after the warm-up and each critic refit (0: off)

    # --- team reward ---------------------------------------------------------------------------------------------------
    reward: TeamRewardWeights = field(default_factory=TeamRewardWeights)

    def __post_init__(self) -> None:
        from .networks import DISTRICT_FEATURES, FEATURES, OBSERVATION_GROUPS
        from .teachers import TEACHERS

        problems = []
        if self.teacher not in TEACHERS:
            problems.append(f"teacher = {self.teacher!r} (choose {' or '.join(TEACHERS)})")
        if self.planner_objective not in OBJECTIVES:
            problems.append(f"planner_objective = {self.planner_objective!r} (choose one of {', '.join(OBJECTIVES)})")
        if self.noise_slots not in NOISE_SLOTS:
            problems.append(f"noise_slots = {self.noise_slots!r} (choose {' or '.join(NOISE_SLOTS)})")
        if self.actor_q_terms not in ACTOR_Q_TERMS:
            problems.append(f"actor_q_terms = {self.actor_q_terms!r} (choose {' or '.join(ACTOR_Q_TERMS)})")
        if set(self.features) - set(FEATURES):
            problems.append(f"features = {list(self.features)} (known: {', '.join(FEATURES)})")
        if set(self.ignore) - set(OBSERVATION_GROUPS):
            problems.append(f"ignore = {list(self.ignore)} (known: {', '.join(OBSERVATION_GROUPS)})")
        for name in ("ensemble", "n_step", "label_every", "batch_size", "policy_delay", "update_every", "planner_horizon",
                     "model_updates", "model_horizon", "model_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name} = {getattr(self, name)} (must be at least 1)")
        if self.undercharge_weight < 1:
            problems.append(f"undercharge_weight = {self.undercharge_weight} (must be at least 1: 1 is plain cloning)")
        if not 0 < self.ev_pace <= 1:
            problems.append(f"ev_pace = {self.ev_pace} (must be in (0, 1]: 1 charges late cars at full power)")
        if self.model_episodes < 0 or self.model_clone_weight < 0 or self.model_lr <= 0:
            problems.append(f"model_episodes = {self.model_episodes}, model_clone_weight = {self.model_clone_weight}, "
                            f"model_lr = {self.model_lr} (need episodes >= 0, weight >= 0, lr > 0)")
        if not 0 <= self.model_peak_share <= 1:
            problems.append(f"model_peak_share = {self.model_peak_share} (must be in [0, 1]: the share of each batch's "
                            f"runs aimed at the highest daily peaks)")
        if not 0 <= self.model_load_spread < 1:
            problems.append(f"model_load_spread = {self.model_load_spread} (must be in [0, 1): loads and solar are "
                            f"scaled by factors in [1 - spread, 1 + spread])")
        if self.model_district_step <= 0:
            problems.append(f"model_district_step = {self.model_district_step} (must be > 0: 1 steps the district "
                            f"weights as far as every other weight)")
        if self.model_district not in ("", *DISTRICT_FEATURES):
            problems.append(f"model_district = {self.model_district!r} (choose one of {list(DISTRICT_FEATURES)}, or "
                            f"\"\" for none)")
        elif self.model_district and set(self.features) & set(DISTRICT_FEATURES):
            problems.append(f"model_district = {self.model_district!r} with features {list(self.features)}: the actors "
                            f"already read a district feature; drop one of the two (model_district = \"\" or "
                            f"--model-district none keeps the feature read from the first cloning step)")
        elif self.model_district and self.model_episodes > 0 and self.episodes > 0:
            problems.append(f"model_district = {self.model_district!r} with episodes = {self.episodes}: MADDPG "
                            f"fine-tuning after the widening would need its critic fitted anew on the wider inputs; "
                            f"set episodes = 0, or model_episodes = 0 (--model-episodes 0: MADDPG on the clone), or "
                            f"model_district = \"\" (--model-district none: decentralised actors)")
        if not 0 <= self.heldout_fraction < 1:
            problems.append(f"heldout_fraction = {self.heldout_fraction} (must be in [0, 1))")
        for window in self.windows:
            if len(window) != 2 or window[0] < 0 or window[1] <= window[0]:
                problems.append(f"windows entry {list(window)} (need [start, end] with 0 <= start < end)")
        if problems:
            raise MaddpgCitylearnError("invalid training setting(s): " + "; ".join(problems))

    def training_windows(self) -> tuple[tuple[int | None, int | None], ...]:
        return tuple(tuple(w) for w in self.windows) if self.windows else ((self.start, self.end),)

    def evaluation_window(self) -> tuple[int | None, int | None]:
        """The deterministic evaluations' window: eval_start/eval_end, else the one training window, else the year.
        A smoke run on 200 steps is then evaluated on those steps, not on a full year it never trained on."""
        if self.eval_start is not None or self.eval_end is not None:
            return self.eval_start, self.eval_end
        windows = self.training_windows()
        return windows[0] if len(windows) == 1 else (None, None)

    def exploration_std(self, episode: int) -> float:
        if self.exploration_decay_episodes <= 0:
            return self.exploration_end
        fraction = min(1.0, episode / self.exploration_decay_episodes)
        return self.exploration_start + fraction * (self.exploration_end - self.exploration_start)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["actor_hidden"] = list(self.actor_hidden)
        data["critic_hidden"] = list(self.critic_hidden)
        data["features"] = list(self.features)
        data["ignore"] = list(self.ignore)
        data["windows"] = [list(w) for w in self.windows]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MaddpgCitylearnError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        for name in ("actor_hidden", "critic_hidden"):
            if name in values:
                values[name] = tuple(int(h) for h in values[name])
        for name in ("features", "ignore"):
            if name in values:
                values[name] = tuple(str(f) for f in values[name])
        if "windows" in values:
            values["windows"] = tuple((int(a), int(b)) for a, b in values["windows"])
        if "reward" in values:
            reward = values["reward"]
            allowed = {f.name for f in fields(TeamRewardWeights)}
            if not isinstance(reward, dict) or set(reward) - allowed:
                raise MaddpgCitylearnError(f"[reward] takes the weights {', '.join(sorted(allowed))}")
            values["reward"] = TeamRewardWeights(**reward)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_toml(path, "config file"))

    def override(self, **values: Any) -> "TrainConfig":
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's contents, or one error line saying it is missing or not valid TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MaddpgCitylearnError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise MaddpgCitylearnError(f"{what} {path} is not valid TOML: {exc}") from None
