"""The load driver: closed-loop callers against one server on 127.0.0.1 (Triton over HTTP or gRPC, the seed-style
server), pooled into latency percentiles, stalls and Triton's batching figures. How it loads and checks the servers,
and why this way: docs/benchmarks.md, "How"."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np

from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 10.0  # a request unanswered this long is an error, and the level stops waiting for it
# An answer this much slower than its row's median is a stall (Triton 2.51's lost wake-up holds a request for 500 ms:
# docs/benchmarks.md), counted only where the median is below STALL_DETECTABLE_MEDIAN_MS: above it (64 callers x 64
# districts, overloaded on purpose) the tail is as wide as a stall.
STALL_MS = 400.0
STALL_DETECTABLE_MEDIAN_MS = 100.0


class ResponseError(Exception):
    """An answer that arrived but is wrong: a non-200 status, a short body, wrong shape or values."""


@dataclass(frozen=True)
class Level:
    """``concurrency`` callers, ``districts`` per request, bounded in time and in requests, after a warm-up."""

    concurrency: int
    districts: int = 1
    duration_s: float = 5.0
    max_requests: int = 200_000
    warmup_s: float = 1.0


@dataclass(frozen=True)
class Payload:
    """The observations of one request and, when known, the actions a correct server answers."""

    observations: np.ndarray             # float32 [districts, agents, obs_width]
    expected: np.ndarray | None = None   # float32 [districts, agents, action_width]
    action_width: int = 0
    action_counts: tuple[int, ...] = ()  # per agent: the seed-style server answers each building's own count

    @property
    def districts(self) -> int:
        return int(self.observations.shape[0])

    @property
    def agents(self) -> int:
        return int(self.observations.shape[1])

    @property
    def answer_bytes(self) -> int:
        return self.districts * self.agents * self.action_width * 4


@dataclass
class Target:
    """A server on 127.0.0.1: ``triton-*-grpc`` speaks gRPC, other ``triton-*`` HTTP, the rest the seed's API."""

    name: str
    port: int
    model: str = ""
    metrics_url: str | None = None  # Triton's /metrics, for batching figures
    server_pid: int | None = None   # leader of the server's process group, for its CPU time
    config: str = ""


