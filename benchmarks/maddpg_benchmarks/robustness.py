"""What a client sees when the server cannot keep up, or goes away for a moment: a bounded flood against a model
with a small queue, and a server restarted under a stepping client.

``flood``             many requests at once (bounded in count, each bounded by the client timeout) on 127.0.0.1;
                      every outcome is recorded with how long it took to come back
``restart_recovery``  a client stepping through ``act`` calls while the server is stopped and started again: how long
                      the client went without an answer, and how much of that was the server starting

``benchmarks/robustness.py`` runs both and prints the figures; tests/test_overload.py asserts on the outcomes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from maddpg_client.triton_policy import RetryPolicy, TritonPolicy
from maddpg_core.errors import PolicyError

HOST = "127.0.0.1"
MAX_FLOOD_REQUESTS = 10_000


@dataclass(frozen=True)
class Outcome:
    index: int                     # which request (row of the flood's observations)
    kind: str                      # "ok" or the error class name, e.g. "PolicyOverloadedError"
    seconds: float                 # from sending to the answer or the error
    actions: np.ndarray | None = None
    message: str = ""


@dataclass
class FloodResult:
    outcomes: list[Outcome] = field(default_factory=list)
    client_timeout_s: float = 0.0

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def counts(self) -> Counter:
        return Counter(o.kind for o in self.outcomes)

    def latency_ms(self, kind: str) -> dict[str, float]:
        seconds = np.sort([o.seconds for o in self.of(kind)])
        if seconds.size == 0:
            return {}
        return {"count": int(seconds.size), "p50": 1e3 * float(np.percentile(seconds, 50)),
                "p95": 1e3 * float(np.percentile(seconds, 95)), "max": 1e3 * float(seconds[-1])}


def flood(url: str, protocol: str, observations: np.ndarray, *, concurrency: int = 32,
          client_timeout_s: float = 30.0, model: str = "maddpg_ctde") -> FloodResult:
    """Send ``observations[i]`` (each a batch ``[rows, agents, obs_width]``) as one request each, ``concurrency`` at
    a time, without retries: every rejection is seen as it comes back. Only to 127.0.0.1."""
    if not url.startswith(f"{HOST}:"):
        raise ValueError(f"floods are only sent to {HOST}, not {url}")
    if len(observations) > MAX_FLOOD_REQUESTS:
        raise ValueError(f"at most {MAX_FLOOD_REQUESTS} requests in one flood")
    policy = TritonPolicy(url, protocol=protocol, model=model, timeout=client_timeout_s, retry=RetryPolicy(attempts=1))
    _ = policy.layout  # config read once, before the flood
    result, lock, next_index = FloodResult(client_timeout_s=client_timeout_s), threading.Lock(), iter(range(len(observations)))

    def worker() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                actions = policy.act(observations[index])
                outcome = Outcome(index, "ok", time.perf_counter() - started, actions)
            except PolicyError as exc:
                outcome = Outcome(index, type(exc).__name__, time.perf_counter() - started, message=str(exc))
            with lock:
                result.outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    # Each request ends within the client timeout; the whole flood within that many rounds of it.
    deadline = time.monotonic() + client_timeout_s * (len(observations) / concurrency + 1)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    policy.close()
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError("the flood did not finish within its bound")
    result.outcomes.sort(key=lambda o: o.index)
    return result


@dataclass(frozen=True)
class Recovery:
    steps: int
    failed_steps: int               # steps that raised after the retry budget (0 when the client rode it out)
    longest_gap_s: float            # longest time between two answered steps: what the client went without
    server_down_s: float            # from stop() called to the restarted server ready
    first_answer_after_ready_s: float  # the client's backoff on top of the server's own restart


def restart_recovery(server, observations: np.ndarray, *, steps: int = 300, restart_after: int = 100,
                     retry_seconds: float = 30.0, protocol: str = "http", model: str = "maddpg_ctde") -> Recovery:
    """Step ``steps`` ``act`` calls; after ``restart_after`` of them another thread stops ``server`` (a
    LocalTritonServer) and starts it again on the same ports while the client keeps stepping."""
    url = server.http_url if protocol == "http" else server.grpc_url
    policy = TritonPolicy(url, protocol=protocol, model=model, retry=RetryPolicy.for_seconds(retry_seconds))
    _ = policy.layout
    marks: dict[str, float] = {}
    reached = threading.Event()

    def restart() -> None:
        reached.wait()
        marks["stopped"] = time.monotonic()
        server.stop()
        server.start(timeout=120)
        marks["ready"] = time.monotonic()

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    answered, failed = [], 0
    for step in range(steps):
        if step == restart_after:
            reached.set()
        try:
            policy.act(observations[step % len(observations)])
            answered.append(time.monotonic())
        except PolicyError:
            failed += 1
    restarter.join(180)
    policy.close()
    gaps = np.diff(answered) if len(answered) > 1 else np.zeros(1)
    after_ready = [t for t in answered if t >= marks.get("ready", float("inf"))]
    return Recovery(steps=steps, failed_steps=failed, longest_gap_s=float(gaps.max()),
                    server_down_s=marks["ready"] - marks["stopped"],
                    first_answer_after_ready_s=(after_ready[0] - marks["ready"]) if after_ready else float("nan"))
