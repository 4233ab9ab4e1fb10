"""`maddpg-citylearn export`: a validated ONNX graph written atomically as a new version with three Triton configs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from tritonclient.grpc import model_config_pb2 as pb

from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME, PolicyLayout
from maddpg_export.triton_config import parse_config
from maddpg_ops.cli import cli
from maddpg_training.checkpoint import load_checkpoint

pytestmark = pytest.mark.citylearn
MODEL = "maddpg_ctde"


def run_export(*args: str):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    """The one line a failed command prints: `Error: <what is wrong and what to do>`."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture()
def repository(tmp_path) -> Path:
    return tmp_path / "repo"


def test_export_help_explains_the_command():
    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    for words in ("CHECKPOINT", "--repository", "--model", "--version", "--force", "observations", "actions"):
        assert words in result.output


def test_exporting_twice_writes_versions_1_and_2_and_keeps_both(initial_checkpoint_path, repository):
    first = run_export(initial_checkpoint_path, "--repository", repository)
    assert first.exit_code == 0, first.output
    second = run_export(initial_checkpoint_path, "--repository", repository)
    assert second.exit_code == 0, second.output
    model_dir = repository / MODEL
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["1", "2"]
    for version in ("1", "2"):
        assert {p.name for p in (model_dir / version).iterdir()} == {"model.onnx", "model.py", "layout.json"}
    assert not list(model_dir.glob(".staging-*"))
    # The summary names what a user needs to know.
    for words in ("version", "observations", "nodes", "KiB", "parity", "time"):
        assert words in second.output


