"""The evaluation protocol: does a recipe hold on months it never saw, beyond the noise, over several seeds?

For every fold (test months, and the training months around them with a gap of at least a week), every arm (a
recipe: settings over the shipped defaults) and every training seed, ``train`` runs on the fold's training months;
its final policy (chosen by the training months only) is then scored, deterministically, on the test months:

* on the env as published, and on ``env_seeds`` more (CityLearn re-seeds the drift of unconnected cars' charge with
  the env's random seed): how far the *same weights* move is the noise of a score;
* against charge on arrival on the same months (every car served, the fair reference for cost and carbon), and
  beside the teacher's own actions on those months (the planner's cached full-year pass, replayed): how much of
  what it was taught a policy keeps on months it never saw.

Arms are compared in pairs, seed by seed (the same seed for both arms): an arm counts as better where its score is
lower by more than the noise floor on at least ``wins_needed`` of the seeds. What is compared is a difference of two
scores on the same env seed, so the floor is that difference's noise: two runs of one training seed, rescored on the
same env seeds, meet the same cars, and most of a score's movement (the district's cost when more cars arrive
empty) moves both. Measured on this project's folds: a single score moves by up to 0.015, the difference of two runs
by up to 0.0075. The floor is the largest spread of such a difference over every pair of runs rescored in the fold;
the single score's floor is reported beside it, with the verdicts it would give. The score is the mean of the four
headline KPIs (cost, carbon, daily peak, all-time peak; ratios to no control, lower is better).

Runs that finished (their ``heldout.json``) are not trained again: a protocol can be continued across sessions and
split across processes (``--arms``, ``--folds``, ``--seeds``), and ``--summarise-only`` re-reads what exists. A
finished run whose training seed joins ``env_seed_runs`` later is rescored on the env seeds it lacks (from its
``final.pt``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_core.files import atomic_write
from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.kpis import HEADLINE_KPIS, headline_score
from maddpg_evaluation.reference_controllers import ChargeOnArrivalPolicy

from . import teacher_cache
from .checkpoint import load_checkpoint
from .config import TrainConfig, read_toml
from .torch_policy import TorchPolicy

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.json"
REFERENCES_FILE = "references.json"
TEACHER = "planner (the teacher), replayed"
START_FROM = "start_from"   # an arm's setting that is not a training setting (see Protocol.start_from)
MIN_GAP = 168  # hours between training and test data (a week)


PACED_TEACHER = "planner (the teacher, EV floor paced "   # + the pace, "), replayed"


def teacher_label(config: TrainConfig) -> str:
    """The teacher's row in references.json: one per EV rule, since the planner plans inside the rule it teaches."""
    return TEACHER if config.ev_pace == 1.0 else f"{PACED_TEACHER}{config.ev_pace:g}), replayed"


def is_teacher_row(label: str) -> bool:
    return label == TEACHER or label.startswith(PACED_TEACHER)


@dataclass(frozen=True)
class Fold:
    name: str
    test: tuple[int, int]
    train: tuple[tuple[int, int], ...]

    def check(self, gap: int = MIN_GAP) -> None:
        a, b = self.test
        for start, end in self.train:
            if not (end + gap < a or start - gap > b):
                raise MaddpgCitylearnError(
                    f"fold {self.name}: training window {start}..{end} comes within {gap} h of the test months "
                    f"{a}..{b}; leave a gap of at least a week")


