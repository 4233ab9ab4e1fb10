"""Read Triton's Prometheus endpoint (``:8002/metrics``) and turn its counters into the figures operators ask for.

Counters are cumulative since the server started, so the useful numbers are differences between two snapshots:
``after - before`` gives what a load test or an evaluation run caused.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

from maddpg_core.errors import PolicyUnavailableError

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


@dataclass(frozen=True)
class ModelMetrics:
    """Counters of one model (all versions summed). Subtract two snapshots to get a window."""

    request_success: float = 0.0
    request_failure: float = 0.0
    inference_count: float = 0.0      # samples (batch rows) inferred
    execution_count: float = 0.0      # model executions (one per dynamic batch)
    request_duration_us: float = 0.0
    queue_duration_us: float = 0.0
    compute_input_duration_us: float = 0.0
    compute_infer_duration_us: float = 0.0
    compute_output_duration_us: float = 0.0

    def __sub__(self, other: "ModelMetrics") -> "ModelMetrics":
        return ModelMetrics(*(a - b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[float, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    @property
    def requests(self) -> float:
        return self.request_success + self.request_failure

    @property
    def average_batch_size(self) -> float:
        """Rows per model execution: above 1 means the dynamic batcher merged requests."""
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    @property
    def queue_us_per_request(self) -> float:
        return self.queue_duration_us / self.request_success if self.request_success else 0.0

    @property
    def compute_us_per_request(self) -> float:
        total = self.compute_input_duration_us + self.compute_infer_duration_us + self.compute_output_duration_us
        return total / self.request_success if self.request_success else 0.0

    @property
    def request_us_per_request(self) -> float:
        return self.request_duration_us / self.request_success if self.request_success else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "failures": self.request_failure,
            "inferences": self.inference_count,
            "executions": self.execution_count,
            "average_batch_size": self.average_batch_size,
            "queue_us_per_request": self.queue_us_per_request,
            "compute_us_per_request": self.compute_us_per_request,
            "request_us_per_request": self.request_us_per_request,
        }


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)] (comments skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            try:
                samples.append((match["name"], labels, float(match["value"])))
            except ValueError:
                continue
    return samples


def model_metrics(text: str, model: str) -> ModelMetrics:
    totals = dict.fromkeys(COUNTERS, 0.0)
    for name, labels, value in parse_metrics(text):
        if name in totals and labels.get("model") == model:
            totals[name] += value
    return ModelMetrics(*(totals[name] for name in COUNTERS))


def scrape(url: str, model: str, timeout: float = 5.0) -> ModelMetrics:
    """Fetch ``url`` (``http://host:8002/metrics``; ``host:8002`` also accepted) and summarise ``model``."""
    if not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError as exc:
        raise PolicyUnavailableError(f"cannot read Triton metrics at {url} ({exc}); is the metrics port open?") from exc
    return model_metrics(text, model)
