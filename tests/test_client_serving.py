"""The client library against the real tritonserver (bundled in nvidia-pytriton), started once per session."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton_http

from maddpg_client import (
    AsyncTritonPolicy,
    BadInputError,
    LayoutMismatchError,
    LocalPolicy,
    ModelNotFoundError,
    PolicyTimeoutError,
    PolicyUnavailableError,
    ProtocolMismatchError,
    RetryPolicy,
    TritonPolicy,
    scrape,
    scrape_settled,
)
from maddpg_client.triton_policy import classify_error
from maddpg_serving.processes import reserve_ports

pytestmark = [pytest.mark.triton, pytest.mark.citylearn]
MODEL = "maddpg_ctde"


@pytest.fixture(scope="module")
def local(exported_repository) -> LocalPolicy:
    return LocalPolicy(exported_repository)


@pytest.fixture(scope="module")
def observations(initial_checkpoint_path) -> np.ndarray:
    """Real env observations (the checkpoint's reference sample), 256 of them."""
    import torch

    sample = torch.load(initial_checkpoint_path, weights_only=True)["reference_observations"].numpy()
    return sample[np.random.default_rng(0).integers(0, len(sample), 256)]


def url_for(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_actions_equal_in_process_onnxruntime(triton_server, local, observations, protocol):
    with TritonPolicy(url_for(triton_server, protocol), protocol=protocol).wait_until_ready(30) as policy:
        assert policy.layout == local.layout
        one = policy.act(observations[0])
        assert one.shape == (17, 3)
        assert np.abs(one - local.act(observations[0])).max() <= 1e-6
        batch = policy.act(observations)
        assert batch.shape == (256, 17, 3)
        assert np.abs(batch - local.act(observations)).max() <= 1e-6


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_policy_serves_many_requests_in_flight(triton_server, local, observations, protocol):
    async def main():
        async with AsyncTritonPolicy(url_for(triton_server, protocol), protocol=protocol) as policy:
            await policy.wait_until_ready(30)
            return await asyncio.gather(*(policy.act(observations[i]) for i in range(64)))

    results = asyncio.run(main())
    expected = local.act(observations[:64])
    assert np.abs(np.stack(results) - expected).max() <= 1e-6


def test_one_policy_object_is_safe_to_share_between_threads(triton_server, local, observations):
    policy = TritonPolicy(triton_server.http_url)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: policy.act(observations[i]), range(64)))
    policy.close()
    assert np.abs(np.stack(results) - local.act(observations[:64])).max() <= 1e-6


def test_metrics_endpoint_reports_the_requests_made(triton_server, observations):
    before = scrape(triton_server.metrics_url, MODEL)
    with TritonPolicy(triton_server.grpc_url, protocol="grpc") as policy:
        for i in range(20):
            policy.act(observations[i])
        policy.act(observations[:64])
    # Read once the counters have caught up (Triton updates them just after answering): exact counts, no race.
    window = scrape_settled(triton_server.metrics_url, MODEL, expected_success=before.request_success + 21) - before
    assert window.request_success == 21
    assert window.inference_count == 20 + 64
    assert window.execution_count >= 1 and window.average_batch_size >= 1.0
    assert window.compute_us_per_request > 0 and window.queue_us_per_request >= 0


class LaggingMetrics:
    """A metrics endpoint whose success counter catches up one request per read, as Triton's does (rarely, by a
    request or two) right after answering: a read-count clock, so the test does not depend on timing."""

    def __init__(self, counts: list[int]):
        import http.server

        self.counts, self.reads = counts, 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                value = endpoint.counts[min(endpoint.reads, len(endpoint.counts) - 1)]
                endpoint.reads += 1
                body = f'nv_inference_request_success{{model="{MODEL}",version="1"}} {value}\n'.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("expected", [21, None])
def test_settled_reads_wait_for_counters_that_lag_behind_the_answers(expected):
    endpoint = LaggingMetrics([18, 19, 20, 21])
    try:
        assert scrape_settled(endpoint.url, MODEL, expected_success=expected, interval_s=0.001).request_success == 21
        # A count that never comes (a restarted server) ends the wait at its bound with the last value read.
        assert scrape_settled(endpoint.url, MODEL, expected_success=1000, timeout_s=0.2,
                              interval_s=0.01).request_success == 21
    finally:
        endpoint.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_raise_typed_errors_and_the_server_keeps_serving(triton_server, observations, protocol):
    policy = TritonPolicy(url_for(triton_server, protocol), protocol=protocol)
    with pytest.raises(BadInputError, match=r"shape \(17, 51\)"):
        policy.act(np.zeros((17, 51), np.float32))
    with pytest.raises(BadInputError, match="dtype int64"):
        policy.act(np.zeros((17, 52), np.int64))
    with pytest.raises(BadInputError, match="non-finite"):
        policy.act(np.full((17, 52), np.nan, np.float32))
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        TritonPolicy(url_for(triton_server, protocol), protocol=protocol, model="no_such_model").act(observations[0])
    assert policy.act(observations[0]).shape == (17, 3)  # still serving
    policy.close()


