"""The evaluation harness: any policy in the real CityLearn env (the ``env`` extra).

``citylearn_env``          build the env offline or online, derive its layout, translate lists <-> padded arrays
``episode``                step a policy through a window deterministically (parity against a reference in lockstep)
``kpis``                   the district KPIs of ``env.evaluate()`` and the EV / appliance service levels
``reference_controllers``  zero actions, BasicBatteryRBC, charge on arrival: what every policy is compared with
``evaluation``             a whole evaluation run (policy, references, parity, several simulators at once)
``report``                 report.json, the printed table and report.png
"""
