"""What the planner's LP needs to know about a district, read from a built CityLearn env (citylearn 3.0.2).

Everything is in episode time steps: index 0 is the env's ``simulation_start_time_step``. The env is built from the
dataset's files (buildings' energy simulation, pricing, carbon intensity, charger and appliance CSVs), so reading
the loaded series from it is reading the dataset, already cut to the window and normalised the way the env uses it.

Facts of citylearn 3.0.2 this module encodes (see ``docs/model-card.md`` and the env's source):

* The battery action is a fraction of the battery's *nominal power* over the step; the grid sees exactly the
  requested energy unless a limit binds. The stored energy changes by ``e * sqrt(eta)`` when charging and
  ``e / sqrt(eta)`` when discharging, ``eta`` read from the battery's power-efficiency curve at ``|e| / P``. The
  power a battery accepts or gives is capped by its capacity-power curve at the state of charge before the step
  (a full battery gives only ~25 % of its nominal power).
* A charger action is a fraction of its ``max_charging_power``; requests under ``min_charging_power`` give nothing.
  The car's battery gains ``e * charger efficiency * sqrt(eta_car)``.
* A car's session is a run of charger state 1 with one EV id; the state-of-charge at its last connected step (after
  that step's action) is what ``evaluate_v2`` compares with the required SOC. The arrival SOC is the estimate on the
  state-2 row just before the session (the env forces it in), when there is one.
* The no-control baseline of ``env.evaluate()`` is the control run less storage and chargers: it keeps the
  controller's deferrable-appliance load. The planner runs every appliance cycle at its earliest start (action 1.0,
  as the references do), so its baseline is known before the episode: base load plus that appliance load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maddpg_core.errors import PlannerError

from ..citylearn_names import APPLIANCE_ACTION_PREFIX, BATTERY_ACTION, CHARGER_ACTION_PREFIX

CONNECTED = 1
INCOMING = 2
HOURS_PER_DAY = 24
THERMAL_DEMANDS = ("cooling_demand", "heating_demand", "dhw_demand")


def interpolate(curve: np.ndarray, x: float) -> float:
    """citylearn's piecewise-linear curve lookup (``curve`` is ``[2, n]``: x row, y row), clipped at the ends."""
    return float(np.interp(x, curve[0], curve[1]))


@dataclass(frozen=True)
class BatterySpec:
    capacity: float                  # kWh, what SOC fractions refer to
    usable_capacity: float           # kWh, the degraded capacity that caps charging
    nominal_power: float             # kW: action 1.0 asks for this much energy in one hour
    min_energy: float                # kWh, (1 - depth of discharge) * capacity
    efficiency_curve: np.ndarray     # [2, n]: normalised power -> technical efficiency
    capacity_power_curve: np.ndarray  # [2, m]: SOC -> fraction of nominal power available

    def storage_factor(self, energy_kwh: float) -> float:
        """sqrt(eta) at this grid-side energy: stored = e * f when charging, drawn = e / f when discharging."""
        normalised = min(abs(energy_kwh) / max(self.nominal_power, 1e-12), 1.0)
        return interpolate(self.efficiency_curve, normalised) ** 0.5

    def max_power(self) -> float:
        """The most the capacity-power curve ever allows, kWh per hour (its value at empty, ~98 % of nominal)."""
        return self.nominal_power * float(np.max(self.capacity_power_curve[1]))

    def power_limit_segments(self) -> list[tuple[float, float]]:
        """The steep parts of the capacity-power curve as lines ``limit = a + b * energy_kwh``.

        The curve is concave (flat, then falling fast near full), so the cap is the minimum of its lines. Lines that
        lose less than a tenth of nominal power over their span are left to the variable bound (``max_power``): the
        env clips the few per cent they would take and the next solve starts from what really happened.
        """
        x, y = self.capacity_power_curve
        segments = []
        for i in range(len(x) - 1):
            if y[i] - y[i + 1] < 0.1:
                continue
            slope = (y[i + 1] - y[i]) / max(x[i + 1] - x[i], 1e-12)
            a = self.nominal_power * (y[i] - slope * x[i])
            b = self.nominal_power * slope / max(self.capacity, 1e-12)
            segments.append((a, b))
        return segments


