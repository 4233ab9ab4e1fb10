"""`maddpg-citylearn train` end to end on a short window: trains, checkpoints, resumes, exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maddpg_ops.cli import cli
from maddpg_training.checkpoint import load_checkpoint

pytestmark = pytest.mark.citylearn
SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def train(*args):
    return CliRunner().invoke(cli, ["train", "--config", SMOKE, "--eval-start", "0", "--eval-end", "47",
                                    "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, schema_path):
    out = tmp_path_factory.mktemp("smoke")
    result = train("--dataset", schema_path, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_training_writes_checkpoints_a_summary_and_a_deterministic_evaluation(smoke_run):
    out, result = smoke_run
    assert {p.name for p in out.iterdir()} >= {"last.pt", "final.pt", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    # One demonstration pass of the self-consumption rule, one DAgger pass of the clone, then two episodes.
    assert summary["demonstration"]["dagger_rounds"] == 1
    assert summary["demonstration"]["env_steps"] == 2 * 199 and summary["demonstration"]["clone_loss"] >= 0
    assert summary["episodes"] == 2 and summary["env_steps"] == 4 * 199
    assert len(summary["history"]) == 2
    for episode in summary["history"]:
        assert episode["steps_per_second"] > 0 and set(episode["reward_terms"]) == {"cost", "emissions", "peak", "ev", "appliance", "storage"}
    assert set(summary["evaluation"]) >= {"cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average"}
    assert "ev_departures_acceptable" in summary["evaluation_service"]
    assert "deterministic evaluation" in result.output and "EV departures" in result.output
    final = load_checkpoint(out / "final.pt")
    assert final.summary["trained"] is True and final.trainer is not None
    assert final.reference_observations is not None and final.layout.observation_shape == (17, 52)


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


def test_learning_changed_the_actors(smoke_run, tmp_path, schema_path):
    out, _ = smoke_run
    untrained = tmp_path / "untrained"
    assert train("--dataset", schema_path, "--episodes", "0", "--out", untrained).exit_code == 0
    before = load_checkpoint(untrained / "final.pt").policy
    after = load_checkpoint(out / "final.pt").policy
    assert torch.equal(before["normaliser.mean"], after["normaliser.mean"])  # same warm-up statistics
    changed = [k for k in before if k.startswith("actors.") and not torch.equal(before[k], after[k])]
    assert changed, "two episodes of updates must move the actor weights"


def test_resume_continues_from_the_last_checkpoint(smoke_run, tmp_path, schema_path):
    out, _ = smoke_run
    resumed = tmp_path / "resumed"
    result = train("--dataset", schema_path, "--episodes", "3", "--resume", out / "last.pt", "--out", resumed)
    assert result.exit_code == 0, result.output
    assert "resuming after episode 2" in result.output
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["episodes"] == 3 and summary["env_steps"] == 5 * 199  # 2 demonstration passes + 3 episodes
    assert [h["episode"] for h in summary["history"]] == [1, 2, 3]
    before = load_checkpoint(out / "last.pt").trainer["learner"]["updates"]
    after = load_checkpoint(resumed / "final.pt").trainer["learner"]["updates"]
    assert after > before


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


def test_a_bad_config_file_is_reported(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("episodes = 2\nlearning_rate = 0.1\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1 and "unknown training setting(s) learning_rate" in result.output
