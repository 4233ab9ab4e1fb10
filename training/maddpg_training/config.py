"""Every training setting in one typed place, loadable from a TOML file (``--config``) and overridable by options."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_evaluation.citylearn_env import DEFAULT_DATASET

from .team_reward import TeamRewardWeights


@dataclass(frozen=True)
class TrainConfig:
    # --- what to learn on --------------------------------------------------------------------------------------------
    dataset: str = DEFAULT_DATASET        # dataset name or schema.json path
    start: int | None = None              # training window (inclusive time steps); None = whole dataset
    end: int | None = None
    episodes: int = 12                    # passes over the window
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None            # torch intra-op threads; None = torch's default

    # --- networks ----------------------------------------------------------------------------------------------------
    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)

    # --- TD3-style MADDPG ---------------------------------------------------------------------------------------------
    gamma: float = 0.99
    tau: float = 0.005                    # Polyak rate of the target networks
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    batch_size: int = 256
    buffer_size: int = 100_000
    learning_starts: int = 2_000          # uniform random actions before the first update
    update_every: int = 2                 # env steps per gradient update of the critic
    policy_delay: int = 2                 # critic updates per actor (and target) update
    target_noise: float = 0.2             # target policy smoothing (unit action scale)
    target_noise_clip: float = 0.5
    exploration_start: float = 0.05       # Gaussian exploration std (unit action scale), decayed linearly ...
    exploration_end: float = 0.05
    exploration_decay_episodes: int = 8   # ... over this many episodes, then held
    grad_clip: float = 1.0
    preactivation_penalty: float = 0.01   # keeps actors out of tanh saturation (see trainer)

    # --- learning from a demonstration (DDPGfD; see demonstration.py) ---------------------------------------------------
    demonstration: bool = True            # start from the self-consumption rule: replay seeded, actors cloned
    demonstration_noise: float = 0.1      # Gaussian noise on the rule's actions while it fills the replay buffer
    clone_steps: int = 5_000              # behaviour-cloning steps of the actors (per cloning)
    clone_lr: float = 1e-3
    dagger_rounds: int = 1                # passes where the clone acts and the rule labels, each followed by
                                          # re-cloning on everything labelled so far (DAgger)
    critic_warmup_steps: int = 3_000      # critic updates on the demonstration before the actors follow the critic
    guide_alpha: float = 0.3              # TD3+BC: weight of the normalised Q term against staying near the rule;
                                          # 0 turns the pull towards the rule off (pure TD3 after the warm start)

    # --- what the policy may do -----------------------------------------------------------------------------------------
    # False narrows every EV charger action to [0, 1]: the policy charges parked cars but never discharges them into
    # the building (vehicle-to-grid needs the owner's consent, and draining a car is what an untamed policy learns
    # first: measured EV service 0.006 against 0.094 for doing nothing).
    allow_ev_discharge: bool = False

    # --- team reward ---------------------------------------------------------------------------------------------------
    reward: TeamRewardWeights = field(default_factory=TeamRewardWeights)

    def exploration_std(self, episode: int) -> float:
        if self.exploration_decay_episodes <= 0:
            return self.exploration_end
        fraction = min(1.0, episode / self.exploration_decay_episodes)
        return self.exploration_start + fraction * (self.exploration_end - self.exploration_start)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["actor_hidden"] = list(self.actor_hidden)
        data["critic_hidden"] = list(self.critic_hidden)
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
        if "reward" in values:
            reward = values["reward"]
            allowed = {f.name for f in fields(TeamRewardWeights)}
            if not isinstance(reward, dict) or set(reward) - allowed:
                raise MaddpgCitylearnError(f"[reward] takes the weights {', '.join(sorted(allowed))}")
            values["reward"] = TeamRewardWeights(**reward)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise MaddpgCitylearnError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise MaddpgCitylearnError(f"config file {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def override(self, **values: Any) -> "TrainConfig":
        return replace(self, **{k: v for k, v in values.items() if v is not None})
