"""`maddpg-citylearn protocol`: held-out months, seeds, the noise floor, paired verdicts; resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_ops.cli import cli
from maddpg_training import teacher_cache
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.config import TrainConfig
from maddpg_training.protocol import (
    HELDOUT_FILE,
    TEACHER,
    Fold,
    Protocol,
    ReplayedActions,
    _paired,
    _run,
    is_teacher_row,
    run_directory,
    summarise,
    teacher_label,
    teacher_reference,
)

TINY = """
seeds = [0, 1]
env_seeds = [1]
env_seed_runs = [0]
comparisons = [["district", "local"], ["local+maddpg", "local"]]

[folds.tiny]
test = [200, 247]
train = [[0, 23]]

[common]
dataset = "{schema}"
teacher = "rule"
actor_hidden = [16]
critic_hidden = [16]
batch_size = 8
clone_steps = 20
dagger_rounds = 1
label_every = 4
buffer_size = 500
model_episodes = 0
model_district = ""        # arm "district" reads the district feature from the start

[arms.local]
features = ["hour_cycle", "ev_slack"]

[arms.district]
features = ["hour_cycle", "ev_slack", "district"]

[arms."local+maddpg"]
start_from = "local"
episodes = 1
critic_warmup_steps = 20
critic_refit_steps = 10
actor_steps = 2
"""


def test_paired_verdicts_need_wins_beyond_the_noise_floor():
    a = {s: {"score": v} for s, v in enumerate([1.00, 1.00, 1.00])}
    better = {s: {"score": v} for s, v in enumerate([0.98, 0.97, 1.01])}
    assert _paired("b", "a", better, a, 0.005, 2)["verdict"] == "better"           # 2 of 3 beyond 0.005
    assert _paired("b", "a", better, a, 0.025, 2)["verdict"] == "no difference beyond the noise"  # only one
    worse = {s: {"score": v} for s, v in enumerate([1.02, 1.03, 0.99])}
    assert _paired("w", "a", worse, a, 0.005, 2)["verdict"] == "worse"


def test_no_difference_is_decided_once_the_seeds_left_cannot_give_the_wins_or_losses():
    a = {s: {"score": 1.00} for s in (3, 4)}
    level = {3: {"score": 1.001}, 4: {"score": 0.995}}      # neither beyond 0.01: one seed left cannot make two
    decided = _paired("b", "a", level, a, 0.01, 2, planned=(3, 4, 5))
    assert decided["verdict"] == "no difference beyond the noise" and decided["cannot_change_it"] == ["5"]
    one_win = {3: {"score": 0.98}, 4: {"score": 1.001}}     # seed 5 could still give the second win
    assert _paired("b", "a", one_win, a, 0.01, 2, planned=(3, 4, 5))["verdict"] == "not enough seeds yet"
    one_loss = {3: {"score": 1.02}, 4: {"score": 1.001}}    # ... or the second loss
    assert _paired("b", "a", one_loss, a, 0.01, 2, planned=(3, 4, 5))["verdict"] == "not enough seeds yet"
    three = {3: {"score": 0.98}, 4: {"score": 1.001}, 5: {"score": 1.0}}   # one win of three; seed 6 could add one
    verdict = _paired("b", "a", three, {**a, 5: {"score": 1.0}}, 0.01, 2, planned=(3, 4, 5, 6))
    assert verdict["verdict"] == "no difference beyond the noise" and "cannot_change_it" not in verdict
    # A protocol of two seeds never gives "no difference": two wins are needed and a third opinion.
    assert _paired("b", "a", level, a, 0.01, 2, planned=(3, 4))["verdict"] == "not enough seeds yet"
    complete = _paired("b", "a", {**level, 5: {"score": 1.0}}, {**a, 5: {"score": 1.0}}, 0.01, 2, planned=(3, 4, 5))
    assert complete["verdict"] == "no difference beyond the noise" and "cannot_change_it" not in complete


def _heldout(path: Path, scores: dict[str, float]) -> None:
    """A finished run's heldout.json with these scores (env seed label -> score); the KPIs are the score itself."""
    path.mkdir(parents=True)
    kpis = {"cost_total": 1.0, "carbon_emissions_total": 1.0, "daily_peak_average": 1.0, "all_time_peak_average": 1.0}
    service = {"ev_departures_acceptable": 1.0, "appliance_service_level": 1.0}
    rows = {label: {"kpis": kpis, "service": service, "score": score} for label, score in scores.items()}
    (path / HELDOUT_FILE).write_text(json.dumps({"scores": rows}))


