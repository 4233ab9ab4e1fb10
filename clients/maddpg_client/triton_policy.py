"""The served policy, over Triton's HTTP or gRPC endpoint, synchronous or asyncio, with one vocabulary:

    policy = TritonPolicy("localhost:8000", protocol="http")     # or AsyncTritonPolicy (same arguments)
    policy.wait_until_ready(timeout=60)                         # server live and model loaded
    policy.layout                                               # read from the model config `parameters`
    actions = policy.act(observations)                          # [agents, obs_width] or [batch, agents, obs_width]

Failures become the project's typed errors: :class:`PolicyUnavailableError` (connection refused or dropped, UNAVAILABLE,
model not loaded), :class:`PolicyOverloadedError` (the server's queue turned the request away), both retried with
backoff first, :class:`PolicyTimeoutError`, :class:`ModelNotFoundError`, :class:`BadInputError` (checked before
sending, or reported by the server) and :class:`LayoutMismatchError` (a model without a maddpg-citylearn layout).
Retrying is safe because every call is a read or a stateless inference: a rejected request never ran, and running one
twice gives the same actions. Timeouts are not retried: the request may still be running, and a second copy only adds
load to a server that is already slow.

A ``tritonclient.http`` client must stay in the thread that made it, so :class:`TritonPolicy` keeps one client per
thread: one policy object can be shared by many threads.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from maddpg_core.errors import (
    BadInputError,
    LayoutMismatchError,
    ModelNotFoundError,
    PolicyError,
    PolicyOverloadedError,
    PolicyTimeoutError,
    PolicyUnavailableError,
)
from maddpg_core.layout import DEFAULT_MODEL_NAME, INPUT_NAME, LAYOUT_PARAMETER, OUTPUT_NAME, PolicyLayout

from .observations import as_batch

Protocol = Literal["http", "grpc"]
PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter, only for errors where retrying can help.

    At most ``attempts`` calls in all and, when ``within_s`` is set, no retry later than ``within_s`` seconds after the
    first failure: that bounds the wait in time, whatever the backoff.
    """

    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    within_s: float | None = None

    @classmethod
    def for_seconds(cls, seconds: float, backoff_s: float = 0.25, max_backoff_s: float = 2.0) -> "RetryPolicy":
        """Keep retrying for up to ``seconds``: long enough to ride out a server restart (a few seconds here)."""
        return cls(attempts=sys.maxsize, backoff_s=backoff_s, max_backoff_s=max_backoff_s, within_s=seconds)

    def delays(self):
        # A generator: the clock starts at the first failure (the first next()), not when the call began.
        deadline = None if self.within_s is None else time.monotonic() + self.within_s
        for attempt in range(self.attempts - 1):
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempt, 32)) * (0.5 + random.random() / 2)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                delay = min(delay, left)
            yield delay


# Triton answers UNAVAILABLE (HTTP 503) both when it cannot serve at all and when a model's queue turns a request
# away; only the message tells them apart (measured on 2.51: "Exceeds maximum queue size" when max_queue_size is
# reached, "Request timeout expired" when a request waited past the queue policy's timeout).
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
# The production pods' admission proxy (k8s/overlays/production/admission/nginx.conf) turns requests beyond its
# in-flight bound away before they reach Triton: HTTP 429, gRPC RESOURCE_EXHAUSTED.
OVERLOAD_STATUSES = ("429", "StatusCode.RESOURCE_EXHAUSTED")
# While a model unloads (a server stopping, a version being replaced) Triton answers NOT_FOUND with this message:
# the model exists but has no version loaded right now, which is worth waiting for, unlike an unknown model.
NOT_LOADED_MESSAGE = "has no available versions"


def classify_error(exc: BaseException, protocol: str, url: str, model: str) -> PolicyError:
    """Map tritonclient / socket exceptions onto the project's typed errors."""
    from tritonclient.utils import InferenceServerException

    where = f"{protocol}://{url}"
    if isinstance(exc, PolicyError):
        return exc
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return PolicyTimeoutError(f"{where} did not answer in time; raise the client timeout or check the server load")
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if "DEADLINE_EXCEEDED" in status:
            return PolicyTimeoutError(f"{where} did not answer in time ({message}); raise the client timeout")
        if status in OVERLOAD_STATUSES or any(text in message for text in OVERLOAD_MESSAGES):
            return PolicyOverloadedError(
                f"{where} is overloaded and turned the request away ({message.strip()}); send fewer requests at once, "
                f"or scale the server out (more replicas or instances)")
        if NOT_LOADED_MESSAGE in message:
            return PolicyUnavailableError(f"{where} has no version of {model!r} loaded right now ({message}); is the "
                                          f"server starting, stopping or reloading the model?")
        if status in {"404", "StatusCode.NOT_FOUND"} or "unknown model" in message:
            return ModelNotFoundError(f"{where} does not serve model {model!r} ({message}); check --model and the "
                                      f"server's repository")
        if status in {"400", "StatusCode.INVALID_ARGUMENT"}:
            return BadInputError(f"{where} rejected the request: {message}")
        if status in {"503", "StatusCode.UNAVAILABLE"} or "UNAVAILABLE" in status:
            return PolicyUnavailableError(f"{where} is unavailable ({message}); is tritonserver running and ready?")
        return PolicyError(f"{where} failed: [{status}] {message}")
    if isinstance(exc, (ConnectionError, OSError, http.client.HTTPException)) or _is_aiohttp_connection_error(exc):
        # HTTPException: geventhttpclient's HTTPConnectionClosed when the server goes away mid-request.
        return PolicyUnavailableError(f"cannot connect to {where} ({exc}); is tritonserver running? "
                                      f"(start one with `maddpg-citylearn serve`)")
    return PolicyError(f"{where} failed: {type(exc).__name__}: {exc}")