@dataclass
class Measurement:
    """One measured window (the windows of interleaved rounds pool into one result: :func:`summarise`)."""

    latencies_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0                # length of the measured window
    span_s: float = 0.0                 # between the CPU/metrics snapshots around it
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    errors: Counter = field(default_factory=Counter)
    warmup_errors: int = 0
    first_error: str | None = None
    triton: Any = None                  # ModelMetrics difference over the window

    def error(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {str(exc)[:300]}"


def find(results: list[dict], target: str, concurrency: int, districts: int) -> dict | None:
    """The result of ``target`` at one level, or None."""
    return next((r for r in results if (r["target"], r["concurrency"], r["districts"]) ==
                 (target, concurrency, districts)), None)


def count_stalls(latencies_ns: np.ndarray) -> int | None:
    """Answers slower than the median by more than ``STALL_MS``; None where a stall would not stand out."""
    if latencies_ns.size == 0:
        return 0
    median = np.median(latencies_ns)
    return None if median > STALL_DETECTABLE_MEDIAN_MS * 1e6 else int((latencies_ns > median + STALL_MS * 1e6).sum())


def summarise(name: str, level: Level, payload: Payload, measurements: list[Measurement], *,
              client: str = "asyncio-raw", config: str = "") -> dict[str, Any]:
    """Pool windows into one result row of ``benchmarks.json``: all latencies together; requests, seconds, CPU time
    and Triton's counters summed."""
    latencies = np.concatenate([np.zeros(0, np.int64), *(m.latencies_ns for m in measurements)])
    ms = latencies / 1e6 if latencies.size else np.full(1, np.nan)
    errors = sum((m.errors for m in measurements), Counter())
    seconds, span = float(sum(m.seconds for m in measurements)), sum(m.span_s for m in measurements) or 1e-9
    server, deltas = [m.server_cpu_s for m in measurements], [m.triton for m in measurements]
    requests_per_s = latencies.size / seconds if seconds else 0.0
    return {
        "target": name, "concurrency": level.concurrency,
        "districts": payload.districts, "agents": payload.agents,  # a district: one row of all agents
        "requests": int(latencies.size), "errors": sum(errors.values()), "seconds": seconds,  # the measured window
        **dict(zip(("p50_ms", "p95_ms", "p99_ms"), map(float, np.percentile(ms, [50, 95, 99])))),
        "mean_ms": float(ms.mean()), "max_ms": float(ms.max()),
        "client_cpu_cores": sum(m.client_cpu_s for m in measurements) / span,  # the load generator's
        "stalled": count_stalls(latencies),  # None: a stall would not stand out
        "server_cpu_cores": None if None in server or not server else sum(server) / span,
        "warmup_errors": sum(m.warmup_errors for m in measurements), "error_kinds": dict(errors),
        "first_error": next((m.first_error for m in measurements if m.first_error), None), "client": client,
        # Triton's metrics over the window: average_batch_size (rows per model execution), queue and compute time
        "triton": None if None in deltas or not deltas else
                  type(deltas[0])(*map(sum, zip(*map(astuple, deltas)))).as_dict(),
        "config": config,  # which server configuration
        "requests_per_s": requests_per_s, "decisions_per_s": requests_per_s * payload.districts * payload.agents,
    }


# --- requests and their checks ----------------------------------------------------------------------------------------
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


def http_request(path: str, port: int, body: bytes, content_type: str, **headers: object) -> bytes:
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def triton_http(model: str, payload: Payload, port: int) -> tuple[bytes, Any]:
    """A KServe-v2 binary-tensor request, and the check of its answer."""
    data = np.ascontiguousarray(payload.observations, dtype=np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": INPUT_NAME, "shape": list(payload.observations.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}]},
                        separators=(",", ":")).encode()

    def check(headers: dict[str, str], body: bytes) -> None:
        length = int(headers.get("inference-header-content-length", len(body)))
        output = next(o for o in json.loads(body[:length])["outputs"] if o["name"] == OUTPUT_NAME)
        check_actions(np.frombuffer(body[length:], dtype=np.float32).reshape(output["shape"]), payload)

    request = http_request(f"/v2/models/{model}/infer", port, header + data, "application/octet-stream",
                           Inference_Header_Content_Length=len(header))
    return request, check


def seed_http(payload: Payload, port: int) -> tuple[bytes, Any]:
    """``POST /predict`` in the seed's JSON form (``{"observations": [{"obs": [...]}, ...]}``, one district)."""
    if payload.districts != 1:
        raise ValueError("the seed-style API takes one district per request")
    body = json.dumps({"observations": [{"obs": [float(v) for v in row]} for row in payload.observations[0]]})

    def check(_headers: dict[str, str], answer: bytes) -> None:
        actions = json.loads(answer)["actions"]
        if len(actions) != payload.agents:
            raise ResponseError(f"answer has {len(actions)} buildings, expected {payload.agents}")
        for i, (row, count) in enumerate(zip(actions, payload.action_counts)):
            if len(row) != count or not all(-1.0 <= a <= 1.0 for a in row):
                raise ResponseError(f"building {i}: {row} is not {count} actions in [-1, 1]")

    return http_request("/predict", port, body.encode(), "application/json"), check


class HttpCaller:
    """One HTTP/1.1 keep-alive connection sending one pre-encoded request; answers checked by status and size."""

    def __init__(self, port: int, request: bytes, min_body: int, check):
        self.port, self.request, self.min_body, self.check = port, request, min_body, check
        self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)
            self.writer = None

    async def call(self, checked: bool = False) -> None:
        self.writer.write(self.request)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if "content-length" not in headers:
            raise ResponseError(f"answer without Content-Length ({status_line}); this driver needs one")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
            await self.open()
        if status_line.split(" ", 2)[1] != "200":
            raise ResponseError(f"{status_line}: {body[:200].decode(errors='replace')}")
        if checked:
            self.check(headers, body)
        elif len(body) < self.min_body:
            raise ResponseError(f"answer of {len(body)} bytes, expected at least {self.min_body}")


