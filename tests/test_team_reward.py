"""The team reward is the evaluation's headline KPIs, decomposed per step: checked against env.evaluate() itself."""

from __future__ import annotations

import numpy as np
import pytest

from maddpg_core.layout import layout_from_names
from maddpg_training.team_reward import DAY, BaselineSeries, StepSeries, TeamReward, TeamRewardWeights


def two_buildings(steps: int = 48):
    layout = layout_from_names(["A", "B"], [["hour"], ["hour"]], [["electrical_storage"], ["electrical_storage"]],
                               [[-1], [-1]], [[1], [1]])
    baseline = BaselineSeries(consumption=np.array([[2.0, 1.0]] * steps), cost=np.array([[0.4, 0.1]] * steps),
                              emissions=np.array([[0.8, 0.2]] * steps), battery_capacity=np.array([6.4, 6.4]))
    return layout, baseline


def series(consumption, cost, emissions, baseline=((2.0, 1.0), (0.4, 0.1), (0.8, 0.2))):
    return StepSeries(*(np.asarray(v, dtype=float) for v in (consumption, cost, emissions, *baseline)))


def test_doing_what_the_baseline_does_scores_zero():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    for _ in range(30):
        shares, terms = reward.step(series([2.0, 1.0], [0.4, 0.1], [0.8, 0.2]))
        assert np.allclose(shares, 0.0) and all(v == pytest.approx(0.0) for v in terms.values())


def test_each_building_share_moves_only_with_that_building_and_shares_sum_to_the_team_reward():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline, TeamRewardWeights(daily_peak=0.0, all_time_peak=0.0), scale=1.0)
    shares, terms = reward.step(series([2.0, 1.0], [0.8, 0.1], [0.8, 0.2]))  # A pays double at one step
    assert shares.shape == (4,)
    assert shares[0] == pytest.approx(-0.4 / (0.4 * 48) / 2) and shares[1] == 0.0
    assert shares.sum() == pytest.approx(-(terms["cost"] + terms["emissions"]))


def test_exports_are_not_costs():
    layout, baseline = two_buildings()
    reward = TeamReward(layout, baseline)
    shares, _ = reward.step(series([2.0, -3.0], [0.4, -0.5], [0.8, -0.6]))
    # B exported instead of importing 0.1: its positive cost fell from 0.1 to 0, a gain, but no more than that.
    assert shares[1] == pytest.approx(reward.scale * (0.1 / (0.1 * 48) + 0.2 / (0.2 * 48)) / 2)


def test_peaks_cost_only_when_the_running_maximum_rises():
    layout, baseline = two_buildings()
    weights = TeamRewardWeights(cost=0.0, emissions=0.0)
    reward = TeamReward(layout, baseline, weights, scale=1.0)
    first, _ = reward.step(series([3.0, 1.0], [0.4, 0.1], [0.8, 0.2]))       # 4 kW against a baseline of 3 kW
    assert first[-2] < 0 and first[-1] < 0
    lower, _ = reward.step(series([1.0, 1.0], [0.4, 0.1], [0.8, 0.2]))        # below the running max: free
    assert lower[-2] == pytest.approx(0.0) and lower[-1] == pytest.approx(0.0)
    assert reward.state()[0] == pytest.approx(4.0 / 3.0) and reward.state()[1] == pytest.approx(4.0 / 3.0)
    for _ in range(DAY - 2):
        reward.step(series([2.0, 1.0], [0.4, 0.1], [0.8, 0.2]))
    new_day, _ = reward.step(series([3.0, 1.0], [0.4, 0.1], [0.8, 0.2]))     # the daily maximum starts again
    assert new_day[-2] < 0 and new_day[-1] == pytest.approx(0.0)


@pytest.mark.citylearn
def test_over_a_real_window_the_terms_sum_to_the_kpis_env_evaluate_reports(schema_path):
    from maddpg_evaluation.citylearn_env import CityLearnAdapter, EnvSpec
    from maddpg_evaluation.kpis import district_kpis
    from maddpg_training.bootstrap import warmup

    spec = EnvSpec(schema=str(schema_path), start=100, end=299)
    warm = warmup(spec)
    env = spec.build()
    adapter = CityLearnAdapter(warm.layout, env)
    reward = TeamReward(warm.layout, warm.baseline, scale=1.0)
    rng = np.random.default_rng(0)
    env.reset()
    reward.reset()
    totals, returns = {}, 0.0
    appliance = [(i, j) for i, a in enumerate(warm.layout.agents) for j, n in enumerate(a.action_names)
                 if n.startswith("deferrable_appliance")]
    while not env.terminated:
        actions = rng.uniform(-0.6, 0.6, size=warm.layout.action_shape).astype(np.float32)
        actions[:, 1:] = np.abs(actions[:, 1:])  # chargers draw power
        for i, j in appliance:
            actions[i, j] = 1.0                  # as the baseline the KPIs are a ratio to
        env.step(adapter.actions_to_lists(actions))
        shares, terms = reward.step_env(env)     # the path the trainer uses
        returns += shares.sum()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value
    kpis = district_kpis(env)
    assert totals["cost"] == pytest.approx(kpis["cost_total"] - 1, abs=1e-6)
    assert totals["emissions"] == pytest.approx(kpis["carbon_emissions_total"] - 1, abs=1e-6)
    assert totals["daily_peak"] == pytest.approx(kpis["daily_peak_average"] - 1, abs=1e-6)
    assert totals["all_time_peak"] == pytest.approx(kpis["all_time_peak_average"] - 1, abs=1e-6)
    headline = sum(kpis[k] - 1 for k in ("cost_total", "carbon_emissions_total", "daily_peak_average",
                                          "all_time_peak_average"))
    assert returns == pytest.approx(-headline, abs=1e-5)