def _is_aiohttp_connection_error(exc: BaseException) -> bool:
    aiohttp = sys.modules.get("aiohttp")  # only loaded when the asyncio HTTP client is in use
    return aiohttp is not None and isinstance(exc, aiohttp.ClientConnectionError)


def _retryable(error: PolicyError) -> bool:
    return isinstance(error, (PolicyUnavailableError, PolicyOverloadedError))


def _given_up(error: PolicyError, attempts: int, first_failure: float) -> PolicyError:
    """The error to raise after the last attempt: the same type, saying how long it was retried."""
    if attempts < 2:
        return error
    return type(error)(f"{error} (gave up after {attempts} attempts over {time.monotonic() - first_failure:.1f} s)")


def _config_dict(protocol: str, raw: Any) -> dict:
    # gRPC's as_json form wraps the config in {"config": ...}; HTTP returns it bare.
    return raw.get("config", raw) if protocol == "grpc" else raw


def layout_from_served_config(config: dict, where: str) -> PolicyLayout:
    parameter = (config.get("parameters") or {}).get(LAYOUT_PARAMETER)
    if not parameter:
        raise LayoutMismatchError(
            f"model {config.get('name')!r} at {where} carries no `{LAYOUT_PARAMETER}` parameter: it was not exported "
            f"by `maddpg-citylearn export`, so its observation layout is unknown"
        )
    return PolicyLayout.from_json(parameter["string_value"])


def _split(batch: np.ndarray, limit: int) -> list[np.ndarray]:
    return [batch] if limit <= 0 or len(batch) <= limit else [batch[i : i + limit] for i in range(0, len(batch), limit)]