def test_the_noise_floor_is_the_spread_of_a_paired_difference_over_env_seeds(tmp_path):
    # Both arms meet the same cars on an env seed: their scores move together by 0.03 between env seeds (a single
    # score's floor), their difference by 0.002. Arm "district" is 0.01 lower on two seeds of three: beyond the
    # difference's noise, not beyond a single score's.
    config = tmp_path / "protocol.toml"
    config.write_text(TINY.replace("{schema}", "unused").replace("seeds = [0, 1]", "seeds = [0, 1, 2]")
                      .replace("env_seeds = [1]", "env_seeds = [1, 2]"))
    out = tmp_path / "runs"
    env_shift = {"published": 0.0, "env-seed-1": 0.03, "env-seed-2": -0.002}
    _heldout(run_directory(out, "tiny", "local", 0), {k: 1.0 + v for k, v in env_shift.items()})
    _heldout(run_directory(out, "tiny", "district", 0),
             {k: 0.99 + v + (0.002 if k == "env-seed-2" else 0.0) for k, v in env_shift.items()})
    for seed, (local, district) in {1: (1.0, 0.99), 2: (1.0, 1.001)}.items():
        _heldout(run_directory(out, "tiny", "local", seed), {"published": local})
        _heldout(run_directory(out, "tiny", "district", seed), {"published": district})
    fold = summarise(Protocol.load(config), out)["folds"]["tiny"]
    assert fold["noise_floor"] == pytest.approx(0.002) and fold["paired_rescorings"] == 1
    assert fold["noise_floor_single_score"] == pytest.approx(0.032)
    (comparison,) = [c for c in fold["comparisons"] if c["arm"] == "district"]
    assert comparison["verdict"] == "better" and comparison["wins"] == [0, 1]
    assert comparison["verdict_single_score_floor"] == "no difference beyond the noise"


def test_a_fold_whose_training_months_touch_its_test_months_is_refused():
    with pytest.raises(MaddpgCitylearnError, match="within 168 h"):
        Fold("leaky", test=(1000, 1200), train=((0, 900),)).check()