def test_written_configs_agree_with_each_other_and_with_the_onnx_graph(exported_repository):
    model_dir = exported_repository / MODEL
    configs = {name: parse_config((model_dir / path).read_text()) for name, path in
               {"default": "config.pbtxt", "cpu": "configs/cpu.pbtxt", "local": "configs/local.pbtxt"}.items()}
    graph = onnx.load(model_dir / "1" / "model.onnx")
    layout = PolicyLayout.from_json(configs["default"].parameters["layout"].string_value)
    assert layout.observation_shape == (17, 52) and layout.action_shape == (17, 3)  # derived from citylearn 3.0.2

    def graph_dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (graph_in,), (graph_out,) = graph.graph.input, graph.graph.output
    assert (graph_in.name, graph_out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert isinstance(graph_dims(graph_in)[0], str) and isinstance(graph_dims(graph_out)[0], str)  # dynamic batch
    assert graph_dims(graph_in)[1:] == [17, 52] and graph_dims(graph_out)[1:] == [17, 3]
    for config in configs.values():
        assert config.name == MODEL
        assert config.max_batch_size > 0
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [(INPUT_NAME, pb.TYPE_FP32, [17, 52])]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [(OUTPUT_NAME, pb.TYPE_FP32, [17, 3])]
        assert PolicyLayout.from_json(config.parameters["layout"].string_value) == layout
        assert config.HasField("dynamic_batching")
        # No queue policy by default: in Triton 2.51 one makes requests stall ~500 ms (docs/benchmarks.md).
        assert not config.dynamic_batching.HasField("default_queue_policy")
        assert len(config.model_warmup) >= 1
    kinds = {name: [g.kind for g in config.instance_group] for name, config in configs.items()}
    assert kinds["default"] == [pb.ModelInstanceGroup.KIND_GPU, pb.ModelInstanceGroup.KIND_CPU]
    assert kinds["cpu"] == [pb.ModelInstanceGroup.KIND_CPU]
    assert kinds["local"] == [pb.ModelInstanceGroup.KIND_CPU]
    assert configs["default"].platform == configs["cpu"].platform == "onnxruntime_onnx"
    assert configs["local"].backend == "python"


def test_the_repository_is_readable_by_a_server_running_as_another_user(exported_repository):
    # The Triton image runs as a non-root user: a 0600 config.pbtxt or a 0700 version directory fails the pod.
    for path in exported_repository.rglob("*"):
        wanted = 0o005 if path.is_dir() else 0o004  # others may read (and enter directories)
        assert path.stat().st_mode & wanted == wanted, f"{path} is {oct(path.stat().st_mode & 0o777)}"


def test_onnxruntime_on_the_written_file_matches_torch(exported_repository, initial_checkpoint_path):
    checkpoint = load_checkpoint(initial_checkpoint_path)
    policy = checkpoint.build_policy()
    session = ort.InferenceSession(str(exported_repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    real = checkpoint.reference_observations.numpy()
    for batch in (1, 7, 256, 4096):
        x = real[np.random.default_rng(batch).integers(0, len(real), batch)]
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        with torch.no_grad():
            expected = policy(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 17, 3)
        assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("policy", ["fresh", "saturated"])
def test_actions_stay_finite_and_within_bounds_for_real_and_hostile_inputs(policy, request, initial_checkpoint_path):
    """A fresh policy acts near 0; the saturated one (see conftest) pushes most slots onto their bounds."""
    repository = request.getfixturevalue("exported_repository" if policy == "fresh" else "saturated_repository")
    session = ort.InferenceSession(str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    layout = PolicyLayout.from_json((repository / MODEL / "1" / "layout.json").read_text())
    low, high = layout.action_bounds()
    mask = layout.action_mask()
    real = torch.load(initial_checkpoint_path, weights_only=True)["reference_observations"].numpy()
    hostile = [np.full((2, 17, 52), value, dtype=np.float32)
               for value in (np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38, -3.4e38)]
    batches = [real, *hostile]
    for x in batches:
        actions = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        assert np.isfinite(actions).all()
        assert (actions >= low).all() and (actions <= high).all()
        assert (actions[:, ~mask] == 0).all(), "padded action slots must be exactly 0"
    if policy == "saturated":
        actions = session.run([OUTPUT_NAME], {INPUT_NAME: real})[0]
        on_bound = (actions == low) | (actions == high)
        assert on_bound[:, mask].mean() > 0.7, "the saturated fixture must actually saturate"
        assert (actions == high)[:, mask].any() and (actions == low)[:, mask].any()


def test_existing_version_is_refused_without_force_and_replaced_with_it(initial_checkpoint_path, repository):
    assert run_export(initial_checkpoint_path, "-r", repository, "--version", "3").exit_code == 0
    before = tree(repository)
    refused = run_export(initial_checkpoint_path, "-r", repository, "--version", "3")
    assert refused.exit_code != 0
    assert "already exists" in refused.output and "--force" in refused.output
    assert tree(repository) == before
    forced = run_export(initial_checkpoint_path, "-r", repository, "--version", "3", "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in (repository / MODEL).iterdir() if p.name.isdigit()) == ["3"]


@pytest.mark.parametrize("case", ["missing", "truncated", "foreign", "unsafe", "directory", "text", "empty", "binary"])
def test_bad_checkpoints_fail_with_one_clear_line_and_write_nothing(case, tmp_path, initial_checkpoint_path, repository):
    path = tmp_path / "bad.pt"
    if case == "text":
        path.write_text("step,reward\n1,0.5\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif case == "truncated":
        data = initial_checkpoint_path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "foreign":
        torch.save({"model": torch.zeros(3), "epoch": 4}, path)
    elif case == "unsafe":
        torch.save({"format": "maddpg-citylearn.checkpoint", "payload": Path("/etc")}, path)  # needs arbitrary unpickling
    elif case == "directory":
        path = tmp_path
    result = run_export(path, "--repository", repository)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    message = error_line(result)
    expected = {"missing": "does not exist", "truncated": "truncated", "foreign": "not a checkpoint this tool can export",
                "unsafe": "arbitrary unpickling", "directory": "is a directory",
                # A file torch.save cannot have written is called what it is, not an unsafe pickle.
                "text": "is not a checkpoint: it is text (starting 'step,reward')", "empty": "is not a checkpoint: it is empty",
                "binary": "is not a checkpoint: it is neither a zip archive nor a pickle"}[case]
    assert expected in message
    if case in ("text", "empty", "binary"):
        assert "unpickling" not in message
    if case == "unsafe":
        assert "PosixPath" in message  # names what it refused to unpickle
    assert not repository.exists()


def test_a_checkpoint_whose_weights_do_not_fit_its_layout_is_refused(tmp_path, initial_checkpoint_path, repository):
    payload = torch.load(initial_checkpoint_path, weights_only=True)
    layout = json.loads(payload["layout"])
    layout["agents"] = layout["agents"][:-1]  # 16 buildings declared, 17 actors stored
    payload["layout"] = json.dumps(layout)
    payload["reference_observations"] = None
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    result = run_export(path, "--repository", repository)
    assert result.exit_code == 1
    assert "do not match" in result.output
    assert not repository.exists()


def test_a_repository_model_with_another_layout_is_not_mixed_in(tmp_path, initial_checkpoint_path, repository):
    assert run_export(initial_checkpoint_path, "-r", repository).exit_code == 0
    before = tree(repository)
    payload = torch.load(initial_checkpoint_path, weights_only=True)
    layout = json.loads(payload["layout"])
    layout["agents"][0]["building"] = "Building_X"
    payload["layout"] = json.dumps(layout)
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    result = run_export(path, "-r", repository)
    assert result.exit_code == 1 and "--model" in result.output
    assert tree(repository) == before


def test_an_unwritable_repository_is_reported_before_any_work(tmp_path, initial_checkpoint_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the repository should go")
    result = run_export(initial_checkpoint_path, "--repository", blocker / "repo")
    assert result.exit_code == 1
    assert "is a file" in result.output
    assert blocker.read_text() == "a file where the repository should go"


def test_validation_failures_are_all_reported_and_nothing_is_written(monkeypatch, initial_checkpoint_path, repository):
    import maddpg_export.pipeline as pipeline
    from maddpg_export.onnx_graph import export_onnx as real_export

    def export_a_different_policy(policy, layout):
        tampered = type(policy)(layout, policy.spec)
        tampered.load_state_dict(policy.state_dict())
        with torch.no_grad():
            tampered.actors.mlp.layers[-1].bias.add_(0.5)  # not the trained actors any more
        return real_export(tampered, layout)

    monkeypatch.setattr(pipeline, "export_onnx", export_a_different_policy)
    result = run_export(initial_checkpoint_path, "--repository", repository)
    assert result.exit_code == 1
    assert "export validation failed" in result.output and "nothing was written" in result.output
    for family in ("reference", "random", "extreme"):
        for batch in (1, 7, 256, 4096):
            assert f"{family} observations, batch {batch}: onnxruntime differs from torch" in result.output
    assert not (repository / MODEL).exists() or not any(p.name.isdigit() for p in (repository / MODEL).iterdir())


# Runs the real `maddpg-citylearn export` with one change: the process SIGKILLs itself right after the commit has
# written its N-th file into the staging directory. The kill lands inside the commit by construction, not by timing.
EXPORT_KILLED_AFTER_FILE_N = """
import os, signal, sys
import maddpg_export.repository as repository
n, write, written = int(sys.argv[1]), repository._write_synced, []
def write_then_die(path, data):
    write(path, data)
    written.append(path)
    if len(written) == n:
        os.kill(os.getpid(), signal.SIGKILL)
repository._write_synced = write_then_die
from maddpg_ops.cli import main
sys.argv = ["maddpg-citylearn", *sys.argv[2:]]
main()
"""


def test_an_export_killed_inside_the_commit_leaves_no_visible_version(tmp_path, initial_checkpoint_path):
    """Killed after 1, 2 and all 3 files of a version: the staging directory held them, no version ever showed."""
    export = ["export", str(initial_checkpoint_path), "-r"]
    complete = {"model.onnx", "model.py", "layout.json"}
    for files_written in (1, 2, 3):
        repository = tmp_path / f"killed-after-{files_written}"
        killed = subprocess.run([sys.executable, "-c", EXPORT_KILLED_AFTER_FILE_N, str(files_written), *export,
                                 str(repository)], capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died where the kill was put, not before
        model_dir = repository / MODEL
        (staging,) = model_dir.glob(".staging-*")  # the version was being assembled...
        assert len({p.name for p in staging.iterdir()} & complete) == files_written
        assert not [p for p in model_dir.iterdir() if p.name.isdigit()], "a version became visible"  # ...unseen
        assert not (model_dir / "config.pbtxt").exists()  # configs are written only after the version
    # The next export removes the debris and writes a complete version 1.
    again = subprocess.run([sys.executable, "-m", "maddpg_ops.cli", *export, str(repository)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not list(model_dir.glob(".staging-*"))
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["1"]
    assert {f.name for f in (model_dir / "1").iterdir()} == complete
    onnx.checker.check_model(onnx.load(model_dir / "1" / "model.onnx"))
    shutil.rmtree(repository)


@pytest.fixture(scope="module")
def district_checkpoint_path(tmp_path_factory, week_spec) -> Path:
    """A policy whose actors also read the district signal and leave the season out, with the safety layer, on the
    real env layout."""
    from maddpg_training.bootstrap import fresh_policy, reference_sample, warmup, without_ev_discharge
    from maddpg_training.checkpoint import Checkpoint, save_checkpoint
    from maddpg_training.networks import ActorSpec
    from maddpg_training.safety import safety_spec_from_env

    warm = warmup(week_spec)
    layout = without_ev_discharge(warm.layout)
    safety = safety_spec_from_env(week_spec.build(), layout)
    spec = ActorSpec(hidden_sizes=(32, 32), features=("hour_cycle", "ev_slack", "district"), ignore=("season",))
    policy = fresh_policy(layout, warm.observations, spec, seed=3, safety=safety)
    path = tmp_path_factory.mktemp("district") / "district.pt"
    save_checkpoint(path, Checkpoint(layout=layout, actor_spec=spec, policy=policy.state_dict(), safety=safety,
                                     reference_observations=reference_sample(warm.observations,
                                                                             np.random.default_rng(0))))
    return path


def test_the_district_signal_is_inside_the_exported_graph(district_checkpoint_path, repository):
    """The district aggregates are computed in the graph from all 17 rows: any client gets them, and ONNX Runtime
    agrees with torch on real observations and stays finite and in bounds on hostile ones."""
    assert run_export(district_checkpoint_path, "-r", repository).exit_code == 0
    checkpoint = load_checkpoint(district_checkpoint_path)
    assert checkpoint.policy["features.district_std"].min() > 0   # fitted on the warm-up pass, stored with weights
    policy = checkpoint.build_policy()
    session = ort.InferenceSession(str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    real = checkpoint.reference_observations.numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: real})[0]
    with torch.no_grad():
        assert np.abs(got - policy(torch.from_numpy(real)).numpy()).max() <= 1e-5
    low, high = checkpoint.layout.action_bounds()
    for value in (np.nan, np.inf, -1e30, 3.4e38):
        actions = session.run([OUTPUT_NAME], {INPUT_NAME: np.full((2, 17, 52), value, dtype=np.float32)})[0]
        assert np.isfinite(actions).all() and (actions >= low).all() and (actions <= high).all()
    # The month and the weather, which the actors ignore, do not move the served actions.
    names = checkpoint.layout.agents[0].observation_names
    season = [i for i, name in enumerate(names) if name == "month" or name.startswith(("outdoor_", "diffuse_", "direct_"))]
    assert len(season) == 17
    moved = real.copy()
    moved[..., season] -= 10.0
    assert np.array_equal(session.run([OUTPUT_NAME], {INPUT_NAME: moved})[0], got)
    # One building's load moves every actor's district input: the actors are not decentralised any more.
    x = torch.from_numpy(real[:4].copy())
    before = policy.actor_inputs(x)
    x[:, 3, :] *= 2.0
    after = policy.actor_inputs(x)
    district = slice(-6, None)
    assert not torch.allclose(before[:, 0, district], after[:, 0, district])
    assert torch.equal(after[:, 0, district], after[:, 16, district])
