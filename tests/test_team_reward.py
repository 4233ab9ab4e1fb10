"""The cooperative team reward: what it rewards and penalises, on hand-made numbers and on the real env."""

from __future__ import annotations

import numpy as np
import pytest

from maddpg_core.layout import layout_from_names
from maddpg_training.team_reward import BaselineSeries, TeamReward, TeamRewardWeights

CHARGER = ["electric_vehicle_charger_c1_connected_state", "connected_electric_vehicle_at_charger_c1_departure_time",
           "connected_electric_vehicle_at_charger_c1_required_soc_departure", "connected_electric_vehicle_at_charger_c1_soc"]
APPLIANCE = ["deferrable_appliance_d1_can_start", "deferrable_appliance_d1_running"]


def two_buildings():
    """Building A has a charger and an appliance; building B only a battery."""
    layout = layout_from_names(
        ["A", "B"],
        [["hour", *CHARGER, *APPLIANCE], ["hour", "electrical_storage_soc"]],
        [["electrical_storage", "electric_vehicle_storage_charger_c1", "deferrable_appliance_d1"], ["electrical_storage"]],
        [[-1, -1, 0], [-1]], [[1, 1, 1], [1]],
    )
    steps = 4
    baseline = BaselineSeries(
        consumption=np.array([[2.0, 1.0]] * steps),
        cost=np.array([[0.4, 0.1]] * steps),
        emissions=np.array([[0.8, 0.2]] * steps),
        battery_capacity=np.array([6.4, 6.4]),
    )
    return layout, baseline


def rows(connected=0.0, departure=-1.0, required=-0.1, soc=-0.1, can_start=0.0, running=0.0, battery=0.0):
    a = np.zeros((2, 7), np.float32)
    a[0, 1:7] = [connected, departure, required, soc, can_start, running]
    a[1, 1] = battery
    return a


def reward_of(reward: TeamReward, consumption, cost, emissions, after=None, before=None):
    after = rows() if after is None else after
    before = rows() if before is None else before
    parts = reward.components(0, np.array(consumption), np.array(cost), np.array(emissions), after, before)
    return reward.reward(parts), parts


def test_doing_exactly_what_the_baseline_does_scores_zero():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    value, parts = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2])
    assert all(type(v) is float for v in parts.values()), "plain floats: they are saved in weights_only checkpoints"
    assert value == pytest.approx(0.0)
    assert all(v == pytest.approx(0.0) for v in parts.values())


def test_cost_and_emissions_are_relative_to_each_buildings_own_baseline():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    # One extra unit of each building's average cost, in either building, weighs the same (the KPI is a mean of
    # per-building ratios).
    _, in_a = reward_of(reward, [2.0, 1.0], [0.8, 0.1], [0.8, 0.2])
    _, in_b = reward_of(reward, [2.0, 1.0], [0.4, 0.2], [0.8, 0.2])
    assert in_a["cost"] == pytest.approx(in_b["cost"]) == pytest.approx(0.5)
    cheaper, _ = reward_of(reward, [2.0, 1.0], [0.2, 0.1], [0.8, 0.2])
    assert cheaper > 0


def test_the_shares_sum_to_the_team_reward_and_each_building_share_is_its_own_doing():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    before = rows(connected=1, departure=5, required=0.8, soc=0.5, battery=0.2)
    after = rows(connected=1, departure=4, required=0.8, soc=0.45, battery=0.4)
    args = (0, np.array([2.5, 0.7]), np.array([0.5, 0.05]), np.array([0.9, 0.1]), after, before)
    shares = reward.split(*reward.terms(*args))
    assert shares.shape == (3,)  # two buildings and the district
    assert shares.sum() == pytest.approx(reward.reward(reward.components(*args)))
    # Building B's share moves with B's cost and battery only; A's car and cost do not touch it.
    other = (0, np.array([2.5, 0.7]), np.array([0.9, 0.05]), np.array([0.9, 0.1]),
             rows(connected=1, departure=4, required=0.8, soc=0.3, battery=0.4), before)
    changed = reward.split(*reward.terms(*other))
    assert changed[1] == pytest.approx(shares[1]) and changed[0] < shares[0]


def test_exports_are_not_costs():
    """CityLearn's cost KPI sums max(0, cost): selling back does not earn money, so it does not earn reward either."""
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    _, zero = reward_of(reward, [2.0, 1.0], [0.0, 0.1], [0.0, 0.2])
    _, negative = reward_of(reward, [2.0, 1.0], [-5.0, 0.1], [-5.0, 0.2])
    assert zero["cost"] == pytest.approx(negative["cost"])


