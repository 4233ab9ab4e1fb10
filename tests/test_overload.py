"""Overload against what production runs: the shipped model (``model_repository/``, ``configs/cpu.pbtxt`` on Triton's
onnxruntime backend, no queue policy) behind the production pods' admission proxy (nginx on
``k8s/overlays/production/admission/nginx.conf``, the file the pods mount). A bounded flood (127.0.0.1, a fixed number
of requests, each bounded by the client timeout): the excess comes back as ``PolicyOverloadedError`` (not a timeout,
not "unavailable"), it never reaches Triton, accepted requests get the right actions, and the server serves normally
afterwards. Latencies (how fast, how long the accepted ones waited, whether any stalled) are measured by
``benchmarks/overload.py`` (docs/overload.md), not asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest

from maddpg_benchmarks.robustness import flood
from maddpg_client import LocalPolicy, PolicyOverloadedError, RetryPolicy, TritonPolicy
from maddpg_client.metrics import scrape, scrape_settled
from maddpg_client.triton_policy import classify_error
from maddpg_serving.admission import AdmissionProxy
from maddpg_serving.local_triton import LocalTritonServer, free_ports

pytestmark = pytest.mark.triton
REPO_MODEL = "maddpg_ctde"
REQUESTS, ROWS, CONCURRENCY = 192, 256, 64
CLIENT_TIMEOUT_S = 60.0  # a rejection that waited for this would come back as PolicyTimeoutError instead


@pytest.fixture(scope="module")
def shipped_repository(request):
    return request.config.rootpath / "model_repository"


@pytest.fixture(scope="module")
def production(shipped_repository):
    """The shipped model as CPU pods serve it, behind the pods' admission proxy; stopped by PID."""
    server = LocalTritonServer(shipped_repository, ports=free_ports(), backend="onnxruntime", config_name="cpu")
    server.start(timeout=120)
    proxy = AdmissionProxy(server.ports.http, server.ports.grpc)
    try:
        proxy.start(timeout=30)
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def local(shipped_repository) -> LocalPolicy:
    return LocalPolicy(shipped_repository)


@pytest.fixture(scope="module")
def flood_observations(local) -> np.ndarray:
    """REQUESTS batches of ROWS districts (big requests keep the two instances busy while the flood arrives)."""
    shape = (REQUESTS, ROWS, *local.layout.observation_shape)
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_flood_beyond_the_admission_bound_is_turned_away_typed_and_the_server_recovers(
        production, protocol, flood_observations, local):
    server, proxy = production
    url = proxy.http_url if protocol == "http" else proxy.grpc_url
    before = scrape(server.metrics_url, REPO_MODEL)
    result = flood(url, protocol, flood_observations, concurrency=CONCURRENCY, client_timeout_s=CLIENT_TIMEOUT_S,
                   model=REPO_MODEL)

    counts = result.counts()
    assert sum(counts.values()) == REQUESTS
    # Only two outcomes: answered, or turned away by the admission bound. No timeout (a rejection came back before the
    # client timeout), no "unavailable" (the server never went away), no other failure.
    assert set(counts) == {"ok", PolicyOverloadedError.__name__}, counts
    rejected, accepted = result.of(PolicyOverloadedError.__name__), result.of("ok")
    assert all("turned the request away" in o.message and "admission" in o.message for o in rejected)
    # Every accepted request got the actions of the shipped model for its own observations.
    for outcome in accepted[:16]:
        assert np.abs(outcome.actions - local.act(flood_observations[outcome.index])).max() <= 1e-5
    # What was turned away never reached Triton: it counted exactly the accepted requests, and no failure.
    window = scrape_settled(server.metrics_url, REPO_MODEL,
                            expected_success=before.request_success + len(accepted)) - before
    assert window.request_success == len(accepted) and window.request_failure == 0

    # Afterwards the server serves normally through the proxy: ready, and right.
    with TritonPolicy(url, protocol=protocol, model=REPO_MODEL, retry=RetryPolicy(attempts=1)) as policy:
        assert policy.is_ready()
        for i in range(5):
            observations = flood_observations[i, 0]
            assert np.abs(policy.act(observations) - local.act(observations)).max() <= 1e-5


@pytest.mark.parametrize(("status", "message"), [
    ("429", "admission: the server has 32 requests in flight and turned this one away"),   # the proxy, HTTP
    ("StatusCode.RESOURCE_EXHAUSTED", "admission: the server has 32 requests in flight"),  # the proxy, gRPC
    ("503", "Exceeds maximum queue size"),                       # Triton's own queue bound (a config with one)
    ("StatusCode.UNAVAILABLE", "Request timeout expired"),       # Triton's queue timeout
])
def test_every_way_of_turning_a_request_away_is_an_overload(status, message):
    from tritonclient.utils import InferenceServerException

    error = classify_error(InferenceServerException(message, status=status), "http", "127.0.0.1:1", REPO_MODEL)
    assert isinstance(error, PolicyOverloadedError) and "turned the request away" in str(error)
