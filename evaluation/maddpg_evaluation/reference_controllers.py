"""Controllers every policy is compared with, behind the same ``layout`` / ``act`` interface as the policies.

* :class:`ZeroPolicy`: no control at all (batteries and chargers idle, appliances never started). Every KPI ratio is
  1.0 by construction, which is exactly why the service levels must be reported beside the ratios.
* :class:`BasicBatteryRBCPolicy`: CityLearn's own ``BasicBatteryRBC`` (charge 11 %/h from 06:00 to 14:00, discharge
  6.7 %/h otherwise). Out of the box it raises ``ValueError('Unknown action name')`` on the deferrable appliance of
  this dataset; here CityLearn builds its map for every action it knows and the appliance runs at 1.0 (start as soon
  as it may), as in the reference KPIs of the shared dataset's README.
* :class:`SelfConsumptionPolicy`: each battery stores the building's solar surplus and gives back what the building
  imports (from its own observation: load, solar, the appliance's current step, what its chargers draw); appliances
  start as soon as they may; cars are left alone.
* :class:`ChargeOnArrivalPolicy`: the reference a district operator compares against when cars must be charged:
  every parked car at full power from arrival until its required SOC, batteries by the self-consumption rule.
  Doing nothing never charges a car, so ratios to no control reward leaving cars empty; this one serves them.
"""

from __future__ import annotations

import numpy as np

from maddpg_core.layout import PolicyLayout

from .citylearn_env import layout_from_env
from .citylearn_names import APPLIANCE_ACTION_PREFIX as APPLIANCE_PREFIX
from .citylearn_names import BATTERY_ACTION, NON_SHIFTABLE_LOAD, SOLAR_GENERATION, car_observation, charger_connected
from .planner.district import charging_gain, read_chargers

SOC_TOLERANCE = 1e-3      # observations are float32: a car at its target may read a hair below it
DEADBAND_MARGIN = 1.001   # a request exactly at min_charging_power can round below it in float32 and give nothing


class ZeroPolicy:
    name = "zero actions"

    def __init__(self, layout: PolicyLayout):
        self.layout = layout
        self._zeros = np.zeros(layout.action_shape, dtype=np.float32)

    def act(self, observations: np.ndarray) -> np.ndarray:
        return self._zeros.copy()


def _appliance_aware_rbc_class():
    from citylearn.agents.rbc import BasicBatteryRBC, HourRBC
    from citylearn.building import Building

    class ApplianceAwareBasicBatteryRBC(BasicBatteryRBC):
        @BasicBatteryRBC.action_map.setter
        def action_map(self, action_map):
            if action_map is None:
                names = self.action_names
                # Let CityLearn's BasicBatteryRBC build its own map for the actions it understands ...
                self.action_names = [[n for n in agent if not n.startswith(APPLIANCE_PREFIX)] for agent in names]
                BasicBatteryRBC.action_map.fset(self, None)
                known = self.action_map
                self.action_names = names
                # ... and start deferrable appliances whenever they may run.
                hours = Building.get_periodic_observation_metadata()["hour"]
                action_map = [
                    {**known_agent, **{n: {h: 1.0 for h in hours} for n in agent if n.startswith(APPLIANCE_PREFIX)}}
                    for known_agent, agent in zip(known, names)
                ]
            HourRBC.action_map.fset(self, action_map)

    return ApplianceAwareBasicBatteryRBC


class BasicBatteryRBCPolicy:
    name = "BasicBatteryRBC"

    def __init__(self, env, layout: PolicyLayout | None = None):
        self.layout = layout or layout_from_env(env)
        self._rbc = _appliance_aware_rbc_class()(env)
        self._observation_counts = [len(n) for n in env.observation_names]

    def act(self, observations: np.ndarray) -> np.ndarray:
        rows = [observations[i, :count].tolist() for i, count in enumerate(self._observation_counts)]
        actions = self._rbc.predict(rows, deterministic=True)
        out = np.zeros(self.layout.action_shape, dtype=np.float32)
        for i, agent_actions in enumerate(actions):
            out[i, : len(agent_actions)] = agent_actions
        return out


class SelfConsumptionPolicy:
    """Battery: charge the solar surplus, discharge what the building imports (a fraction of nominal power)."""

    name = "self-consumption"
    charge_cars = False

    def __init__(self, env, layout: PolicyLayout | None = None):
        self.layout = layout or layout_from_env(env)
        self.low, self.high = self.layout.action_bounds()
        self._buildings = []
        for building, observation_names, action_names in zip(env.buildings, env.observation_names, env.action_names):
            obs = {name: k for k, name in enumerate(observation_names)}
            chargers = []
            for charger in read_chargers(building, action_names):
                # kWh into a car per kWh drawn: the least of this district's cars, so a car never stops short.
                gain = min((charging_gain(charger, ev.battery) for ev in env.electric_vehicles), default=1.0)
                car = {field: obs[car_observation(charger.charger_id, field)]
                       for field in ("soc", "required_soc_departure", "battery_capacity")}
                chargers.append((charger, gain, obs[charger_connected(charger.charger_id)], car["soc"],
                                 car["required_soc_departure"], car["battery_capacity"]))
            self._buildings.append({
                "load": obs[NON_SHIFTABLE_LOAD], "solar": obs[SOLAR_GENERATION],
                "appliance_now": [k for name, k in obs.items()
                                  if name.startswith(APPLIANCE_PREFIX) and name.endswith("_current_step_energy_kwh")],
                "battery": action_names.index(BATTERY_ACTION),
                "power": float(building.electrical_storage.nominal_power),
                "appliances": [k for k, name in enumerate(action_names) if name.startswith(APPLIANCE_PREFIX)],
                "chargers": chargers,
            })

    def act(self, observations: np.ndarray) -> np.ndarray:
        out = np.zeros(self.layout.action_shape, dtype=np.float32)
        for i, b in enumerate(self._buildings):
            row = observations[i]
            drawn = 0.0
            if self.charge_cars:
                for charger, gain, connected, soc, required, capacity in b["chargers"]:
                    action = self.car_action(charger, gain, row[connected], row[soc], row[required], row[capacity])
                    out[i, charger.action] = action
                    drawn += action * charger.max_power
            net = row[b["load"]] + sum(row[k] for k in b["appliance_now"]) + drawn - row[b["solar"]]
            out[i, b["battery"]] = -net / b["power"]
            for k in b["appliances"]:
                out[i, k] = 1.0
        return np.clip(out, self.low, self.high)

    @staticmethod
    def car_action(charger, gain: float, connected: float, soc: float, required: float, capacity: float) -> float:
        """Full power until the car holds its required SOC; the last hour only what is missing (above the deadband)."""
        if connected != 1 or capacity <= 0 or not 0 <= required <= 1 or soc >= required - SOC_TOLERANCE:
            return 0.0
        # A little more than the missing energy: the car's efficiency is lower at part power than at full power.
        missing_kwh = (required - soc) * capacity / max(gain, 1e-6) * 1.02
        power = min(max(missing_kwh, charger.min_power * DEADBAND_MARGIN), charger.max_power)
        return float(power / charger.max_power)


class ChargeOnArrivalPolicy(SelfConsumptionPolicy):
    """Every parked car at full power from arrival until its required SOC; batteries by self-consumption."""

    name = "charge on arrival"
    charge_cars = True