def test_peaks_are_penalised_more_than_proportionally():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline, TeamRewardWeights(cost=0, emissions=0, peak=1, ev=0, appliance=0))
    small, _ = reward_of(reward, [2.5, 1.0], [0.4, 0.1], [0.8, 0.2])
    large, _ = reward_of(reward, [3.0, 1.0], [0.4, 0.1], [0.8, 0.2])
    assert large < small < 0
    assert (0 - large) > 2 * (0 - small)  # quadratic in the district load
    shaved, _ = reward_of(reward, [1.5, 1.0], [0.4, 0.1], [0.8, 0.2])
    assert shaved > 0


def test_draining_a_parked_ev_below_its_target_is_penalised_and_charging_it_credited_less():
    layout, baseline = two_buildings()
    weights = TeamRewardWeights(cost=0, emissions=0, peak=0, ev=5, ev_charge_credit=0.1, appliance=0, storage=0)
    reward = TeamReward(layout, baseline, weights)
    before = rows(connected=1, departure=5, required=0.8, soc=0.5)
    drained, parts = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(1, 4, 0.8, 0.4), before=before)
    assert parts["ev"] == pytest.approx(0.1, abs=1e-6) and drained == pytest.approx(-0.5, abs=1e-5)
    charged, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(1, 4, 0.8, 0.6), before=before)
    assert charged == pytest.approx(0.05, abs=1e-5)
    # Charging beyond the requested state of charge earns nothing more.
    full = rows(connected=1, departure=5, required=0.8, soc=0.9)
    beyond, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(1, 4, 0.8, 1.0), before=full)
    assert beyond == 0.0
    # A car arriving or leaving is not something the policy did.
    arrival, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(1, 9, 0.8, 0.2), before=rows())
    leaving, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(), before=rows(1, 0, 0.8, 0.2))
    assert arrival == leaving == 0.0


def test_an_appliance_window_that_closes_without_a_run_is_penalised():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline, TeamRewardWeights(cost=0, emissions=0, peak=0, ev=0, appliance=2))
    missed, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(can_start=0), before=rows(can_start=1))
    started, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(can_start=0, running=1),
                           before=rows(can_start=1))
    assert missed == -2.0 and started == 0.0


def test_energy_put_into_a_battery_is_credited_when_it_goes_in_and_debited_when_it_comes_out():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline, TeamRewardWeights(cost=0, emissions=0, peak=0, ev=0, appliance=0, storage=1),
                        gamma=0.99)
    value_per_kwh = reward.scales.stored_kwh_value[1]
    assert value_per_kwh == pytest.approx(2.0 / (1.0 * 2))  # building B imports 1 kWh per step on average
    charge, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(battery=0.5), before=rows(battery=0.0))
    assert charge == pytest.approx(0.99 * 0.5 * 6.4 * value_per_kwh)
    discharge, _ = reward_of(reward, [2.0, 1.0], [0.4, 0.1], [0.8, 0.2], after=rows(battery=0.0), before=rows(battery=0.5))
    assert discharge == pytest.approx(-0.5 * 6.4 * value_per_kwh)
    # Potential-based: a round trip through the battery earns nothing by itself (only discounting remains).
    assert charge + discharge == pytest.approx(-0.01 * 0.5 * 6.4 * value_per_kwh)


@pytest.mark.citylearn
def test_on_the_real_env_no_control_earns_nothing_but_ev_and_appliance_terms(week_spec):
    """Zero actions reproduce the no-storage baseline: cost, emission and peak terms vanish step by step."""
    from maddpg_evaluation.citylearn_env import CityLearnAdapter
    from maddpg_training.bootstrap import warmup

    warm = warmup(week_spec)
    reward = TeamReward(warm.layout, warm.baseline)
    assert len(reward.chargers) == 8 and len(reward.appliances) == 1  # found by name in the real layout
    assert len(reward.battery_soc) == 17 and (warm.baseline.battery_capacity > 0).all()
    env = week_spec.build()
    adapter = CityLearnAdapter(warm.layout, env)
    observations, _ = env.reset()
    previous = adapter.observations_to_array(observations)
    totals = dict.fromkeys(("cost", "emissions", "peak", "storage"), 0.0)
    while not env.terminated:
        observations, *_ = env.step(adapter.actions_to_lists(np.zeros(warm.layout.action_shape)))
        current = adapter.observations_to_array(observations)
        _, parts = reward.step_reward(env, current, previous)
        for key in totals:
            totals[key] += abs(parts[key])
        previous = current
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in totals.values()), totals