class GrpcCaller:
    """One gRPC channel to Triton (its own TCP connection, like separate clients), a pre-built ``ModelInferRequest``."""

    def __init__(self, port: int, model: str, payload: Payload):
        from tritonclient.grpc import service_pb2

        self.port, self.payload, self.channel = port, payload, None
        self.request = service_pb2.ModelInferRequest(model_name=model)
        tensor = self.request.inputs.add(name=INPUT_NAME, datatype="FP32")
        tensor.shape.extend(payload.observations.shape)
        self.request.outputs.add(name=OUTPUT_NAME)
        self.request.raw_input_contents.append(np.ascontiguousarray(payload.observations, np.float32).tobytes())

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.aio.insecure_channel(f"{HOST}:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        await asyncio.wait_for(self.channel.channel_ready(), REQUEST_TIMEOUT_S)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def call(self, checked: bool = False) -> None:
        response = await self.stub.ModelInfer(self.request, timeout=REQUEST_TIMEOUT_S)
        sizes = [len(r) for r in response.raw_output_contents]
        if sizes != [self.payload.answer_bytes]:
            raise ResponseError(f"answer of {sizes} bytes, expected [{self.payload.answer_bytes}]")
        if checked:
            actions = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
            check_actions(actions.reshape(list(response.outputs[0].shape)), self.payload)


def callers(target: Target, payload: Payload, count: int) -> list:
    if target.name.startswith("triton") and target.name.endswith("grpc"):
        return [GrpcCaller(target.port, target.model, payload) for _ in range(count)]
    if target.name.startswith("triton"):
        request, check = triton_http(target.model, payload, target.port)
        return [HttpCaller(target.port, request, payload.answer_bytes, check) for _ in range(count)]
    request, check = seed_http(payload, target.port)
    return [HttpCaller(target.port, request, 2, check) for _ in range(count)]


# --- running a level --------------------------------------------------------------------------------------------------
def measure(target: Target, payload: Payload, level: Level) -> Measurement:
    """One window of ``target`` at ``level``, blocking (its own event loop)."""
    return asyncio.run(_measure(target, payload, level))


async def _measure(target: Target, payload: Payload, level: Level) -> Measurement:
    from maddpg_client.metrics import scrape_settled

    def snapshot() -> tuple:  # wall clock, CPU time here and of the server, Triton's counters once answers are counted
        metrics = scrape_settled(target.metrics_url, target.model) if target.metrics_url else None
        return time.perf_counter(), time.process_time(), process_group_cpu_seconds(target.server_pid), metrics

    group = callers(target, payload, level.concurrency)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.open() for c in group)), REQUEST_TIMEOUT_S)
        await asyncio.wait_for(group[0].call(checked=True), REQUEST_TIMEOUT_S)  # correctness before speed
        warmup = await _phase(group, level.warmup_s, level.max_requests)
        before = snapshot()
        window = await _phase(group, level.duration_s, level.max_requests)
        after = snapshot()
    finally:
        await asyncio.gather(*(c.close() for c in group), return_exceptions=True)
    window.span_s, window.client_cpu_s, window.server_cpu_s, window.triton = (
        None if a is None or b is None else a - b for a, b in zip(after, before))
    window.warmup_errors, window.first_error = sum(warmup.errors.values()), window.first_error or warmup.first_error
    return window


async def _phase(group: list, duration_s: float, max_requests: int) -> Measurement:
    window, latencies, started = Measurement(), [], time.perf_counter()
    deadline, budget = started + duration_s, max_requests

    async def loop(caller) -> None:
        nonlocal budget
        while budget > 0 and time.perf_counter() < deadline:
            budget -= 1
            start = time.perf_counter_ns()
            try:
                await caller.call()
            except Exception as exc:  # noqa: BLE001 - every failure is counted and named in the report
                window.error(exc)
                await _reconnect(caller)
                continue
            latencies.append(time.perf_counter_ns() - start)

    if duration_s > 0:
        done, pending = await asyncio.wait([asyncio.ensure_future(loop(c)) for c in group],
                                           timeout=duration_s + REQUEST_TIMEOUT_S)
        for task in done:
            task.result()  # a failure outside a request (a bug here) is raised, not lost
        for task in pending:  # a caller still waiting for an answer long after the deadline
            task.cancel()
            window.error(TimeoutError(f"no answer within {REQUEST_TIMEOUT_S:.0f} s"))
        if pending:
            await asyncio.wait(pending)
            for caller in group:
                await _reconnect(caller)
    window.latencies_ns, window.seconds = np.asarray(latencies, np.int64), time.perf_counter() - started
    return window


async def _reconnect(caller) -> None:
    try:
        await asyncio.wait_for(caller.close(), REQUEST_TIMEOUT_S)
        await asyncio.wait_for(caller.open(), REQUEST_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the next call reports what is wrong
        pass


# --- CPU time from /proc ----------------------------------------------------------------------------------------------
def process_ticks():
    """``(pid, process group, user + system ticks, name)`` of every process (the report's busy processes, too)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    raw = handle.read()
            except OSError:
                continue
            stat = raw.rsplit(b")", 1)[1].split()  # after the name: state ppid pgrp ... utime(11) stime(12)
            name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
            yield int(entry.name), int(stat[2]), int(stat[11]) + int(stat[12]), name


def process_group_cpu_seconds(pgid: int | None) -> float | None:
    """User + system CPU seconds of process group ``pgid`` (a server and, for Triton, its python stubs)."""
    if pgid is None:
        return None
    return sum(ticks for _, group, ticks, _ in process_ticks() if group == pgid) / os.sysconf("SC_CLK_TCK")
