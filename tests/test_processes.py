"""Child processes never outlive their owner, servers side by side never touch each other's shared memory, and the
server command line comes from one typed config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maddpg_serving import processes
from maddpg_serving.local_triton import SHM_DIR, LocalTritonServer, free_ports, shm_regions
from maddpg_serving.server_config import BackendSetting, TritonPorts, TritonServerConfig

# A parent that ignores SIGTERM and a child that does too: only SIGKILL to the whole group ends them.
STUBBORN = ("import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()


def test_stop_group_ends_a_process_that_ignores_sigterm_and_its_children():
    process = processes.start_group([sys.executable, "-c", STUBBORN], output=subprocess.PIPE, stderr=None)
    child = int(process.stdout.readline())
    assert alive(process.pid) and alive(child)
    started = time.monotonic()
    status = processes.stop_group(process, timeout=1.0)
    assert status == -9  # it took SIGKILL
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:  # the child is reaped by init after the group's SIGKILL
        time.sleep(0.05)
    assert not alive(child), "a child in the group outlived stop_group"
    process.stdout.close()


def test_wait_ready_reports_an_exit_and_is_bounded():
    exiting = processes.start_group([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(processes.ProcessExited) as exited:
        processes.wait_ready(exiting, lambda: False, timeout=30)
    assert exited.value.returncode == 3

    sleeping = processes.start_group([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = time.monotonic()
        with pytest.raises(processes.ReadyTimeout):
            processes.wait_ready(sleeping, lambda: False, timeout=0.5, interval=0.05)
        assert time.monotonic() - started < 10
    finally:
        processes.stop_group(sleeping, timeout=5)
    assert sleeping.poll() is not None


def test_reserved_ports_are_distinct():
    ports = processes.reserve_ports(12)
    assert len(set(ports)) == 12 and all(0 < p < 65536 for p in ports)


def test_the_command_line_is_rendered_from_the_typed_config(tmp_path):
    config = TritonServerConfig(
        repository=tmp_path, backend_directory=tmp_path / "backends", backend="onnxruntime", config_name="cpu",
        ports=TritonPorts(1001, 1002, 1003), host="127.0.0.1",
        backend_settings=(BackendSetting("python", "shm-region-prefix-name", "p-"),), exit_timeout_s=7,
        options=(("strict-readiness", "true"),))
    argv = config.argv("/bin/tritonserver")
    assert argv[0] == "/bin/tritonserver"
    for expected in (f"--model-repository={tmp_path.resolve()}", "--model-config-name=cpu",
                     f"--backend-directory={tmp_path / 'backends'}", "--backend-config=python,shm-region-prefix-name=p-",
                     "--http-port=1001", "--grpc-port=1002", "--metrics-port=1003", "--http-address=127.0.0.1",
                     "--exit-timeout-secs=7", "--allow-gpu-metrics=false", "--strict-readiness=true"):
        assert expected in argv
    default = TritonServerConfig(tmp_path, tmp_path, "onnxruntime", config_name=None)
    assert not any(a.startswith("--model-config-name") for a in default.argv("x"))  # config.pbtxt
    assert default.variant_file == "config.pbtxt" and config.variant_file == "configs/cpu.pbtxt"


def test_options_cannot_override_what_the_config_owns(tmp_path):
    with pytest.raises(ValueError, match="http-port"):
        TritonServerConfig(tmp_path, tmp_path, "python", "local", options=(("--http-port", "9"),))
    with pytest.raises(ValueError, match="unknown backend"):
        TritonServerConfig(tmp_path, tmp_path, "tensorrt", "local")


@pytest.mark.triton
def test_servers_side_by_side_keep_their_own_shared_memory(exported_repository):
    from maddpg_client import TritonPolicy

    first = LocalTritonServer(exported_repository, ports=free_ports(), backend="python")
    second = LocalTritonServer(exported_repository, ports=free_ports(), backend="python")
    assert first.shm_prefix != second.shm_prefix
    try:
        first.start(timeout=120)
        second.start(timeout=120)  # started after the first: its regions are newer than the first's start
        own_first, own_second = shm_regions(first.shm_prefix), shm_regions(second.shm_prefix)
        assert own_first and own_second, "each python-backend server maps regions under its own prefix"
        argv = first.config.argv("tritonserver")
        assert f"--backend-config=python,shm-region-prefix-name={first.shm_prefix}" in argv
        first.stop()
        assert not shm_regions(first.shm_prefix), "stop() leaves its own regions behind"
        assert shm_regions(second.shm_prefix) == own_second, "stop() removed another server's regions"
        assert all((SHM_DIR / name).exists() for name in own_second)
        with TritonPolicy(second.http_url) as policy:
            assert policy.act(np.zeros(policy.layout.observation_shape, np.float32)).shape == policy.layout.action_shape
    finally:
        first.stop()
        second.stop()
    assert not shm_regions(second.shm_prefix)