@dataclass(frozen=True)
class Protocol:
    folds: tuple[Fold, ...]
    arms: dict[str, dict[str, Any]]            # arm name -> TrainConfig settings over `common` (and `start_from`)
    common: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    env_seeds: tuple[int, ...] = (1, 2)        # extra env random seeds for the noise floor
    env_seed_runs: tuple[int, ...] = (0,)      # training seeds whose weights are rescored on them
    comparisons: tuple[tuple[str, str], ...] = ()
    wins_needed: int = 2
    summary: str = "protocol.json"             # its file in OUT: confirmations sharing an OUT keep their own

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        data = read_toml(path, "protocol file")
        if "extends" in data:
            data = _extended(Path(path), data)
        folds = tuple(Fold(name, tuple(f["test"]), tuple(tuple(w) for w in f["train"]))
                      for name, f in data.get("folds", {}).items())
        # Settings the file leaves out keep this class's defaults.
        given = {name: tuple(data[name]) for name in ("seeds", "env_seeds", "env_seed_runs") if name in data}
        if "comparisons" in data:
            given["comparisons"] = tuple(tuple(c) for c in data["comparisons"])
        if "wins_needed" in data:
            given["wins_needed"] = int(data["wins_needed"])
        if "summary" in data:
            given["summary"] = str(data["summary"])
        protocol = cls(folds=folds, arms=dict(data.get("arms", {})), common=dict(data.get("common", {})), **given)
        protocol.check()
        return protocol

    def check(self) -> None:
        if not self.folds or not self.arms:
            raise MaddpgCitylearnError("a protocol needs at least one [folds.NAME] and one [arms.NAME]")
        if Path(self.summary).name != self.summary or not self.summary.endswith(".json"):
            raise MaddpgCitylearnError(f"summary = {self.summary!r}: name a .json file (no folder): it is written "
                                       f"in the protocol's --out directory")
        for fold in self.folds:
            fold.check()
        for a, b in self.comparisons:
            for arm in (a, b):
                if arm not in self.arms:
                    raise MaddpgCitylearnError(f"comparison {a} vs {b}: no arm named {arm!r}")
        for arm in self.arms:
            self.config(arm, self.folds[0], self.seeds[0])   # every setting is checked before any work
            base = self.start_from(arm)
            if base is not None and (base not in self.arms or self.start_from(base) is not None):
                raise MaddpgCitylearnError(
                    f"arm {arm!r}: start_from = {base!r} must name an arm that starts from scratch "
                    f"(the protocol has {', '.join(self.arms)})")

    def start_from(self, arm: str) -> str | None:
        """The arm whose trained run (same fold, same seed) this arm resumes, or None: it trains from scratch.

        An arm that only adds fine-tuning episodes starts from the other arm's clone: the same weights on both
        sides of the paired comparison, and the cloning is not paid twice."""
        return self.arms[arm].get(START_FROM)

    def config(self, arm: str, fold: Fold, seed: int) -> TrainConfig:
        settings = {**self.common, **{k: v for k, v in self.arms[arm].items() if k != START_FROM}}
        return TrainConfig.from_dict({**settings, "windows": [list(w) for w in fold.train], "start": None,
                                      "end": None, "eval_start": fold.test[0], "eval_end": fold.test[1],
                                      "seed": seed})

    def fold(self, name: str) -> Fold:
        for fold in self.folds:
            if fold.name == name:
                return fold
        raise MaddpgCitylearnError(f"no fold named {name!r} (the protocol has {', '.join(f.name for f in self.folds)})")


def _extended(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A protocol file that ``extends`` another (a path relative to it): the other's folds, common settings and
    arms, only those named in this file's ``arms`` list where it gives one, and this file's other keys over the
    other's. A confirmation on fresh seeds then runs the very recipes the first protocol ran, written once."""
    parent_path = path.parent / str(data["extends"])
    parent = read_toml(parent_path, "protocol file")
    if "extends" in parent:
        raise MaddpgCitylearnError(f"{path} extends {parent_path}, which extends another: one level only")
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("extends", "arms")}}
    if "arms" in data:
        chosen, known = data["arms"], parent.get("arms", {})
        if not isinstance(chosen, list) or any(arm not in known for arm in chosen):
            raise MaddpgCitylearnError(
                f"{path}: arms = {chosen!r} must list arms of {parent_path} by name (it has {', '.join(known)})")
        merged["arms"] = {arm: known[arm] for arm in chosen}
    return merged


def run_directory(out: Path, fold: str, arm: str, seed: int) -> Path:
    return out / fold / arm / f"seed-{seed}"


