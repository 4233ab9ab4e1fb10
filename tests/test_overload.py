"""Overload against the real tritonserver: a model whose queue admits 2 requests, flooded (127.0.0.1, a bounded
number of requests, each bounded by the client timeout). Rejections come back as their own typed error, not as a
timeout; accepted requests get the right actions; the server serves normally afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from maddpg_benchmarks.robustness import flood, small_queue_view
from maddpg_client import LocalPolicy, PolicyOverloadedError, RetryPolicy, TritonPolicy
from maddpg_client.metrics import scrape, scrape_settled
from maddpg_serving.local_triton import LocalTritonServer, free_ports

pytestmark = [pytest.mark.triton, pytest.mark.citylearn]  # the fixtures export a policy built on the env
MODEL = "maddpg_ctde"
REQUESTS, ROWS, CONCURRENCY = 192, 256, 32
CLIENT_TIMEOUT_S = 60.0  # a rejection that waited for this would come back as PolicyTimeoutError instead


@pytest.fixture(scope="module")
def local(exported_repository) -> LocalPolicy:
    return LocalPolicy(exported_repository)


@pytest.fixture(scope="module")
def flood_observations(initial_checkpoint_path) -> np.ndarray:
    """REQUESTS batches of ROWS real env observations (big requests keep the one instance busy)."""
    import torch

    sample = torch.load(initial_checkpoint_path, weights_only=True)["reference_observations"].numpy()
    rows = np.random.default_rng(1).integers(0, len(sample), (REQUESTS, ROWS))
    return sample[rows]


# Triton rejects a request when the queue is full (max_queue_size) or when it waited past the queue timeout.
QUEUES = {"full-queue": dict(max_queue_size=2), "queue-timeout": dict(queue_timeout_us=2_000)}


@pytest.fixture(scope="module", params=list(QUEUES))
def small_queue_server(request, exported_repository, tmp_path_factory):
    view = small_queue_view(exported_repository, tmp_path_factory.mktemp("small-queue") / "repository", instances=1,
                            **QUEUES[request.param])
    server = LocalTritonServer(view, ports=free_ports())
    server.start(timeout=120)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_flood_beyond_the_queue_is_rejected_fast_and_typed_and_the_server_recovers(
        small_queue_server, protocol, flood_observations, local):
    url = small_queue_server.http_url if protocol == "http" else small_queue_server.grpc_url
    before = scrape(small_queue_server.metrics_url, MODEL)
    result = flood(url, protocol, flood_observations, concurrency=CONCURRENCY, client_timeout_s=CLIENT_TIMEOUT_S)

    counts = result.counts()
    assert sum(counts.values()) == REQUESTS
    # Only two outcomes: answered, or turned away by the queue. No timeout (a rejection came back well before the
    # client timeout), no "unavailable" (the server never went away), no other failure.
    assert set(counts) == {"ok", PolicyOverloadedError.__name__}, counts
    rejected, accepted = result.of(PolicyOverloadedError.__name__), result.of("ok")
    assert all("turned the request away" in o.message for o in rejected)
    # Every accepted request got the actions of the exported model for its own observations.
    for outcome in accepted:
        assert np.abs(outcome.actions - local.act(flood_observations[outcome.index])).max() <= 1e-6
    # Triton's own count of answered requests agrees. (Not its failure counter: 2.51 does not count full-queue
    # rejections in nv_inference_request_failure at all, and only some of the queue-timeout ones.)
    window = scrape_settled(small_queue_server.metrics_url, MODEL,
                            expected_success=before.request_success + len(accepted)) - before
    assert window.request_success == len(accepted)

    # Afterwards the server serves normally: ready, and right.
    with TritonPolicy(url, protocol=protocol, retry=RetryPolicy(attempts=1)) as policy:
        assert policy.is_ready()
        for i in range(5):
            observations = flood_observations[i, 0]
            assert np.abs(policy.act(observations) - local.act(observations)).max() <= 1e-6