@dataclass(frozen=True)
class Charger:
    building: int
    action: int                      # slot in the building's action list
    charger_id: str
    max_power: float                 # kW, action 1.0
    min_power: float                 # kW, the deadband: smaller requests give nothing
    efficiency: float


@dataclass(frozen=True)
class Session:
    """One car parked at one charger from ``arrival`` to ``departure`` (inclusive episode steps)."""

    charger: int                     # index into District.chargers
    ev: str
    arrival: int
    departure: int
    required_energy: float           # kWh the car should hold at departure (required SOC * capacity)
    capacity: float                  # kWh
    min_energy: float                # kWh (1 - depth of discharge) * capacity
    arrival_energy: float | None     # kWh, from the dataset's estimate; None when the dataset has none
    gain: float                      # kWh into the car per kWh drawn by the charger
    # The same car stayed on from the previous session at this charger: a stay whose first hours have no departure
    # countdown ends, for evaluate_v2, where the countdown appears, and goes on as a new session with the same car.
    continues_previous: bool = False


@dataclass
class Baseline:
    """The no-control figures ``env.evaluate()`` divides by, for the planner's appliance schedule."""

    cost: np.ndarray                 # [buildings] sum of positive imports * price
    carbon: np.ndarray               # [buildings] sum of positive imports * carbon intensity
    daily_peak: float                # mean over 24-step blocks of the district's max net load
    all_time_peak: float
    ramping: float                   # sum of positive step-to-step changes of the district's net load


@dataclass
class District:
    building_names: list[str]
    steps: int                       # env.time_steps; the last one is never stepped
    base_load: np.ndarray            # [buildings, steps] net load with nothing controlled: loads - solar, kWh
    appliance_load: np.ndarray       # [buildings, steps] every appliance cycle at its earliest start, kWh
    price: np.ndarray                # [buildings, steps]
    carbon: np.ndarray               # [buildings, steps]
    batteries: list[BatterySpec]
    battery_action: list[int]        # slot of electrical_storage in each building's action list
    chargers: list[Charger]
    sessions: list[Session]
    appliance_actions: list[tuple[int, int]]  # (building, slot) of every deferrable appliance
    # What each charger's car looks like to a controller, per step: the departure countdown it observes (NaN where
    # the stay has none yet, or no car) and the required SOC. The deployed policy's EV rule reads these.
    countdown: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))   # [chargers, steps]
    required_soc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [chargers, steps]
    baseline: Baseline = field(init=False)

    def __post_init__(self):
        self.baseline = baseline_figures(self.base_load + self.appliance_load, self.price, self.carbon)

    @property
    def n_buildings(self) -> int:
        return len(self.building_names)

    @property
    def decision_steps(self) -> int:
        """Steps the episode runner acts on (and ``env.evaluate()`` scores): all but the last."""
        return self.steps - 1


def baseline_figures(net: np.ndarray, price: np.ndarray, carbon: np.ndarray) -> Baseline:
    """The denominators of ``env.evaluate()`` (citylearn internal/kpi.py) for per-building net loads ``net``."""
    net = net[:, :-1]  # the terminal step is never simulated
    imports = np.clip(net, 0.0, None)
    district = net.sum(axis=0)
    blocks = [district[i:i + HOURS_PER_DAY] for i in range(0, district.size, HOURS_PER_DAY)]
    return Baseline(
        cost=(imports * price[:, :-1]).sum(axis=1),
        carbon=(imports * carbon[:, :-1]).sum(axis=1),
        daily_peak=float(np.mean([b.max() for b in blocks])),
        all_time_peak=float(district.max()),
        ramping=float(np.clip(np.diff(district), 0.0, None).sum()),
    )


