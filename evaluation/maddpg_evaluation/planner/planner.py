"""The perfect-foresight planner: from the env's true state and the dataset's future, the actions for this step.

Each call reads the env's state (every battery's energy, every parked car's energy, the appliance's cycles and what
is already running, the district's net load so far) and solves one LP over the next ``horizon`` hours whose
objective is ``env.evaluate()``'s own arithmetic (see :mod:`.objective`); the first step of the plan becomes the
actions (receding horizon). ``mode="open-loop"`` solves once for the whole window instead and replays that plan.

Knowing the future exactly makes this an upper bound on what a controller could reach, not a deployable one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from maddpg_core.errors import PlannerError

from ..citylearn_env import layout_from_env
from ..ev_service import EvServiceRule
from .district import HOURS_PER_DAY, District, earliest_start_load, read_district
from .forecast import Forecast, check_forecast
from .lp import LinearProgram
from .objective import Weights, objective_weights

MODES = ("receding", "open-loop")
# kWh of unmet car charge cost more than anything else the objective can buy (its other terms are KPI fractions).
EV_SHORTFALL_PENALTY = 1.0
# Charging and discharging in the same hour only burns energy; this breaks the LP's ties towards not doing it.
THROUGHPUT_TIE_BREAK = 1e-9
DEADBAND_MARGIN = 1.001
# Hours whose battery efficiencies follow the previous solve's powers (the rest use the curve's best point): the
# first hours are what the env will really do; beyond them, coefficients that stay put let the warm start work
# (measured on hours 600-800: 180 simplex iterations a solve instead of 510, the same KPIs).
LINEARISED_HOURS = 6


@dataclass
class State:
    """What the env holds at the step being planned (episode index ``step``)."""

    step: int
    battery_energy: np.ndarray                  # [buildings] kWh
    ev_energy: dict[int, float]                  # session index -> kWh, for cars parked now
    appliance_load: np.ndarray                   # [buildings, steps] cycles running now + pending ones started asap
    realised_net: np.ndarray                     # [step] district net load of the steps already taken


@dataclass
class Plan:
    """A solved horizon: grid-side kWh per step for every battery (charge - discharge) and charger."""

    first_step: int
    battery: np.ndarray                          # [buildings, n] net kWh (charge > 0)
    charge: np.ndarray                           # [buildings, n]
    discharge: np.ndarray                        # [buildings, n]
    charger: np.ndarray                          # [chargers, n] kWh drawn
    energy: np.ndarray                           # [buildings, n] kWh stored after each step
    car: np.ndarray                              # [chargers, n] kWh in the parked car after each step (0: none)
    ev_shortfall_kwh: float
    objective: float


@dataclass
class Timing:
    build_seconds: list[float] = field(default_factory=list)
    solve_seconds: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.solve_seconds)

    def as_dict(self) -> dict:
        build, solve = np.asarray(self.build_seconds), np.asarray(self.solve_seconds)
        if not self.calls:
            return {"solves": 0}
        total = build + solve
        return {"solves": self.calls, "ms_per_solve_mean": 1000 * float(total.mean()),
                "ms_per_solve_p50": 1000 * float(np.median(total)), "ms_per_solve_max": 1000 * float(total.max()),
                "build_ms_mean": 1000 * float(build.mean()), "solve_ms_mean": 1000 * float(solve.mean()),
                "simplex_iterations_mean": float(np.mean(self.iterations)),
                "seconds_total": float(total.sum())}


class Planner:
    """Perfect-foresight LP planner for a CityLearn district (the env being stepped, any window).

    ``objective``: ``balanced`` | ``cost`` | ``carbon`` | ``peak`` (weights of :mod:`.objective`).
    ``horizon``: hours of foresight per solve (receding mode). ``ev``: charge every parked car to its required SOC
    by departure (or as close as the charger allows); ``False`` leaves the cars alone (charger actions 0).
    ``forecast``: what each solve knows of the future (:mod:`.forecast`): ``exact`` (the upper bound), or a forecast
    from what a deployed controller could know (``yesterday``, ``hour-profile``, ...; receding mode only).
    """

    def __init__(self, env, *, objective: str = "balanced", horizon: int = 48, ev: bool = True,
                 mode: str = "receding", weights: Weights | None = None, ev_rule: EvServiceRule | None = None,
                 forecast: str = "exact"):
        check_options(objective=objective, horizon=horizon, mode=mode, forecast=forecast)
        self.objective, self.horizon, self.ev, self.mode = objective, int(horizon), bool(ev), mode
        # With an EV service rule (the deployed policy's safety layer), plans stay inside it: every car is charged
        # at least as the rule would force it to be, and to the rule's target. A teacher must only demonstrate what
        # the policy it teaches can do.
        self.ev_rule = ev_rule
        self.weights = weights or objective_weights(objective)
        self.district: District = read_district(env)
        self.known = Forecast(self.district, forecast)   # what each solve knows of the district's future
        self.layout = layout_from_env(env)
        self.timing = Timing()
        self._previous: Plan | None = None     # last solve: its powers linearise the next solve's efficiencies
        self._previous_solution = None         # ... and its basis starts the next one
        self._open_loop: Plan | None = None

    # --- the interface the trainer and the episode runner use -----------------------------------------------------
    def actions(self, env) -> np.ndarray:
        """float32 ``[agents, action_width]`` for the env's current step, solved from the env's true state."""
        state = read_state(env, self.district, None if self.mode == "open-loop" else self.horizon)
        if state.step >= self.district.decision_steps:
            raise PlannerError("the env is at its last time step: there is no step left to plan")
        if self.mode == "open-loop":
            if self._open_loop is None or state.step < self._open_loop.first_step:
                self._open_loop = self.solve(state, self.district.decision_steps - state.step)
            plan, offset = self._open_loop, state.step - self._open_loop.first_step
        else:
            plan, offset = self.solve(state, self.horizon), 0
        return self.to_actions(plan, offset)

    def solve(self, state: State, horizon: int) -> Plan:
        """One LP over ``horizon`` steps from ``state``, warm-started from the previous solve (receding mode)."""
        started = time.perf_counter()
        program, variables = build_program(self.known.view(state.step), state, horizon, self.weights, ev=self.ev,
                                           previous=self._previous, ev_rule=self.ev_rule)
        built = time.perf_counter()
        if self.mode == "open-loop":
            solution = program.solve(method="ipm")
        else:
            try:
                solution = program.solve(warm_start=self._previous_solution)
            except PlannerError:
                if self._previous_solution is None:
                    raise
                solution = program.solve()  # a basis carried over that HiGHS could not use: start cold
        solved = time.perf_counter()
        self.timing.build_seconds.append(built - started)
        self.timing.solve_seconds.append(solved - built)
        self.timing.iterations.append(solution.iterations)
        plan = variables.plan(solution.x, state.step, solution.objective)
        self._previous, self._previous_solution = plan, solution
        return plan

    def to_actions(self, plan: Plan, offset: int) -> np.ndarray:
        """Step ``offset`` of ``plan`` in the model's padded action layout."""
        d = self.district
        out = np.zeros(self.layout.action_shape, dtype=np.float32)
        for i, battery in enumerate(d.batteries):
            out[i, d.battery_action[i]] = np.clip(plan.battery[i, offset] / battery.nominal_power, -1.0, 1.0)
        if self.ev:
            for j, charger in enumerate(d.chargers):
                out[charger.building, charger.action] = charger_action(plan.charger[j, offset], charger)
        for building, slot in d.appliance_actions:
            out[building, slot] = 1.0  # every cycle at its earliest start: see district.py
        low, high = self.layout.action_bounds()
        return np.clip(out, low, high).astype(np.float32)


