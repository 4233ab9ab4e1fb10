"""A simulator that only needs the client installs the base package: numpy, tritonclient, click, tqdm. Nothing else.

Built the way a user would: ``pip install .`` (no extras) into a fresh virtual environment, then that environment's
Python calls the real served model. torch, onnx, onnxruntime and citylearn must not be there, and must not be needed.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.triton

CLIENT_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    from maddpg_client import TritonPolicy, BadInputError

    absent = [m for m in ("torch", "onnx", "onnxruntime", "citylearn", "pandas") if importlib.util.find_spec(m)]
    policy = TritonPolicy(sys.argv[1], protocol=sys.argv[2]).wait_until_ready(timeout=60)
    observations = np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
    actions = policy.act(observations)
    try:
        policy.act(observations[:, :3])
        refused = False
    except BadInputError:
        refused = True
    print(json.dumps({"absent_check": absent, "shape": list(policy.layout.observation_shape),
                      "actions": actions.tolist(), "bad_input_refused": refused}))
""")


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base-install") / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(REPO_ROOT)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return python


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_base_install_calls_the_served_policy_without_torch_onnx_or_citylearn(base_venv, triton_server,
                                                                                  exported_repository, protocol):
    from maddpg_client import LocalPolicy

    local = LocalPolicy(exported_repository)
    observations = np.random.default_rng(0).normal(size=(3, *local.layout.observation_shape)).astype(np.float32)
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    result = subprocess.run([str(base_venv), "-c", CLIENT_SCRIPT, url, protocol, json.dumps(observations.tolist())],
                            capture_output=True, text=True, timeout=300, cwd=base_venv.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["absent_check"] == [], f"the base install pulled in {answer['absent_check']}"
    assert answer["shape"] == list(local.layout.observation_shape)
    assert np.abs(np.asarray(answer["actions"], dtype=np.float32) - local.act(observations)).max() <= 1e-6
    assert answer["bad_input_refused"]


def test_commands_that_need_an_extra_say_which_one_in_one_line(base_venv, tmp_path):
    cli = base_venv.parent / "maddpg-citylearn"
    helped = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "evaluate" in helped.stdout
    missing = subprocess.run([str(cli), "train", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the Python package 'torch'" in lines[0] and "maddpg-citylearn[all]" in lines[0]
