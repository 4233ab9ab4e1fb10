"""`maddpg-citylearn train` end to end on a short window: trains, checkpoints, resumes, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.episode import run_episode
from maddpg_ops.cli import cli
from maddpg_training import teacher_cache
from maddpg_training.checkpoint import load_checkpoint
from maddpg_training.config import TrainConfig
from maddpg_training.learner import MADDPG
from maddpg_training.torch_policy import TorchPolicy

pytestmark = pytest.mark.citylearn
SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
# The smoke settings without its window, teacher and phases, for tests that set their own.
SMOKE_SETTINGS = "".join(line for line in Path(SMOKE).read_text().splitlines(keepends=True)
                         if not line.startswith(("start =", "end =", "episodes =", "teacher =", "dagger_rounds =")))


def train(*args):
    return CliRunner().invoke(cli, ["train", "--config", SMOKE, "--eval-start", "0", "--eval-end", "47",
                                    "--no-progress", *map(str, args)])


def test_a_bad_setting_is_named_before_any_work(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('teacher = "oracle"\nn_step = 0\n')
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "teacher = 'oracle'" in result.output and "n_step = 0" in result.output
    assert not (tmp_path / "x").exists()


def test_maddpg_episodes_after_the_shipped_widening_are_refused_with_the_way_out(tmp_path):
    """The shipped recipe widens the actors to read the district when the model tuning starts; MADDPG episodes after
    it would meet a critic fitted to narrower inputs. The error names the options that avoid it, and they work."""
    out = tmp_path / "x"
    result = CliRunner().invoke(cli, ["train", "--episodes", "1", "--out", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert "--model-district none" in result.output and "--model-episodes 0" in result.output
    assert TrainConfig().model_district == "district"
    missing = tmp_path / "no-such-schema.json"     # the run stops at the env: only what is still wrong is named
    for way_out in (["--model-district", "none"], ["--model-episodes", "0"]):
        refused = CliRunner().invoke(cli, ["train", "--dataset", str(missing), "--episodes", "1", *way_out,
                                           "--out", str(out)])
        assert refused.exit_code == 1 and "model_district" not in refused.output, refused.output
        assert f"schema file {missing} does not exist" in refused.output


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, schema_path):
    out = tmp_path_factory.mktemp("smoke")
    result = train("--dataset", schema_path, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_training_writes_checkpoints_a_summary_and_a_deterministic_evaluation(smoke_run):
    out, result = smoke_run
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "final.pt", "summary.json", "metrics.jsonl"}
    summary = json.loads((out / "summary.json").read_text())
    # The rule teacher drives one pass, the clone one DAgger pass, then two fine-tuning episodes.
    assert [p["phase"] for p in summary["teaching"]["passes"]] == ["teach", "dagger 1"]
    assert summary["teaching"]["labelled_states"] == 199 + 100  # every state of the teacher's pass, every 2nd of DAgger
    assert summary["episodes"] == 2 and summary["env_steps"] == 4 * 199
    assert [h["episode"] for h in summary["history"]] == [1, 2]
    for episode in summary["history"]:
        assert set(episode["terms"]) == {"cost", "emissions", "daily_peak", "all_time_peak"}
        assert episode["evaluation_kpis"]["cost_total"] > 0
    assert set(summary["evaluation"]) >= {"cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average"}
    assert summary["evaluation_service"]["ev_departures_acceptable"] == 1.0  # the safety layer's promise
    assert "deterministic evaluation" in result.output and "EV departures" in result.output
    final = load_checkpoint(out / "final.pt")
    assert final.summary["trained"] is True and final.trainer is not None and final.safety is not None
    assert final.reference_observations is not None and final.layout.observation_shape == (17, 52)


@pytest.mark.citylearn
def test_the_training_evaluation_is_what_a_new_env_measures(smoke_run, schema_path):
    """Scores in training (evaluation, fine-tuning checks) come from new envs, like `evaluate`'s: a reused env's
    reset() leaves state behind, and the same weights then score differently pass after pass."""
    from maddpg_evaluation.kpis import headline_score

    out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    result = run_episode(EnvSpec(schema=str(schema_path), start=0, end=47).build(),
                         TorchPolicy.from_checkpoint(out / "final.pt"))
    assert result.kpis == pytest.approx(summary["evaluation"], abs=1e-9)
    # Where fine-tuning started (the clone on the training window), recorded for the ablation's clone arm.
    start = summary["fine_tuning_start"]
    assert start["score"] == pytest.approx(headline_score(start["kpis"]))


@pytest.mark.citylearn
def test_the_fine_tuning_check_scores_the_same_weights_the_same_every_time(smoke_run, schema_path):
    """citylearn 3.0.2's reset() keeps EV state: on a reused env, Building_10's car arrives at step 360 with SOC 0.91
    on the first pass and 0.44 on the next. The check would then compare noise; it builds a new env each time."""
    from maddpg_training import trainer as T
    from maddpg_training.bootstrap import warmup

    out, _ = smoke_run
    checkpoint = load_checkpoint(out / "final.pt")
    config = TrainConfig.load(SMOKE)
    spec = EnvSpec(schema=str(schema_path), start=0, end=400)
    window = T.make_window(spec, warmup(spec), checkpoint.layout, config, teacher=False, safety=checkpoint.safety)
    learner = MADDPG(checkpoint.build_policy().train(), config, window.reward.shares)
    first, second = (T.gate_check([window], learner)[0] for _ in range(2))
    assert first["kpis"] == second["kpis"]
    assert first["kpis"] == pytest.approx(run_episode(spec.build(), TorchPolicy(learner.policy)).kpis, abs=1e-9)


def test_training_leaves_a_trace_of_every_update_pass_and_evaluation(smoke_run):
    from maddpg_training.trace import read_trace

    out, _ = smoke_run
    records = read_trace(out)
    updates = [r for r in records if r["kind"] == "update"]
    warmup = [r for r in updates if r["phase"] == "critic_warmup"]
    finetune = [r for r in updates if r["phase"] == "finetune"]
    assert len(warmup) == 5  # every 10th warm-up update
    # Per episode: a critic update at each of the 199 steps, 20 critic refits, and the actor steps the gate before it
    # set (10 for the first; half as many after a rejected episode), each every 2nd update of the improve stage.
    gates = [r for r in records if r["kind"] == "gate"]
    planned = [g["next_actor_steps"] for g in gates[:-1]]
    assert planned[0] == 10
    stages = [r["stage"] for r in finetune]
    assert (stages.count("collect"), stages.count("critic refit"), stages.count("improve")) == (2 * 199, 2 * 20,
                                                                                              2 * sum(planned))
    assert all({"critic_loss", "td_error", "q", "target"} <= set(r) for r in updates)
    actor_steps = [r for r in finetune if "actor_loss" in r]
    assert len(actor_steps) == sum(planned) and all(r["stage"] == "improve" for r in actor_steps)
    assert all({"cloning_loss", "actor_q", "q_scale"} <= set(r) for r in actor_steps)
    assert [r["phase"] for r in records if r["kind"] == "rollout"] == ["teach", "dagger 1", "finetune", "finetune"]
    assert [r["episode"] for r in records if r["kind"] == "evaluation"] == [0, 1, 2]
    assert [g["episode"] for g in gates] == [0, 1, 2]  # 0: the clone's score, where fine-tuning starts
    best = gates[0]["score"]
    for before, gate in zip(gates, gates[1:]):  # kept only if better than the best so far; else back to it with
        assert gate["accepted"] == (gate["score"] < best)  # half the actor steps
        assert gate["next_actor_steps"] == before["next_actor_steps"] // (1 if gate["accepted"] else 2)
        best = min(best, gate["score"])
    assert any(r["kind"] == "clone" for r in records)
    picture = CliRunner().invoke(cli, ["plot-training", str(out)])
    assert picture.exit_code == 0 and (out / "training.png").stat().st_size > 10_000


def test_the_policy_charges_parked_cars_but_never_discharges_them(smoke_run):
    out, _ = smoke_run
    final = load_checkpoint(out / "final.pt")
    chargers = [(i, j) for i, agent in enumerate(final.layout.agents) for j, name in enumerate(agent.action_names)
                if name.startswith("electric_vehicle_storage_")]
    assert len(chargers) == 8
    assert all(final.layout.agents[i].action_low[j] == 0.0 for i, j in chargers)
    with torch.no_grad():
        actions = final.build_policy()(torch.randn(512, 17, 52) * 10)
    assert all((actions[:, i, j] >= 0).all() for i, j in chargers)
    assert (actions[:, :, 0] < 0).any(), "batteries may still discharge"


def test_fine_tuning_keeps_moved_actors_only_when_the_gate_accepts_them(smoke_run, tmp_path, schema_path):
    """The final actors are the clone's moved by the fine-tuning episodes the gate accepted, or, where it accepted
    none, exactly the clone's (whether an episode of a short smoke run helps is the run's outcome, not a given)."""
    from maddpg_training.trace import read_trace

    out, _ = smoke_run
    clone_only = tmp_path / "clone-only"
    assert train("--dataset", schema_path, "--episodes", "0", "--out", clone_only).exit_code == 0
    before = load_checkpoint(clone_only / "final.pt").policy
    after = load_checkpoint(out / "final.pt").policy
    assert torch.equal(before["normaliser.mean"], after["normaliser.mean"])  # same warm-up statistics
    changed = [k for k in before if k.startswith("actors.") and not torch.equal(before[k], after[k])]
    accepted = [g["episode"] for g in read_trace(out) if g["kind"] == "gate" and g["episode"] > 0 and g["accepted"]]
    assert bool(changed) == bool(accepted), (changed, accepted)


def test_tuning_through_the_district_model_is_gated_traced_and_kept_only_when_accepted(smoke_run, tmp_path,
                                                                                      schema_path):
    """After the teacher phases, episodes of updates through the district model: every update traced with the
    terms it lowered, every episode gated in the env, and the final actors moved exactly when one was accepted."""
    from maddpg_training.trace import read_trace

    out = tmp_path / "model"
    result = train("--dataset", schema_path, "--episodes", "0", "--model-episodes", "2", "--out", out)
    assert result.exit_code == 0, result.output
    trace = [r for r in read_trace(out) if r.get("phase") == "model"]
    updates = [r for r in trace if r["kind"] == "update"]
    gates = [r for r in trace if r["kind"] == "gate"]
    assert updates and all({"cost", "carbon", "daily_peak", "all_time_peak", "debt", "clone"} <= set(r) for r in updates)
    assert [g["episode"] for g in gates] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    tuning = summary["model_tuning"]
    assert [h["accepted"] for h in tuning["history"]] == [g["accepted"] for g in gates]
    # The final evaluation is the tuned actors', not the clone's.
    assert summary["evaluation"] != summary["teaching"]["evaluation_kpis"] or not any(g["accepted"] for g in gates)
    clone = tmp_path / "clone-only"
    assert train("--dataset", schema_path, "--episodes", "0", "--out", clone).exit_code == 0
    before, after = load_checkpoint(clone / "final.pt").policy, load_checkpoint(out / "final.pt").policy
    changed = [k for k in before if k.startswith("actors.") and not torch.equal(before[k], after[k])]
    assert bool(changed) == any(g["accepted"] for g in gates), (changed, gates)


def test_a_clone_widened_to_read_the_district_is_tuned_checkpointed_resumed_and_exported(smoke_run, tmp_path,
                                                                                         schema_path, caplog):
    """model_district: from the first tuning update the actors also read a district feature; the run's checkpoints
    carry the widened actors, a resume goes on with them, export writes them."""
    out, _ = smoke_run
    config = tmp_path / "smoke-district.toml"
    smoke = Path(SMOKE).read_text()
    assert "\nepisodes = 2\n" in smoke
    config.write_text(smoke.replace("\nepisodes = 2\n", "\nepisodes = 0\n") + 'model_district = "district_ev"\n')

    def tune(*args):
        return CliRunner().invoke(cli, ["train", "--config", str(config), "--dataset", str(schema_path),
                                        "--eval-start", "0", "--eval-end", "47", "--no-progress", *map(str, args)])

    with caplog.at_level("INFO", logger="maddpg_training"):
        result = tune("--model-episodes", "1", "--resume", out / "last.pt", "--out", tmp_path / "wide")
    assert result.exit_code == 0, result.output
    assert "now read the district feature 'district_ev'" in caplog.text
    widened = load_checkpoint(tmp_path / "wide" / "last.pt")
    assert widened.actor_spec.features[-1] == "district_ev" and not widened.actor_spec.decentralised
    caplog.clear()
    with caplog.at_level("INFO", logger="maddpg_training"):
        result = tune("--model-episodes", "2", "--resume", tmp_path / "wide" / "last.pt", "--out", tmp_path / "more")
    assert result.exit_code == 0, result.output
    assert "now read the district feature" not in caplog.text       # already widened: resumed as it is
    summary = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert [h["episode"] for h in summary["model_tuning"]["history"]] == [1, 2]
    exported = CliRunner().invoke(cli, ["export", str(tmp_path / "more" / "final.pt"),
                                        "--repository", str(tmp_path / "repo")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "repo" / "maddpg_ctde" / "1" / "model.onnx").is_file()


def test_resume_continues_from_the_last_checkpoint(smoke_run, tmp_path, schema_path, caplog):
    out, _ = smoke_run
    resumed = tmp_path / "resumed"
    with caplog.at_level("INFO", logger="maddpg_training"):
        result = train("--dataset", schema_path, "--episodes", "3", "--resume", out / "last.pt", "--out", resumed)
    assert result.exit_code == 0, result.output
    assert "resuming after episode 2" in caplog.text
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["episodes"] == 3 and summary["env_steps"] == 5 * 199  # teacher + DAgger passes + 3 episodes
    assert [h["episode"] for h in summary["history"]] == [1, 2, 3]
    # Fine-tuning's cloning term goes on with every label of the teacher phases, DAgger's included.
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    resume = next(r for r in records if r["kind"] == "resume")
    assert resume["labelled_states"] == summary["teaching"]["labelled_states"]
    assert (resumed / "labels.pt").is_file()
    before = load_checkpoint(out / "last.pt").trainer["learner"]["updates"]
    after = load_checkpoint(resumed / "final.pt").trainer["learner"]["updates"]
    assert after > before


def test_planner_taught_training_clones_fine_tunes_resumes_and_exports(tmp_path, schema_path, monkeypatch, caplog):
    """The shipped recipe (teacher = the perfect-foresight planner, cars charged) end to end on 72 steps."""
    monkeypatch.setenv("MADDPG_CITYLEARN_CACHE", str(tmp_path / "cache"))
    run, resumed = tmp_path / "planner", tmp_path / "planner-resumed"
    args = ("--dataset", schema_path, "--teacher", "planner", "--start", "0", "--end", "71")
    result = train(*args, "--episodes", "1", "--out", run)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teaching"]["teacher"] == "planner"
    assert summary["teaching"]["labelled_states"] == 71 + 36       # the planner labels its pass and DAgger's states
    teacher_pass = summary["teaching"]["passes"][0]
    assert teacher_pass["service"]["ev_departures_acceptable"] == 1.0
    assert len(list((tmp_path / "cache" / "teacher-passes").glob("*.pt"))) == 1  # the LP pass is cached for reruns
    with caplog.at_level("INFO", logger="maddpg_training"):
        result = train(*args, "--episodes", "2", "--resume", run / "last.pt", "--out", resumed)
    assert result.exit_code == 0, result.output
    assert "resuming after episode 1" in caplog.text
    # Whether or not the resumed episode passed the gate, the new run directory holds a best.pt to export.
    assert (resumed / "best.pt").is_file()
    assert [h["episode"] for h in json.loads((resumed / "summary.json").read_text())["history"]] == [1, 2]
    exported = CliRunner().invoke(cli, ["export", str(resumed / "best.pt"), "--repository", str(tmp_path / "repo")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "repo" / "maddpg_ctde" / "1" / "model.onnx").is_file()


def test_the_trained_checkpoint_exports(smoke_run, tmp_path):
    out, _ = smoke_run
    result = CliRunner().invoke(cli, ["export", str(out / "final.pt"), "--repository", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "maddpg_ctde" / "1" / "model.onnx").is_file()


def test_resuming_from_an_exported_or_foreign_file_is_refused(tmp_path, schema_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    result = train("--dataset", schema_path, "--resume", bogus, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "not a maddpg-citylearn checkpoint" in result.output
    assert not (tmp_path / "x").exists()


def test_a_truncated_checkpoint_is_refused_before_any_env_work(smoke_run, tmp_path, schema_path, caplog):
    """Checked first: a broken --resume fails in a second, not after the warm-up, and leaves no empty --out."""
    out, _ = smoke_run
    broken = tmp_path / "broken.pt"
    broken.write_bytes((out / "last.pt").read_bytes()[:5000])
    with caplog.at_level("INFO", logger="maddpg_training"):
        result = train("--dataset", schema_path, "--resume", broken, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "broken.pt" in result.output
    assert "warm-up" not in caplog.text and not (tmp_path / "x").exists()


def test_a_bad_config_file_is_reported(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("episodes = 2\nlearning_rate = 0.1\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1 and "unknown training setting(s) learning_rate" in result.output


def test_windows_are_labelled_by_a_cut_of_the_whole_pass_whatever_the_cache_held(tmp_path, schema_path, monkeypatch):
    """teacher_whole_year: a fold's labels come from the teacher's pass over the whole dataset (computed first where
    it is not cached), even where each window's own pass is cached, so the clone does not depend on the cache."""
    monkeypatch.setenv("MADDPG_CITYLEARN_CACHE", str(tmp_path / "cache"))
    schema = json.loads(schema_path.read_text())
    schema.update(root_directory=str(schema_path.parent), simulation_end_time_step=95)   # a four-day dataset
    short = tmp_path / "schema.json"
    short.write_text(json.dumps(schema))
    windows = [[0, 35], [60, 95]]
    base = SMOKE_SETTINGS + f'windows = {windows}\nteacher = "planner"\nepisodes = 0\ndagger_rounds = 0\n'
    passes = tmp_path / "cache" / "teacher-passes"
    for name, whole_year in (("own", "false"), ("cut", "true")):
        config = tmp_path / f"{name}.toml"
        config.write_text(base + f"teacher_whole_year = {whole_year}\n")
        result = CliRunner().invoke(cli, ["train", "--config", str(config), "--dataset", str(short), "--eval-start",
                                          "0", "--eval-end", "35", "--no-progress", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert len(list(passes.glob("*.pt"))) == (2 if name == "own" else 3)   # each window's, then the whole one
    whole = max(passes.glob("*.pt"), key=lambda p: teacher_cache.load(p).steps)
    cached = teacher_cache.load(whole)
    assert cached.steps == 95 and cached.first_step == 0
    labels = torch.load(tmp_path / "cut" / "labels.pt", weights_only=True)
    expected = np.concatenate([cached.labels[1][a:b] for a, b in windows])
    np.testing.assert_array_equal(labels["targets"].numpy(), expected)
    own = torch.load(tmp_path / "own" / "labels.pt", weights_only=True)
    assert not np.array_equal(own["targets"].numpy(), expected), "a window's own pass starts from another charge"