class PlannerPolicy:
    """The planner behind the episode runner's ``layout`` / ``act`` interface (it reads the env, not the observations)."""

    name = "planner"

    def __init__(self, planner: Planner, env):
        self.planner, self.env = planner, env
        self.layout = layout_from_env(env)

    def act(self, observations: np.ndarray) -> np.ndarray:
        return self.planner.actions(self.env)


def check_options(*, objective: str, horizon: int, mode: str, forecast: str = "exact") -> None:
    from .objective import OBJECTIVES

    if objective not in OBJECTIVES:
        raise PlannerError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if mode not in MODES:
        raise PlannerError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if int(horizon) < 1:
        raise PlannerError(f"--horizon must be at least 1 hour, got {horizon}")
    check_forecast(forecast)
    if forecast != "exact" and mode == "open-loop":
        raise PlannerError(f"--forecast {forecast} plans from what is known at each step: it needs --mode receding")


def charger_action(energy_kwh: float, charger) -> float:
    """kWh to draw -> action, honouring the deadband: below ``min_power`` a request gives nothing, so round."""
    if energy_kwh <= 1e-6 or charger.max_power <= 0:
        return 0.0
    if energy_kwh < charger.min_power * DEADBAND_MARGIN:
        # float32 actions: a request exactly at the deadband may round below it and give nothing
        energy_kwh = charger.min_power * DEADBAND_MARGIN if energy_kwh >= 0.5 * charger.min_power else 0.0
    return float(min(energy_kwh / charger.max_power, 1.0))


