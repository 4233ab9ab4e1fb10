"""The figures a district is judged by, read from CityLearn's own evaluation after an episode (or window).

District KPIs come from ``env.evaluate()``: ratios to the no-storage baseline, lower is better, 1.0 = doing nothing.
Doing nothing never charges an EV, so those ratios alone reward neglect: the EV and appliance service levels from
``env.evaluate_v2(include_business_as_usual=False)`` (cheap: no second simulation) always travel with them.
"""

from __future__ import annotations

import math

# env.evaluate() cost functions reported at district level, in report order.
DISTRICT_KPIS = (
    "cost_total",
    "carbon_emissions_total",
    "daily_peak_average",
    "all_time_peak_average",
    "ramping_average",
    "daily_one_minus_load_factor_average",
)
# The four the project's bar is set on (see docs/model-card.md).
HEADLINE_KPIS = DISTRICT_KPIS[:4]

# evaluate_v2 district rows -> short names used in reports.
SERVICE_LEVELS = {
    "ev_departures_acceptable": "district_ev_performance_departure_min_acceptable_ratio",
    "ev_departures_met_target": "district_ev_performance_departure_success_feasible_ratio",
    "ev_departure_count": "district_ev_events_departure_count",
    "appliance_service_level": "district_deferrable_appliance_service_service_level_ratio",
    "appliance_missed_cycles": "district_deferrable_appliance_service_missed_cycles_count",
}


def district_kpis(env) -> dict[str, float]:
    frame = env.evaluate()
    district = frame[frame["level"] == "district"].set_index("cost_function")["value"]
    return {name: _finite(district.get(name)) for name in DISTRICT_KPIS}


def service_levels(env) -> dict[str, float]:
    frame = env.evaluate_v2(include_business_as_usual=False)
    district = frame[(frame["level"] == "district")].set_index("cost_function")["value"]
    return {short: _finite(district.get(long)) for short, long in SERVICE_LEVELS.items()}


def headline_score(kpis: dict[str, float]) -> float:
    """Mean of the four headline ratios: one number to pick the best checkpoint by (lower is better)."""
    values = [kpis[name] for name in HEADLINE_KPIS if not math.isnan(kpis.get(name, math.nan))]
    return sum(values) / len(values) if values else math.nan


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan
