"""A tritonserver command line as data: one frozen dataclass, rendered to argv in one place.

:class:`TritonServerConfig` holds everything the local launcher decides (repository, config variant, backend, ports,
addresses, backend settings, log verbosity, exit timeout); :meth:`TritonServerConfig.argv` is the only code that turns
it into ``--name=value`` arguments. Options the project does not model (a Kubernetes manifest's
``--strict-readiness=true``, ``--http-restricted-api=...``) go in ``options`` as ``(name, value)`` pairs; a pair that
names an option the config already owns is refused, so nothing can silently override a port or the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("onnxruntime", "python")


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def as_dict(self) -> dict[str, int]:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}


@dataclass(frozen=True)
class BackendSetting:
    """One ``--backend-config=<backend>,<name>=<value>``."""

    backend: str
    name: str
    value: str


# Options rendered from the typed fields below; ``options`` may not name them.
OWNED_OPTIONS = frozenset({
    "model-repository", "model-config-name", "backend-directory", "backend-config", "allow-gpu-metrics",
    "http-address", "http-port", "grpc-address", "grpc-port", "metrics-address", "metrics-port", "log-verbose",
    "exit-timeout-secs",
})


@dataclass(frozen=True)
class TritonServerConfig:
    repository: Path
    backend_directory: Path
    backend: str                          # the backend the served variant runs on: "onnxruntime" or "python"
    config_name: str | None               # ``configs/<name>.pbtxt``; None serves each model's ``config.pbtxt``
    ports: TritonPorts = TritonPorts()
    host: str = "127.0.0.1"
    backend_settings: tuple[BackendSetting, ...] = ()
    log_verbose: int = 0
    exit_timeout_s: int = 5               # how long a SIGTERMed server waits for open requests before it stops anyway
    allow_gpu_metrics: bool = False       # off: on a host without a GPU it only adds warnings
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        clashing = sorted({name for name, _ in self.options if name.lstrip("-") in OWNED_OPTIONS})
        if clashing:
            raise ValueError(f"options {', '.join(clashing)} are set by the config's own fields; set those instead")

    @property
    def variant_file(self) -> str:
        return "config.pbtxt" if self.config_name is None else f"configs/{self.config_name}.pbtxt"

    def argv(self, binary: Path | str) -> list[str]:
        arguments = [
            str(binary),
            f"--model-repository={Path(self.repository).resolve()}",
            # Without the flag Triton reads config.pbtxt; with it, configs/<name>.pbtxt.
            *([f"--model-config-name={self.config_name}"] if self.config_name is not None else []),
            f"--backend-directory={self.backend_directory}",
            *(f"--backend-config={s.backend},{s.name}={s.value}" for s in self.backend_settings),
            f"--allow-gpu-metrics={str(self.allow_gpu_metrics).lower()}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        return arguments + [f"--{name.lstrip('-')}={value}" for name, value in self.options]