def read_state(env, district: District, horizon: int | None = None) -> State:
    """The env's true state at its current step; the appliance's future is filled in for ``horizon`` steps."""
    step = int(env.time_step)
    horizon_end = district.steps if horizon is None else step + int(horizon) + 1
    battery_energy = np.array([float(b.electrical_storage.energy_init) for b in env.buildings])
    ev_energy: dict[int, float] = {}
    charger_objects = [c for b in env.buildings for c in (b.electric_vehicle_chargers or [])]
    for index, session in enumerate(district.sessions):
        if session.arrival <= step <= session.departure:
            car = charger_objects[session.charger].connected_electric_vehicle
            if car is not None and car.name == session.ev:
                ev_energy[index] = float(car.battery.energy_init)
    appliance = np.zeros_like(district.appliance_load)
    start = int(env.episode_tracker.episode_start_time_step)
    for i, building in enumerate(env.buildings):
        for device in building.deferrable_appliances or []:
            scheduled = np.asarray(device.electricity_consumption, dtype=np.float64)[: district.steps]
            appliance[i, step:scheduled.size] += scheduled[step:]   # cycles already running
            appliance[i] += earliest_start_load(device, start, district.steps, from_step=step, to_step=horizon_end,
                                                states=dict(device.cycle_state))
    realised = np.asarray(env.net_electricity_consumption, dtype=np.float64)[:step]
    return State(step=step, battery_energy=battery_energy, ev_energy=ev_energy, appliance_load=appliance,
                 realised_net=realised)


@dataclass
class Variables:
    """Column indices of one LP, to read a plan back from its solution."""

    charge: np.ndarray
    discharge: np.ndarray
    energy: np.ndarray
    charger: np.ndarray | None
    car: np.ndarray | None
    shortfall: np.ndarray | None

    def plan(self, x: np.ndarray, first_step: int, objective: float) -> Plan:
        charge, discharge = x[self.charge], x[self.discharge]
        n = charge.shape[1]
        charger = x[self.charger] if self.charger is not None else np.zeros((0, n))
        car = x[self.car] if self.car is not None else np.zeros((0, n))
        shortfall = float(x[self.shortfall].sum()) if self.shortfall is not None and self.shortfall.size else 0.0
        return Plan(first_step=first_step, battery=charge - discharge, charge=charge, discharge=discharge,
                    charger=charger, energy=x[self.energy], car=car, ev_shortfall_kwh=shortfall,
                    objective=objective)


