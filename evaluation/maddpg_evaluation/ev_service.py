"""The EV service rule the deployed policy guarantees, stated once: what a charger must draw at least, now.

The exported graph applies it in torch (``maddpg_training.safety``); the planner that teaches the actors keeps its
plans inside it (``planner``), so that what it demonstrates is something the deployed policy can do; this module is
the reference both are tested against.

For a connected car with ``d`` hours to departure the charger has ``d + 1`` steps left (the step at
``departure_time == 0`` still charges: its state of charge is the one CityLearn scores). If the energy the car still
needs to reach its target cannot be delivered in the ``d`` steps after this one at full power, the charger runs now at
the fraction that keeps it deliverable ("least laxity first"). The target is the acceptable level CityLearn counts
(required SOC - :data:`SERVICE_TOLERANCE`) plus ``margin``; energy per step is the charger's power times a
conservative efficiency (measured here: 0.834-0.852 from grid to car across charger powers, so 0.80). A floor below
the charger's minimum power would deliver nothing: it is raised to that minimum.

``pace`` is the share of full power the rule counts on for the hours after this one. At 1 the floor binds only when a
car can just make it at full power, so every late car charges at full power in its last hours, and at a morning
departure peak the cars' floors land in the same hours. Below 1 the floor starts earlier and settles at ``pace`` of
full power for the rest of the stay: the same energy, spread over more hours (0.5: twice as many).

Some stays start without a departure time (``departure_time`` -1 while connected: 105 stays a year on five chargers
of the shared dataset, 33-67 h long). CityLearn's KPI scores such a stay twice: once when its departure countdown
appears (25-57 h after arrival, counted in the charger files), as if the car left then, and once at the real
departure. So the car must be charged within about a day without knowing when that day ends: while its departure is
unknown, the floor is ``needed / unknown_spread_hours`` per step, which leaves less than 2% of the battery to go after
24 h from an arrival SOC of 0.2. (Charging it at full power at once instead is a spike the district's peaks pay for.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# CityLearn 3.0.2 counts a departure as acceptable when SOC >= required - 0.05 (internal/kpi.py, service_tolerance).
SERVICE_TOLERANCE = 0.05


@dataclass(frozen=True)
class EvServiceRule:
    margin: float = 0.02              # charge to required - SERVICE_TOLERANCE + margin
    efficiency: float = 0.80          # grid-to-car efficiency assumed: below every measured one
    unknown_spread_hours: float = 6.0 # (5/6)^24 of the need is left after 24 h
    hours_per_step: float = 1.0
    pace: float = 1.0                 # share of full power counted on after this step (1: charge at the last moment)

    @property
    def target_offset(self) -> float:
        """What the rule adds to the required SOC: its target is ``required + target_offset``."""
        return self.margin - SERVICE_TOLERANCE

    def step_kwh(self, max_power_kw) -> np.ndarray:
        """Energy the rule counts on per step at full power."""
        return np.asarray(max_power_kw, dtype=np.float64) * self.efficiency * self.hours_per_step

    def floor(self, *, connected, departure_time, required_soc, soc, capacity, max_power_kw,
              min_power_kw=0.0) -> np.ndarray:
        """The least fraction of ``max_power_kw`` each charger must draw now (numpy; broadcasts)."""
        departure = np.nan_to_num(np.asarray(departure_time, dtype=np.float64), nan=-1.0)
        known = departure >= 0.0
        target = np.clip(np.nan_to_num(required_soc, nan=0.0), 0.0, 1.0) + self.target_offset
        needed = np.maximum(target - np.clip(np.nan_to_num(soc, nan=0.0), 0.0, 1.0), 0.0) \
            * np.clip(np.nan_to_num(capacity, nan=0.0), 0.0, 1e3)
        energy = self.step_kwh(max_power_kw)
        least_laxity = (needed - np.clip(departure, 0.0, 1e4) * self.pace * energy) / energy
        spread = needed / (self.unknown_spread_hours / self.hours_per_step * energy)
        fraction = np.clip(np.where(known, least_laxity, spread), 0.0, 1.0)
        minimum = np.where(np.asarray(min_power_kw) > 0, np.minimum(1.0, np.asarray(min_power_kw) / max_power_kw + 0.01),
                           0.0)
        fraction = np.where(fraction > 0, np.maximum(fraction, minimum), fraction)
        return np.where(np.nan_to_num(connected, nan=0.0) >= 0.5, np.minimum(fraction, 1.0), 0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.pace == 1.0:
            # Written only when it paces: checkpoints and cached teacher passes from before pacing keep their keys.
            del data["pace"]
        return data
