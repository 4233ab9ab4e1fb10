"""Read Triton's Prometheus endpoint (``:8002/metrics``) and turn its counters into the figures operators ask for.

Counters are cumulative since the server started, so the useful numbers are differences between two snapshots:
``after - before`` gives what a load test or an evaluation run caused. Triton updates them a little after it has
answered, so a snapshot taken right after the last response can miss the last requests: take the closing one with
:func:`scrape_settled`.
"""

from __future__ import annotations

import re
import time
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


def scrape_settled(url: str, model: str, *, expected_success: float | None = None, timeout_s: float = 5.0,
                   interval_s: float = 0.05, timeout: float = 5.0) -> ModelMetrics:
    """:func:`scrape` once Triton's counters have caught up with the requests already answered.

    With ``expected_success`` (the success count the caller knows it caused, plus the count before), poll until the
    count reaches it; without, until two reads in a row agree. Either way at most ``timeout_s`` seconds: the last read
    is returned then, and the caller compares it with what it expected (a server that restarted starts from zero).
    """
    deadline = time.monotonic() + timeout_s
    previous = scrape(url, model, timeout)
    while True:
        if expected_success is not None and previous.request_success >= expected_success:
            return previous
        if time.monotonic() >= deadline:
            return previous
        time.sleep(interval_s)
        current = scrape(url, model, timeout)
        if expected_success is None and current == previous:
            return current
        previous = current