def run_protocol(protocol: Protocol, out: Path, *, folds: list[str] | None = None, arms: list[str] | None = None,
                 seeds: list[int] | None = None, progress: bool = False) -> dict:
    """Train and score every (fold, arm, seed) not finished yet, then summarise everything finished."""
    for fold in [protocol.fold(f) for f in folds] if folds else protocol.folds:
        reference_scores(protocol, fold, out, progress=progress)
        for arm in arms or list(protocol.arms):
            if arm not in protocol.arms:
                raise MaddpgCitylearnError(f"no arm named {arm!r} (the protocol has {', '.join(protocol.arms)})")
            for seed in seeds if seeds is not None else protocol.seeds:
                base = protocol.start_from(arm)
                if base is not None and not _run(protocol, fold, base, seed, out, progress):
                    log.info("protocol: %s waits for %s (seed %d), which another process is training; skipped",
                             arm, base, seed)
                    continue
                _run(protocol, fold, arm, seed, out, progress)
    return summarise(protocol, out)


def _run(protocol: Protocol, fold: Fold, arm: str, seed: int, out: Path, progress: bool) -> bool:
    """Train and score one (fold, arm, seed) unless it is finished; False where another process holds it."""
    directory = run_directory(out, fold.name, arm, seed)
    if (directory / HELDOUT_FILE).is_file():
        return _complete_rescorings(protocol, fold, arm, seed, directory, progress)
    base = protocol.start_from(arm)
    resume = None if base is None else run_directory(out, fold.name, base, seed) / "last.pt"
    if resume is not None and not resume.is_file():
        # The base run is finished (its heldout.json is there) but its weights are not: results copied from
        # docs/model-card/protocol, or a run directory pruned to its results.
        raise MaddpgCitylearnError(
            f"arm {arm!r} resumes {base!r}'s run of seed {seed} on fold {fold.name}, but {resume} does not exist: "
            f"{resume.parent} holds that run's results without its weights. Delete {resume.parent / HELDOUT_FILE} "
            f"and run the same command: {base!r} is trained again first (its labels are cut from the cached "
            f"full-year teacher pass, so it is the same run)")
    with _claim(directory) as claimed:
        if not claimed:
            log.info("protocol: %s is being trained by another process; skipped", directory)
            return False
        _train_and_score(protocol, fold, arm, seed, out, progress, resume=resume)
    return True


def _complete_rescorings(protocol: Protocol, fold: Fold, arm: str, seed: int, directory: Path, progress: bool) -> bool:
    """A finished run whose seed the protocol now rescores (``env_seed_runs`` grew after it ran): its final policy
    is scored on the env seeds its heldout.json lacks, nothing trained again. False where another process holds it."""
    wanted = protocol.env_seeds if seed in protocol.env_seed_runs else ()
    heldout, missing = _unscored(directory, wanted)
    if not missing:
        return True
    checkpoint = directory / "final.pt"
    if not checkpoint.is_file():
        log.info("protocol: %s lacks env seed(s) %s but holds no final.pt to rescore (results only); left as it is",
                 directory, list(missing))
        return True
    with _claim(directory) as claimed:
        if not claimed:
            return False
        # Read again under the lock: another process may have rescored the run since the first read.
        heldout, missing = _unscored(directory, wanted)
        if not missing:
            return True
        log.info("protocol: fold %s, arm %s, seed %d: rescoring the finished run on env seed(s) %s", fold.name, arm,
                 seed, list(missing))
        published = heldout["scores"]["published"]
        rescored = score_heldout(checkpoint, protocol.config(arm, fold, seed).dataset, fold, missing,
                                 progress=progress, published=published)
        heldout["scores"] = {**heldout["scores"], **rescored["scores"]}
        _write_json(directory / HELDOUT_FILE, heldout)
    return True


def _unscored(directory: Path, wanted: tuple[int, ...]) -> tuple[dict, tuple[int, ...]]:
    """The run's heldout.json, and which of the ``wanted`` env seeds it holds no score for."""
    heldout = json.loads((directory / HELDOUT_FILE).read_text())
    return heldout, tuple(env for env in wanted if f"env-seed-{env}" not in heldout["scores"])