def test_requests_the_server_rejects_are_reported_as_bad_input(triton_server):
    """Bypass the client's own checks: the server's 400 must still come back as BadInputError."""
    client = triton_http.InferenceServerClient(triton_server.http_url)
    tensor = triton_http.InferInput("observations", [1, 17, 50], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 17, 50), np.float32))
    with pytest.raises(Exception) as raised:
        client.infer(MODEL, [tensor])
    client.close()
    error = classify_error(raised.value, "http", triton_server.http_url, MODEL)
    assert isinstance(error, BadInputError) and "unexpected shape" in str(error)


def test_non_finite_observations_can_be_left_to_the_model_to_sanitise(triton_server):
    with TritonPolicy(triton_server.http_url, allow_non_finite=True) as policy:
        hostile = np.full((17, 52), np.inf, np.float32)
        hostile[::2] = np.nan
        actions = policy.act(hostile)
    low, high = policy.layout.action_bounds()
    assert np.isfinite(actions).all() and (actions >= low).all() and (actions <= high).all()


@pytest.mark.parametrize("kind", ["http", "grpc", "local", "async"])
def test_allow_non_finite_is_accepted_per_call_as_the_refusal_suggests(kind, triton_server, exported_repository, local):
    """The BadInputError says `pass allow_non_finite=True (to act() ...)`: that call works, and answers what the
    in-process graph answers; the policy's own setting is unchanged for the next call."""
    hostile = np.full((17, 52), np.inf, np.float32)
    hostile[::2] = np.nan
    expected = local.act(hostile, allow_non_finite=True)
    if kind == "async":
        async def main():
            async with AsyncTritonPolicy(triton_server.http_url) as policy:
                await policy.wait_until_ready(30)
                with pytest.raises(BadInputError) as refused:
                    await policy.act(hostile)
                return refused.value, await policy.act(hostile, allow_non_finite=True)

        refusal, actions = asyncio.run(main())
    else:
        policy = (LocalPolicy(exported_repository) if kind == "local"
                  else TritonPolicy(url_for(triton_server, kind), protocol=kind))
        with pytest.raises(BadInputError) as refused:
            policy.act(hostile)
        refusal, actions = refused.value, policy.act(hostile, allow_non_finite=True)
        with pytest.raises(BadInputError):
            policy.act(hostile)  # the call's own switch, not a new default
    assert "allow_non_finite=True (to act()" in str(refusal)
    assert np.abs(actions - expected).max() <= 1e-6


# --- why a policy is not ready, said at once where waiting cannot help ------------------------------------------------
# `interval=600` would make any second wait hang the test (pytest's timeout then fails it): an error that comes back
# proves the first look decided, without comparing clocks.
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_wrong_protocol_for_the_port_is_named_at_once(triton_server, protocol):
    other = triton_server.grpc_url if protocol == "http" else triton_server.http_url
    with pytest.raises(ProtocolMismatchError) as raised:
        TritonPolicy(other, protocol=protocol).wait_until_ready(timeout=600, interval=600)
    assert {"http": "speaks gRPC, not HTTP", "grpc": "speaks HTTP, not gRPC"}[protocol] in str(raised.value)

    async def main():
        async with AsyncTritonPolicy(other, protocol=protocol) as policy:
            await policy.wait_until_ready(timeout=600, interval=600)

    with pytest.raises(ProtocolMismatchError):
        asyncio.run(main())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_metrics_port_is_not_taken_for_the_inference_api(triton_server, protocol):
    metrics = f"127.0.0.1:{triton_server.ports.metrics}"
    with pytest.raises(ProtocolMismatchError, match="metrics port"):
        TritonPolicy(metrics, protocol=protocol).wait_until_ready(timeout=600, interval=600)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unknown_model_is_named_at_once_with_what_the_server_has(triton_server, protocol):
    policy = TritonPolicy(url_for(triton_server, protocol), protocol=protocol, model="no_such_model")
    with pytest.raises(ModelNotFoundError) as raised:
        policy.wait_until_ready(timeout=600, interval=600)
    assert "does not serve 'no_such_model' (it serves: maddpg_ctde)" in str(raised.value)
    assert policy.unready_reason() is not None and policy.is_ready() is False
    assert TritonPolicy(url_for(triton_server, protocol), protocol=protocol).unready_reason() is None