class _ServedPolicy:
    """What the sync and asyncio clients share: where the model is, how to call it, and its cached config."""

    def __init__(self, url: str = "localhost:8000", protocol: Protocol = "http", model: str = DEFAULT_MODEL_NAME,
                 version: str = "", *, timeout: float = 10.0, retry: RetryPolicy = RetryPolicy(),
                 allow_non_finite: bool = False, headers: dict[str, str] | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.url, self.protocol, self.model, self.version = _strip_scheme(url), protocol, model, str(version or "")
        self.timeout, self.retry, self.allow_non_finite = timeout, retry, allow_non_finite
        self.headers = headers
        self._config: dict | None = None
        self._layout: PolicyLayout | None = None

    @property
    def where(self) -> str:
        return f"{self.protocol}://{self.url}"

    def _not_ready(self, timeout: float) -> PolicyUnavailableError:
        return PolicyUnavailableError(
            f"{self.where} was not ready to serve {self.model!r} within {timeout:.0f} s; check that tritonserver "
            f"runs and its log for model load errors"
        )


class TritonPolicy(_ServedPolicy):
    """Synchronous client of the served policy (HTTP or gRPC); thread-safe."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    # --- transport ------------------------------------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                import tritonclient.http as module

                client = module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            else:
                import tritonclient.grpc as module

                client = module.InferenceServerClient(self.url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, operation, *, retry: bool = True):
        delays, attempts, first_failure = iter(self.retry.delays() if retry else ()), 0, 0.0
        while True:
            try:
                return operation(self._client())
            except Exception as exc:  # noqa: BLE001 - classified below
                error = classify_error(exc, self.protocol, self.url, self.model)
                attempts, first_failure = attempts + 1, first_failure or time.monotonic()
                delay = next(delays, None) if _retryable(error) else None
                if delay is None:
                    raise _given_up(error, attempts, first_failure) from exc
                time.sleep(delay)

    def _grpc_timeout(self) -> dict:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    # --- vocabulary -----------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Server ready and model loaded, right now (no retry)."""
        try:
            return bool(self._call(lambda c: c.is_server_ready(headers=self.headers, **self._grpc_timeout())
                                   and c.is_model_ready(self.model, self.version, headers=self.headers,
                                                        **self._grpc_timeout()), retry=False))
        except PolicyError:
            return False

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> "TritonPolicy":
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout)
            time.sleep(interval)
        return self

    def model_config(self) -> dict:
        if self._config is None:
            raw = self._call(lambda c: c.get_model_config(self.model, self.version, headers=self.headers,
                                                          **({"as_json": True, **self._grpc_timeout()}
                                                             if self.protocol == "grpc" else {})))
            self._config = _config_dict(self.protocol, raw)
        return self._config

    @property
    def layout(self) -> PolicyLayout:
        if self._layout is None:
            self._layout = layout_from_served_config(self.model_config(), self.where)
        return self._layout

    def act(self, observations) -> np.ndarray:
        """Actions for one district ``[agents, obs_width]`` or a batch ``[batch, agents, obs_width]``."""
        batch, single = as_batch(observations, self.layout, allow_non_finite=self.allow_non_finite)
        limit = int(self.model_config().get("max_batch_size", 0))
        parts = [self._call(lambda c, part=part: self._infer(c, part)) for part in _split(batch, limit)]
        actions = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return actions[0] if single else actions

    def _infer(self, client, batch: np.ndarray) -> np.ndarray:
        inputs, outputs = _request(self.protocol, batch)
        result = client.infer(self.model, inputs, self.version, outputs=outputs, headers=self.headers,
                              **self._grpc_timeout())
        return result.as_numpy(OUTPUT_NAME)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a client of another thread may complain; nothing to do
                pass
        self._local = threading.local()

    def __enter__(self) -> "TritonPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTritonPolicy(_ServedPolicy):
    """asyncio client of the served policy with the same vocabulary (``await policy.act(...)``).

    Use inside one event loop: ``async with AsyncTritonPolicy(url) as policy: ...``. Many ``act`` calls may be in
    flight at once; Triton's dynamic batcher groups them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._client_instance = None

    def _client(self):
        if self._client_instance is None:
            if self.protocol == "http":
                import tritonclient.http.aio as module

                self._client_instance = module.InferenceServerClient(self.url, conn_timeout=self.timeout)
            else:
                import tritonclient.grpc.aio as module

                self._client_instance = module.InferenceServerClient(self.url)
        return self._client_instance

    async def _call(self, operation, *, retry: bool = True):
        delays, attempts, first_failure = iter(self.retry.delays() if retry else ()), 0, 0.0
        while True:
            try:
                return await asyncio.wait_for(operation(self._client()), self.timeout)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = classify_error(exc, self.protocol, self.url, self.model)
                attempts, first_failure = attempts + 1, first_failure or time.monotonic()
                delay = next(delays, None) if _retryable(error) else None
                if delay is None:
                    raise _given_up(error, attempts, first_failure) from exc
                await asyncio.sleep(delay)

    async def is_ready(self) -> bool:
        async def check(c):
            return await c.is_server_ready(headers=self.headers) and await c.is_model_ready(
                self.model, self.version, headers=self.headers)

        try:
            return bool(await self._call(check, retry=False))
        except PolicyError:
            return False

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> "AsyncTritonPolicy":
        deadline = time.monotonic() + timeout
        while not await self.is_ready():
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout)
            await asyncio.sleep(interval)
        await self.load_layout()
        return self

    async def model_config(self) -> dict:
        if self._config is None:
            kwargs = {"as_json": True} if self.protocol == "grpc" else {}
            raw = await self._call(lambda c: c.get_model_config(self.model, self.version, headers=self.headers, **kwargs))
            self._config = _config_dict(self.protocol, raw)
        return self._config

    async def load_layout(self) -> PolicyLayout:
        if self._layout is None:
            self._layout = layout_from_served_config(await self.model_config(), self.where)
        return self._layout

    @property
    def layout(self) -> PolicyLayout:
        if self._layout is None:
            raise PolicyError("the layout is not loaded yet: `await policy.load_layout()` (or wait_until_ready) first")
        return self._layout

    async def act(self, observations) -> np.ndarray:
        layout = await self.load_layout()
        batch, single = as_batch(observations, layout, allow_non_finite=self.allow_non_finite)
        limit = int((await self.model_config()).get("max_batch_size", 0))
        parts = [await self._call(lambda c, part=part: self._infer(c, part)) for part in _split(batch, limit)]
        actions = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return actions[0] if single else actions

    async def _infer(self, client, batch: np.ndarray) -> np.ndarray:
        inputs, outputs = _request(self.protocol, batch)
        result = await client.infer(self.model, inputs, self.version, outputs=outputs, headers=self.headers)
        return result.as_numpy(OUTPUT_NAME)

    async def close(self) -> None:
        if self._client_instance is not None:
            await self._client_instance.close()
            self._client_instance = None

    async def __aenter__(self) -> "AsyncTritonPolicy":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _request(protocol: str, batch: np.ndarray):
    """Input and requested output of one inference (binary tensors over HTTP; the aio clients use the same types)."""
    if protocol == "http":
        import tritonclient.http as module

        tensor = module.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=True)
        return [tensor], [module.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]
    import tritonclient.grpc as module

    tensor = module.InferInput(INPUT_NAME, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor], [module.InferRequestedOutput(OUTPUT_NAME)]


def _strip_scheme(url: str) -> str:
    # tritonclient wants host:port; users paste http://host:port.
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")
