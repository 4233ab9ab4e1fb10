"""A bounded flood of requests through the project's own client, every outcome typed and timed: what a client sees
when the server cannot keep up (benchmarks/overload.py measures it against what production runs;
tests/test_overload.py and tests/test_prometheus_live.py assert on it)."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from maddpg_client.triton_policy import RetryPolicy, TritonPolicy
from maddpg_core.errors import PolicyError

from .load import HOST

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

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def counts(self) -> Counter:
        return Counter(o.kind for o in self.outcomes)


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

    def send(index: int) -> Outcome:
        started = time.perf_counter()
        try:
            actions = policy.act(observations[index])
        except PolicyError as exc:
            return Outcome(index, type(exc).__name__, time.perf_counter() - started, message=str(exc))
        return Outcome(index, "ok", time.perf_counter() - started, actions)

    pool = ThreadPoolExecutor(concurrency)
    try:  # each request ends within the client timeout, the whole flood within that many rounds of it
        bound = client_timeout_s * (len(observations) / concurrency + 1)
        return FloodResult(list(pool.map(send, range(len(observations)), timeout=bound)))
    except TimeoutError:
        raise TimeoutError("the flood did not finish within its bound") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        policy.close()