@pytest.fixture(scope="module")
def saturated_server(saturated_repository, local_server):
    """A served policy whose actors are saturated (see conftest): its actions sit on their bounds."""
    with local_server(saturated_repository) as server:
        yield server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_saturated_actors_stay_on_their_bounds_never_past_them(saturated_server, saturated_repository,
                                                                     observations, protocol):
    with TritonPolicy(url_for(saturated_server, protocol), protocol=protocol, allow_non_finite=True) as policy:
        low, high = policy.layout.action_bounds()
        mask = policy.layout.action_mask()
        hostile = np.full((4, 17, 52), np.inf, np.float32)
        hostile[1], hostile[2], hostile[3] = -np.inf, np.nan, 3.4e38
        for batch in (observations, hostile):
            actions = policy.act(batch)
            assert np.isfinite(actions).all()
            assert (actions >= low).all() and (actions <= high).all()
            assert (actions[:, ~mask] == 0).all()
        actions = policy.act(observations)
    assert (actions == high)[:, mask].any() and (actions == low)[:, mask].any(), "the fixture must saturate"
    assert np.abs(actions - LocalPolicy(saturated_repository).act(observations)).max() <= 1e-6


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_stopped_server_raises_unavailable_after_bounded_retries(protocol):
    address = f"127.0.0.1:{reserve_ports(1)[0]}"
    policy = TritonPolicy(address, protocol=protocol, retry=RetryPolicy(attempts=2, backoff_s=0.01))
    with pytest.raises(PolicyUnavailableError, match="is tritonserver running"):
        _ = policy.layout
    assert policy.is_ready() is False
    # Nothing listening may be a server still starting: waited for, then named.
    with pytest.raises(PolicyUnavailableError) as raised:
        policy.wait_until_ready(timeout=1, interval=0.2)
    assert f"nothing is listening at {address} (connection refused)" in str(raised.value)
    assert "still so after 1 s" in str(raised.value)


def test_a_server_that_never_answers_raises_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        policy = TritonPolicy(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        with pytest.raises(PolicyTimeoutError, match="did not answer in time"):
            policy.model_config()


def test_unavailable_is_retried_with_backoff_then_succeeds(monkeypatch):
    """Unit test of the retry loop: the transport fails twice with connection refused, then answers."""
    calls = []

    class FlakyClient:
        def get_model_config(self, *args, **kwargs):
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionRefusedError(111, "Connection refused")
            return {"name": MODEL, "parameters": {}}

    policy = TritonPolicy("127.0.0.1:1", retry=RetryPolicy(attempts=3, backoff_s=0.001))
    monkeypatch.setattr(policy, "_client", lambda: FlakyClient())
    assert policy.model_config()["name"] == MODEL
    assert len(calls) == 3
    with pytest.raises(LayoutMismatchError, match="carries no `layout` parameter"):
        _ = policy.layout


def test_a_raw_kserve_json_request_returns_the_same_actions(triton_server, local, observations):
    """What the README's curl example does: plain JSON over HTTP, no tritonclient."""
    body = {"inputs": [{"name": "observations", "shape": [2, 17, 52], "datatype": "FP32",
                        "data": observations[:2].ravel().tolist()}]}
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{MODEL}/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.load(response)
    (output,) = answer["outputs"]
    assert output["name"] == "actions" and output["shape"] == [2, 17, 3]
    actions = np.asarray(output["data"], dtype=np.float32).reshape(2, 17, 3)
    assert np.abs(actions - local.act(observations[:2])).max() <= 1e-6


def test_the_layout_is_readable_from_the_model_config_endpoint(triton_server, local):
    with urllib.request.urlopen(f"http://{triton_server.http_url}/v2/models/{MODEL}/config", timeout=10) as response:
        config = json.load(response)
    from maddpg_client import PolicyLayout

    assert PolicyLayout.from_json(config["parameters"]["layout"]["string_value"]) == local.layout


def test_threads_each_get_their_own_tritonclient(triton_server):
    policy = TritonPolicy(triton_server.http_url)
    seen = set()

    def grab():
        seen.add(id(policy._client()))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4
    policy.close()
