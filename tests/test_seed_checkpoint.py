"""Checkpoints of the seed project (CooperativeMADDPG) export, serve and answer like the seed's own inference path.

The checkpoints here are built with random weights in the exact structure ``docs/seed-checkpoints.md`` describes
(key names, shapes, numpy float64 statistics) by ``maddpg_export.seed_example`` (what ``python -m
maddpg_export.seed_example OUT.pt`` writes for users). The reference they are compared with is written independently of
the exporter, straight from that description: the seed's module tree with ``nn.Linear``, ``nn.LayerNorm``,
``nn.MultiheadAttention``, and a loop over the 17 actors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pathlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result
from tritonclient.grpc import model_config_pb2 as pb

from maddpg_client import LayoutMismatchError, LocalPolicy, PolicyLayout, TritonPolicy
from maddpg_core.errors import CheckpointError
from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME
from maddpg_evaluation.citylearn_env import CityLearnAdapter
from maddpg_export.seed_example import ACTION_DIM, N_AGENTS, OBS_DIM, Actor, Coordinator, H, seed_payload
from maddpg_export.triton_config import parse_config
from maddpg_ops.cli import cli

MODEL = "seed_cooperative"
BATCHES = (1, 7, 256, 4096)


def save(payload: dict, path: Path) -> Path:
    torch.save(payload, path)
    return path


@torch.no_grad()
def reference_actions(payload: dict, observations: np.ndarray) -> np.ndarray:
    """Steps 1-5 of the description with the seed's own modules, one actor at a time."""
    x = np.array(observations, dtype=np.float32)
    x[np.isnan(x)] = 0.0
    x[np.isposinf(x)] = 1.0
    x[np.isneginf(x)] = -1.0
    std = np.sqrt(payload["obs_var"] / payload["obs_count"] + 1e-8).astype(np.float32)
    z = torch.from_numpy(np.clip((x - payload["obs_mean"].astype(np.float32)) / std, -5.0, 5.0))
    coordinator = Coordinator(payload["obs_dim"]).eval()
    coordinator.load_state_dict(payload["coordinator"])
    hints = coordinator(z)
    actions = []
    for i, agent in enumerate(payload["agents"]):
        actor = Actor(payload["obs_dim"], payload["action_dim"]).eval()
        actor.load_state_dict(agent["actor"])
        actions.append(actor.net(torch.cat([z[:, i], hints[:, i]], dim=-1)))
    return np.clip(torch.stack(actions, dim=1).numpy(), -1.0, 1.0)


def typical_observations(payload: dict, batch: int, seed: int) -> np.ndarray:
    """Around obs_mean, two of the normalisation's standard deviations wide: mostly inside the [-5, 5] clip."""
    rng = np.random.default_rng(seed)
    std = np.sqrt(payload["obs_var"] / payload["obs_count"])
    shape = (batch, payload["n_agents"], payload["obs_dim"])
    return (payload["obs_mean"] + 2.0 * std * rng.standard_normal(shape)).astype(np.float32)


def hostile_observations(payload: dict, batch: int, seed: int) -> np.ndarray:
    """Typical observations with a fifth of the values replaced by NaN, +-inf, +-1e30 and +-3.4e38."""
    x = typical_observations(payload, batch, seed)
    flat = x.reshape(-1)
    positions = np.random.default_rng(seed + 1).choice(flat.size, size=max(7, flat.size // 5), replace=False)
    flat[positions] = np.resize(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38, -3.4e38], np.float32),
                                len(positions))
    return x


def run_export(*args) -> Result:
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


# --- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def payload() -> dict:
    return seed_payload()


@pytest.fixture(scope="module")
def seed_path(tmp_path_factory, payload) -> Path:
    return save(payload, tmp_path_factory.mktemp("seed") / "cooperative_maddpg.pt")


