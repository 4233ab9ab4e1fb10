"""The perfect-foresight planner: an LP over the dataset's future, re-solved from the env's true state every step.

``district``   what the LP needs, read from a built env (series for the whole episode, every device's limits)
``lp``         one linear program, assembled with numpy / scipy.sparse and solved by HiGHS
``objective``  the weights of env.evaluate()'s KPIs in the LP's objective (balanced, cost, carbon, peak)
``planner``    ``Planner`` (actions for the env's current step) and ``PlannerPolicy`` (the episode runner's interface)
"""

from .objective import OBJECTIVES
from .planner import MODES, Planner, PlannerPolicy

__all__ = ["MODES", "OBJECTIVES", "Planner", "PlannerPolicy"]
