"""How fast an overloaded server turns requests away, and how long a client goes without answers when the server
restarts under it.

    python benchmarks/robustness.py                       # the shipped model_repository/, prints the figures
    python benchmarks/robustness.py --out reports/robustness.json --rounds 5

1. Overload: the model served with one instance and a queue that admits 2 requests (``max_queue_size``), then with
   a 2 ms queue timeout; a flood of ``--requests`` requests of ``--rows`` districts each, ``--concurrency`` at a
   time, over HTTP and gRPC, client timeout 60 s, no retries. Latency of the rejections and of the answers.
2. Restart: a client stepping ``act`` one district at a time (``RetryPolicy.for_seconds(30)``, what ``evaluate`` uses)
   while the server is stopped and started again on the same ports after 100 steps: the longest time between two
   answers, the server's own stop-to-ready time, and the client's extra wait after the server was ready.

Only 127.0.0.1. Numbers are from a shared machine: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from maddpg_benchmarks.robustness import flood, restart_recovery, small_queue_view
from maddpg_core.layout import PolicyLayout
from maddpg_serving.local_triton import LocalTritonServer, free_ports

QUEUES = {"full queue (max_queue_size 2)": dict(max_queue_size=2),
          "queue timeout (2 ms)": dict(queue_timeout_us=2_000)}


def observations_for(repository: Path, model: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    layout = PolicyLayout.from_json(max((repository / model).glob("[0-9]*/layout.json")).read_text())
    rng = np.random.default_rng(seed)
    return rng.standard_normal((*shape, *layout.observation_shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="maddpg_ctde")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rows", type=int, default=256, help="districts per flood request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="restarts measured per protocol")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    figures: dict = {"overload": {}, "restart": {}}
    flood_batches = observations_for(args.repository, args.model, (args.requests, args.rows))
    with tempfile.TemporaryDirectory(prefix="maddpg-robustness-") as workdir:
        for i, (name, queue) in enumerate(QUEUES.items()):
            view = small_queue_view(args.repository, Path(workdir) / f"queue-{i}", instances=1, **queue)
            with LocalTritonServer(view, ports=free_ports()) as server:
                for protocol in ("http", "grpc"):
                    url = server.http_url if protocol == "http" else server.grpc_url
                    result = flood(url, protocol, flood_batches, concurrency=args.concurrency,
                                   client_timeout_s=60.0, model=args.model)
                    figures["overload"][f"{name}, {protocol}"] = {
                        "outcomes": dict(result.counts()), "client_timeout_s": result.client_timeout_s,
                        "rejected_ms": result.latency_ms("PolicyOverloadedError"), "answered_ms": result.latency_ms("ok")}

    steps = observations_for(args.repository, args.model, (64,), seed=1)
    with LocalTritonServer(args.repository, ports=free_ports(), exit_timeout_s=0) as server:
        for protocol in ("http", "grpc"):
            rounds = [restart_recovery(server, steps, protocol=protocol, model=args.model) for _ in range(args.rounds)]
            figures["restart"][protocol] = [r.__dict__ for r in rounds]

    for name, f in figures["overload"].items():
        rejected, answered = f["rejected_ms"], f["answered_ms"]
        print(f"{name:<42} {f['outcomes']}  rejected: p50 {rejected.get('p50', float('nan')):.0f} ms, "
              f"p95 {rejected.get('p95', float('nan')):.0f} ms, max {rejected.get('max', float('nan')):.0f} ms; "
              f"answered: p50 {answered.get('p50', float('nan')):.0f} ms (client timeout 60 s)")
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
