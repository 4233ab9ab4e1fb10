"""Run the real ``tritonserver`` bundled in the nvidia-pytriton wheel, on a model repository, without Docker.

That build has only the python backend, so the repository's ``local`` config variant is used: the python backend runs
the same ``model.onnx`` with onnxruntime. What the binary needs (measured, see docs/operations.md):

* a backend directory holding ``python/{libtriton_python.so, triton_python_backend_utils.py,
  triton_python_backend_stub}``, the stub built for this interpreter's Python version;
* ``LD_LIBRARY_PATH`` starting with this interpreter's LIBDIR (else the stub may load another libpython) and the
  wheel's ``nvidia_pytriton.libs``;
* this environment's ``bin/`` first on ``PATH``, so the stub finds numpy and onnxruntime.

The server is started in its own process group, every wait is bounded, and :meth:`LocalTritonServer.stop` always ends
it by PID (SIGTERM, then SIGKILL) and removes the shared-memory regions its python stubs leave behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from maddpg_core.errors import ServerStartError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_TRITON_ERROR = re.compile(r"^E\d{4} ")
# Shared-memory regions the python backend creates (one per model instance and one for the server's stubs).
SHM_PREFIXES = ("triton_python_backend_shm_region_",)


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def as_dict(self) -> dict[str, int]:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def reserve_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (held open together so the kernel cannot hand out the same one twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_ports(host: str = "127.0.0.1") -> TritonPorts:
    """HTTP, gRPC and metrics ports for one server."""
    return TritonPorts(*reserve_ports(3, host))


def tritonserver_install() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend directory, stub for this Python) from the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerStartError(
            "the local tritonserver comes with nvidia-pytriton, which is not installed: "
            "pip install 'maddpg-citylearn[serve]'"
        ) from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    for path in (binary, backend / "libtriton_python.so", stub):
        if not path.exists():
            raise ServerStartError(
                f"{path} is missing from the nvidia-pytriton install (no python backend stub for Python {version}?): "
                f"reinstall nvidia-pytriton==0.7.0 on Python 3.8-3.13"
            )
    return binary, backend, stub


@dataclass
class LocalTritonServer:
    """A tritonserver process on ``repository``, stopped by PID. Use as a context manager or call start()/stop()."""

    repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    host: str = "127.0.0.1"
    config_name: str = "local"
    extra_args: Sequence[str] = ()
    log_verbose: int = 0
    exit_timeout_s: int = 5  # how long a SIGTERMed server waits for open connections before it stops anyway
    stdout_path: Path | None = None  # where the server's output goes; default a temp file
    instances: int | None = None     # resize the variant's instance groups (via a symlinked view of the repository)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._shm_before: set[str] = set()
        self._log_handle = None
        self._served_repository = self.repository

    # --- addresses ------------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self.stdout_path

    def command(self, backend_directory: Path | str = "<backend-dir>") -> list[str]:
        binary = tritonserver_install()[0]
        return [
            str(binary),
            f"--model-repository={self._served_repository.resolve()}",
            f"--model-config-name={self.config_name}",
            f"--backend-directory={backend_directory}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--allow-gpu-metrics=false",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]

    # --- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalTritonServer":
        if self.process is not None:
            raise ServerStartError("this server is already started")
        self._check_repository()
        self._check_ports()
        binary, backend, stub = tritonserver_install()
        self._workdir = Path(tempfile.mkdtemp(prefix="maddpg-triton-"))
        try:
            if self.instances is not None:
                self._served_repository = resized_repository(self.repository, self.instances, self.config_name,
                                                             self._workdir)
            backend_dir = self._workdir / "backends"
            (backend_dir / "python").mkdir(parents=True)
            for source in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
                shutil.copy2(source, backend_dir / "python" / source.name)
            if self.stdout_path is None:  # outside the work dir: the log outlives the server, for post-mortems
                self.stdout_path = Path(tempfile.gettempdir()) / f"maddpg-tritonserver-{os.getpid()}-{self.ports.http}.log"
            self._log_handle = open(self.stdout_path, "ab")
            self._shm_before = _shm_regions()
            command = self.command(backend_dir)
            log.info("starting %s", " ".join(command))
            self.process = subprocess.Popen(
                command, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_server_environment(binary), start_new_session=True,
            )
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole process group. Returns the exit status."""
        status = None
        if self.process is not None:
            status = _terminate(self.process, timeout)
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        leaked = _shm_regions() - self._shm_before
        for name in leaked:
            (SHM_DIR / name).unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return status

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        if self.stdout_path is None or not self.stdout_path.exists():
            return ""
        with open(self.stdout_path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))

    def log_summary(self, errors: int = 8, tail: int = 4) -> str:
        """Triton's own error lines (``E<date> ...``: why a model did not load) and the last lines of its log."""
        if self.stdout_path is None or not self.stdout_path.exists():
            return "(no server log)"
        with open(self.stdout_path, errors="replace") as handle:
            lines = handle.readlines()
        found = [line for line in lines if _TRITON_ERROR.match(line)][:errors]
        last = [line for line in lines[-tail:] if line not in found]
        return "".join(found + last).rstrip() + f"\n(full log: {self.stdout_path})"

    def __enter__(self) -> "LocalTritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- checks -------------------------------------------------------------------------------------------------------
    def _check_repository(self) -> None:
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository {self.repository} does not exist: export a model into it first "
                                   f"(`maddpg-citylearn export CHECKPOINT --repository {self.repository}`)")
        models = [p for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not models:
            raise ServerStartError(f"model repository {self.repository} holds no model: export one into it first")
        for model in models:
            if not any(p.is_dir() and p.name.isdigit() for p in model.iterdir()):
                raise ServerStartError(f"model {model.name} in {self.repository} has no numbered version directory")

    def _check_ports(self) -> None:
        for name, port in self.ports.as_dict().items():
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.host, port))
                except OSError:
                    raise ServerStartError(
                        f"{name} port {port} on {self.host} is already in use (another tritonserver?): stop it or pass "
                        f"--{name}-port with a free port"
                    ) from None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"tritonserver exited with status {self.process.returncode} before it was ready:\n"
                    f"{self.log_summary()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerStartError(
            f"tritonserver was not ready after {timeout:.0f} s (a model that cannot load, or a python stub that cannot "
            f"start, keeps it 'loading'); stopped it:\n{self.log_summary()}"
        )


