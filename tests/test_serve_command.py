"""`maddpg-citylearn serve` as a user runs it: a real process, real ports, Ctrl-C, busy ports, broken repositories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from maddpg_serving.local_triton import SHM_DIR, free_ports

pytestmark = pytest.mark.triton
# Python-backend regions: this project's servers name theirs maddpg-<pid>-<token>-...; Triton's default prefix too.
SHM_NAMES = ("maddpg-", "triton_python_backend_shm_region_")


def serve_command(repository: Path, ports, *extra: str) -> list[str]:
    return [sys.executable, "-m", "maddpg_ops.cli", "serve", "--repository", str(repository),
            "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), *extra]


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    os.set_blocking(process.stdout.fileno(), False)
    while time.monotonic() < deadline:
        chunk = process.stdout.read()  # bytes, non-blocking: None when nothing arrived yet
        if chunk:
            seen += chunk.decode(errors="replace")
            if needle in seen:
                return seen
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not printed within {timeout}s; output so far:\n{seen}")


def children_named(parent: int, name: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True).stdout
    return [int(pid) for pid, ppid, comm in (line.split(None, 2) for line in out.splitlines()[1:])
            if int(ppid) == parent and comm.strip() == name]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def shm_regions() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_NAMES)} if SHM_DIR.is_dir() else set()


@pytest.mark.parametrize(("backend", "variant"), [("onnxruntime", "configs/cpu.pbtxt"),
                                                  ("python", "configs/local.pbtxt")])
def test_serve_prints_endpoints_serves_and_stops_cleanly_on_ctrl_c(exported_repository, backend, variant):
    ports = free_ports()
    shm_before = shm_regions()
    process = subprocess.Popen(serve_command(exported_repository, ports, "--backend", backend), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        output = wait_for_line(process, "ready:", timeout=120)
        assert f"http://127.0.0.1:{ports.http}" in output and f"127.0.0.1:{ports.grpc}" in output
        assert f"127.0.0.1:{ports.metrics}/metrics" in output
        assert f"{backend} backend, config variant" in output and f"({backend} backend, {variant})" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        servers = children_named(process.pid, "tritonserver")
        assert len(servers) == 1, "serve should have started exactly one tritonserver"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not alive(servers[0]), "tritonserver outlived serve"
    assert shm_regions() <= shm_before, "shared-memory regions were left behind"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=2)


def test_a_second_serve_on_a_busy_port_fails_before_starting_and_clearly(triton_server, exported_repository):
    result = subprocess.run(serve_command(exported_repository, triton_server.ports), capture_output=True, text=True,
                            timeout=60)  # a bounded wait, not a timing assert
    assert result.returncode == 1
    assert "tritonserver exited" not in result.stderr  # refused by the port check, not launched and failed
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"port {triton_server.ports.http}" in errors[0] and "already in use" in errors[0]
    assert triton_server.is_ready(), "the running server must not be disturbed"


@pytest.mark.parametrize("case", ["unresolvable host", "not this machine's address", "one port twice"])
def test_a_bad_host_or_repeated_port_is_named_as_such_before_starting(case, exported_repository):
    ports = free_ports()
    extra, expected = {
        "unresolvable host": (["--host", "not-a-host.invalid"], "--host 'not-a-host.invalid' is not a valid address"),
        # TEST-NET-3 (RFC 5737): never an address of this machine.
        "not this machine's address": (["--host", "203.0.113.7"], "cannot listen on 203.0.113.7"),
        "one port twice": (["--grpc-port", str(ports.http)], f"--http-port and --grpc-port are both {ports.http}"),
    }[case]
    result = subprocess.run([*serve_command(exported_repository, ports), *extra], capture_output=True, text=True,
                            timeout=60)  # a bounded wait, not a timing assert
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "already in use" not in result.stderr and "Default is" not in result.stderr
    assert "tritonserver exited" not in result.stderr  # refused by the checks, not launched and failed


def test_a_repository_without_versions_is_refused_before_starting(tmp_path):
    (tmp_path / "maddpg_ctde").mkdir()
    result = subprocess.run(serve_command(tmp_path, free_ports()), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "has no numbered version directory" in result.stderr


def test_a_model_that_cannot_load_ends_with_the_server_log_and_leaves_nothing_behind(tmp_path, exported_repository):
    broken = tmp_path / "repo"
    shutil.copytree(exported_repository, broken)
    (broken / "maddpg_ctde" / "1" / "model.py").write_text("raise RuntimeError('this stub cannot start')\n")
    shm_before = shm_regions()
    result = subprocess.run(serve_command(broken, free_ports(), "--backend", "python", "--ready-timeout", "60"),
                            capture_output=True, text=True, timeout=120)  # a bounded wait, not a timing assert
    assert result.returncode == 1
    assert "tritonserver" in result.stderr and "this stub cannot start" in result.stderr
    assert shm_regions() <= shm_before


def test_serve_help_lists_the_options_users_need():
    result = subprocess.run([sys.executable, "-m", "maddpg_ops.cli", "serve", "--help"], capture_output=True, text=True)
    for option in ("--repository", "--http-port", "--grpc-port", "--metrics-port", "--instances", "--backend"):
        assert option in result.stdout
    # --instances resizes whichever variant is served (cpu.pbtxt by default where the onnxruntime backend is built).
    instances = " ".join(result.stdout.split("--instances")[1].split("--backend")[0].split())
    assert "configs/cpu.pbtxt on the onnxruntime backend, configs/local.pbtxt on the python backend" in instances


def ready_line_of_serve(repository: Path, *extra: str, env: dict | None = None) -> str:
    """Start `serve`, return what it printed up to `ready:`, stop it with Ctrl-C."""
    process = subprocess.Popen(serve_command(repository, free_ports(), *extra), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env)
    try:
        output = wait_for_line(process, "ready:", timeout=120)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    return output


@pytest.mark.parametrize(("built", "expected"), [(True, "(onnxruntime backend, configs/cpu.pbtxt)"),
                                                 (False, "(python backend, configs/local.pbtxt)")])
def test_serve_runs_the_onnxruntime_backend_when_it_is_built_and_the_python_one_otherwise(
        exported_repository, tmp_path, built, expected):
    # The build lives in the cache directory: an empty one is a machine where `make setup` could not build it.
    env = None if built else {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "no-build-here")}
    assert expected in ready_line_of_serve(exported_repository, env=env)


def test_asking_for_the_onnxruntime_backend_where_it_is_not_built_is_one_clear_line(exported_repository, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "no-build-here")}
    result = subprocess.run(serve_command(exported_repository, free_ports(), "--backend", "onnxruntime"),
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "onnxruntime backend is not built" in errors[0] and "make setup" in errors[0]


def has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_the_gpu_config_is_refused_on_a_host_without_a_gpu(exported_repository):
    if has_gpu():
        pytest.skip("this host has a GPU: config.pbtxt's KIND_GPU group may load here")
    result = subprocess.run(serve_command(exported_repository, free_ports(), "--config-name", "default"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1
    assert "config.pbtxt" in errors[0] and "KIND_GPU but no GPUs are available" in errors[0]
    assert "--config-name cpu" in errors[0]