@pytest.mark.citylearn
def test_the_protocol_trains_scores_compares_and_resumes(tmp_path, schema_path, monkeypatch):
    config = tmp_path / "protocol.toml"
    config.write_text(TINY.replace("{schema}", str(schema_path)))
    out = tmp_path / "runs"
    args = ["protocol", "--config", str(config), "--out", str(out), "--no-progress",
            "--markdown", str(tmp_path / "protocol.md")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "protocol.json").read_text())
    fold = summary["folds"]["tiny"]
    assert fold["charge_on_arrival"]["score"] > 0 and "ev_departures_acceptable" in fold["charge_on_arrival"]["service"]
    assert set(fold["arms"]) == {"local", "district", "local+maddpg"}
    for arm in fold["arms"].values():
        assert set(arm["seeds"]) == {"0", "1"}
        assert {"cost_vs_charge_on_arrival", "carbon_vs_charge_on_arrival"} <= set(arm["seeds"]["0"])
        assert len(arm["seeds"]["0"]["env_seed_scores"]) == 2 and "env_seed_scores" not in arm["seeds"]["1"]
    assert fold["noise_floor"] >= 0
    comparison = fold["comparisons"][0]
    assert (comparison["arm"], comparison["against"]) == ("district", "local")
    assert comparison["verdict"] == "not enough seeds yet"       # 2 seeds cannot give 2 wins and a third opinion
    heldout = json.loads((out / "tiny" / "district" / "seed-0" / "heldout.json").read_text())
    assert heldout["test"] == [200, 247] and set(heldout["scores"]) == {"published", "env-seed-1"}
    assert "| district | 0 |" in (tmp_path / "protocol.md").read_text()
    # The fine-tuning arm resumed the local arm's clone of the same seed: its critic was warmed up (it never had
    # one), then one episode went through the gate.
    events = [json.loads(line) for line in (out / "tiny" / "local+maddpg" / "seed-0" / "metrics.jsonl").open()]
    kinds = [e["kind"] for e in events]
    assert "resume" in kinds and "gate" in kinds and "teach" not in {e.get("phase") for e in events}
    assert any(e["kind"] == "update" and e.get("phase") == "critic_warmup" for e in events)
    (episode,) = json.loads((out / "tiny" / "local+maddpg" / "seed-0" / HELDOUT_FILE).read_text())["training"]["fine_tuning"]
    assert episode["episode"] == 1 and isinstance(episode["kept"], bool) and episode["training_score"] > 0
    references = json.loads((out / "tiny" / "references.json").read_text())
    assert not any(is_teacher_row(label) for label in references)   # the rule teacher: no cache

    # The teacher's row: the test months' actions of the cached full-year pass, replayed. A planner pass is too slow
    # for a test, so a recorded pass of varied actions stands in for it at the planner's cache key.
    monkeypatch.setenv("MADDPG_CITYLEARN_CACHE", str(tmp_path / "cache"))
    protocol = Protocol.load(config)
    fold = protocol.fold("tiny")
    planner_config = replace(protocol.config("local", fold, 0), teacher="planner")
    checkpoint = out / "tiny" / "local" / "seed-0" / "final.pt"
    policy = load_checkpoint(checkpoint).build_policy()
    spec = EnvSpec(schema=str(schema_path), start=200, end=247)
    steps = np.arange(300, dtype=np.float32)[:, None, None]
    actions = (0.5 + 0.5 * np.sin(steps / 7.0) * np.ones(policy.layout.action_shape, np.float32)).astype(np.float32)
    path = teacher_cache.cache_path(spec, policy, planner_config, start=None, end=None)
    path.parent.mkdir(parents=True)
    torch.save({"summary": {"driver": "stand-in", "steps": 300, "team_return": 0.0, "terms": {}, "kpis": {},
                            "service": {}, "seconds": 0.0}, "first_step": 0, "labels": [],
                "record": {"actions": torch.from_numpy(actions)}}, path)
    teacher_reference(fold, out=out, config=planner_config, checkpoint=checkpoint)
    label = teacher_label(planner_config)     # one teacher row per EV rule: the planner plans inside the rule
    assert label != TEACHER and "paced 0.5" in label
    row = json.loads((out / "tiny" / "references.json").read_text())[label]

    def replayed(first: int) -> dict:
        return run_episode(spec.build(), ReplayedActions(policy.layout, actions[first:])).kpis

    assert row["kpis"] == replayed(200) and row["kpis"] != replayed(0)   # the test months' own actions

    # Run again: everything finished is re-read, nothing is trained again; the summary has the teacher's row.
    stamp = (out / "tiny" / "local" / "seed-1" / "final.pt").stat().st_mtime_ns
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert (out / "tiny" / "local" / "seed-1" / "final.pt").stat().st_mtime_ns == stamp
    summary = json.loads((out / "protocol.json").read_text())
    assert "cost_vs_charge_on_arrival" in summary["folds"]["tiny"]["teachers"][label]
    assert f"| {label} | - |" in (tmp_path / "protocol.md").read_text()
    pairs = summary["folds"]["tiny"]["paired_rescorings"]

    # More training seeds rescored after the runs finished: their final policies are scored on the missing env
    # seeds, nothing is trained again, and the floor counts the new pairs.
    config.write_text(config.read_text().replace("env_seed_runs = [0]", "env_seed_runs = [0, 1]"))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert (out / "tiny" / "local" / "seed-1" / "final.pt").stat().st_mtime_ns == stamp
    rescored = json.loads((out / "tiny" / "local" / "seed-1" / HELDOUT_FILE).read_text())["scores"]
    assert list(rescored) == ["published", "env-seed-1"]
    fold = json.loads((out / "protocol.json").read_text())["folds"]["tiny"]
    assert set(fold["arms"]["local"]["seeds"]["1"]["env_seed_scores"]) == {"published", "env-seed-1"}
    assert fold["paired_rescorings"] == 2 * pairs       # three arms: three pairs per rescored seed