@contextlib.contextmanager
def _claim(directory: Path) -> Iterator[bool]:
    """A run directory for this process alone (a lock file holding its PID; a dead holder's lock is taken over),
    so that processes splitting a protocol never train the same run twice."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".running"
    try:
        holder = int(lock.read_text() or 0)
    except (FileNotFoundError, ValueError):
        holder = 0
    if holder and holder != os.getpid() and _alive(holder):
        yield False
        return
    lock.write_text(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_and_score(protocol: Protocol, fold: Fold, arm: str, seed: int, out: Path, progress: bool, *,
                     resume: Path | None = None) -> None:
    """Train one (fold, arm, seed) (``resume``: from another arm's run) and score its final policy on the fold's
    test months."""
    from .trainer import train

    config = protocol.config(arm, fold, seed)
    directory = run_directory(out, fold.name, arm, seed)
    log.info("protocol: fold %s, arm %s, seed %d: training on %s%s, testing on %d..%d", fold.name, arm,
             seed, [list(w) for w in fold.train], "" if resume is None else f" from {resume}", *fold.test)
    result = train(config, directory, resume=resume, progress=progress, evaluate_every=0)
    teacher_reference(fold, out=out, config=config, checkpoint=result.final_checkpoint, progress=progress)
    env_seeds = protocol.env_seeds if seed in protocol.env_seed_runs else ()
    # The run's final evaluation is the published env on the test months, on a new env; more env seeds
    # rescore the same weights.
    scores = score_heldout(result.final_checkpoint, config.dataset, fold, env_seeds, progress=progress,
                           published={"kpis": result.summary["evaluation"],
                                      "service": result.summary["evaluation_service"]})
    scores["training"] = training_line(result.summary)
    _write_json(directory / HELDOUT_FILE, scores)


def score_heldout(checkpoint: Path, dataset: str, fold: Fold, env_seeds: tuple[int, ...], *,
                  progress: bool = False, published: dict | None = None) -> dict:
    """The checkpoint's policy, deterministic, on the fold's test months: the env as published (``published``:
    already measured) and each env seed."""
    policy = TorchPolicy.from_checkpoint(checkpoint)
    rows = {}
    if published is not None:
        rows["published"] = {**published, "score": headline_score(published["kpis"])}
    for env_seed in (*(() if published is not None else (None,)), *env_seeds):
        result = run_episode(EnvSpec(schema=dataset, start=fold.test[0], end=fold.test[1],
                                     random_seed=env_seed).build(), policy, progress=progress)
        rows["published" if env_seed is None else f"env-seed-{env_seed}"] = {
            "kpis": result.kpis, "service": result.service, "score": headline_score(result.kpis)}
    return {"checkpoint": str(checkpoint), "test": list(fold.test), "scores": rows}


def reference_scores(protocol: Protocol, fold: Fold, out: Path, *, progress: bool = False) -> dict:
    """Charge on arrival on the fold's test months (cached in OUT/<fold>/references.json)."""
    path = out / fold.name / REFERENCES_FILE
    if path.is_file():
        return json.loads(path.read_text())
    dataset = protocol.common.get("dataset", TrainConfig().dataset)
    env = EnvSpec(schema=dataset, start=fold.test[0], end=fold.test[1]).build()
    result = run_episode(env, ChargeOnArrivalPolicy(env), name="charge on arrival", progress=progress)
    references = {"charge on arrival": {"kpis": result.kpis, "service": result.service,
                                        "score": headline_score(result.kpis)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, references)
    return references


def teacher_reference(fold: Fold, *, out: Path, config: TrainConfig, checkpoint: Path, progress: bool = False) -> None:
    """The teacher's actions on the fold's test months, added once to OUT/<fold>/references.json.

    They come from the cached full-year planner pass that labelled the fold (its key needs the trained policy's
    layout and safety rules: hence after a run) and are replayed from the test months' first hour, so the first
    hours start from the env's initial battery charge instead of the pass's: close to, not exactly, the teacher.
    """
    path = out / fold.name / REFERENCES_FILE
    references = json.loads(path.read_text())
    label = teacher_label(config)
    if label in references:
        return
    policy = load_checkpoint(checkpoint).build_policy()
    spec = EnvSpec(schema=config.dataset, start=fold.test[0], end=fold.test[1])
    cached = teacher_cache.cache_path(spec, policy, config, start=None, end=None)
    if cached is None or not cached.is_file():
        log.info("protocol: no cached full-year teacher pass for %s; the teacher's row is left out", fold.name)
        return
    whole = teacher_cache.load(cached)
    actions = whole.record["actions"][fold.test[0] - whole.first_step:]
    result = run_episode(spec.build(), ReplayedActions(policy.layout, actions), name="teacher replayed",
                         progress=progress)
    references[label] = {"kpis": result.kpis, "service": result.service, "score": headline_score(result.kpis),
                         "source": f"{cached.name}, steps {fold.test[0]}..{fold.test[1]} replayed"}
    _write_json(path, references)


class ReplayedActions:
    """A recorded action sequence behind the ``Policy`` interface: step ``t`` gets row ``t``."""

    def __init__(self, layout, actions: np.ndarray):
        self.layout, self.actions, self.step = layout, actions, 0

    def act(self, observations: np.ndarray) -> np.ndarray:
        actions = self.actions[self.step]
        self.step += 1
        return actions if np.ndim(observations) == 2 else actions[None]


# --- the summary ----------------------------------------------------------------------------------------------------
def summarise(protocol: Protocol, out: Path) -> dict:
    """Everything finished so far: per fold, each arm's held-out scores per seed, the noise floor, the paired
    comparisons and the bars against charge on arrival. Written to OUT/<the protocol's summary> (protocol.json)."""
    summary: dict = {"folds": {}, "wins_needed": protocol.wins_needed}
    for fold in protocol.folds:
        references_path = out / fold.name / REFERENCES_FILE
        references = json.loads(references_path.read_text()) if references_path.is_file() else {}
        coa = references.get("charge on arrival")
        teachers = {label: row for label, row in references.items() if is_teacher_row(label)}
        arms: dict[str, dict] = {}
        env_spreads, rescorings = [], {}
        for arm in protocol.arms:
            runs = {}
            for seed in protocol.seeds:
                path = run_directory(out, fold.name, arm, seed) / HELDOUT_FILE
                if not path.is_file():
                    continue
                heldout = json.loads(path.read_text())
                published = heldout["scores"]["published"]
                row = {"score": published["score"], **{k: published["kpis"][k] for k in HEADLINE_KPIS},
                       "ev_departures_acceptable": published["service"]["ev_departures_acceptable"],
                       "appliance_service_level": published["service"]["appliance_service_level"]}
                if coa is not None:
                    row.update(_against(published["kpis"], coa["kpis"]))
                rescored = {env: s["score"] for env, s in heldout["scores"].items()}
                if len(rescored) > 1:
                    row["env_seed_scores"] = rescored
                    env_spreads.append(max(rescored.values()) - min(rescored.values()))
                    rescorings.setdefault(seed, {})[arm] = rescored
                runs[seed] = row
            if runs:
                scores = [r["score"] for r in runs.values()]
                arms[arm] = {"seeds": runs, "mean_score": float(np.mean(scores)),
                             "seed_spread": float(max(scores) - min(scores)),
                             "bars": _bars(runs, coa) if coa is not None else None}
        single = max(env_spreads) if env_spreads else math.nan
        pair_spreads = paired_spreads(rescorings)
        # Without two runs rescored on the same env seeds the difference's noise is unmeasured: the single score's
        # floor (larger) stands in for it.
        noise = max(pair_spreads) if pair_spreads else single
        comparisons = []
        for better, than in protocol.comparisons:
            if better in arms and than in arms:
                pair = (better, than, arms[better]["seeds"], arms[than]["seeds"])
                comparison = _paired(*pair, noise, protocol.wins_needed, protocol.seeds)
                comparison["verdict_single_score_floor"] = _paired(*pair, single, protocol.wins_needed,
                                                                   protocol.seeds)["verdict"]
                comparisons.append(comparison)
        if coa is not None:
            teachers = {label: {**row, **_against(row["kpis"], coa["kpis"])} for label, row in teachers.items()}
        summary["folds"][fold.name] = {"test": list(fold.test), "train": [list(w) for w in fold.train],
                                       "charge_on_arrival": coa, "teachers": teachers, "noise_floor": noise,
                                       "noise_floor_single_score": single, "paired_rescorings": len(pair_spreads),
                                       "arms": arms,
                                       "comparisons": comparisons}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / protocol.summary, summary)
    return summary


def paired_spreads(rescorings: dict[Any, dict[str, dict[str, float]]]) -> list[float]:
    """For every training seed and every two arms whose runs of it were rescored on the same env seeds (at least
    two in common): the spread (max - min) over those env seeds of the difference of their scores.
    ``rescorings``: seed -> arm -> env seed label -> score."""
    spreads = []
    for by_arm in rescorings.values():
        for a, b in itertools.combinations(sorted(by_arm), 2):
            common = sorted(set(by_arm[a]) & set(by_arm[b]))
            if len(common) > 1:
                differences = [by_arm[a][env] - by_arm[b][env] for env in common]
                spreads.append(max(differences) - min(differences))
    return spreads


def _write_json(path: Path, data: dict) -> None:
    payload = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda handle: handle.write(payload))