def build_program(d: District, state: State, horizon: int, w: Weights, *, ev: bool,
                  previous: Plan | None, ev_rule: EvServiceRule | None = None) -> tuple[LinearProgram, Variables]:
    k0 = state.step
    k1 = min(k0 + int(horizon), d.decision_steps)
    n, B = k1 - k0, d.n_buildings
    steps = np.arange(k0, k1)
    lp = LinearProgram()
    base = d.base_load[:, k0:k1] + state.appliance_load[:, k0:k1]

    # --- batteries -------------------------------------------------------------------------------------------------
    power = np.array([b.max_power() for b in d.batteries])[:, None]
    charge = lp.variables((B, n), 0.0, np.broadcast_to(power, (B, n)), THROUGHPUT_TIE_BREAK, name="charge", labels=steps)
    discharge = lp.variables((B, n), 0.0, np.broadcast_to(power, (B, n)), THROUGHPUT_TIE_BREAK, name="discharge",
                             labels=steps)
    e_min = np.array([b.min_energy for b in d.batteries])[:, None]
    e_max = np.array([b.usable_capacity for b in d.batteries])[:, None]
    energy = lp.variables((B, n), np.broadcast_to(e_min, (B, n)), np.broadcast_to(e_max, (B, n)), name="energy",
                          labels=steps)
    f_charge, f_discharge = storage_factors(d, k0, n, previous, LINEARISED_HOURS)
    e0 = np.clip(state.battery_energy, e_min[:, 0], e_max[:, 0])
    # energy[k] - energy[k-1] - f_c c[k] + d[k] / f_d = 0 (energy[-1] is the state read from the env)
    rhs = np.zeros((B, n))
    rhs[:, 0] = e0
    lp.constraints([(energy, 1.0), (charge, -f_charge), (discharge, 1.0 / f_discharge),
                    (_previous_of(energy), -1.0)], rhs, rhs, name="battery", labels=steps)
    # The capacity-power curve caps |e| at the SOC before the step: c[k] <= a + b energy[k-1] for every segment.
    segments = [b.power_limit_segments() for b in d.batteries]
    for seg in range(max(len(x) for x in segments)):
        a = np.array([x[seg][0] if seg < len(x) else np.inf for x in segments])[:, None]
        slope = np.array([x[seg][1] if seg < len(x) else 0.0 for x in segments])[:, None]
        upper = np.broadcast_to(a, (B, n)).copy()
        upper[:, 0] += slope[:, 0] * e0
        for label, flow in (("charge", charge), ("discharge", discharge)):
            lp.constraints([(flow, 1.0), (_previous_of(energy), -np.broadcast_to(slope, (B, n)))], upper=upper,
                           name=f"{label} limit {seg}", labels=steps)

    # --- cars --------------------------------------------------------------------------------------------------------
    charger_cols = car_cols = shortfall = None
    flows_into = [[] for _ in range(B)]   # extra grid-side columns per building (charger draws)
    if ev and d.chargers:
        charger_cols, car_cols, shortfall = _ev_block(lp, d, state, k0, k1, steps, ev_rule)
        for j, charger in enumerate(d.chargers):
            flows_into[charger.building].append(j)

    # --- per-building imports and the district's net load --------------------------------------------------------
    imports = lp.variables((B, n), 0.0, np.inf, name="imports", labels=steps)
    terms = [(imports, 1.0), (charge, -1.0), (discharge, 1.0)]
    ev_by_building = None
    if charger_cols is not None:
        ev_by_building = _charger_sum_index(charger_cols, d, B, n)
        terms.append((ev_by_building, -1.0))
    lp.constraints(terms, lower=base, name="imports", labels=steps)
    net = lp.variables((n,), -np.inf, np.inf, name="net", labels=steps)
    terms = [(net, 1.0), (charge.T, -1.0), (discharge.T, 1.0)]
    if ev_by_building is not None:
        terms.append((np.transpose(ev_by_building, (1, 0, 2)).reshape(n, -1), -1.0))
    district_base = base.sum(axis=0)
    lp.constraints(terms, district_base, district_base, name="net", labels=steps)

    # --- objective terms, each the fraction it adds to its KPI -----------------------------------------------------
    bl = d.baseline
    cost = np.zeros((B, n))
    if w.cost:
        cost += w.cost / B * d.price[:, k0:k1] / np.maximum(bl.cost, 1e-9)[:, None]
    if w.carbon:
        cost += w.carbon / B * d.carbon[:, k0:k1] / np.maximum(bl.carbon, 1e-9)[:, None]
    lp.add_cost(imports, cost)

    realised = state.realised_net
    days = steps // HOURS_PER_DAY
    unique_days, day_of_step = np.unique(days, return_inverse=True)
    n_days = int(np.ceil(d.decision_steps / HOURS_PER_DAY))
    day_floor = np.array([realised[day * HOURS_PER_DAY:k0].max() if day * HOURS_PER_DAY < k0 else -np.inf
                          for day in unique_days])
    daily = lp.variables((unique_days.size,), day_floor, np.inf,
                         w.daily_peak / (n_days * max(bl.daily_peak, 1e-9)), name="daily", labels=unique_days)
    lp.constraints([(daily[day_of_step], 1.0), (net, -1.0)], lower=0.0, name="daily", labels=steps)
    peak_floor = realised.max() if realised.size else -np.inf
    peak = lp.variables((1,), peak_floor, np.inf, w.all_time_peak / max(bl.all_time_peak, 1e-9), name="peak",
                        labels=[0])
    lp.constraints([(np.repeat(peak, n), 1.0), (net, -1.0)], lower=0.0, name="peak", labels=steps)
    if w.ramping:
        # ramp[k] >= net[k] - net[k-1]; the step before the horizon is realised (the episode's first has no ramp)
        ramp = lp.variables((n,), 0.0, np.inf, w.ramping / max(bl.ramping, 1e-9), name="ramp", labels=steps)
        lower = np.zeros(n)
        lower[0] = -realised[-1] if realised.size else -np.inf
        lp.constraints([(ramp, 1.0), (net, -1.0), (_previous_of(net), 1.0)], lower=lower, name="ramp", labels=steps)
    return lp, Variables(charge=charge, discharge=discharge, energy=energy, charger=charger_cols, car=car_cols,
                         shortfall=shortfall)


