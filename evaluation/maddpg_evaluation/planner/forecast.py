"""What the planner may know of the future: all of it (``exact``), or what a deployed controller could (``yesterday``).

``exact`` is the perfect-foresight upper bound. ``yesterday`` plans from information a controller in the field has
at the step it acts on, so its KPIs say how much of the upper bound is foresight and how much is coordination.
``yesterday-loads`` and ``parked-cars`` withhold one half each (the loads' future, the cars to come), to say which
half the upper bound owes most to. ``hour-profile`` is what a controller without memory could know of the loads:
the window's mean profile by hour of day (what a policy trained on it can carry in its weights), shifted by how far
the current hour is from it; the cars as in ``yesterday``. What ``yesterday`` knows:

* the current hour's loads, solar and carbon intensity as observed, every later hour's as the same hour of the
  last observed day (seasonal naive; before a day has been seen, the current hour's value);
* prices as they are: a published tariff (CityLearn's observations carry its 6/12/24 h predictions);
* the cars that are parked now, with the departure and required SOC their chargers report; a car not yet arrived
  is unknown. A stay whose countdown has not appeared yet keeps the dataset's departure (those stays are few and
  CityLearn itself scores them where the countdown appears);
* the appliance's booked cycles, as its device reports them (the same in every mode).

The no-control denominators of the objective (``District.baseline``) are the window's true ones in every mode:
they only scale the objective's terms against each other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maddpg_core.errors import PlannerError

from .district import HOURS_PER_DAY, District

FORECASTS = ("exact", "yesterday", "yesterday-loads", "parked-cars", "hour-profile")


def check_forecast(forecast: str) -> None:
    if forecast not in FORECASTS:
        raise PlannerError(f"unknown forecast {forecast!r}: use one of {', '.join(FORECASTS)}")


class Forecast:
    """What the planner knows of ``district`` at each step under ``mode`` (``exact``: the district itself)."""

    def __init__(self, district: District, mode: str):
        check_forecast(mode)
        self.district, self.mode = district, mode
        # The hourly profiles are the whole window's: computed once, not at every step.
        self._profiles = ({name: hourly_profile(getattr(district, name)) for name in ("base_load", "carbon")}
                          if mode == "hour-profile" else {})

    def view(self, step: int) -> District:
        """The district as the planner sees it at episode step ``step``."""
        district, mode = self.district, self.mode
        if mode == "exact":
            return district
        changes = {}
        if mode in ("yesterday", "yesterday-loads"):
            changes.update(base_load=seasonal_naive(district.base_load, step),
                           carbon=seasonal_naive(district.carbon, step))
        if mode == "hour-profile":
            changes.update({name: hour_profile(getattr(district, name), step, profile)
                            for name, profile in self._profiles.items()})
        if mode in ("yesterday", "parked-cars", "hour-profile"):
            # Indices into ``sessions`` key the cars' observed energies (``State.ev_energy``): a car not yet arrived
            # is moved out of every horizon rather than dropped.
            changes["sessions"] = [session if _arrived(district.sessions, index, step) else dataclasses.replace(
                session, arrival=district.steps, departure=district.steps)
                for index, session in enumerate(district.sessions)]
        view = dataclasses.replace(district, **changes)
        view.baseline = district.baseline
        return view


def seasonal_naive(series: np.ndarray, step: int) -> np.ndarray:
    """``series`` (``[rows, steps]``) with every step after ``step`` replaced by the same hour of the last day seen.

    Step ``k > step`` reads step ``k - 24 * ceil((k - step) / 24)``, the latest step at or before ``step`` with the
    same hour of day; where that is before the episode's start, the current step's value.
    """
    def same_hour_seen(later: np.ndarray) -> np.ndarray:
        source = later - HOURS_PER_DAY * np.ceil((later - step) / HOURS_PER_DAY).astype(int)
        return series[..., np.where(source >= 0, source, step)]

    return _with_later(series, step, same_hour_seen)


def hourly_profile(series: np.ndarray) -> np.ndarray:
    """``[rows, 24]``: the mean of ``series`` at each hour of the day (hours counted from the window's first step)."""
    hours = np.arange(series.shape[-1]) % HOURS_PER_DAY
    return np.stack([series[..., hours == h].mean(axis=-1) for h in range(HOURS_PER_DAY)], axis=-1)


def hour_profile(series: np.ndarray, step: int, profile: np.ndarray | None = None) -> np.ndarray:
    """``series`` with every step after ``step`` replaced by its hourly profile (``hourly_profile``, computed here
    unless given) plus the current step's departure from its own hour's mean."""
    profile = hourly_profile(series) if profile is None else profile
    anomaly = series[..., step] - profile[..., step % HOURS_PER_DAY]
    return _with_later(series, step, lambda later: profile[..., later % HOURS_PER_DAY] + anomaly[..., None])


def _with_later(series: np.ndarray, step: int, forecast_of) -> np.ndarray:
    """A copy of ``series`` whose steps after ``step`` are ``forecast_of(those steps)``."""
    out = np.array(series, dtype=np.float64, copy=True)
    later = np.arange(step + 1, series.shape[-1])
    if later.size:
        out[..., later] = forecast_of(later)
    return out


def _arrived(sessions, index: int, step: int) -> bool:
    """The car of ``sessions[index]`` is parked at ``step`` or was: it arrived, or it is a stay that goes on."""
    while sessions[index].arrival > step:
        if not sessions[index].continues_previous or index == 0:
            return False
        index -= 1   # the same car staying on: a continuation follows its predecessor in ``sessions``
    return True
