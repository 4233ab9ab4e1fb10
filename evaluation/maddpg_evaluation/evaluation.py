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

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from maddpg_client.local_policy import LocalPolicy
from maddpg_client.metrics import ModelMetrics, scrape, scrape_settled
from maddpg_client.triton_policy import RetryPolicy, TritonPolicy
from maddpg_core.errors import MaddpgCitylearnError, PolicyUnavailableError

from .citylearn_env import EnvSpec, layout_from_env
from .episode import EpisodeResult, Policy, run_episode
from .reference_controllers import BasicBatteryRBCPolicy, ChargeOnArrivalPolicy, ZeroPolicy

PolicyFactory = Callable[[], Policy]
# Parity bounds of the contract: the served graph against the same graph in process, and against the torch policy
# it was exported from (float32 kernels of two libraries differ in the last bits; export validates at 1e-5).
PARITY_TOLERANCE = 1e-6
TORCH_PARITY_TOLERANCE = 1e-5
BARRIER_TIMEOUT_S = 300
RELATIVE_KPIS = ("cost_total", "carbon_emissions_total")


def triton_factory(url: str, protocol: str, model: str, retry: RetryPolicy | None = None) -> PolicyFactory:
    """``retry``: how long a step may wait for a server that went away (default: the client's few quick retries)."""
    return partial(_ready_triton_policy, url, protocol, model, retry)


def local_factory(path: str, model: str) -> PolicyFactory:
    return partial(LocalPolicy, path, model)


def _ready_triton_policy(url: str, protocol: str, model: str, retry: RetryPolicy | None = None) -> TritonPolicy:
    options = {"retry": retry} if retry is not None else {}
    return TritonPolicy(url, protocol=protocol, model=model, **options).wait_until_ready(timeout=30)


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
        return {
            "policy": self.policy_name,
            "model": self.layout_source,
            "env": self.env,
            "results": {"policy": result(self.policy), **{name: result(r) for name, r in self.baselines.items()}},
            "parity": parity,
            "throughput": self.throughput,
        }


def evaluate_policy(policy: PolicyFactory, spec: EnvSpec, *, policy_name: str = "policy",
             reference: PolicyFactory | None = None, reference_name: str | None = None,
             parity_tolerance: float = PARITY_TOLERANCE, baselines: bool = True,
             envs: int = 1, metrics_url: str | None = None, metrics_optional: bool = False,
             model: str | None = None, progress: bool = True,
             say: Callable[[str], None] = lambda _: None) -> EvaluationReport:
    # Everything that can be wrong is checked before the long part: window, dataset, server, layout.
    spec.check_window()
    env = spec.build()
    probe = policy()
    env_layout = layout_from_env(env, dataset=spec.dataset_name)
    probe.layout.require_compatible(env_layout, what=policy_name)
    if reference is not None:
        reference().layout.require_compatible(env_layout, what=reference_name or "the reference policy")
    if envs < 1:
        raise MaddpgCitylearnError("--envs must be at least 1")

    def snapshot(expected_success: float | None = None) -> ModelMetrics | None:
        if not (metrics_url and model):
            return None
        try:
            if expected_success is None:
                return scrape(metrics_url, model)
            return scrape_settled(metrics_url, model, expected_success=expected_success)
        except PolicyUnavailableError as exc:
            if not metrics_optional:
                raise
            say(f"no batch statistics: {exc}")
            return None

    before = snapshot()
    if envs == 1:
        main = run_episode(env, probe, reference=reference() if reference else None, name=policy_name,
                           progress=progress)
        others: list[EpisodeResult] = []
    else:
        say(f"running {envs} simulators at once, one process each")
        main, others = _run_concurrently(policy, reference, spec, envs, policy_name)
    runs = [main, *others]
    steps = sum(r.steps for r in runs)  # one inference request per step and simulator
    after = snapshot(expected_success=before.request_success + steps) if before is not None else None
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
        if window.request_success >= steps:
            throughput["server"] = window.as_dict()
            throughput["average_batch_size"] = window.average_batch_size
        else:  # counters start from zero in a restarted server: a difference across a restart means nothing
            say(f"no batch statistics: Triton counted {window.request_success:.0f} of the {steps} requests of this "
                f"run (did the server restart during it?)")

    results = {}
    if baselines:
        results = run_baselines(spec, progress=progress, say=say)
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
    )


REFERENCE_CONTROLLERS: dict[str, Callable[[Any], Policy]] = {
    "zero_actions": lambda env: ZeroPolicy(layout_from_env(env)),
    "basic_battery_rbc": BasicBatteryRBCPolicy,
    "charge_on_arrival": ChargeOnArrivalPolicy,
}


def run_baselines(spec: EnvSpec, *, progress: bool = True,
                  say: Callable[[str], None] = lambda _: None) -> dict[str, EpisodeResult]:
    """Every reference controller on the window of ``spec``, each in a fresh env."""
    results = {}
    for name, make in REFERENCE_CONTROLLERS.items():
        say(f"reference controller: {name}")
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
