"""The load driver: closed-loop callers against one server on 127.0.0.1, latency percentiles, Triton's batching.

``concurrency`` callers each send their next request as soon as the previous answer arrived (a closed loop, like
``perf_analyzer --concurrency-range``, which ``bench`` runs beside it on Triton; this driver also drives the
seed-style FastAPI server, which perf_analyzer cannot). A level ends after ``duration_s`` seconds or ``max_requests``
requests, after a warm-up that is not counted; every wait is bounded. All callers share one asyncio event loop, each
with its own connection (HTTP/1.1 keep-alive over asyncio streams, or ``grpc.aio`` with Triton's generated stub), and
each level's request is encoded once: the client's share of the cores goes into sockets, not re-encoding. The first
answer of every window is checked completely and a wrong one fails the level; later answers by status and size, a bad
one counting as an error: a server that answers quickly but wrongly is never reported as fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np

from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME

HOST = "127.0.0.1"
DEFAULT_CLIENT = "asyncio-raw"
# A request with no answer after this long is counted as an error (and the level stops waiting for it).
REQUEST_TIMEOUT_S = 10.0
# An answer that took this much longer than its row's median is a stall, counted apart: Triton 2.51's dynamic
# batcher, when it misses a wake-up, holds a request for its 500 ms timeout on top of whatever the request costs
# (docs/benchmarks.md). Relative to the median, so that big batches that are slow for good reason do not count.
STALL_MS = 400.0
# Only where requests normally take well under the stall can it be told from queueing: a level whose median is
# above this (64 callers x 64 districts, overloaded on purpose) has a wide tail of its own and is not counted.
STALL_DETECTABLE_MEDIAN_MS = 100.0


def count_stalls(latencies_ns: np.ndarray) -> int | None:
    """Answers slower than the median of ``latencies_ns`` by more than ``STALL_MS``; None where the median is above
    ``STALL_DETECTABLE_MEDIAN_MS`` (a stall would not stand out there)."""
    if latencies_ns.size == 0:
        return 0
    median = np.median(latencies_ns)
    if median > STALL_DETECTABLE_MEDIAN_MS * 1e6:
        return None
    return int((latencies_ns > median + STALL_MS * 1e6).sum())


class ResponseError(Exception):
    """An answer that arrived but is wrong: a non-200 status, a short body, wrong shape or values."""


@dataclass(frozen=True)
class Level:
    """One measurement: ``concurrency`` callers, ``districts`` per request, bounded in time and in requests."""

    concurrency: int
    districts: int = 1
    duration_s: float = 5.0
    max_requests: int = 200_000
    warmup_s: float = 1.0


@dataclass
class LevelResult:
    target: str                  # e.g. "triton-http", "seed-fastapi", "onnxruntime-inprocess"
    concurrency: int
    districts: int               # districts (rows of all agents) per request
    agents: int
    requests: int                # answered correctly in the measured window
    errors: int                  # failed in the measured window (status, size, timeout, connection)
    seconds: float               # length of the measured window
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu_cores: float      # CPU time of this process / wall time (the load generator's share of the cores)
    stalled: int | None = 0      # answers slower than the median by more than STALL_MS; None: not detectable
    server_cpu_cores: float | None = None
    warmup_errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    client: str = DEFAULT_CLIENT
    triton: dict[str, float] | None = None  # metrics-endpoint differences over the window (average_batch_size, ...)
    config: str = ""             # which server configuration (tuning label)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def decisions_per_s(self) -> float:
        """Agent decisions per second: districts x agents answered per second."""
        return self.requests_per_s * self.districts * self.agents

    @property
    def average_batch_size(self) -> float | None:
        return None if self.triton is None else self.triton.get("average_batch_size")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(requests_per_s=self.requests_per_s, decisions_per_s=self.decisions_per_s)
        return data


def latency_summary(latencies_ns: np.ndarray) -> dict[str, float]:
    if latencies_ns.size == 0:
        return dict(p50_ms=float("nan"), p95_ms=float("nan"), p99_ms=float("nan"), mean_ms=float("nan"),
                    max_ms=float("nan"))
    ms = latencies_ns / 1e6
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return dict(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), mean_ms=float(ms.mean()),
                max_ms=float(ms.max()))


# --- what is sent -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """The observations of one request and, when known, the actions a correct server answers."""

    observations: np.ndarray           # float32 [districts, agents, obs_width]
    expected: np.ndarray | None = None  # float32 [districts, agents, action_width]
    action_width: int = 0
    action_counts: tuple[int, ...] = ()  # per agent, for the seed-style answer (truncated per building)

    @property
    def districts(self) -> int:
        return int(self.observations.shape[0])

    @property
    def agents(self) -> int:
        return int(self.observations.shape[1])


def triton_http_request(model: str, payload: Payload, host: str, port: int) -> tuple[bytes, int]:
    """A complete KServe-v2 binary-tensor request (HTTP/1.1, keep-alive) and the size of its binary answer."""
    data = np.ascontiguousarray(payload.observations, dtype=np.float32).tobytes()
    header = json.dumps({
        "inputs": [{"name": INPUT_NAME, "shape": list(payload.observations.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
    }, separators=(",", ":")).encode()
    body = header + data
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    answer_bytes = payload.districts * payload.agents * payload.action_width * 4
    return head + body, answer_bytes


def decode_triton_http(headers: dict[str, str], body: bytes) -> np.ndarray:
    length = int(headers.get("inference-header-content-length", len(body)))
    meta = json.loads(body[:length])
    output = next(o for o in meta["outputs"] if o["name"] == OUTPUT_NAME)
    return np.frombuffer(body[length:], dtype=np.float32).reshape(output["shape"])


def seed_request(payload: Payload, host: str, port: int) -> bytes:
    """``POST /predict`` in the seed's JSON form: ``{"observations": [{"obs": [...]}, ...]}`` for one district."""
    if payload.districts != 1:
        raise ValueError("the seed-style API takes one district per request")
    body = json.dumps({"observations": [{"obs": [float(v) for v in row]} for row in payload.observations[0]]}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def check_actions(actions: np.ndarray, payload: Payload, tolerance: float = 1e-4) -> None:
    expected_shape = (payload.districts, payload.agents, payload.action_width)
    if actions.shape != expected_shape:
        raise ResponseError(f"answer has shape {actions.shape}, expected {expected_shape}")
    if not np.isfinite(actions).all():
        raise ResponseError("answer holds non-finite actions")
    if payload.expected is not None:
        worst = float(np.abs(actions - payload.expected).max())
        if worst > tolerance:
            raise ResponseError(f"answer differs from the in-process model by {worst:.2e} (> {tolerance})")


def check_seed_answer(body: bytes, payload: Payload) -> None:
    actions = json.loads(body)["actions"]
    if len(actions) != payload.agents:
        raise ResponseError(f"answer has {len(actions)} buildings, expected {payload.agents}")
    for i, (row, count) in enumerate(zip(actions, payload.action_counts)):
        if len(row) != count or not all(-1.0 <= a <= 1.0 for a in row):
            raise ResponseError(f"building {i}: {row} is not {count} actions in [-1, 1]")


# --- callers: one connection each -------------------------------------------------------------------------------------
class HttpCaller:
    """One HTTP/1.1 keep-alive connection sending pre-encoded requests; answers checked by status and size."""

    def __init__(self, host: str, port: int, request: bytes, min_body: int, check_first: Callable[[dict, bytes], None]):
        self.host, self.port, self.request, self.min_body = host, port, request, min_body
        self.check_first = check_first
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.reader = self.writer = None

    async def reset(self) -> None:
        await self.close()
        await self.open()

    async def _exchange(self) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ResponseError(f"answer without Content-Length (status {status}); this driver needs one")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.reset()
        if status != 200:
            raise ResponseError(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        return status, headers, body

    async def call(self) -> None:
        _, _, body = await self._exchange()
        if len(body) < self.min_body:
            raise ResponseError(f"answer of {len(body)} bytes, expected at least {self.min_body}")

    async def call_checked(self) -> None:
        _, headers, body = await self._exchange()
        self.check_first(headers, body)


class GrpcCaller:
    """One gRPC channel to Triton, sending a pre-built ``ModelInferRequest`` through the generated stub."""

    def __init__(self, url: str, request, answer_bytes: int, payload: Payload):
        self.url, self.request, self.answer_bytes, self.payload = url, request, answer_bytes, payload
        self.channel = None
        self.stub = None

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        # A local subchannel pool: each caller gets its own TCP connection, like separate clients would.
        self.channel = grpc.aio.insecure_channel(self.url, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        await asyncio.wait_for(self.channel.channel_ready(), REQUEST_TIMEOUT_S)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = self.stub = None

    async def reset(self) -> None:
        await self.close()
        await self.open()

    async def call(self):
        response = await self.stub.ModelInfer(self.request, timeout=REQUEST_TIMEOUT_S)
        if len(response.raw_output_contents) != 1 or len(response.raw_output_contents[0]) != self.answer_bytes:
            raise ResponseError(f"answer of {[len(r) for r in response.raw_output_contents]} bytes, "
                                f"expected [{self.answer_bytes}]")
        return response

    async def call_checked(self) -> None:
        response = await self.call()
        output = response.outputs[0]
        actions = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(output.shape))
        check_actions(actions, self.payload)


# --- targets: what a level is run against -----------------------------------------------------------------------------
@dataclass
class Target:
    """A server endpoint plus what the driver needs to measure it."""

    name: str                    # "triton-http", "triton-grpc", "seed-fastapi"
    port: int
    model: str = ""
    metrics_url: str | None = None           # Triton's /metrics, for batching figures
    server_pid: int | None = None            # leader of the server's process group, for its CPU time
    host: str = HOST
    config: str = ""

    @property
    def protocol(self) -> str:
        return "grpc" if self.name.endswith("grpc") else "http"

    @property
    def is_triton(self) -> bool:
        return self.name.startswith("triton")

    def callers(self, payload: Payload, count: int):
        if self.host != HOST:
            raise ValueError("benchmarks only drive 127.0.0.1")
        if not self.is_triton:
            if payload.districts != 1:
                raise ValueError("the seed-style API takes one district per request")

            def check(_headers, body):
                check_seed_answer(body, payload)

            request = seed_request(payload, self.host, self.port)
            return [HttpCaller(self.host, self.port, request, 2, check) for _ in range(count)]
        if self.protocol == "grpc":
            request, answer = triton_grpc_request(self.model, payload)
            return [GrpcCaller(f"{self.host}:{self.port}", request, answer, payload) for _ in range(count)]
        request, answer = triton_http_request(self.model, payload, self.host, self.port)

        def check(headers, body):
            check_actions(decode_triton_http(headers, body), payload)

        return [HttpCaller(self.host, self.port, request, answer, check) for _ in range(count)]


def triton_grpc_request(model: str, payload: Payload):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=INPUT_NAME, datatype="FP32")
    tensor.shape.extend(payload.observations.shape)
    request.outputs.add(name=OUTPUT_NAME)
    request.raw_input_contents.append(np.ascontiguousarray(payload.observations, dtype=np.float32).tobytes())
    return request, payload.districts * payload.agents * payload.action_width * 4


# --- running a level --------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One measured window of one level. Several windows (interleaved rounds) pool into one :class:`LevelResult`."""

    latencies_ns: np.ndarray
    seconds: float                      # length of the measured window
    span_s: float                       # between the CPU/metrics snapshots around it
    client_cpu_s: float
    server_cpu_s: float | None = None
    errors: Counter = field(default_factory=Counter)
    warmup_errors: int = 0
    first_error: str | None = None
    triton: Any = None                  # ModelMetrics difference over the window


def measure(target: Target, payload: Payload, level: Level) -> Measurement:
    """One window of ``target`` at ``level``, blocking (its own event loop)."""
    return asyncio.run(_measure_async(target, payload, level))


def summarise(name: str, level: Level, payload: Payload, measurements: list[Measurement], *, client: str = "",
              config: str = "") -> LevelResult:
    """Pool windows: all latencies together, requests and seconds summed, Triton's counters summed."""
    latencies = np.concatenate([m.latencies_ns for m in measurements]) if measurements else np.zeros(0, np.int64)
    errors: Counter = Counter()
    for m in measurements:
        errors.update(m.errors)
    span = sum(m.span_s for m in measurements) or 1e-9
    server = [m.server_cpu_s for m in measurements]
    triton = None
    if measurements and all(m.triton is not None for m in measurements):
        deltas = [m.triton for m in measurements]
        total = type(deltas[0])(*(sum(getattr(d, f.name) for d in deltas) for f in fields(deltas[0])))
        triton = total.as_dict()
    return LevelResult(
        target=name, concurrency=level.concurrency, districts=payload.districts, agents=payload.agents,
        requests=int(latencies.size), errors=int(sum(errors.values())),
        seconds=float(sum(m.seconds for m in measurements)), **latency_summary(latencies),
        client_cpu_cores=sum(m.client_cpu_s for m in measurements) / span,
        stalled=count_stalls(latencies),
        server_cpu_cores=None if None in server or not server else sum(server) / span,
        warmup_errors=sum(m.warmup_errors for m in measurements), error_kinds=dict(errors),
        first_error=next((m.first_error for m in measurements if m.first_error), None), client=client,
        triton=triton, config=config,
    )


@dataclass
class Window:
    """What one phase collected: latencies of correct answers, errors by kind, the first error's message."""

    latencies: list[int] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    first_error: str | None = None

    def error(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = f"{kind}: {str(exc)[:300]}"


async def _measure_async(target: Target, payload: Payload, level: Level) -> Measurement:
    callers = target.callers(payload, level.concurrency)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.open() for c in callers)), REQUEST_TIMEOUT_S)
        await asyncio.wait_for(callers[0].call_checked(), REQUEST_TIMEOUT_S)  # correctness before speed
        warmup = await _phase(callers, level.warmup_s, level.max_requests)
        before = _snapshot(target)
        started = time.perf_counter()
        window = await _phase(callers, level.duration_s, level.max_requests)
        seconds = time.perf_counter() - started
        after = _snapshot(target)
    finally:
        await asyncio.gather(*(c.close() for c in callers), return_exceptions=True)
    return _measurement(window, warmup, seconds, before, after)