def _against(kpis: dict, coa: dict) -> dict:
    return {"cost_vs_charge_on_arrival": kpis["cost_total"] / coa["cost_total"],
            "carbon_vs_charge_on_arrival": kpis["carbon_emissions_total"] / coa["carbon_emissions_total"]}


def _bars(runs: dict, coa: dict) -> dict:
    """The issue's held-out bars, on every seed: EV >= 0.95, appliance 1.0, cost and carbon >= 5 % below charge on
    arrival, both peaks below charge on arrival's."""
    rows = list(runs.values())
    return {
        "ev_departures_acceptable_ge_0.95": all(r["ev_departures_acceptable"] >= 0.95 for r in rows),
        "appliance_served": all(r["appliance_service_level"] >= 1.0 for r in rows),
        "cost_5pct_below_charge_on_arrival": all(r["cost_vs_charge_on_arrival"] <= 0.95 for r in rows),
        "carbon_5pct_below_charge_on_arrival": all(r["carbon_vs_charge_on_arrival"] <= 0.95 for r in rows),
        "daily_peak_below_charge_on_arrival": all(r["daily_peak_average"] < coa["kpis"]["daily_peak_average"]
                                                  for r in rows),
        "all_time_peak_below_charge_on_arrival": all(r["all_time_peak_average"] < coa["kpis"]["all_time_peak_average"]
                                                     for r in rows),
    }


