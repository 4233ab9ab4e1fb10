"""Prove in CityLearn that a policy (served or local) is the trained one, and measure how well it controls the district.

:func:`evaluate_policy` runs the policy through an env window deterministically, optionally steps a reference policy in
lockstep (parity), runs the reference controllers on the same window (zero actions, BasicBatteryRBC, charge on
arrival), and can run
``envs`` simulators at once against one server so that Triton's dynamic batching has something to batch. The
simulators step in lockstep, like a fleet of co-simulations on a shared clock: every step, all of them ask for their
actions at the same moment, which is when a server can batch.

Policies are given as *factories* (zero-argument callables returning an object with ``layout`` and ``act``): with
``envs > 1`` each simulator runs in its own process and builds its own client there. Use picklable factories
(``functools.partial`` of a module-level function or class) for that case.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from maddpg_client.local_policy import LocalPolicy, resolve_model_file
from maddpg_client.metrics import ModelMetrics, scrape, scrape_settled
from maddpg_client.triton_policy import RetryPolicy, TritonPolicy
from maddpg_core.errors import MaddpgCitylearnError, ModelNotFoundError, PolicyUnavailableError
from maddpg_core.files import sha256_file

from .citylearn_env import EnvSpec, layout_from_env
from .episode import EpisodeResult, Policy, run_episode
from .reference_controllers import BasicBatteryRBCPolicy, ChargeOnArrivalPolicy, ZeroPolicy

log = logging.getLogger(__name__)

PolicyFactory = Callable[[], Policy]
# Parity bounds of the contract: the served graph against the same graph in process, and against the torch policy
# it was exported from (float32 kernels of two libraries differ in the last bits; export validates at 1e-5).
PARITY_TOLERANCE = 1e-6
TORCH_PARITY_TOLERANCE = 1e-5
BARRIER_TIMEOUT_S = 300
RELATIVE_KPIS = ("cost_total", "carbon_emissions_total")


def triton_factory(url: str, protocol: str, model: str, retry: RetryPolicy | None = None,
                   ready_timeout: float = 30.0) -> PolicyFactory:
    """``retry``: how long a step may wait for a server that went away (default: the client's few quick retries);
    ``ready_timeout``: how long to wait for a server still starting (a wrong protocol or model fails at once)."""
    return partial(_ready_triton_policy, url, protocol, model, retry, ready_timeout)


def local_factory(path: str, model: str) -> PolicyFactory:
    return partial(LocalPolicy, path, model)


def _ready_triton_policy(url: str, protocol: str, model: str, retry: RetryPolicy | None = None,
                         ready_timeout: float = 30.0) -> TritonPolicy:
    options = {"retry": retry} if retry is not None else {}
    return TritonPolicy(url, protocol=protocol, model=model, **options).wait_until_ready(timeout=ready_timeout)


@dataclass(frozen=True)
class ModelIdentity:
    """What an evaluation ran, precisely enough to find it again: model, version, config variant, backend, and the
    sha256 of its ``model.onnx`` where the file is on this machine. ``notes`` say how a field was found where it was
    not read directly."""

    name: str
    version: str | None = None
    config_variant: str | None = None
    backend: str | None = None
    server: str | None = None
    onnx_file: str | None = None
    onnx_sha256: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``maddpg_ctde v2``: how tables and legends name the policy."""
        return f"{self.name} v{self.version}" if self.version else self.name


def identify(policy: Policy, *, name: str, config_variant: str | None = None,
             files: str | os.PathLike | None = None) -> ModelIdentity:
    """The identity of ``policy``: read from the local file, or asked from the server (``files``: where this machine
    has the served version's files, e.g. the repository a local server was started on)."""
    if isinstance(policy, LocalPolicy):
        path = Path(policy.path)
        version = path.parent.name if path.parent.name.isdigit() else None
        return ModelIdentity(name=path.parent.parent.name if version else path.stem, version=version,
                             backend="onnxruntime (in process)", onnx_file=str(path), onnx_sha256=sha256_file(path))
    if not isinstance(policy, TritonPolicy):
        return ModelIdentity(name=name)
    notes = []
    config = policy.model_config()
    backend = config.get("backend") or config.get("platform") or None
    version = policy.served_version()
    server = f"Triton {policy.server_metadata().get('version', '?')} at {policy.where}"
    if config_variant is None:
        config_variant = _infer_variant(config)
        notes.append("config_variant inferred from the served config (the server does not name the file)")
    onnx_file = onnx_sha256 = None
    if files is not None:
        try:
            found = resolve_model_file(files, policy.model, int(version) if version else None)
            onnx_file, onnx_sha256 = str(found), sha256_file(found)
        except (ModelNotFoundError, ValueError) as exc:
            notes.append(f"no model.onnx digest: {exc}")
    else:
        notes.append("no model.onnx digest: the server does not expose its files (evaluate --serve, or "
                     "--reference-onnx with the served repository, records it)")
    return ModelIdentity(name=policy.model, version=version, config_variant=config_variant, backend=backend,
                         server=server, onnx_file=onnx_file, onnx_sha256=onnx_sha256, notes=tuple(notes))


def _infer_variant(config: dict) -> str:
    """The exported variant a served config is: ``local`` (python backend), ``default`` (config.pbtxt: a KIND_GPU
    instance group) or ``cpu`` (onnxruntime on KIND_CPU only)."""
    if config.get("backend") == "python":
        return "local"
    kinds = {str(group.get("kind", "")) for group in config.get("instance_group", [])}
    return "default" if any("GPU" in kind for kind in kinds) else "cpu"


@dataclass
class EvaluationReport:
    policy_name: str
    env: dict[str, Any]
    policy: EpisodeResult
    baselines: dict[str, EpisodeResult] = field(default_factory=dict)
    reference_name: str | None = None
    parity_tolerance: float = PARITY_TOLERANCE
    throughput: dict[str, Any] = field(default_factory=dict)
    layout_source: dict[str, Any] = field(default_factory=dict)
    model: ModelIdentity | None = None

    @property
    def policy_label(self) -> str:
        """The policy's short name in tables and legends (``maddpg_ctde v2``, ``planner``)."""
        return self.model.label if self.model is not None else "policy"

    def relative_to_charge_on_arrival(self, result: EpisodeResult) -> dict[str, float] | None:
        """Cost and carbon of ``result`` over those of charge on arrival (the reference that serves the cars too).

        Both KPIs are ratios to no control, which never charges a car; dividing by charge on arrival's ratio asks
        instead how a controller compares with one that charges every car.
        """
        reference = self.baselines.get("charge_on_arrival")
        if reference is None:
            return None
        return {kpi: _ratio(result.kpis.get(kpi), reference.kpis.get(kpi)) for kpi in RELATIVE_KPIS}

    @property
    def parity_ok(self) -> bool | None:
        value = self.policy.parity_max_abs_diff
        return None if value is None else value <= self.parity_tolerance

    def to_dict(self) -> dict[str, Any]:
        def result(r: EpisodeResult) -> dict[str, Any]:
            out = {"kpis": r.kpis, "service": r.service, "steps": r.steps,
                   "env_ms_per_step": r.env_ms_per_step, "inference_ms_per_step": r.inference_ms_per_step}
            relative = self.relative_to_charge_on_arrival(r)
            if relative is not None:
                out["relative_to_charge_on_arrival"] = relative
            return out

        parity = None
        if self.policy.parity is not None:
            parity = {"reference": self.reference_name, "max_abs_diff": self.policy.parity_max_abs_diff,
                      "tolerance": self.parity_tolerance,
                      "steps_over_tolerance": int((self.policy.parity > self.parity_tolerance).sum()),
                      "ok": self.parity_ok}
        identity = {k: v for k, v in asdict(self.model).items() if k != "notes"} if self.model else {}
        if self.model is not None and self.model.notes:
            identity["notes"] = list(self.model.notes)
        return {
            "policy": self.policy_name,
            "model": {**identity, "source": self.layout_source},
            "env": self.env,
            "results": {"policy": result(self.policy), **{name: result(r) for name, r in self.baselines.items()}},
            "parity": parity,
            "throughput": self.throughput,
        }


def evaluate_policy(policy: PolicyFactory, spec: EnvSpec, *, policy_name: str = "policy",
                    reference: PolicyFactory | None = None, reference_name: str | None = None,
                    parity_tolerance: float = PARITY_TOLERANCE, baselines: bool = True,
                    envs: int = 1, metrics_url: str | None = None, metrics_optional: bool = False,
                    model: str | None = None, progress: bool = True, config_variant: str | None = None,
                    model_files: str | os.PathLike | None = None) -> EvaluationReport:
    """Run ``policy`` through the window of ``spec`` (see the module's doc).

    Batch statistics come from Triton's metrics endpoint: ``metrics_url``, else found from the server's address
    (:func:`metrics_candidates`), and used only once a request of this run was seen counted there. ``config_variant``
    and ``model_files`` complete the model's identity where the caller knows them (a server it started itself).
    """
    # Everything that can be wrong is checked before the long part: window, server, dataset, layout. The server
    # first: it answers in a fraction of a second, the env takes seconds to build.
    spec.check_window()
    if envs < 1:
        raise MaddpgCitylearnError("--envs must be at least 1")
    probe = policy()
    env = spec.build()
    env_layout = layout_from_env(env, dataset=spec.dataset_name)
    probe.layout.require_compatible(env_layout, what=policy_name)
    if reference is not None:
        reference().layout.require_compatible(env_layout, what=reference_name or "the reference policy")
    identity = identify(probe, name=policy_name, config_variant=config_variant, files=model_files)

    counted_at = None
    if isinstance(probe, TritonPolicy) and model:
        candidates = [metrics_url] if metrics_url else metrics_candidates(probe.url, probe.protocol)
        counted_at = find_metrics_endpoint(probe, candidates, explicit=not metrics_optional)
    before = scrape(counted_at, model) if counted_at else None
    if envs == 1:
        main = run_episode(env, probe, reference=reference() if reference else None, name=policy_name,
                           progress=progress)
        others: list[EpisodeResult] = []
    else:
        log.info("running %d simulators at once, one process each", envs)
        main, others = _run_concurrently(policy, reference, spec, envs, policy_name)
    runs = [main, *others]
    steps = sum(r.steps for r in runs)  # one inference request per step and simulator
    after = (scrape_settled(counted_at, model, expected_success=before.request_success + steps)
             if before is not None else None)
    # Only the stepping counts: env construction, process start-up and KPI evaluation are not decisions.
    wall = max(r.extra["stepped_at"] for r in runs) - min(r.extra["started_at"] for r in runs)
    throughput = {
        "envs": envs,
        "steps_per_simulator": [r.steps for r in runs],
        "wall_seconds": wall,
        "district_steps_per_second": steps / wall,
        "agent_decisions_per_second": steps * env_layout.n_agents / wall,
    }
    if before is not None and after is not None:
        window: ModelMetrics = after - before
        throughput["metrics_url"] = counted_at
        if window.request_success >= steps:
            throughput["server"] = window.as_dict()
            throughput["average_batch_size"] = window.average_batch_size
        elif after.request_success < before.request_success or getattr(probe, "retried", 0):
            # Seen, not guessed: the counters went back, or this client had to retry a server that was away.
            log.warning("no batch statistics: the server went away during the run (%d call(s) retried) and its "
                        "counters at %s started again from zero (%.0f -> %.0f successful requests)",
                        getattr(probe, "retried", 0), counted_at, before.request_success, after.request_success)
        else:
            log.warning("no batch statistics: the counters at %s rose by %.0f for the %d requests of this run",
                        counted_at, window.request_success, steps)

    results = {}
    if baselines:
        results = run_baselines(spec, progress=progress)
    return EvaluationReport(
        policy_name=policy_name,
        env={"dataset": spec.dataset_name, "schema": str(spec.resolve_schema()), "start": spec.start, "end": spec.end,
             "steps": main.steps, "citylearn_version": env_layout.citylearn_version},
        policy=main,
        baselines=results,
        reference_name=reference_name,
        parity_tolerance=parity_tolerance,
        throughput=throughput,
        layout_source=dict(probe.layout.source),
        model=identity,
    )


def metrics_candidates(url: str, protocol: str) -> list[str]:
    """Where a Triton serving ``url`` may publish its metrics: Triton's own layout (HTTP, gRPC, metrics on three
    consecutive ports: 8000, 8001, 8002) shifted to ``url``'s port, then the default 8002."""
    host, _, port = url.rpartition(":")
    offset = 2 if protocol == "http" else 1
    found = [f"http://{host}:{int(port) + offset}/metrics", f"http://{host}:8002/metrics"]
    return list(dict.fromkeys(found))


def find_metrics_endpoint(policy: TritonPolicy, candidates: list[str], *, explicit: bool = False) -> str | None:
    """The first of ``candidates`` that counts a request sent now through ``policy``: the metrics of *this* server.

    A guessed port may belong to another server, whose counters say nothing about this run; one probe request (zeros,
    which the graph answers like any observation) tells them apart. Returns None, having said why, when none does;
    with ``explicit`` (the user named the endpoint) that is an error instead.
    """
    readable, unreadable = {}, []
    for url in candidates:
        try:
            readable[url] = scrape(url, policy.model, timeout=2.0)
        except PolicyUnavailableError as exc:
            unreadable.append(str(exc))
    if readable:
        policy.act(np.zeros((1, *policy.layout.observation_shape), np.float32))
        for url, before in readable.items():
            after = scrape_settled(url, policy.model, expected_success=before.request_success + 1, timeout_s=3.0)
            if after.request_success >= before.request_success + 1:
                return url
    why = "; ".join([*(f"{url} does not count its requests" for url in readable), *unreadable])
    if explicit:
        raise MaddpgCitylearnError(f"--metrics-url is not the metrics endpoint of {policy.where} ({why}): pass the "
                                   f"server's own (its --metrics-port), or leave --metrics-url out")
    log.warning("no batch statistics: the metrics endpoint of %s was not found (%s); pass --metrics-url "
                "http://HOST:PORT/metrics with the server's metrics port", policy.where, why)
    return None


REFERENCE_CONTROLLERS: dict[str, Callable[[Any], Policy]] = {
    "zero_actions": lambda env: ZeroPolicy(layout_from_env(env)),
    "basic_battery_rbc": BasicBatteryRBCPolicy,
    "charge_on_arrival": ChargeOnArrivalPolicy,
}


def run_baselines(spec: EnvSpec, *, progress: bool = True) -> dict[str, EpisodeResult]:
    """Every reference controller on the window of ``spec``, each in a fresh env."""
    results = {}
    for name, make in REFERENCE_CONTROLLERS.items():
        log.info("reference controller: %s", name)
        env = spec.build()
        results[name] = run_episode(env, make(env), name=name, progress=progress)
    return results


def _ratio(value, reference) -> float:
    try:
        return float(value) / float(reference)
    except (TypeError, ValueError, ZeroDivisionError):
        return float("nan")


def _episode_in_worker(policy: PolicyFactory, reference: PolicyFactory | None, spec: EnvSpec, name: str,
                       barrier) -> EpisodeResult:
    env, own_policy = spec.build(), policy()
    own_reference = reference() if reference else None
    barrier.wait(timeout=BARRIER_TIMEOUT_S)  # all simulators start stepping together, after their slow set-up
    return run_episode(env, own_policy, reference=own_reference, name=name,
                       before_act=lambda: barrier.wait(timeout=BARRIER_TIMEOUT_S))


def _run_concurrently(policy, reference, spec, envs, name) -> tuple[EpisodeResult, list[EpisodeResult]]:
    # spawn, not fork: the parent holds gRPC/HTTP clients and threads that must not be duplicated.
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=envs, mp_context=context) as pool:
        barrier = manager.Barrier(envs)
        futures = [pool.submit(_episode_in_worker, policy, reference if i == 0 else None, spec, f"{name}[{i}]",
                               barrier) for i in range(envs)]
        results = [f.result() for f in futures]
    return results[0], results[1:]
