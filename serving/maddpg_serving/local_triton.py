"""Run the real ``tritonserver`` bundled in the nvidia-pytriton wheel on a model repository, without Docker.

Two backends can serve the model (``docs/operations.md`` says how to choose and what each needs):

``onnxruntime``  Triton's own onnxruntime backend, built locally by :mod:`maddpg_serving.onnxruntime_backend`
                 (``make setup`` does it), serving ``configs/cpu.pbtxt``: what Kubernetes' CPU nodes run.
``python``       the python backend the wheel ships, serving ``configs/local.pbtxt``: ``model.py`` runs the same
                 ``model.onnx`` with onnxruntime in a stub process. The fallback where the other is not built.

``backend="auto"`` (the default of ``serve``, ``evaluate --serve``, the benchmarks and the tests) takes onnxruntime
when it is built and every model has a ``cpu`` variant, and python otherwise.

What the binary needs (measured): a backend directory holding ``python/{libtriton_python.so,
triton_python_backend_utils.py, triton_python_backend_stub}`` (the stub built for this interpreter's Python) and, for
onnxruntime, ``onnxruntime/`` as :func:`~maddpg_serving.onnxruntime_backend.assemble_backend_directory` lays it out;
``LD_LIBRARY_PATH`` starting with this interpreter's LIBDIR (else the stub may load another libpython) and the wheel's
``nvidia_pytriton.libs``; this environment's ``bin/`` first on ``PATH``, so the stub finds numpy and onnxruntime.

The server runs in its own process group (:mod:`maddpg_serving.processes`), every wait is bounded, and
:meth:`LocalTritonServer.stop` always ends it by PID (SIGTERM, then SIGKILL) and removes the python backend's
shared-memory regions, only its own: each server gets a prefix of its own
(``--backend-config=python,shm-region-prefix-name=...``), so servers started side by side never touch each other's.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from maddpg_core.errors import ServerStartError

from . import onnxruntime_backend, processes
from .processes import reserve_ports
from .server_config import BackendSetting, TritonPorts, TritonServerConfig

log = logging.getLogger(__name__)

__all__ = ["LocalTritonServer", "TritonPorts", "free_ports", "reserve_ports", "default_backend", "BACKEND_CHOICES"]

SHM_DIR = Path("/dev/shm")
BACKEND_CHOICES = ("auto", "onnxruntime", "python")
# The config variant each backend serves by default.
DEFAULT_VARIANTS = {"onnxruntime": "cpu", "python": "local"}
_TRITON_ERROR = re.compile(r"^E\d{4} [\d:.]+ \d+ \S+\] (.*)$")
# Error lines every CPU-only start prints; they never say why a model did not load.
_HARMLESS = ("CudaDriverHelper has not been initialized", "Unable to allocate pinned system memory",
             "CUDA memory pool disabled")
PYTHON_SHM_DEFAULT_BYTES = 4 * 1024 * 1024


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


def tritonserver_library(binary: Path) -> Path:
    """The core library the wheel renamed (``nvidia_pytriton.libs/libtritonserver-<hash>.so``)."""
    found = sorted((binary.parents[3] / "nvidia_pytriton.libs").glob("libtritonserver-*.so"))
    if not found:
        raise ServerStartError(f"no libtritonserver-*.so beside {binary}: reinstall nvidia-pytriton==0.7.0")
    return found[0]


def default_backend() -> str:
    """``onnxruntime`` where its build exists, else ``python``."""
    return "onnxruntime" if onnxruntime_backend.installed() is not None else "python"


def _models(repository: Path) -> list[Path]:
    return [p for p in sorted(repository.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def variant_file(model_dir: Path, config_name: str) -> Path:
    """The file Triton reads for ``config_name`` (``default``: config.pbtxt; a missing variant falls back to it)."""
    if config_name != "default":
        variant = model_dir / "configs" / f"{config_name}.pbtxt"
        if variant.is_file():
            return variant
    return model_dir / "config.pbtxt"


def variant_backend(config_file: Path) -> str:
    """Which backend a config runs on (``platform: "onnxruntime_onnx"`` means onnxruntime)."""
    from maddpg_export.triton_config import parse_config  # protobuf only; no torch

    try:
        config = parse_config(config_file.read_text())
    except Exception as exc:  # noqa: BLE001 - a broken config is the user's to fix, said in one line
        raise ServerStartError(f"{config_file} is not a valid model config ({str(exc).splitlines()[0]}): re-export "
                               f"the model") from exc
    if config.backend:
        return config.backend
    return "onnxruntime" if config.platform.startswith("onnxruntime") else config.platform or "unknown"


@dataclass
class LocalTritonServer:
    """A tritonserver process on ``repository``, stopped by PID. Use as a context manager or call start()/stop()."""

    repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    host: str = "127.0.0.1"
    backend: str = "auto"                  # "auto", "onnxruntime" or "python"
    config_name: str | None = None         # None: the backend's variant (cpu / local); "default": config.pbtxt
    options: tuple[tuple[str, str], ...] = ()  # further tritonserver options, see TritonServerConfig
    log_verbose: int = 0
    exit_timeout_s: int = 5  # how long a SIGTERMed server waits for open connections before it stops anyway
    stdout_path: Path | None = None  # where the server's output goes; default a temp file
    instances: int | None = None     # resize the variant's instance groups (via a symlinked view of the repository)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.backend not in BACKEND_CHOICES:
            raise ServerStartError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
        self.process = None
        self.config: TritonServerConfig | None = None  # what runs, once started
        self._workdir: Path | None = None
        self._log_handle = None
        # Every region this server's python stubs create starts with this; stop() removes those and no others.
        self.shm_prefix = f"maddpg-{os.getpid()}-{secrets.token_hex(4)}-"

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

    @property
    def served_backend(self) -> str | None:
        return None if self.config is None else self.config.backend

    def describe(self) -> str:
        """``onnxruntime backend, configs/cpu.pbtxt`` (once started)."""
        return "not started" if self.config is None else f"{self.config.backend} backend, {self.config.variant_file}"

    # --- what runs ----------------------------------------------------------------------------------------------------
    def resolve(self) -> tuple[str, str]:
        """(backend, config variant) this server will run, checked against the repository and what is built."""
        self._check_repository()
        models = _models(self.repository)
        built = onnxruntime_backend.installed() is not None
        backend, config_name = self.backend, self.config_name
        if backend == "auto" and config_name is None:
            every_has_cpu = all((m / "configs" / "cpu.pbtxt").is_file() for m in models)
            backend = "onnxruntime" if built and every_has_cpu else "python"
        if config_name is None:
            config_name = DEFAULT_VARIANTS[backend]
        needs = {variant_backend(variant_file(m, config_name)) for m in models if variant_file(m, config_name).is_file()}
        if backend == "auto":
            backend = "onnxruntime" if "onnxruntime" in needs else "python"
        for need in needs:
            if need not in DEFAULT_VARIANTS:
                raise ServerStartError(f"config variant `{config_name}` needs Triton's {need} backend, which the local "
                                       f"server does not have: serve --config-name cpu or local")
            if need != backend:
                raise ServerStartError(f"config variant `{config_name}` runs on the {need} backend, not {backend}: "
                                       f"pass --backend {need}, or --config-name {DEFAULT_VARIANTS[backend]}")
        if backend == "onnxruntime" and not built:
            raise ServerStartError(
                "Triton's onnxruntime backend is not built here: run `python -m maddpg_serving.onnxruntime_backend "
                "build` (make setup does it), or serve with --backend python")
        return backend, config_name

    def server_config(self, backend_directory: Path, served_repository: Path, backend: str,
                      config_name: str) -> TritonServerConfig:
        settings = (BackendSetting("python", "shm-default-byte-size", str(PYTHON_SHM_DEFAULT_BYTES)),
                    BackendSetting("python", "shm-region-prefix-name", self.shm_prefix))
        return TritonServerConfig(
            repository=served_repository, backend_directory=backend_directory, backend=backend,
            config_name=None if config_name == "default" else config_name, ports=self.ports, host=self.host,
            backend_settings=settings, log_verbose=self.log_verbose, exit_timeout_s=self.exit_timeout_s,
            options=tuple(self.options))

    # --- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalTritonServer":
        if self.process is not None:
            raise ServerStartError("this server is already started")
        backend, config_name = self.resolve()
        self._check_ports()
        binary, python_backend, stub = tritonserver_install()
        self._workdir = Path(tempfile.mkdtemp(prefix="maddpg-triton-"))
        try:
            served = self.repository
            if self.instances is not None:
                served = resized_repository(self.repository, self.instances, config_name, self._workdir)
            backends = self._workdir / "backends"
            (backends / "python").mkdir(parents=True)
            for source in (python_backend / "libtriton_python.so", python_backend / "triton_python_backend_utils.py",
                           stub):
                shutil.copy2(source, backends / "python" / source.name)
            library = onnxruntime_backend.installed()
            if library is not None:
                onnxruntime_backend.assemble_backend_directory(backends / "onnxruntime", library,
                                                               tritonserver_library(binary))
            self.config = self.server_config(backends, served, backend, config_name)
            if self.stdout_path is None:  # outside the work dir: the log outlives the server, for post-mortems
                self.stdout_path = Path(tempfile.gettempdir()) / f"maddpg-tritonserver-{os.getpid()}-{self.ports.http}.log"
            self._log_handle = open(self.stdout_path, "ab")
            command = self.config.argv(binary)
            log.debug("starting %s", " ".join(command))
            self.process = processes.start_group(command, output=self._log_handle, env=_server_environment(binary))
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole process group. Returns the exit status."""
        status = None
        if self.process is not None:
            status = processes.stop_group(self.process, timeout, name="tritonserver")
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        for name in shm_regions(self.shm_prefix):  # what the stubs left behind (a killed stub never cleans up)
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

    def triton_errors(self, limit: int = 8) -> list[str]:
        """Triton's own error lines (``E<date> ... ] message``: why a model did not load), messages only."""
        if self.stdout_path is None or not self.stdout_path.exists():
            return []
        with open(self.stdout_path, errors="replace") as handle:
            found = [m.group(1).strip().strip('"') for m in map(_TRITON_ERROR.match, handle) if m]
        return [line for line in found if not line.startswith(_HARMLESS)][:limit]

    def log_summary(self, errors: int = 8, tail: int = 4) -> str:
        """Triton's own error lines and the last lines of its log."""
        if self.stdout_path is None or not self.stdout_path.exists():
            return "(no server log)"
        with open(self.stdout_path, errors="replace") as handle:
            lines = handle.readlines()
        found = [line for line in lines if _TRITON_ERROR.match(line) and not any(h in line for h in _HARMLESS)]
        found = found[:errors]
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
        models = _models(self.repository)
        if not models:
            raise ServerStartError(f"model repository {self.repository} holds no model: export one into it first")
        for model in models:
            if not any(p.is_dir() and p.name.isdigit() for p in model.iterdir()):
                raise ServerStartError(f"model {model.name} in {self.repository} has no numbered version directory")

    def _check_ports(self) -> None:
        """The host is an address of this machine, the three ports differ and are free: else one line saying which."""
        ports = self.ports.as_dict()
        for port in set(ports.values()):
            sharing = [f"--{name}-port" for name, p in ports.items() if p == port]
            if len(sharing) > 1:
                raise ServerStartError(f"{' and '.join(sharing)} are both {port}: each endpoint needs a port of its own")
        try:
            family, *_, address = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise ServerStartError(
                f"--host {self.host!r} is not a valid address (it does not resolve: {getattr(exc, 'strerror', exc)}): "
                f"pass an address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            ) from None
        for name, port in ports.items():
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((address[0], port, *address[2:]))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise ServerStartError(
                            f"cannot listen on {self.host} ({address[0]}): {exc.strerror}; --host must be an address of "
                            f"this machine, e.g. 127.0.0.1 or 0.0.0.0"
                        ) from None
                    raise ServerStartError(
                        f"{name} port {port} on {self.host} is already in use (another tritonserver?): stop it or pass "
                        f"--{name}-port with a free port"
                    ) from None

    def _wait_ready(self, timeout: float) -> None:
        try:
            processes.wait_ready(self.process, self.is_ready, timeout)
        except processes.ProcessExited as exited:
            raise ServerStartError(f"tritonserver ({self.describe()}) exited with status {exited.returncode} before "
                                   f"it was ready{self._reason()}:\n{self.log_summary()}") from None
        except processes.ReadyTimeout:
            raise ServerStartError(
                f"tritonserver ({self.describe()}) was not ready after {timeout:.0f} s (a model that cannot load, or a "
                f"python stub that cannot start, keeps it 'loading'){self._reason()}; stopped it:\n{self.log_summary()}"
            ) from None

    def _reason(self) -> str:
        errors = self.triton_errors(1)
        if not errors:
            return ""
        if "KIND_GPU but no GPUs are available" in errors[0]:
            return f": {errors[0]} (this host has no GPU: serve configs/cpu.pbtxt, --config-name cpu)"
        return f": {errors[0]}"


def shm_regions(prefix: str) -> set[str]:
    """Names of the shared-memory regions under /dev/shm that start with ``prefix``."""
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)}


def resized_repository(repository: Path, instances: int, config_name: str, workdir: Path) -> Path:
    """A view of ``repository`` under ``workdir`` whose ``config_name`` variant runs ``instances`` instances.

    Version directories are symlinked, not copied, and the user's repository is never modified.
    """
    from maddpg_export.triton_config import with_instance_count  # protobuf only; no torch

    view = workdir / "repository"
    for model in _models(repository):
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