@pytest.fixture(scope="module")
def seed_export(tmp_path_factory, seed_path) -> tuple[Path, Result, str]:
    """`maddpg-citylearn export` of the seed checkpoint into a fresh repository (once per module), with the progress
    messages it logged."""
    repository = tmp_path_factory.mktemp("seed_repository")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("maddpg_export")
    logger.addHandler(handler)
    try:
        result = run_export(seed_path, "--repository", repository, "--model", MODEL)
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    return repository, result, "\n".join(messages)


@pytest.fixture(scope="module")
def seed_repository(seed_export) -> Path:
    return seed_export[0]


@pytest.fixture(scope="module")
def seed_session(seed_repository) -> ort.InferenceSession:
    return ort.InferenceSession(str(seed_repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=("onnxruntime", "python"))
def seed_server(request, seed_repository, local_server):
    # On both backends, like the session server; stopped by PID on the way out.
    with local_server(seed_repository, backend=request.param) as server:
        yield server


# --- the torch re-implementation is the seed's inference path ----------------------------------------------------------
def test_reimplementation_computes_what_the_seed_modules_compute(seed_path, payload):
    from maddpg_export.sources import load_policy_source

    source = load_policy_source(seed_path)
    assert source.kind == "seed-cooperative-maddpg"
    for family in (typical_observations, hostile_observations):
        x = family(payload, 64, seed=3)
        with torch.no_grad():
            got = source.policy(torch.from_numpy(x)).numpy()
        expected = reference_actions(payload, x)
        assert got.shape == (64, N_AGENTS, ACTION_DIM)
        assert np.abs(got - expected).max() <= 1e-5, family.__name__
    # Not a constant or saturated policy: the comparison above means something.
    assert np.abs(expected).max() < 1.0 and expected.std() > 0.05


def test_each_agent_acts_with_its_own_actor_and_sees_the_other_buildings(seed_path, payload):
    from maddpg_export.sources import load_policy_source

    policy = load_policy_source(seed_path).policy
    x = typical_observations(payload, 1, seed=4)
    changed = x.copy()
    changed[0, 5] += 3.0 * np.sqrt(payload["obs_var"] / payload["obs_count"]).astype(np.float32)
    with torch.no_grad():
        before, after = policy(torch.from_numpy(x)).numpy(), policy(torch.from_numpy(changed)).numpy()
    # Building 5's observation reaches every agent through the coordinator (centralised execution).
    assert (np.abs(after - before).max(axis=-1) > 1e-4).all()
    same_rows = np.repeat(x[:, :1], N_AGENTS, axis=1)  # identical rows: different actions come from different actors
    with torch.no_grad():
        actions = policy(torch.from_numpy(same_rows)).numpy()[0]
    assert np.unique(actions.round(5), axis=0).shape[0] == N_AGENTS


# --- export ------------------------------------------------------------------------------------------------------------
def test_export_writes_a_version_whose_graph_matches_the_seed_path(seed_repository, seed_session, payload):
    version = seed_repository / MODEL / "1"
    assert {p.name for p in version.iterdir()} == {"model.onnx", "model.py", "layout.json"}
    graph = onnx.load(version / "model.onnx")
    onnx.checker.check_model(graph, full_check=True)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.graph.input,
                                                                                          *graph.graph.output)]
    assert dims == [["batch", N_AGENTS, OBS_DIM], ["batch", N_AGENTS, ACTION_DIM]]
    for batch in BATCHES:
        for family in (typical_observations, hostile_observations):
            x = family(payload, batch, seed=batch)
            got = seed_session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            assert got.shape == (batch, N_AGENTS, ACTION_DIM)
            assert np.isfinite(got).all() and (np.abs(got) <= 1.0).all()
            assert np.abs(got - reference_actions(payload, x)).max() <= 1e-5, (family.__name__, batch)


def test_every_input_is_answered_with_finite_actions_in_bounds(seed_session):
    for value in (np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38, -3.4e38, 0.0):
        actions = seed_session.run([OUTPUT_NAME], {INPUT_NAME: np.full((2, N_AGENTS, OBS_DIM), value, np.float32)})[0]
        assert np.isfinite(actions).all() and (np.abs(actions) <= 1.0).all(), value