def _paired(better: str, than: str, a: dict, b: dict, noise: float, wins_needed: int,
            planned: tuple = ()) -> dict:
    """Seed-by-seed verdict. ``planned``: the protocol's seeds; where those not run yet could not make the arm
    better or worse (too few left to reach ``wins_needed`` wins or losses), "no difference" is already decided and
    ``cannot_change_it`` names them. The floor only grows with more rescorings, so no later run can add a win."""
    seeds = sorted(set(a) & set(b))
    differences = {seed: a[seed]["score"] - b[seed]["score"] for seed in seeds}
    margin = 0.0 if math.isnan(noise) else noise
    wins = [seed for seed, d in differences.items() if d < -margin]
    losses = [seed for seed, d in differences.items() if d > margin]
    left = sorted({str(seed) for seed in planned} - {str(seed) for seed in seeds})
    enough = min(wins_needed + 1, 3)    # "no difference" takes a third opinion where two wins are needed
    out_of_reach = len(wins) + len(left) < wins_needed and len(losses) + len(left) < wins_needed
    verdict = ("better" if len(wins) >= wins_needed else "worse" if len(losses) >= wins_needed
               else "no difference beyond the noise"
               if len(seeds) >= enough or (out_of_reach and len(seeds) + len(left) >= enough)
               else "not enough seeds yet")
    result = {"arm": better, "against": than, "seeds": seeds, "differences": differences, "noise_floor": noise,
              "wins": wins, "losses": losses, "verdict": verdict}
    if left and out_of_reach and verdict == "no difference beyond the noise":
        result["cannot_change_it"] = left
    return result


