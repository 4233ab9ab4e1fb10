"""A batched, differentiable model of the district, for training only: the policy's actions in, its next
observations and the district's net load out, with gradients all the way back to the actors.

What the actors lack is how today's charge becomes tomorrow morning's peak: a clone spends its batteries in the
evening on its own trajectory and meets the cars' morning charging with nothing left (docs/heldout-gap). Cloning
scores each action alone; through this model the district's KPIs over the next two days are scored on the whole
trajectory the actors drive, so a battery's evening discharge pays for the peak it causes at 06:00 (analytic policy
gradients, Mora et al. 2021: centralised training on the team's objective, the actors still decentralised).

Only what the actions change is simulated (citylearn 3.0.2, ``energy_model.Battery.charge`` and
``ElectricVehicleCharger.update_connected_electric_vehicle_soc``): each building battery's charge, each connected
car's charge, and a building's net consumption. Everything else an actor reads (loads, solar, prices, forecasts, the
cars' arrivals, departures and targets) is data, taken from a recorded pass over the same steps. ``fidelity`` checks
the model against the env on the actions the env saw; every figure reported still comes from CityLearn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_core.layout import PolicyLayout
from maddpg_evaluation.citylearn_env import CityLearnAdapter
from maddpg_evaluation.citylearn_names import (
    BATTERY_SOC,
    NET_ELECTRICITY_CONSUMPTION,
    NON_SHIFTABLE_LOAD,
    SOLAR_GENERATION,
)
from maddpg_evaluation.kpis import district_kpis
from maddpg_evaluation.planner.district import BatterySpec, District, battery_spec, read_district

from .safety import SafetySpec

DAY = 24


def interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``ys(xs)`` at ``x`` per device, clipped at the ends (``numpy.interp``).
    ``x``: ``[..., n]``; ``xs``, ``ys``: ``[n, k]`` breakpoints."""
    x = torch.minimum(torch.maximum(x, xs[:, 0]), xs[:, -1])
    out = ys[:, 0].expand_as(x)
    for j in range(xs.shape[1] - 1):
        slope = (ys[:, j + 1] - ys[:, j]) / (xs[:, j + 1] - xs[:, j]).clamp_min(1e-12)
        out = torch.where(x > xs[:, j], ys[:, j] + slope * (x - xs[:, j]), out)
    return out