async def _phase(callers, duration_s: float, max_requests: int) -> Window:
    window = Window()
    if duration_s <= 0:
        return window
    deadline = time.perf_counter() + duration_s
    budget = max_requests

    async def loop(caller) -> None:
        nonlocal budget
        clock = time.perf_counter_ns
        while budget > 0 and time.perf_counter() < deadline:
            budget -= 1
            start = clock()
            try:
                await caller.call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted and named in the report
                window.error(exc)
                await _reset_quietly(caller)
                continue
            window.latencies.append(clock() - start)

    tasks = [asyncio.ensure_future(loop(c)) for c in callers]
    _, pending = await asyncio.wait(tasks, timeout=duration_s + REQUEST_TIMEOUT_S)
    for task in pending:  # a caller still waiting for an answer long after the deadline
        task.cancel()
        window.error(TimeoutError(f"no answer within {REQUEST_TIMEOUT_S:.0f} s"))
    if pending:
        await asyncio.wait(pending)
        for caller in callers:
            await _reset_quietly(caller)
    return window


async def _reset_quietly(caller) -> None:
    try:
        await asyncio.wait_for(caller.reset(), REQUEST_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the next call reports what is wrong
        pass


@dataclass(frozen=True)
class _Snapshot:
    at: float
    client_cpu_s: float
    server_cpu_s: float | None
    metrics: Any = None


def _snapshot(target: Target) -> _Snapshot:
    from maddpg_client.metrics import scrape_settled

    metrics = None
    if target.metrics_url:
        metrics = scrape_settled(target.metrics_url, target.model)  # once the last answered requests are counted
    return _Snapshot(time.perf_counter(), time.process_time(), process_group_cpu_seconds(target.server_pid), metrics)


def _measurement(window: Window, warmup: Window, seconds: float, before: _Snapshot, after: _Snapshot) -> Measurement:
    server = None
    if before.server_cpu_s is not None and after.server_cpu_s is not None:
        server = after.server_cpu_s - before.server_cpu_s
    return Measurement(
        latencies_ns=np.asarray(window.latencies, dtype=np.int64), seconds=seconds, span_s=after.at - before.at,
        client_cpu_s=after.client_cpu_s - before.client_cpu_s, server_cpu_s=server, errors=window.errors,
        warmup_errors=int(sum(warmup.errors.values())), first_error=window.first_error or warmup.first_error,
        triton=None if before.metrics is None or after.metrics is None else after.metrics - before.metrics,
    )


# --- CPU time from /proc ---------------------------------------------------------------------------------------------
def process_ticks():
    """``(pid, process group, user + system ticks, name)`` of every process (the report's busy processes, too)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    raw = handle.read()
            except OSError:
                continue
            fields = raw.rsplit(b")", 1)[1].split()  # after the name: state ppid pgrp ... utime(11) stime(12)
            name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
            yield int(entry.name), int(fields[2]), int(fields[11]) + int(fields[12]), name


def process_group_cpu_seconds(pgid: int | None) -> float | None:
    """User + system CPU seconds of every process in group ``pgid`` (a server and, for Triton, its python stubs)."""
    if pgid is None:
        return None
    return sum(ticks for _, group, ticks, _ in process_ticks() if group == pgid) / os.sysconf("SC_CLK_TCK")
