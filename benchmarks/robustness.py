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
from pathlib import Path

import numpy as np

from maddpg_benchmarks.robustness import restart_recovery
from maddpg_core.layout import PolicyLayout
from maddpg_serving.local_triton import LocalTritonServer, free_ports


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
