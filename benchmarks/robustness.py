"""How long a client goes without answers when the server restarts under it (overload: benchmarks/overload.py).

    python benchmarks/robustness.py                       # the shipped model_repository/, prints the figures
    python benchmarks/robustness.py --out reports/robustness.json --rounds 5

Restart: a client stepping ``act`` one district at a time (``RetryPolicy.for_seconds(30)``, what ``evaluate`` uses)
   while the server is stopped and started again on the same ports after 100 steps: the longest time between two
   answers, the server's own stop-to-ready time, and the client's extra wait after the server was ready.

Only 127.0.0.1. Numbers are from a shared machine: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maddpg_client.triton_policy import RetryPolicy, TritonPolicy
from maddpg_core.errors import PolicyError
from maddpg_core.layout import PolicyLayout
from maddpg_serving.local_triton import LocalTritonServer, free_ports


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


def observations_for(repository: Path, model: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    layout = PolicyLayout.from_json(max((repository / model).glob("[0-9]*/layout.json")).read_text())
    rng = np.random.default_rng(seed)
    return rng.standard_normal((*shape, *layout.observation_shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="maddpg_ctde")
    parser.add_argument("--rounds", type=int, default=3, help="restarts measured per protocol")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    figures: dict = {"restart": {}}
    steps = observations_for(args.repository, args.model, (64,), seed=1)
    with LocalTritonServer(args.repository, ports=free_ports(), exit_timeout_s=0) as server:
        for protocol in ("http", "grpc"):
            rounds = [restart_recovery(server, steps, protocol=protocol, model=args.model) for _ in range(args.rounds)]
            figures["restart"][protocol] = [r.__dict__ for r in rounds]

    for protocol, rounds in figures["restart"].items():
        for r in rounds:
            print(f"restart, {protocol}: no answer for {r['longest_gap_s']:.1f} s (server stop to ready "
                  f"{r['server_down_s']:.1f} s, first answer {r['first_answer_after_ready_s']:.2f} s after ready), "
                  f"{r['failed_steps']} of {r['steps']} steps failed")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
