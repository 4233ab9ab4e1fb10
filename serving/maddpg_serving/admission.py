"""The production pods' admission proxy (nginx in front of Triton), run here exactly as the pods run it.

Triton 2.51 cannot bound its own queue without its 500 ms lost wake-up (docs/dynamic-batching-stall.md), so the
production overlay puts nginx in every pod (``k8s/overlays/production/admission/nginx.conf``): at most a fixed number
of inference requests in flight per pod, excess answered at once (HTTP 429, gRPC RESOURCE_EXHAUSTED).
:class:`AdmissionProxy` starts Debian's ``nginx`` on that same file, with only its ports (and its scratch paths under
``/tmp``) rewritten to free ones on 127.0.0.1, in front of a :class:`~maddpg_serving.local_triton.LocalTritonServer`;
tests and benchmarks measure it. Stopped by PID like every server here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from maddpg_core.errors import ServerStartError

from . import processes
from .processes import reserve_ports

# The file the production pods mount (a source checkout's; the benchmarks and tests run from one).
PRODUCTION_CONFIG = Path(__file__).resolve().parents[2] / "k8s" / "overlays" / "production" / "admission" / "nginx.conf"
# What the file listens on and forwards to inside a pod (Triton's --http-port and --grpc-port).
POD_PORTS = {"http": 8100, "grpc": 8101}
TRITON_POD_PORTS = {"http": 8000, "grpc": 8001}


def in_flight_limit(config_text: str) -> int:
    """The bound the config enforces: its ``limit_conn inflight N`` (one value for HTTP and gRPC)."""
    limits = {int(n) for n in re.findall(r"^\s*limit_conn\s+inflight\s+(\d+);", config_text, re.MULTILINE)}
    if len(limits) != 1:
        raise ValueError(f"expected one `limit_conn inflight N` for HTTP and gRPC, found {sorted(limits) or 'none'}")
    return limits.pop()


def local_config(config_text: str, *, http_port: int, grpc_port: int, triton_http: int, triton_grpc: int,
                 scratch: Path) -> str:
    """The pod's config with its two listen ports, Triton's two ports and ``/tmp`` replaced; nothing else changes."""
    replacements = [
        (rf"listen {POD_PORTS['http']};", f"listen 127.0.0.1:{http_port};"),
        (rf"listen {POD_PORTS['grpc']} http2;", f"listen 127.0.0.1:{grpc_port} http2;"),
        (rf"server 127\.0\.0\.1:{TRITON_POD_PORTS['http']};", f"server 127.0.0.1:{triton_http};"),
        (rf"server 127\.0\.0\.1:{TRITON_POD_PORTS['grpc']};", f"server 127.0.0.1:{triton_grpc};"),
    ]
    text = config_text
    for pattern, value in replacements:
        text, count = re.subn(pattern, value, text)
        if count != 1:
            raise ValueError(f"the admission config has {count} lines matching {pattern!r}, expected one")
    return re.sub(r"(?<=[\s])/tmp/", f"{scratch}/", text)


@dataclass
class AdmissionProxy:
    """nginx with the production admission config in front of a started LocalTritonServer (its HTTP and gRPC ports)."""

    triton_http_port: int
    triton_grpc_port: int
    config: Path = PRODUCTION_CONFIG
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.limit = in_flight_limit(Path(self.config).read_text())

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    def start(self, timeout: float = 30.0) -> "AdmissionProxy":
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if binary is None:
            raise ServerStartError("nginx is not installed (the production admission proxy): install Debian's "
                                   "nginx-light (apt-get install nginx-light; `make setup` does it)")
        if not self.ports:
            self.ports = dict(zip(("http", "grpc"), reserve_ports(2, self.host)))
        self._workdir = Path(tempfile.mkdtemp(prefix="maddpg-admission-"))
        conf = self._workdir / "nginx.conf"
        conf.write_text(local_config(Path(self.config).read_text(), http_port=self.ports["http"],
                                     grpc_port=self.ports["grpc"], triton_http=self.triton_http_port,
                                     triton_grpc=self.triton_grpc_port, scratch=self._workdir))
        log = open(self._workdir / "nginx.log", "wb")
        try:
            self.process = processes.start_group([binary, "-e", "stderr", "-p", str(self._workdir), "-c", str(conf),
                                                  "-g", "daemon off;"], output=log)
            processes.wait_ready(self.process, self.is_ready, timeout)
        except processes.ProcessExited as exited:
            self.stop()
            raise ServerStartError(f"nginx (admission) exited with status {exited.returncode}") from None
        except processes.ReadyTimeout:
            self.stop()
            raise ServerStartError(f"nginx (admission) was not ready after {timeout:.0f} s") from None
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/admission/healthz", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            processes.stop_group(self.process, timeout, name="nginx (admission)")
            self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "AdmissionProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
