"""The served policy, over Triton's HTTP or gRPC endpoint, synchronous or asyncio, with one vocabulary:

    policy = TritonPolicy("localhost:8000", protocol="http")     # or AsyncTritonPolicy (same arguments)
    policy.wait_until_ready(timeout=60)                         # server live and model loaded
    policy.layout                                               # read from the model config `parameters`
    actions = policy.act(observations)                          # [agents, obs_width] or [batch, agents, obs_width]

Failures become the project's typed errors: :class:`PolicyUnavailableError` (connection refused or dropped, UNAVAILABLE,
model not loaded), :class:`PolicyOverloadedError` (the server's queue turned the request away), both retried with
backoff first, :class:`PolicyTimeoutError`, :class:`ModelNotFoundError`, :class:`ProtocolMismatchError` (HTTP sent to
the gRPC port or the reverse), :class:`BadInputError` (checked before sending, or reported by the server) and
:class:`LayoutMismatchError` (a model without a maddpg-citylearn layout). ``wait_until_ready`` says which of them keeps
the policy from serving, and gives up at once where waiting cannot help (a wrong protocol, a model the server does not
have).
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
import socket
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
    ProtocolMismatchError,
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


def probe_endpoint(url: str, timeout: float = 2.0) -> str | None:
    """What answers at ``host:port``, told from one plain HTTP/1.1 request (bounded by ``timeout``):

    ``"triton-http"`` Triton's HTTP API; ``"http"`` another HTTP server (Triton's metrics port answers every path with
    an empty 200); ``"grpc"`` an HTTP/2 server (Triton's gRPC port answers with a SETTINGS frame); ``"refused"``
    nothing listens; None: no answer to go by.
    """
    host, port = _host_port(url)
    data = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET /v2 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        pass  # judge what arrived
    except (OSError, ValueError):
        return None
    if data.startswith(b"HTTP/1."):
        return "triton-http" if b"triton" in data.lower() else "http"
    if len(data) >= 9 and data[3] == 0x04:  # an HTTP/2 frame header of type SETTINGS: what a gRPC server sends first
        return "grpc"
    return None


def diagnose(error: PolicyError, url: str, protocol: str) -> PolicyError:
    """The cause behind a failed call, in one line: nothing listening, the wrong protocol for that port, or ``error``.

    Transport errors look alike from the client (a refused connection, "Socket closed", an HTTP parse error, an empty
    document): one probe of the port tells them apart.
    """
    if isinstance(error, (ProtocolMismatchError, ModelNotFoundError, BadInputError, PolicyOverloadedError)):
        return error
    address = _strip_scheme(url)
    found = probe_endpoint(address)
    if found == "refused":
        return PolicyUnavailableError(f"nothing is listening at {address} (connection refused): start the server "
                                      f"(`maddpg-citylearn serve`) or check the address")
    if found == "grpc" and protocol == "http":
        return ProtocolMismatchError(f"{address} speaks gRPC, not HTTP (Triton's gRPC port?): use protocol grpc "
                                     f"(--protocol grpc) or the server's HTTP port (8000 by default)")
    if found == "triton-http" and protocol == "grpc":
        return ProtocolMismatchError(f"{address} speaks HTTP, not gRPC (Triton's HTTP port?): use protocol http "
                                     f"(--protocol http) or the server's gRPC port (8001 by default)")
    if found == "http":
        return ProtocolMismatchError(f"{address} answers HTTP but is not Triton's inference API (Triton's metrics "
                                     f"port?): use the server's HTTP port (8000 by default) or gRPC port (8001)")
    return error


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = _strip_scheme(url).rpartition(":")
    return (host.strip("[]") or "localhost"), int(port)


def _is_aiohttp_connection_error(exc: BaseException) -> bool:
    aiohttp = sys.modules.get("aiohttp")  # only loaded when the asyncio HTTP client is in use
    return aiohttp is not None and isinstance(exc, aiohttp.ClientConnectionError)


def _worth_waiting(reason: PolicyError) -> bool:
    """A server starting, a model loading, a busy queue may change; a wrong protocol or an unknown model will not."""
    return isinstance(reason, (PolicyUnavailableError, PolicyOverloadedError, PolicyTimeoutError))


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
        self.retried = 0  # calls retried after the server was unavailable or overloaded (an evaluation reports it)
        self._config: dict | None = None
        self._layout: PolicyLayout | None = None

    @property
    def where(self) -> str:
        return f"{self.protocol}://{self.url}"

    def _model_state(self, index: list[dict]) -> PolicyError:
        """Why a ready server does not serve the model, from its repository index (name, version, state, reason)."""
        wanted = f"version {self.version} of {self.model!r}" if self.version else repr(self.model)
        entries = [e for e in index if e.get("name") == self.model
                   and (not self.version or str(e.get("version", "")) == self.version)]
        if not entries:
            served = sorted({str(e.get("name")) for e in index}) or ["none"]
            return ModelNotFoundError(f"{self.where} does not serve {wanted} (it serves: {', '.join(served)}): check "
                                      f"the model name (--model) and the server's repository")
        states = "; ".join(f"{e.get('state') or 'unknown'}{': ' + e['reason'] if e.get('reason') else ''}"
                           for e in entries)
        return PolicyUnavailableError(f"{self.where} has {wanted} but it is not ready ({states}); is it loading? "
                                      f"Otherwise see the server's log for why it did not load")

    @staticmethod
    def _gave_up(reason: PolicyError, timeout: float) -> PolicyError:
        if not _worth_waiting(reason):
            return reason
        return type(reason)(f"{reason} (still so after {timeout:.0f} s)")


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
                self.retried += 1
                time.sleep(delay)

    def _grpc_timeout(self) -> dict:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    # --- vocabulary -----------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Server ready and model loaded, right now (no retry)."""
        return self.unready_reason() is None

    def unready_reason(self) -> PolicyError | None:
        """None when the server is ready and serves the model, right now; else why not, as a typed error (nothing
        listening, the wrong protocol for the port, an unknown model, a model not loaded), without retries."""
        options = {"headers": self.headers, **self._grpc_timeout()}
        try:
            if not self._call(lambda c: c.is_server_ready(**options), retry=False):
                return PolicyUnavailableError(f"{self.where} is up but not ready yet (still loading its models?)")
            # A real Triton answers its metadata; a metrics port answers every path with an empty 200.
            self._call(lambda c: c.get_server_metadata(**options), retry=False)
            if self._call(lambda c: c.is_model_ready(self.model, self.version, **options), retry=False):
                return None
            index = self._call(lambda c: c.get_model_repository_index(
                **options, **({"as_json": True} if self.protocol == "grpc" else {})), retry=False)
        except PolicyError as error:
            return diagnose(error, self.url, self.protocol)
        return self._model_state(index.get("models", []) if isinstance(index, dict) else index)

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> "TritonPolicy":
        """Wait until the server serves the model; raise at once where waiting cannot help (the wrong protocol, a
        model the server does not have), else after ``timeout`` seconds, with the reason either way."""
        deadline = time.monotonic() + timeout
        while (reason := self.unready_reason()) is not None:
            if not _worth_waiting(reason) or time.monotonic() >= deadline:
                raise self._gave_up(reason, timeout)
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

    def server_metadata(self) -> dict:
        """Triton's ``/v2`` answer: ``name``, ``version`` (e.g. "2.51.0"), ``extensions``."""
        return self._call(lambda c: c.get_server_metadata(headers=self.headers, **self._json()))

    def served_version(self) -> str | None:
        """The model version requests go to: the one asked for, else the newest the server has loaded."""
        if self.version:
            return self.version
        metadata = self._call(lambda c: c.get_model_metadata(self.model, headers=self.headers, **self._json()))
        versions = [int(v) for v in metadata.get("versions", []) if str(v).isdigit()]
        return str(max(versions)) if versions else None

    def _json(self) -> dict:
        return {"as_json": True, **self._grpc_timeout()} if self.protocol == "grpc" else {}

    def act(self, observations, *, allow_non_finite: bool | None = None) -> np.ndarray:
        """Actions for one district ``[agents, obs_width]`` or a batch ``[batch, agents, obs_width]``.

        ``allow_non_finite``: send NaN/inf for the graph to sanitise in this call (default: the constructor's).
        """
        allow = self.allow_non_finite if allow_non_finite is None else allow_non_finite
        batch, single = as_batch(observations, self.layout, allow_non_finite=allow)
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
                self.retried += 1
                await asyncio.sleep(delay)

    async def is_ready(self) -> bool:
        return await self.unready_reason() is None

    async def unready_reason(self) -> PolicyError | None:
        """As :meth:`TritonPolicy.unready_reason`."""
        headers = {"headers": self.headers}
        try:
            if not await self._call(lambda c: c.is_server_ready(**headers), retry=False):
                return PolicyUnavailableError(f"{self.where} is up but not ready yet (still loading its models?)")
            await self._call(lambda c: c.get_server_metadata(**headers), retry=False)
            if await self._call(lambda c: c.is_model_ready(self.model, self.version, **headers), retry=False):
                return None
            index = await self._call(lambda c: c.get_model_repository_index(
                **headers, **({"as_json": True} if self.protocol == "grpc" else {})), retry=False)
        except PolicyError as error:
            return await asyncio.to_thread(diagnose, error, self.url, self.protocol)
        return self._model_state(index.get("models", []) if isinstance(index, dict) else index)

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> "AsyncTritonPolicy":
        deadline = time.monotonic() + timeout
        while (reason := await self.unready_reason()) is not None:
            if not _worth_waiting(reason) or time.monotonic() >= deadline:
                raise self._gave_up(reason, timeout)
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

    async def act(self, observations, *, allow_non_finite: bool | None = None) -> np.ndarray:
        layout = await self.load_layout()
        allow = self.allow_non_finite if allow_non_finite is None else allow_non_finite
        batch, single = as_batch(observations, layout, allow_non_finite=allow)
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