def resized_repository(repository: Path, instances: int, config_name: str, workdir: Path) -> Path:
    """A view of ``repository`` under ``workdir`` whose ``config_name`` variant runs ``instances`` instances.

    Version directories are symlinked, not copied, and the user's repository is never modified.
    """
    from maddpg_export.triton_config import with_instance_count  # protobuf only; no torch

    view = workdir / "repository"
    for model in (p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        target = view / model.name
        target.mkdir(parents=True)
        for entry in model.iterdir():
            if entry.name != "configs" and not entry.name.startswith("."):
                (target / entry.name).symlink_to(entry.resolve())
        variant = model / ("config.pbtxt" if config_name in ("", "default") else f"configs/{config_name}.pbtxt")
        if not variant.is_file():
            raise ServerStartError(f"model {model.name} has no {variant.relative_to(model)}: re-export it")
        destination = target / variant.relative_to(model)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.is_symlink():
            destination.unlink()
        destination.write_text(with_instance_count(variant.read_text(), instances))
    return view


def _server_environment(binary: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = binary.parents[3] / "nvidia_pytriton.libs"  # site-packages/nvidia_pytriton.libs
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def _terminate(process: subprocess.Popen, timeout: float) -> int | None:
    status = None
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, timeout)
    # Whatever is left of the group (python stubs outliving the server) goes too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return process.wait(10) if status is None else status


def _shm_regions() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIXES)}