def storage_factors(d: District, k0: int, n: int, previous: Plan | None,
                    linearised_hours: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(eta) for charging and discharging at every planned step, at the power the last solve planned there.

    Efficiency depends on power; an LP cannot hold that curve (it is not concave), so each solve linearises it at
    the previous solve's powers (receding horizon re-solves every step, so this is a fixed-point iteration). Steps
    the previous plan did not cover, planned no flow at, or that lie beyond ``linearised_hours`` use the efficiency
    at 80 % of nominal power, the curve's best point (coefficients that stay put keep the warm start short).
    """
    best = np.array([b.storage_factor(0.8 * b.nominal_power) for b in d.batteries])
    f_c, f_d = np.repeat(best[:, None], n, axis=1), np.repeat(best[:, None], n, axis=1)
    if previous is None:
        return f_c, f_d
    offset = k0 - previous.first_step
    count = min(n, previous.charge.shape[1] - offset, n if linearised_hours is None else linearised_hours)
    if offset < 0 or count <= 0:
        return f_c, f_d
    for flows, out in ((previous.charge, f_c), (previous.discharge, f_d)):
        planned = flows[:, offset:offset + count]
        for i, battery in enumerate(d.batteries):
            normalised = np.minimum(planned[i] / max(battery.nominal_power, 1e-12), 1.0)
            factor = np.sqrt(np.interp(normalised, battery.efficiency_curve[0], battery.efficiency_curve[1]))
            out[i, :count] = np.where(planned[i] > 1e-3, factor, best[i])
    return f_c, f_d


def _previous_of(index: np.ndarray) -> np.ndarray:
    """Column of the same variable one step earlier (last axis); -1 (no column) at the first step."""
    out = np.full_like(index, -1)
    out[..., 1:] = index[..., :-1]
    return out


def _ev_block(lp: LinearProgram, d: District, state: State, k0: int, k1: int, steps: np.ndarray,
              rule: EvServiceRule | None = None):
    """Charger draws and car energies for every session overlapping the horizon; shortfall at each departure.

    With ``rule``, every parked step also draws at least what the rule's floor asks for there (see
    :func:`_rule_floor`), and the departure target is the rule's.
    """
    C, n = len(d.chargers), k1 - k0
    upper = np.zeros((C, n))
    gain = np.zeros((C, n))
    continues = np.zeros((C, n))          # 1 where the same car was parked at the previous planned step
    initial = np.zeros((C, n))            # energy the car brings at its first planned step
    cap = np.zeros((C, n))
    floor = np.zeros((C, n))
    departures: list[tuple[int, int, float, int]] = []   # (charger, planned step, kWh required there, session)
    for index, s in enumerate(d.sessions):
        first, last = max(s.arrival, k0), min(s.departure, k1 - 1)
        if first > last:
            continue
        j, a, b = s.charger, first - k0, last - k0 + 1
        upper[j, a:b] = d.chargers[j].max_power
        gain[j, a:b] = s.gain
        cap[j, a:b] = s.capacity
        floor[j, a:b] = 0.0
        continues[j, a + 1:b] = 1.0
        if s.arrival > k0 and s.continues_previous:
            continues[j, a] = 1.0      # the same car, still parked: its energy carries over
            start = 0.0
        elif s.arrival >= k0:
            start = s.arrival_energy
        else:
            start = state.ev_energy.get(index)
        if start is None:
            start = s.min_energy
        initial[j, a] = min(start, s.capacity)
        required = s.required_energy
        if rule is not None:
            required = max(required + rule.target_offset * s.capacity, 0.0)
        if s.departure <= k1 - 1:
            departures.append((j, s.departure - k0, required, index))
        else:
            # Leaves after the horizon: be no further behind than the charger can still make up.
            reachable = s.gain * d.chargers[j].max_power * (s.departure - (k1 - 1))
            if required - reachable > 0:
                departures.append((j, n - 1, required - reachable, index))
    draw = lp.variables((C, n), 0.0, upper, name="draw", labels=steps)
    car = lp.variables((C, n), floor, np.maximum(cap, initial), name="car", labels=steps)
    # car[k] - continues[k] car[k-1] - gain[k] draw[k] = initial[k]
    lp.constraints([(car, 1.0), (_previous_of(car), -continues), (draw, -gain)], initial, initial, name="car",
                   labels=steps)
    sessions = [x[3] for x in departures]
    shortfall = lp.variables((len(departures),), 0.0, np.inf, EV_SHORTFALL_PENALTY, name="shortfall", labels=sessions)
    if departures:
        j = np.array([x[0] for x in departures])
        k = np.array([x[1] for x in departures])
        need = np.array([x[2] for x in departures])
        lp.constraints([(car[j, k], 1.0), (shortfall, 1.0)], lower=need, name="departure", labels=sessions)
    if rule is not None:
        _rule_floor(lp, d, k0, k1, steps, rule, draw, car, gain, cap)
    return draw, car, shortfall


def _rule_floor(lp: LinearProgram, d: District, k0: int, k1: int, steps: np.ndarray, rule: EvServiceRule,
                draw: np.ndarray, car: np.ndarray, gain: np.ndarray, cap: np.ndarray) -> None:
    """``draw[k] >= max_power * floor(state before step k)`` at every parked step, linearly.

    The floor (:meth:`EvServiceRule.floor`) with ``E = max_power * efficiency`` per step and ``e`` the car's energy
    before the step (``car[k] - gain[k] draw[k]``): known departure in ``c`` hours, ``draw >= (T cap - e - c p E) /
    efficiency`` (``p`` the rule's pace); unknown, ``draw >= (T cap - e) / (spread * efficiency)``. Both are linear
    in (draw, car). The deadband (a floor raised to the charger's minimum power) is not linear and is left out: it
    adds at most that minimum for an hour. A slack with the shortfall's penalty keeps a car that arrives too empty
    feasible.
    """
    C, n = len(d.chargers), k1 - k0
    parked = cap > 0
    countdown = d.countdown[:, k0:k1] if d.countdown.size else np.full((C, n), np.nan)
    required = d.required_soc[:, k0:k1] if d.required_soc.size else np.zeros((C, n))
    required = np.where(required > 1.0, required / 100.0, required)  # the charger files write percent
    known = np.isfinite(countdown) & (countdown >= 0)
    target = (np.clip(np.nan_to_num(required), 0.0, 1.0) + rule.target_offset) * cap
    power = np.array([c.max_power for c in d.chargers])[:, None] * rule.hours_per_step
    step_energy = power * rule.efficiency
    spread = rule.unknown_spread_hours / rule.hours_per_step
    # draw * eff_factor + e >= rhs, with e = car - gain * draw (energy before the step)
    eff_factor = np.where(known, rule.efficiency, spread * rule.efficiency)
    rhs = np.where(known, target - np.clip(np.nan_to_num(countdown), 0.0, 1e4) * rule.pace * step_energy, target)
    rows = parked & (rhs > 0)
    if not rows.any():
        return
    j, k = np.nonzero(rows)
    slack = lp.variables((j.size,), 0.0, np.inf, EV_SHORTFALL_PENALTY, name="rule slack", labels=steps[k])
    lp.constraints([(draw[j, k], eff_factor[j, k] - gain[j, k]), (car[j, k], 1.0), (slack, 1.0)],
                   lower=rhs[j, k], name="rule floor", labels=steps[k])


def _charger_sum_index(charger_cols: np.ndarray, d: District, B: int, n: int) -> np.ndarray:
    """``[B, n, width]`` charger columns per building (-1 padding), to sum draws into building loads."""
    width = max(1, max(sum(1 for c in d.chargers if c.building == i) for i in range(B)))
    out = np.full((B, n, width), -1, dtype=charger_cols.dtype)
    slot = [0] * B
    for j, charger in enumerate(d.chargers):
        out[charger.building, :, slot[charger.building]] = charger_cols[j]
        slot[charger.building] += 1
    return out