def test_export_prints_what_was_recognised_and_measured(seed_export):
    _, result, logged = seed_export
    assert "recognised a CooperativeMADDPG checkpoint of the seed project" in logged
    assert "exported seed-cooperative-maddpg policy" in result.stdout
    assert f"'batch', {N_AGENTS}, {OBS_DIM}]" in result.stdout and f"'batch', {N_AGENTS}, {ACTION_DIM}]" in result.stdout


def test_configs_are_the_three_variants_and_carry_the_layout(seed_repository, seed_path):
    model_dir = seed_repository / MODEL
    configs = {name: parse_config((model_dir / path).read_text()) for name, path in
               {"default": "config.pbtxt", "cpu": "configs/cpu.pbtxt", "local": "configs/local.pbtxt"}.items()}
    layout = PolicyLayout.from_json((model_dir / "1" / "layout.json").read_text())
    for config in configs.values():
        assert config.name == MODEL
        assert [(t.name, list(t.dims)) for t in config.input] == [(INPUT_NAME, [N_AGENTS, OBS_DIM])]
        assert [(t.name, list(t.dims)) for t in config.output] == [(OUTPUT_NAME, [N_AGENTS, ACTION_DIM])]
        assert PolicyLayout.from_json(config.parameters["layout"].string_value) == layout
    assert [g.kind for g in configs["default"].instance_group] == [pb.ModelInstanceGroup.KIND_GPU,
                                                                   pb.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in configs["cpu"].instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert configs["default"].platform == configs["cpu"].platform == "onnxruntime_onnx"
    assert configs["local"].backend == "python"


def test_layout_records_what_is_known_and_what_is_not(seed_repository, seed_path):
    layout = PolicyLayout.from_json((seed_repository / MODEL / "1" / "layout.json").read_text())
    assert (layout.n_agents, layout.obs_width, layout.action_width) == (N_AGENTS, OBS_DIM, ACTION_DIM)
    assert (layout.citylearn_version, layout.dataset) == ("2.5.0", "citylearn_challenge_2022_phase_all_plus_evs")
    assert all(a.building is None and a.observation_names is None and a.action_names is None for a in layout.agents)
    low, high = layout.action_bounds()
    assert (low == -1.0).all() and (high == 1.0).all()
    source = layout.source
    assert source["kind"] == "seed-cooperative-maddpg"
    assert source["checkpoint_sha256"] == hashlib.sha256(seed_path.read_bytes()).hexdigest()
    assert "zero-padded" in source["padding_convention"] and "observation names" in source["unknown"]
    assert "synthetic" in source["validation_observations"]
    assert source["training"]["maddpg_config"]["gamma"] == 0.99
    assert "noise" not in source["training"]["maddpg_config"]  # only plain settings travel as JSON
    json.dumps(source)


def test_unused_seed_weights_are_ignored(tmp_path, payload, seed_path):
    from maddpg_export.sources import load_policy_source

    altered = copy.deepcopy(payload)
    for key in altered["coordinator"]:
        if key.startswith("mean_field."):
            altered["coordinator"][key].fill_(7.0)
    for agent in altered["agents"]:
        for key in agent["actor"]:
            if key.startswith("net_local."):
                agent["actor"][key].fill_(7.0)
        agent["critic"] = {}
    x = torch.from_numpy(typical_observations(payload, 16, seed=5))
    with torch.no_grad():
        expected = load_policy_source(seed_path).policy(x)
        got = load_policy_source(save(altered, tmp_path / "altered.pt")).policy(x)
    assert torch.equal(got, expected)


# --- refusals ---------------------------------------------------------------------------------------------------------
def _drop(container: dict, key) -> None:
    del container[key]


BROKEN = {
    "no coordinator": (lambda p: _drop(p, "coordinator"), ["'coordinator'"]),
    "no obs_var": (lambda p: _drop(p, "obs_var"), ["'obs_var'"]),
    "agent 3 without actor": (lambda p: _drop(p["agents"][3], "actor"), ["agents[3]['actor']"]),
    "coordinator without attention weights": (
        lambda p: _drop(p["coordinator"], "attention.attention.in_proj_weight"),
        ["coordinator", "'attention.attention.in_proj_weight'", f"({3 * H}, {H})"]),
    "obs_mean of the wrong length": (
        lambda p: p.update(obs_mean=np.zeros(OBS_DIM - 2)), ["'obs_mean'", f"({OBS_DIM - 2},)", f"({OBS_DIM},)"]),
    "actor weight of the wrong width": (
        lambda p: p["agents"][5]["actor"].update({"net.0.weight": torch.zeros(256, OBS_DIM + 31)}),
        ["agents[5]['actor']", "'net.0.weight'", f"(256, {OBS_DIM + 31})", f"(256, {OBS_DIM + 32})"]),
    "an undocumented coordinator weight": (
        lambda p: p["coordinator"].update({"gate.weight": torch.zeros(3)}), ["unexpected", "'gate.weight'"]),
    "fewer agents than n_agents": (lambda p: p["agents"].pop(), ["'agents'", f"{N_AGENTS - 1} entries", f"{N_AGENTS}"]),
    "a non-cooperative model": (lambda p: p.update(is_cooperative=False), ["is_cooperative=False"]),
    "a non-positive obs_count": (lambda p: p.update(obs_count=0.0), ["'obs_count'", "0.0"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_seed_checkpoint_is_refused_naming_what_is_wrong(case, tmp_path, payload):
    breaks, words = BROKEN[case]
    broken = copy.deepcopy(payload)
    breaks(broken)
    repository = tmp_path / "repo"
    result = run_export(save(broken, tmp_path / "broken.pt"), "--repository", repository)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    message = error_line(result)
    for word in words:
        assert word in message, message
    assert not repository.exists()


UNSAFE = {
    "an extra pickled object": lambda p: p.update(notes=pathlib.Path("/etc")),
    "an object array": lambda p: p.update(obs_mean=np.array([pathlib.Path("/etc")] * OBS_DIM, dtype=object)),
    "an array of another dtype": lambda p: p.update(obs_mean=p["obs_mean"].astype(np.float32)),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_only_float64_numpy_arrays_are_admitted_anything_else_is_unsafe(case, tmp_path, payload):
    unsafe = copy.copy(payload)
    UNSAFE[case](unsafe)
    repository = tmp_path / "repo"
    result = run_export(save(unsafe, tmp_path / "unsafe.pt"), "--repository", repository)
    assert result.exit_code == 1
    assert "arbitrary unpickling" in error_line(result)
    assert not repository.exists()


def test_our_own_format_is_still_loaded_strictly(tmp_path):
    from maddpg_export.seed_cooperative import NUMPY_ARRAY_GLOBALS
    from maddpg_training.checkpoint import read_payload

    path = save({"format": "maddpg-citylearn.checkpoint", "stats": np.zeros(3)}, tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        read_payload(path)
    assert read_payload(path, NUMPY_ARRAY_GLOBALS)[0]["stats"].dtype == np.float64


def test_a_file_written_with_numpy_2_loads_too(tmp_path, payload):
    """numpy 2 pickles arrays through numpy._core.multiarray._reconstruct: the same function under another name."""
    import zipfile

    from maddpg_export.sources import load_policy_source

    original = save(payload, tmp_path / "numpy1.pt")
    renamed = tmp_path / "numpy2.pt"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(renamed, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy.core.multiarray" in data  # protocol-2 GLOBAL opcodes are plain text lines
                data = data.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
            target.writestr(info, data)
    assert "numpy._core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(renamed)
    assert load_policy_source(renamed).kind == "seed-cooperative-maddpg"


# --- serving -----------------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_served_seed_model_answers_through_the_client(seed_server, seed_repository, payload, protocol):
    url = seed_server.http_url if protocol == "http" else seed_server.grpc_url
    local = LocalPolicy(seed_repository, MODEL, allow_non_finite=True)
    with TritonPolicy(url, protocol=protocol, model=MODEL, allow_non_finite=True).wait_until_ready(60) as policy:
        assert policy.layout == local.layout
        assert policy.layout.source["kind"] == "seed-cooperative-maddpg"
        for x in (typical_observations(payload, 1, seed=11)[0], typical_observations(payload, 256, seed=12),
                  hostile_observations(payload, 64, seed=13)):
            served = policy.act(x)
            assert served.shape == x.shape[:-1] + (ACTION_DIM,)
            assert np.abs(served - local.act(x)).max() <= 1e-6
            expected = reference_actions(payload, x if x.ndim == 3 else x[None])
            assert np.abs(served - (expected if x.ndim == 3 else expected[0])).max() <= 1e-5


# --- the env the model was not trained on ------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.citylearn
def test_the_adapter_refuses_an_env_whose_buildings_are_wider_than_the_model(seed_server, week_spec):
    from maddpg_evaluation.citylearn_env import citylearn_version

    env = week_spec.build()
    with TritonPolicy(seed_server.http_url, model=MODEL).wait_until_ready(60) as policy:
        with pytest.raises(LayoutMismatchError) as refused:
            CityLearnAdapter(policy.layout, env)
    message = str(refused.value)
    widest = max(len(names) for names in env.observation_names)
    assert widest > OBS_DIM
    assert f"{widest} observations" in message and f"at most {OBS_DIM}" in message
    assert "citylearn 2.5.0" in message and f"citylearn {citylearn_version()}" in message


@pytest.mark.triton
@pytest.mark.citylearn
def test_evaluate_refuses_the_seed_model_on_this_citylearn_with_one_line(seed_server, schema_path, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--url", seed_server.http_url, "--model", MODEL,
                                      "--schema", str(schema_path), "--start", "0", "--end", "23",
                                      "--no-baselines", "--no-progress", "--out", str(tmp_path / "report")])
    assert result.exit_code == 1
    message = error_line(result)
    assert "does not fit" in message and "citylearn 2.5.0" in message and f"at most {OBS_DIM}" in message
    assert not (tmp_path / "report").exists()


@pytest.mark.citylearn
def test_a_seed_model_wide_enough_for_the_env_is_fed_tail_padded_rows(tmp_path, week_spec):
    from maddpg_export.sources import load_policy_source

    env = week_spec.build()
    widest = max(len(names) for names in env.observation_names)
    most_actions = max(len(names) for names in env.action_names)
    layout = load_policy_source(save(seed_payload(obs_dim=widest + 4, action_dim=most_actions + 1),
                                     tmp_path / "wide.pt")).layout
    adapter = CityLearnAdapter(layout, env)
    observations, _ = env.reset()
    rows = adapter.observations_to_array(observations)
    assert rows.shape == (N_AGENTS, widest + 4)
    for i, building in enumerate(observations):
        np.testing.assert_array_equal(rows[i, : len(building)], np.asarray(building, dtype=np.float32))
        assert (rows[i, len(building):] == 0).all()
    actions = adapter.actions_to_lists(np.full((N_AGENTS, most_actions + 1), 0.5, np.float32))
    assert [len(a) for a in actions] == [len(names) for names in env.action_names]


def test_the_seed_example_command_writes_a_checkpoint_that_export_recognises(tmp_path):
    """docs/seed-checkpoints.md: `python -m maddpg_export.seed_example OUT.pt` makes a file to try the seed path with."""
    import subprocess
    import sys

    from maddpg_export.sources import load_policy_source

    out = tmp_path / "runs" / "seed-example.pt"
    result = subprocess.run([sys.executable, "-m", "maddpg_export.seed_example", str(out), "--obs-dim", "20"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"maddpg-citylearn export {out}" in result.stdout
    source = load_policy_source(out)
    assert source.kind == "seed-cooperative-maddpg"
    assert source.layout.observation_shape == (N_AGENTS, 20) and source.layout.action_shape == (N_AGENTS, ACTION_DIM)