def training_line(summary: dict) -> dict:
    """What a run's summary (final.pt) says about its training, for heldout.json: time, the clone's fit, and for
    fine-tuning arms each episode's gate and the critic's dQ/da check (after the warm-up, before each actor step), for
    arms tuned through the district model each episode's gate."""
    teaching = summary.get("teaching") or {}
    return {"seconds": summary["training_seconds"], "env_steps": summary["env_steps"], "episodes": summary["episodes"],
            "teaching": {"labelled_states": teaching.get("labelled_states"), "clone_loss": teaching.get("clone_loss")},
            "critic_gradient_after_warmup": (teaching.get("heldout_check") or {}).get("gradient"),
            "fine_tuning": [{"episode": h["episode"], "kept": h["gate"]["accepted"], "training_score": h["gate"]["score"],
                             "critic_gradient": h.get("critic_gradient")} for h in summary.get("history", [])],
            "fine_tuning_start_score": (summary.get("fine_tuning_start") or {}).get("score"),
            "model_tuning": [{"episode": h["episode"], "kept": h["accepted"], "training_score": h["score"]}
                             for h in (summary.get("model_tuning") or {}).get("history", [])],
            "model_tuning_start_score": ((summary.get("model_tuning") or {}).get("start") or {}).get("score")}


def markdown(summary: dict) -> str:
    """The summary as the tables of the model card."""
    lines = []
    for name, fold in summary["folds"].items():
        coa = fold["charge_on_arrival"]
        lines += [f"### Fold {name}: test steps {fold['test'][0]}..{fold['test'][1]}, trained on "
                  + ", ".join(f"{a}..{b}" for a, b in fold["train"]), "",
                  f"Noise floor of a paired difference (two runs of one training seed rescored on the same env seeds: "
                  f"the largest spread of their difference, over {fold['paired_rescorings']} pairs): "
                  f"{fold['noise_floor']:.4f}; of a single score (the same weights rescored): "
                  f"{fold['noise_floor_single_score']:.4f}",
                  "", "| arm | seed | score | cost | carbon | daily peak | all-time peak | EV ok | cost / CoA | "
                  "carbon / CoA |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for label, reference in (("charge on arrival", coa), *fold["teachers"].items()):
            if reference is None or coa is None:
                continue
            k, ratios = reference["kpis"], _against(reference["kpis"], coa["kpis"])
            lines.append(f"| {label} | - | {reference['score']:.4f} | {k['cost_total']:.3f} | "
                         f"{k['carbon_emissions_total']:.3f} | {k['daily_peak_average']:.3f} | "
                         f"{k['all_time_peak_average']:.3f} | {reference['service']['ev_departures_acceptable']:.3f} | "
                         f"{ratios['cost_vs_charge_on_arrival']:.3f} | {ratios['carbon_vs_charge_on_arrival']:.3f} |")
        for arm, data in fold["arms"].items():
            for seed, r in data["seeds"].items():
                lines.append(f"| {arm} | {seed} | {r['score']:.4f} | {r['cost_total']:.3f} | "
                             f"{r['carbon_emissions_total']:.3f} | {r['daily_peak_average']:.3f} | "
                             f"{r['all_time_peak_average']:.3f} | {r['ev_departures_acceptable']:.3f} | "
                             f"{r.get('cost_vs_charge_on_arrival', math.nan):.3f} | "
                             f"{r.get('carbon_vs_charge_on_arrival', math.nan):.3f} |")
        lines.append("")
        for c in fold["comparisons"]:
            diffs = ", ".join(f"seed {s}: {d:+.4f}" for s, d in c["differences"].items())
            left = c.get("cannot_change_it")
            unrun = f"; seed {', '.join(left)} not run: it cannot change the verdict" if left else ""
            single = c["verdict_single_score_floor"]
            also = "" if single == c["verdict"] else f"; against the single score's floor: {single}"
            lines.append(f"* **{c['arm']} vs {c['against']}**: {c['verdict']} ({diffs}; noise floor "
                         f"{c['noise_floor']:.4f}{unrun}{also})")
        lines.append("")
    return "\n".join(lines)