def read_district(env) -> District:
    """Read the whole episode's exogenous series and every device's parameters from ``env`` (any window)."""
    steps = int(env.time_steps)
    if steps < 2:
        raise PlannerError("the env's window holds no step to plan: use a window of at least two time steps")
    base, appliance, price, carbon = [], [], [], []
    batteries, battery_action, chargers, sessions, appliance_actions = [], [], [], [], []
    countdown, required = [], []
    ev_by_name = {ev.name: ev for ev in env.electric_vehicles}
    for i, (building, names) in enumerate(zip(env.buildings, env.action_names)):
        simulation = building.energy_simulation
        solar = -np.asarray(building.pv.get_generation(simulation.solar_generation), dtype=np.float64)
        if any(np.any(np.asarray(getattr(simulation, name))) for name in THERMAL_DEMANDS):
            # Heat pumps and heaters turn thermal demand into electricity through temperature-dependent COPs and
            # thermal storage: this dataset has none, and the planner does not model them.
            raise PlannerError(f"{building.name} has thermal (cooling, heating or hot water) demand, which the "
                               f"planner does not model: it plans electricity-only districts")
        loads = np.asarray(simulation.non_shiftable_load, dtype=np.float64)
        base.append(_fit(loads + solar, steps))
        price.append(_fit(np.asarray(building.pricing.electricity_pricing, dtype=np.float64), steps))
        carbon.append(_fit(np.asarray(building.carbon_intensity.carbon_intensity, dtype=np.float64), steps))
        if BATTERY_ACTION not in names:
            raise PlannerError(f"{building.name} has no electrical_storage action: the planner needs one per building")
        battery_action.append(names.index(BATTERY_ACTION))
        batteries.append(battery_spec(building.electrical_storage))

        load = np.zeros(steps)
        for device in building.deferrable_appliances or []:
            appliance_actions.append((i, names.index(f"{APPLIANCE_ACTION_PREFIX}_{device.name}")))
            load += earliest_start_load(device, int(env.episode_tracker.episode_start_time_step), steps, from_step=0)
        appliance.append(load)

        for charger, spec in zip(building.electric_vehicle_chargers or [], read_chargers(building, names, i)):
            chargers.append(spec)
            sessions.extend(read_sessions(charger, len(chargers) - 1, spec, ev_by_name, steps))
            simulation = charger.charger_simulation
            countdown.append(_fit(np.asarray(simulation.electric_vehicle_departure_time, dtype=np.float64), steps))
            required.append(_fit(np.asarray(simulation.electric_vehicle_required_soc_departure, dtype=np.float64),
                                 steps))
    empty = np.zeros((0, steps))
    return District(
        building_names=[b.name for b in env.buildings], steps=steps, base_load=np.stack(base),
        appliance_load=np.stack(appliance), price=np.stack(price), carbon=np.stack(carbon), batteries=batteries,
        battery_action=battery_action, chargers=chargers, sessions=sessions, appliance_actions=appliance_actions,
        countdown=np.stack(countdown) if countdown else empty, required_soc=np.stack(required) if required else empty,
    )


def read_chargers(building, action_names, building_index: int = 0) -> list[Charger]:
    """The building's chargers with their action slots, in the order of ``building.electric_vehicle_chargers``."""
    return [Charger(building=building_index, action=action_names.index(CHARGER_ACTION_PREFIX + c.charger_id),
                    charger_id=c.charger_id, max_power=float(c.max_charging_power),
                    min_power=float(c.min_charging_power), efficiency=float(c.efficiency))
            for c in building.electric_vehicle_chargers or []]


def battery_spec(battery) -> BatterySpec:
    return BatterySpec(
        capacity=float(battery.capacity),
        usable_capacity=float(battery.degraded_capacity),
        nominal_power=float(battery.nominal_power),
        min_energy=float(np.clip(1.0 - battery.depth_of_discharge, 0.0, 1.0) * battery.capacity),
        efficiency_curve=np.asarray(battery.power_efficiency_curve, dtype=np.float64),
        capacity_power_curve=np.asarray(battery.capacity_power_curve, dtype=np.float64),
    )


def charging_gain(charger: Charger, ev_battery) -> float:
    """kWh into the car per kWh the charger draws, at the charger's full power (the planner's usual request).

    The charger passes ``efficiency`` of what it draws to the car's battery, which stores ``sqrt(eta)`` of that,
    ``eta`` read at the car battery's own (small) normalised power.
    """
    into_battery = charger.max_power * charger.efficiency
    spec = battery_spec(ev_battery)
    return charger.efficiency * spec.storage_factor(into_battery)