def test_an_arm_must_start_from_an_arm_trained_from_scratch(tmp_path):
    config = tmp_path / "protocol.toml"
    config.write_text('[folds.a]\ntest = [2000, 2100]\ntrain = [[0, 1000]]\n[arms.x]\nstart_from = "y"\n')
    result = CliRunner().invoke(cli, ["protocol", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "start_from = 'y' must name an arm" in result.output


def test_an_arm_whose_base_run_kept_its_results_but_not_its_weights_says_how_to_retrain_it(tmp_path):
    config = tmp_path / "protocol.toml"
    config.write_text(TINY.replace("{schema}", "unused"))
    protocol = Protocol.load(config)
    out = tmp_path / "runs"
    base = run_directory(out, "tiny", "local", 0)
    base.mkdir(parents=True)
    (base / HELDOUT_FILE).write_text("{}")           # e.g. copied from docs/model-card/protocol
    with pytest.raises(MaddpgCitylearnError, match=r"local/seed-0/last.pt does not exist.*Delete .*heldout.json"):
        _run(protocol, protocol.fold("tiny"), "local+maddpg", 0, out, False)
    assert not run_directory(out, "tiny", "local+maddpg", 0).exists(), "nothing half-made for the arm"


def test_a_protocol_that_extends_another_runs_its_recipes_on_its_own_seeds(tmp_path):
    (tmp_path / "protocol.toml").write_text(TINY.replace("{schema}", "unused"))
    confirm = tmp_path / "confirm.toml"
    confirm.write_text('extends = "protocol.toml"\nseeds = [3, 4, 5]\narms = ["local", "local+maddpg"]\n'
                       'comparisons = [["local+maddpg", "local"]]\n')
    first, second = Protocol.load(tmp_path / "protocol.toml"), Protocol.load(confirm)
    assert second.seeds == (3, 4, 5) and set(second.arms) == {"local", "local+maddpg"}
    assert second.folds == first.folds and second.comparisons == (("local+maddpg", "local"),)
    for arm in second.arms:
        assert second.config(arm, second.folds[0], 3) == first.config(arm, first.folds[0], 3), "the same recipe"
    confirm.write_text('extends = "protocol.toml"\narms = ["locall"]\n')
    with pytest.raises(MaddpgCitylearnError, match="must list arms of .*protocol.toml by name"):
        Protocol.load(confirm)


def test_confirmations_sharing_an_out_directory_keep_their_own_summary(tmp_path):
    (tmp_path / "protocol.toml").write_text(TINY.replace("{schema}", "unused"))
    confirm = tmp_path / "confirm.toml"
    confirm.write_text('extends = "protocol.toml"\nseeds = [3]\narms = ["local"]\ncomparisons = []\nsummary = "confirm.json"\n')
    out = tmp_path / "runs"
    summarise(Protocol.load(tmp_path / "protocol.toml"), out)
    summarise(Protocol.load(confirm), out)
    assert json.loads((out / "protocol.json").read_text())["folds"]["tiny"]["arms"] == {}
    assert json.loads((out / "confirm.json").read_text())["folds"]["tiny"]["arms"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["confirm.json", "protocol.json"]
    confirm.write_text('extends = "protocol.toml"\nsummary = "../confirm.json"\n')
    with pytest.raises(MaddpgCitylearnError, match="name a .json file"):
        Protocol.load(confirm)


def test_a_protocol_with_an_unknown_setting_fails_before_any_work(tmp_path):
    config = tmp_path / "protocol.toml"
    config.write_text('[folds.a]\ntest = [2000, 2100]\ntrain = [[0, 1000]]\n[arms.x]\nlearning_rate = 1\n')
    result = CliRunner().invoke(cli, ["protocol", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown training setting(s) learning_rate" in result.output
    assert not (tmp_path / "o").exists()


def test_a_run_another_live_process_holds_is_skipped_and_a_dead_ones_lock_is_taken_over(tmp_path):
    """Processes splitting a protocol (--arm, --fold) never train the same run twice."""
    import os
    import subprocess
    import sys

    from maddpg_training.protocol import _claim

    run = tmp_path / "fold" / "arm" / "seed-0"
    run.mkdir(parents=True)
    (run / ".running").write_text(str(os.getppid()))            # a live process holds it
    with _claim(run) as claimed:
        assert not claimed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".running").write_text(dead.stdout.strip())           # its holder has exited
    with _claim(run) as claimed:
        assert claimed and (run / ".running").read_text() == str(os.getpid())
    assert not (run / ".running").exists()


def test_the_committed_protocol_and_training_configs_load():
    """Every TOML under configs/ is a valid protocol or training config: a typo there fails here, not an hour into
    a run."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    protocol = Protocol.load(configs / "protocol.toml")
    assert {"local", "season-blind", "local+maddpg"} <= set(protocol.arms)
    assert protocol.config("season-blind", protocol.folds[0], 0).ignore == ("season",)
    for path in sorted(configs.glob("protocol-*.toml")):
        Protocol.load(path)
    recipes = [path for path in sorted(configs.glob("*.toml")) if not path.name.startswith("protocol")]
    assert recipes
    for path in recipes:
        TrainConfig.load(path)
