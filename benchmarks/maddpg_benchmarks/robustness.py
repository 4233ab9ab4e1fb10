"""What a client sees when the server cannot keep up, or goes away for a moment: a bounded flood against a model
with a small queue, and a server restarted under a stepping client.

``flood``             many requests at once (bounded in count, each bounded by the client timeout) on 127.0.0.1;
                      every outcome is recorded with how long it took to come back
``benchmarks/overload.py`` measures it against what production runs; tests/test_overload.py asserts on the outcomes.
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
