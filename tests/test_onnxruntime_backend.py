"""Triton's real onnxruntime backend, built by `make setup`, serving the shipped model as Kubernetes' CPU nodes do.

The shipped `model_repository/` is served twice side by side: on the onnxruntime backend with `configs/cpu.pbtxt` and
on the python backend with `configs/local.pbtxt`. Both must answer exactly what onnxruntime computes in process, for
single districts, odd and large batches, and hostile inputs. The build itself is checked for what a user relies on:
a current build does nothing, a tampered source is refused, a missing prerequisite is named in one line.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from maddpg_serving import onnxruntime_backend
from maddpg_serving.onnxruntime_backend import SOURCES, BackendBuildError

SHIPPED = Path(__file__).resolve().parents[1] / "model_repository"
SHARED_SOURCES = Path(__file__).resolve().parents[1].parent / "shared" / "triton-src"
MODEL = "maddpg_ctde"


@pytest.fixture(scope="module")
def shipped_servers(local_server):
    """The shipped repository on both backends at once: {backend: LocalTritonServer}."""
    if onnxruntime_backend.installed() is None:
        pytest.fail("Triton's onnxruntime backend is not built: run `make setup`")
    with local_server(SHIPPED, backend="onnxruntime") as onnxruntime, local_server(SHIPPED, backend="python") as python:
        yield {"onnxruntime": onnxruntime, "python": python}


def model_config(server) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{MODEL}/config", timeout=10) as response:
        return json.load(response)


def hostile_batch(layout, rng) -> np.ndarray:
    """Real-scale observations with NaN, +-inf and +-1e30 sprinkled over every slot."""
    x = rng.standard_normal((64, *layout.observation_shape)).astype(np.float32)
    for value, share in ((np.nan, 0.1), (np.inf, 0.05), (-np.inf, 0.05), (1e30, 0.05), (-1e30, 0.05)):
        x[rng.random(x.shape) < share] = value
    x[0] = np.nan
    x[1] = np.inf
    x[2] = -1e30
    return x


@pytest.mark.triton
def test_the_cpu_config_is_served_by_tritons_onnxruntime_backend(shipped_servers):
    onnxruntime, python = (model_config(shipped_servers[b]) for b in ("onnxruntime", "python"))
    assert onnxruntime["backend"] == "onnxruntime" and onnxruntime["platform"] == "onnxruntime_onnx"
    assert python["backend"] == "python"
    assert onnxruntime["parameters"]["layout"] == python["parameters"]["layout"]  # the same contract
    assert [g["kind"] for g in onnxruntime["instance_group"]] == ["KIND_CPU"] * len(onnxruntime["instance_group"])
    assert shipped_servers["onnxruntime"].describe() == "onnxruntime backend, configs/cpu.pbtxt"


@pytest.mark.triton
@pytest.mark.parametrize("batch", [1, 7, 4096, "hostile"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_both_backends_answer_exactly_what_onnxruntime_computes_in_process(shipped_servers, batch, protocol):
    from maddpg_client import LocalPolicy, TritonPolicy

    local = LocalPolicy(SHIPPED, allow_non_finite=True)
    rng = np.random.default_rng(16)
    if batch == "hostile":
        x = hostile_batch(local.layout, rng)
    else:
        x = rng.standard_normal((batch, *local.layout.observation_shape)).astype(np.float32) * 3
    expected = local.act(x)
    low, high = local.layout.action_bounds()
    for backend, server in shipped_servers.items():
        url = server.http_url if protocol == "http" else server.grpc_url
        with TritonPolicy(url, protocol=protocol, allow_non_finite=True, timeout=60) as policy:
            served = policy.act(x)
        assert served.shape == expected.shape, backend
        assert np.abs(served - expected).max() <= 1e-6, backend
        assert np.isfinite(served).all() and (served >= low).all() and (served <= high).all(), backend


@pytest.mark.triton
def test_raw_kserve_json_through_the_onnxruntime_backend_equals_in_process(shipped_servers):
    """The README's curl request, against what Kubernetes serves."""
    from maddpg_client import LocalPolicy

    local = LocalPolicy(SHIPPED)
    x = np.random.default_rng(3).standard_normal((2, *local.layout.observation_shape)).astype(np.float32)
    body = {"inputs": [{"name": "observations", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    request = urllib.request.Request(f"http://{shipped_servers['onnxruntime'].http_url}/v2/models/{MODEL}/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.load(response)
    (output,) = answer["outputs"]
    actions = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    assert np.abs(actions - local.act(x)).max() <= 1e-6
    # The README shows this answer: its model_version is the one the shipped repository serves, the newest.
    newest = max(int(p.name) for p in (SHIPPED / MODEL).iterdir() if p.name.isdigit())
    assert answer["model_version"] == str(newest)
    readme = (SHIPPED.parent / "README.md").read_text()
    assert f'{{"model_name":"{MODEL}","model_version":"{newest}","outputs"' in readme


# --- the build ----------------------------------------------------------------------------------------------------
def test_a_current_build_is_found_and_not_redone():
    library = onnxruntime_backend.installed()
    assert library is not None, "run `make setup`: it builds the backend"
    before = library.stat().st_mtime_ns
    result = onnxruntime_backend.build(sources_dir=Path("/nonexistent"), progress=False)  # never reads the sources
    assert result.built is False and result.library == library
    assert library.stat().st_mtime_ns == before
    recorded = json.loads((library.parent / "build.json").read_text())
    assert recorded["digest"] == onnxruntime_backend.build_digest()
    assert [s["sha256"] for s in recorded["sources"]] == [s.sha256 for s in SOURCES]


def test_a_source_that_does_not_match_its_pinned_checksum_is_refused(tmp_path):
    if not SHARED_SOURCES.is_dir():
        pytest.skip(f"needs the pinned archives in {SHARED_SOURCES}")
    sources = tmp_path / "sources"
    shutil.copytree(SHARED_SOURCES, sources)
    tampered = sources / SOURCES[2].file
    tampered.chmod(0o644)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(BackendBuildError, match=rf"{tampered.name} has sha256 .* not the pinned"):
        onnxruntime_backend.build(sources_dir=sources, cache_dir=cache, progress=False)
    assert onnxruntime_backend.installed(cache) is None  # nothing half-built is ever found


def test_a_sources_directory_without_an_archive_says_which(tmp_path):
    if not SHARED_SOURCES.is_dir():
        pytest.skip(f"needs the pinned archives in {SHARED_SOURCES}")
    sources = tmp_path / "sources"
    shutil.copytree(SHARED_SOURCES, sources)
    (sources / SOURCES[0].file).unlink()
    with pytest.raises(BackendBuildError, match=rf"{SOURCES[0].file} is missing"):
        onnxruntime_backend.build(sources_dir=sources, cache_dir=tmp_path / "cache", progress=False)


def test_a_missing_prerequisite_is_named_in_one_line(monkeypatch, tmp_path):
    absent = onnxruntime_backend.Prerequisite("RapidJSON's CMake package", "rapidjson-dev", lambda: False)
    monkeypatch.setattr(onnxruntime_backend, "PREREQUISITES", (*onnxruntime_backend.PREREQUISITES[:3], absent))
    monkeypatch.setattr(onnxruntime_backend, "_apt_installer", lambda: None)  # as a user without root or sudo
    with pytest.raises(BackendBuildError) as raised:
        onnxruntime_backend.build(sources_dir=SHARED_SOURCES, cache_dir=tmp_path / "cache", progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "RapidJSON" in message and "apt-get install rapidjson-dev" in message


def test_the_build_command_says_it_is_current():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "maddpg_serving.onnxruntime_backend", "build", "--no-progress"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime backend is current" in result.stdout


def test_one_cache_root_moves_every_cache_the_backend_build_included(monkeypatch, tmp_path):
    """MADDPG_CITYLEARN_CACHE moves the trainer's teacher passes; it must move the backend build with them."""
    from maddpg_core.files import cache_root

    monkeypatch.setenv("MADDPG_CITYLEARN_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert onnxruntime_backend.install_directory().parent == tmp_path / "cache" / "triton-backends"
    assert onnxruntime_backend.installed() is None  # nothing was built there
    monkeypatch.delenv("MADDPG_CITYLEARN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "maddpg-citylearn"
