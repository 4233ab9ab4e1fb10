"""Controllers every policy is compared with, behind the same ``layout`` / ``act`` interface as the policies.

* :class:`ZeroPolicy`: no control at all (batteries and chargers idle, appliances never started). Every KPI ratio is
  1.0 by construction, which is exactly why the service levels must be reported beside the ratios.
* :class:`BasicBatteryRBCPolicy`: CityLearn's own ``BasicBatteryRBC`` (charge 11 %/h from 06:00 to 14:00, discharge
  6.7 %/h otherwise). Out of the box it raises ``ValueError('Unknown action name')`` on the deferrable appliance of
  this dataset; here CityLearn builds its map for every action it knows and the appliance runs at 1.0 (start as soon
  as it may), as in the reference KPIs of the shared dataset's README.
"""

from __future__ import annotations

import numpy as np

from maddpg_core.layout import PolicyLayout

from .citylearn_env import layout_from_env

APPLIANCE_PREFIX = "deferrable_appliance"


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