def read_sessions(charger, index: int, spec: Charger, ev_by_name: dict, steps: int) -> list[Session]:
    simulation = charger.charger_simulation
    state = np.asarray(simulation.electric_vehicle_charger_state, dtype=np.float64)[:steps]
    ids = list(simulation.electric_vehicle_id)[:steps]
    countdown = np.asarray(simulation.electric_vehicle_departure_time, dtype=np.float64)[:steps]
    required = np.asarray(simulation.electric_vehicle_required_soc_departure, dtype=np.float64)[:steps]
    estimated_arrival_soc = np.asarray(simulation.electric_vehicle_estimated_soc_arrival, dtype=np.float64)[:steps]
    sessions: list[Session] = []
    t = 0
    while t < len(state):
        if state[t] != CONNECTED or not _is_ev_id(ids[t]):
            t += 1
            continue
        start, ev_name = t, ids[t]
        # A session ends where the car leaves, another car plugs in, or the countdown restarts (back-to-back).
        while (t + 1 < len(state) and state[t + 1] == CONNECTED and ids[t + 1] == ev_name
               and not (np.isfinite(countdown[t + 1]) and countdown[t + 1] > countdown[t])):
            t += 1
        ev = ev_by_name.get(ev_name)
        if ev is not None:
            battery = ev.battery
            capacity = float(battery.capacity)
            arrival_soc = None
            if start > 0 and state[start - 1] == INCOMING and ids[start - 1] == ev_name:
                arrival_soc = estimated_arrival_soc[start - 1]
            if arrival_soc is None or not 0.0 <= arrival_soc <= 1.0:
                arrival_soc = None
            target = required[t] if np.isfinite(required[t]) and 0.0 <= required[t] <= 1.0 else None
            stayed = bool(sessions) and sessions[-1].ev == ev_name and sessions[-1].departure == start - 1
            if target is not None:
                sessions.append(Session(
                    charger=index, ev=ev_name, arrival=start, departure=t, required_energy=float(target) * capacity,
                    capacity=capacity,
                    min_energy=float(np.clip(1.0 - battery.depth_of_discharge, 0.0, 1.0) * capacity),
                    arrival_energy=None if arrival_soc is None else float(arrival_soc) * capacity,
                    gain=charging_gain(spec, battery), continues_previous=stayed,
                ))
        t += 1
    return sessions


def earliest_start_load(appliance, episode_start: int, steps: int, *, from_step: int, to_step: int | None = None,
                        states: dict[str, str] | None = None) -> np.ndarray:
    """The load of every pending cycle started as early as the env allows (action 1.0 from ``from_step`` on).

    Mirrors ``DeferrableAppliance.start_cycle``: only the first pending cycle may start, inside its start window,
    if it ends by its deadline and before the episode's last step; a pending cycle whose window has passed is
    missed. ``states`` are the appliance's cycle states at ``from_step`` (all pending when None); cycles already
    running are not included (their load is in the env). Starts are simulated up to ``to_step`` (exclusive).
    """
    load = np.zeros(steps)
    to_step = steps if to_step is None else min(to_step, steps)
    pending = [c for c in appliance.deferrable_appliance_simulation.flexibility_schedule
               if (states or {}).get(c["cycle_id"], "pending") == "pending"
               and int(c["latest_start_time_step"]) >= episode_start + from_step]
    t = from_step
    for cycle in pending:  # in schedule order: the env only ever offers the first pending one
        duration = int(cycle["duration_steps"])
        earliest, latest = int(cycle["earliest_start_time_step"]), int(cycle["latest_start_time_step"])
        latest = min(latest, int(cycle["deadline_time_step"]) - duration + 1)
        start = max(t, earliest - episode_start)
        if start >= to_step:
            break
        if start + episode_start > latest or start + duration >= steps:
            # Never startable: the env keeps it pending until its window passes, then it is missed.
            t = max(t, int(cycle["latest_start_time_step"]) - episode_start + 1)
            continue
        profile = np.asarray(cycle["load_profile"], dtype=np.float64)
        load[start:start + duration] += profile[: steps - start]
        t = start + 1
    return load


def _fit(series: np.ndarray, steps: int) -> np.ndarray:
    out = np.zeros(steps)
    out[: min(steps, series.size)] = series[:steps]
    return out


def _is_ev_id(value) -> bool:
    return isinstance(value, str) and value.strip() not in {"", "nan"}
