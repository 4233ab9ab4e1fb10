"""How much each of ``env.evaluate()``'s KPIs weighs in the planner's objective.

Every term of the LP's objective is the fraction it adds to one KPI as ``env.evaluate()`` computes it (citylearn
internal/kpi.py): cost and carbon are means over buildings of positive imports x price (or carbon intensity)
relative to that building's no-control figure; the daily peak is the mean over 24-step blocks of the district's
maximum net load relative to no control; the all-time peak is the district's maximum; ramping is the sum of upward
steps. The weights below say how much the planner cares for each; ``balanced`` is the project's headline score
(the mean of cost, carbon, daily peak and all-time peak) plus a little ramping, which keeps the plan from swinging.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Weights:
    cost: float = 0.0
    carbon: float = 0.0
    daily_peak: float = 0.0
    all_time_peak: float = 0.0
    ramping: float = 0.0


OBJECTIVES: dict[str, Weights] = {
    "balanced": Weights(cost=1.0, carbon=1.0, daily_peak=1.0, all_time_peak=1.0, ramping=0.1),
    # The single-KPI objectives keep a hundredth of the others: alone, each KPI leaves the LP many equal optima,
    # some of them absurd for the rest (e.g. cost alone charges every battery in the same cheap hour).
    "cost": Weights(cost=1.0, carbon=0.01, daily_peak=0.01, all_time_peak=0.01),
    "carbon": Weights(cost=0.01, carbon=1.0, daily_peak=0.01, all_time_peak=0.01),
    "peak": Weights(cost=0.01, carbon=0.01, daily_peak=1.0, all_time_peak=1.0, ramping=0.1),
}


def objective_weights(name: str, peak_weight: float = 1.0) -> Weights:
    """The named objective, its peak and ramping terms scaled by ``peak_weight`` (a point on the trade between
    energy bought, cost and carbon, and the peaks it is bought at)."""
    w = OBJECTIVES[name]
    return replace(w, daily_peak=w.daily_peak * peak_weight, all_time_peak=w.all_time_peak * peak_weight,
                   ramping=w.ramping * peak_weight)