@dataclass
class Storage:
    """``n`` CityLearn batteries as tensors (``capacity``, ``usable`` and ``min_energy`` may be ``[..., n]``)."""

    capacity: torch.Tensor
    usable: torch.Tensor
    nominal: torch.Tensor
    min_energy: torch.Tensor
    efficiency_x: torch.Tensor
    efficiency_y: torch.Tensor
    power_x: torch.Tensor
    power_y: torch.Tensor

    @classmethod
    def of(cls, specs: list[BatterySpec]) -> "Storage":
        def stack(values) -> torch.Tensor:
            return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)

        for name in ("efficiency_curve", "capacity_power_curve"):
            if len({getattr(s, name).shape for s in specs}) > 1:
                raise MaddpgCitylearnError(f"the district model needs every battery's {name} to have the same "
                                           f"number of points")
        return cls(capacity=stack([s.capacity for s in specs]), usable=stack([s.usable_capacity for s in specs]),
                   nominal=stack([s.nominal_power for s in specs]), min_energy=stack([s.min_energy for s in specs]),
                   efficiency_x=stack([s.efficiency_curve[0] for s in specs]),
                   efficiency_y=stack([s.efficiency_curve[1] for s in specs]),
                   power_x=stack([s.capacity_power_curve[0] for s in specs]),
                   power_y=stack([s.capacity_power_curve[1] for s in specs]))

    def step(self, energy: torch.Tensor, request: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One hour of ``Battery.charge``: stored ``energy`` and terminal-side ``request`` (kWh, + charges) ``[B, n]``
        -> (stored energy after, terminal-side energy balance). Power is capped by the capacity-power curve at the
        charge before the step, the efficiency read at the limited power (twice, as the env does), the stored energy
        kept inside [min_energy, usable]."""
        limit = (self.nominal * interp(energy / self.capacity, self.power_x, self.power_y)).clamp_min(0.0)
        charging = request >= 0
        wanted = torch.where(charging, request, -request)
        headroom = torch.where(charging, (self.usable - energy).clamp_min(0.0), (energy - self.min_energy).clamp_min(0.0))
        moved = torch.minimum(wanted, limit)
        for _ in range(2):
            factor = interp((moved / self.nominal).clamp(0.0, 1.0), self.efficiency_x, self.efficiency_y).sqrt()
            capped = torch.where(charging, headroom / factor, headroom * factor)
            moved = torch.minimum(torch.minimum(wanted, limit), capped)
        after = torch.where(charging, torch.minimum(energy + moved * factor, self.capacity),
                            torch.maximum(self.min_energy, energy - moved / factor))
        delta = after - energy
        return after, torch.where(delta >= 0, delta / factor, delta * factor)


def _slots(layout: PolicyLayout, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Agents that have observation ``name``, and its slot in their rows."""
    agents, slots = [], []
    for i, agent in enumerate(layout.agents):
        if agent.observation_names and name in agent.observation_names:
            agents.append(i)
            slots.append(agent.observation_names.index(name))
    return torch.tensor(agents, dtype=torch.long), torch.tensor(slots, dtype=torch.long)


class DistrictModel:
    """The district over steps ``0 .. T-1`` of ``district`` (the same steps as ``observations``, a pass's recorded
    ``[T, agents, width]`` raw observations, where the data the actions cannot change is read)."""

    def __init__(self, district: District, observations: np.ndarray, actions: np.ndarray, layout: PolicyLayout,
                 safety: SafetySpec, car_battery: BatterySpec, capacity_loss: list[float] | None = None):
        steps = observations.shape[0]
        if actions.shape[0] != steps - 1:
            raise MaddpgCitylearnError(f"a recorded pass of {steps} observations has {steps - 1} actions, not "
                                       f"{actions.shape[0]}")
        if district.steps < steps:
            raise MaddpgCitylearnError(f"the district has {district.steps} steps, the recorded pass {steps}")
        self.layout, self.steps = layout, steps
        self.observations = torch.as_tensor(observations, dtype=torch.float32)
        self.batteries = Storage.of(district.batteries)
        self.battery_agents = torch.arange(district.n_buildings)
        self.battery_action = torch.tensor(district.battery_action, dtype=torch.long)
        self.soc_agents, self.soc_slots = _slots(layout, BATTERY_SOC)
        # A battery's usable capacity shrinks with the energy it moves (Battery.degrade); the model reads it at each
        # step off the recorded pass's throughput, which differs little from one controller's to another's.
        self.usable = self._usable_capacity(observations, capacity_loss or [0.0] * district.n_buildings)
        self.net_agents, self.net_slots = _slots(layout, NET_ELECTRICITY_CONSUMPTION)
        # Everything but batteries and chargers, per building and step (kWh): loads - solar + the appliance.
        self.other_load = torch.as_tensor((district.base_load + district.appliance_load)[:, :steps].T,
                                          dtype=torch.float32)
        # The loads and the solar generation it is made of, as the buildings observe them (kWh, [T, buildings]): a run
        # may scale them (``start``'s ``scale``: a district on a hotter, darker day than the data's).
        self.load_agents, self.load_slots = _slots(layout, NON_SHIFTABLE_LOAD)
        self.solar_agents, self.solar_slots = _slots(layout, SOLAR_GENERATION)
        self.load = self._building_column(self.load_agents, self.load_slots, district.n_buildings)
        self.solar = self._building_column(self.solar_agents, self.solar_slots, district.n_buildings)
        self.price = torch.as_tensor(district.price[:, :steps].T, dtype=torch.float32)
        self.carbon = torch.as_tensor(district.carbon[:, :steps].T, dtype=torch.float32)
        self.baseline = district.baseline

        chargers = list(safety.chargers)
        if len(district.chargers) != len(chargers):
            raise MaddpgCitylearnError(f"the safety layer guards {len(chargers)} chargers, the district has "
                                       f"{len(district.chargers)}: train and build the model on the same dataset")
        self.charger_agent = torch.tensor([c.agent for c in chargers], dtype=torch.long)
        self.charger_action = torch.tensor([c.action for c in chargers], dtype=torch.long)
        self.charger_soc = torch.tensor([c.soc for c in chargers], dtype=torch.long)
        self.charger_connected = torch.tensor([c.connected for c in chargers], dtype=torch.long)
        self.charger_capacity = torch.tensor([c.battery_capacity for c in chargers], dtype=torch.long)
        self.max_power = torch.tensor([c.max_power_kw for c in chargers], dtype=torch.float32)
        self.min_power = torch.tensor([c.min_power_kw for c in chargers], dtype=torch.float32)
        order = [self._district_charger(district, c, i) for i, c in enumerate(chargers)]
        self.charger_efficiency = torch.tensor([district.chargers[k].efficiency for k in order], dtype=torch.float32)
        # A car's charge is simulated from the step after it arrives; on its arrival step the env sets it (data).
        arrival = np.zeros((steps, len(chargers)), dtype=bool)
        for session in district.sessions:
            column = order.index(session.charger)
            if session.arrival < steps and not session.continues_previous:
                arrival[session.arrival, column] = True
        cars = self.observations[:, self.charger_agent, :]
        picked = torch.arange(len(chargers))
        self.connected = cars[:, picked, self.charger_connected] >= 0.5                       # [T, chargers]
        # ... and on every step a car plugs in (the district lists only the sessions with a target).
        plugged = self.connected.clone()
        plugged[1:] &= ~self.connected[:-1]
        self.arrival = torch.as_tensor(arrival) | plugged
        self.car_capacity = torch.nan_to_num(cars[:, picked, self.charger_capacity], nan=1.0).clamp_min(1e-3)
        self.car_soc_data = torch.nan_to_num(cars[:, picked, self.charger_soc], nan=0.0)
        self.car = Storage.of([car_battery] * len(chargers))
        self.arrival_energy = self._arrival_energy(torch.as_tensor(actions, dtype=torch.float32))

    def _arrival_energy(self, actions: torch.Tensor) -> torch.Tensor:
        """``[T - 1, chargers]``: a car's charge on its arrival step, before that step's charging. The row shows the
        data's estimate, but the env starts the car from its own drifted charge (re-drawn at every reset); what the
        recorded pass charged is taken off the car's charge on the next row instead."""
        steps = actions.shape[0]
        seen = self.car_soc_data[:steps] * self.car_capacity[:steps]
        after, _ = self._charge_cars(seen, actions, torch.arange(steps))
        next_seen = self.car_soc_data[1:] * self.car_capacity[:steps]
        same_car = self.arrival[:steps] & self.connected[1:] & ~self.arrival[1:]
        return torch.where(same_car, (next_seen - (after - seen)).clamp_min(0.0), seen)

    def _charge_cars(self, energy: torch.Tensor, actions: torch.Tensor, t: torch.Tensor, *,
                     straight_through: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The connected cars charged by the chargers' actions at steps ``t``: (their charge after, the chargers'
        draw from the building, kWh). A request under a charger's minimum power gives nothing, as in the env; with
        ``straight_through`` its gradient is the requested power's, as if the minimum were not there."""
        connected = self.connected[t]
        requested = actions[:, self.charger_agent, self.charger_action].clamp(0.0, 1.0) * self.max_power
        power = torch.where(requested >= self.min_power, requested, torch.zeros_like(requested))
        if straight_through:
            power = requested + (power - requested).detach()
        power = torch.where(connected, power, torch.zeros_like(power))
        capacity = self.car_capacity[t]
        cars = Storage(capacity=capacity, usable=capacity, nominal=self.car.nominal, min_energy=torch.zeros_like(energy),
                       efficiency_x=self.car.efficiency_x, efficiency_y=self.car.efficiency_y,
                       power_x=self.car.power_x, power_y=self.car.power_y)
        after, balance = cars.step(energy, power * self.charger_efficiency)
        # No car, nothing drawn (the capacity read where no car is parked is a placeholder).
        drawn = torch.where(connected, balance / self.charger_efficiency, torch.zeros_like(balance))
        return torch.where(connected, after, energy), drawn

    def _building_column(self, agents: torch.Tensor, slots: torch.Tensor, buildings: int) -> torch.Tensor:
        column = torch.zeros(self.steps, buildings)
        column[:, agents] = torch.nan_to_num(self.observations[:, agents, slots], nan=0.0)
        return column

    def _usable_capacity(self, observations: np.ndarray, loss: list[float]) -> torch.Tensor:
        """``[T, buildings]`` kWh: each battery's degraded capacity along the recorded pass (Battery.degrade)."""
        agents, slots = self.soc_agents, self.soc_slots
        capacity = self.batteries.capacity.double().numpy()
        soc = np.zeros((observations.shape[0], len(capacity)))
        soc[:, agents.numpy()] = np.nan_to_num(observations[:, agents.numpy(), slots.numpy()].astype(np.float64))
        moved = np.abs(np.diff(soc, axis=0, prepend=soc[:1])) * capacity
        usable = capacity - np.cumsum(np.asarray(loss) * capacity * moved / (2 * capacity), axis=0)
        return torch.as_tensor(np.minimum(usable, self.batteries.usable.double().numpy()), dtype=torch.float32)

    @classmethod
    def from_env(cls, env, observations: np.ndarray, actions: np.ndarray, layout: PolicyLayout, safety: SafetySpec
                 ) -> "DistrictModel":
        """Read the district from a built env whose steps are those of a recorded pass (``observations`` of every
        step and the last next one, ``actions``); the cars share one battery curve in this dataset, which the model
        needs (their capacities come from the data)."""
        cars = [battery_spec(ev.battery) for ev in env.electric_vehicles]
        for car in cars[1:]:
            if not (np.allclose(car.efficiency_curve, cars[0].efficiency_curve)
                    and np.allclose(car.capacity_power_curve, cars[0].capacity_power_curve)
                    and car.nominal_power == cars[0].nominal_power):
                raise MaddpgCitylearnError("the district model needs every car's battery curves to be the same")
        loss = [float(b.electrical_storage.capacity_loss_coefficient) for b in env.buildings]
        return cls(read_district(env), observations, actions, layout, safety, cars[0], capacity_loss=loss)

    @staticmethod
    def _district_charger(district: District, slot, index: int) -> int:
        for k, c in enumerate(district.chargers):
            if c.building == slot.agent and c.action == slot.action:
                return k
        raise MaddpgCitylearnError(f"charger {index} of the safety layer is not in the district")

    # --- one rollout ------------------------------------------------------------------------------------------------
    def start(self, steps: torch.Tensor, observations: torch.Tensor, scale: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """The state at ``steps`` ``[B]`` read from ``observations`` ``[B, agents, width]`` (a pass's rows there).
        ``scale`` ``[B, 2]``: every building's non-shiftable load and solar generation multiplied by these for the
        whole run, in what the actors observe and in the net load alike (default 1: the data)."""
        soc = torch.zeros(len(steps), self.layout.n_agents)
        soc[:, self.soc_agents] = torch.nan_to_num(observations[:, self.soc_agents, self.soc_slots], nan=0.0)
        car_soc = torch.nan_to_num(observations[:, self.charger_agent, self.charger_soc], nan=0.0)
        return {"t": steps.clone(), "battery": soc * self.batteries.capacity,
                "car": car_soc.clamp(0.0, 1.0) * self.car_capacity[steps],
                "net": torch.nan_to_num(observations[:, self.net_agents, self.net_slots], nan=0.0),
                "scale": torch.ones(len(steps), 2) if scale is None else scale}

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, agents, width]``: the recorded rows at the state's steps with what the actions changed written in."""
        t = state["t"]
        rows = self.observations[t].clone()
        rows[:, self.soc_agents, self.soc_slots] = state["battery"][:, self.soc_agents] / self.batteries.capacity[
            self.soc_agents]
        rows[:, self.net_agents, self.net_slots] = state["net"]
        scale = state["scale"]
        rows[:, self.load_agents, self.load_slots] = rows[:, self.load_agents, self.load_slots] * scale[:, :1]
        rows[:, self.solar_agents, self.solar_slots] = rows[:, self.solar_agents, self.solar_slots] * scale[:, 1:]
        connected = self.connected[t]
        car_soc = torch.where(connected & ~self.arrival[t], state["car"] / self.car_capacity[t], self.car_soc_data[t])
        rows[:, self.charger_agent, self.charger_soc] = torch.where(connected, car_soc,
                                                                   rows[:, self.charger_agent, self.charger_soc])
        return rows

    def step(self, state: dict[str, torch.Tensor], actions: torch.Tensor, *, straight_through: bool = False
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Apply env ``actions`` ``[B, agents, action_width]`` at the state's steps -> (next state, per-building net
        consumption of the step ``[B, buildings]``, kWh). ``straight_through``: see ``_charge_cars``."""
        t = state["t"]
        battery_request = actions[:, self.battery_agents, self.battery_action] * self.batteries.nominal
        batteries = Storage(**{**self.batteries.__dict__, "usable": self.usable[t]})
        battery, battery_grid = batteries.step(state["battery"], battery_request)
        # The car's charge before this step: on its arrival step the env's own (see _arrival_energy).
        car_before = torch.where(self.arrival[t], self.arrival_energy[t], state["car"])
        car, charger_grid = self._charge_cars(car_before, actions, t, straight_through=straight_through)
        scale = state["scale"]
        other = self.other_load[t] + (scale[:, :1] - 1) * self.load[t] - (scale[:, 1:] - 1) * self.solar[t]
        net = (other + battery_grid).index_add(1, self.charger_agent, charger_grid)
        next_net = net[:, self.net_agents]
        return {"t": t + 1, "battery": battery, "car": car, "net": next_net, "scale": scale}, net


def record_pass(spec, layout: PolicyLayout, act) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One pass of a new env over ``spec``'s window, ``act(step, raw observations)`` -> env actions: the recorded
    ``observations``, ``next_observations`` and ``actions`` a model is built from or checked against, and
    env.evaluate()'s KPIs."""
    env = spec.build()
    adapter = CityLearnAdapter(layout, env, what="the district model's check")
    observations, actions = [], []
    raw, _ = env.reset()
    while not env.terminated:
        observations.append(adapter.observations_to_array(raw))
        actions.append(act(len(actions), observations[-1]))
        raw, *_ = env.step(adapter.actions_to_lists(actions[-1]))
    observations.append(adapter.observations_to_array(raw))
    return ({"observations": np.stack(observations[:-1]), "next_observations": np.stack(observations[1:]),
             "actions": np.stack(actions)}, district_kpis(env))


def with_appliances_started(actions: np.ndarray, safety: SafetySpec) -> np.ndarray:
    """``actions`` with every deferrable appliance's slot at 1.0: each cycle at its earliest start, the schedule the
    model assumes (the planner's)."""
    out = np.array(actions, dtype=np.float32)
    for appliance in safety.appliances:
        out[appliance.agent, appliance.action] = 1.0
    return out


def replay(model: DistrictModel, record: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The model driven by a recorded pass's actions from its first state, open loop: every step's rows as the
    model writes them ``[T, agents, width]`` and net consumption ``[T, buildings]``, and the end state."""
    state = model.start(torch.tensor([0]), torch.as_tensor(record["observations"][:1]))
    rows, nets = [], []
    with torch.no_grad():
        for t in range(len(record["actions"])):
            state, net = model.step(state, torch.as_tensor(record["actions"][t:t + 1]))
            rows.append(model.observe(state)[0])
            nets.append(net[0])
    return {"rows": torch.stack(rows), "net": torch.stack(nets), "end": state}


def fidelity(model: DistrictModel, record: dict[str, np.ndarray]) -> dict[str, float]:
    """How far the model's replay of a recorded pass (``replay``) lands from what the env observed: the largest
    and mean absolute errors of the batteries' and the parked cars' state of charge and of a building's net
    consumption (kWh). The env's observation after its last step repeats the one before (the episode is over), so
    the last transition is not compared."""
    out = replay(model, record)
    rows = out["rows"][:-1]
    seen = torch.as_tensor(record["next_observations"])[:-1]
    error = rows - seen
    parked = model.connected[1:len(rows) + 1]
    cars = error[:, model.charger_agent, model.charger_soc][parked].abs()
    soc = error[:, model.soc_agents, model.soc_slots].abs()
    net = error[:, model.net_agents, model.net_slots].abs()
    return {"steps": len(rows), "parked_car_steps": int(parked.sum()),
            "battery_soc_max": float(soc.max()), "battery_soc_mean": float(soc.mean()),
            "car_soc_max": float(cars.max()) if len(cars) else 0.0, "car_soc_mean": float(cars.mean()) if len(cars) else 0.0,
            "net_kwh_max": float(net.max()), "net_kwh_mean": float(net.mean())}
