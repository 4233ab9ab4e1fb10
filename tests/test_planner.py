"""The perfect-foresight planner and the charge-on-arrival reference, on short windows of the real env."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from maddpg_core.errors import PlannerError
from maddpg_evaluation.citylearn_env import EnvSpec, layout_from_env
from maddpg_evaluation.episode import run_episode
from maddpg_evaluation.kpis import headline_score
from maddpg_evaluation.planner import Planner, PlannerPolicy
from maddpg_evaluation.planner.forecast import hour_profile, seasonal_naive
from maddpg_evaluation.planner.lp import LinearProgram
from maddpg_evaluation.planner.planner import read_state
from maddpg_evaluation.reference_controllers import ChargeOnArrivalPolicy, SelfConsumptionPolicy
from maddpg_ops.cli import cli

pytestmark = pytest.mark.citylearn
TWO_DAYS = (0, 47)


@pytest.fixture(scope="module")
def two_days(schema_path):
    return EnvSpec(schema=str(schema_path), start=TWO_DAYS[0], end=TWO_DAYS[1])


def test_the_plan_on_a_short_window_respects_every_bound(two_days):
    env = two_days.build()
    env.reset()
    planner = Planner(env, ev=True, mode="open-loop")
    d = planner.district
    plan = planner.solve(read_state(env, d), d.decision_steps)
    tol = 1e-6
    for i, battery in enumerate(d.batteries):
        # State of charge within [0, 1] of capacity (and the depth of discharge), power within nominal power.
        assert np.all(plan.energy[i] >= battery.min_energy - tol) and np.all(plan.energy[i] <= battery.capacity + tol)
        assert np.all(np.abs(plan.battery[i]) <= battery.nominal_power + tol)
        assert np.all(plan.charge[i] >= -tol) and np.all(plan.discharge[i] >= -tol)
    departing = [s for s in d.sessions if s.departure < d.decision_steps]
    assert departing, "the window must hold departures for this test to say anything"
    for s in departing:
        charger = d.chargers[s.charger]
        assert np.all(plan.charger[s.charger, s.arrival:s.departure + 1] <= charger.max_power + tol)
        # Each car leaves at its required SOC, or as full as the charger could make it in the time it was parked.
        start = s.arrival_energy if s.arrival_energy is not None else s.min_energy
        reachable = min(s.required_energy, start + s.gain * charger.max_power * (s.departure - s.arrival + 1))
        assert plan.car[s.charger, s.departure] >= reachable - 1e-4, s
    # No draw where no car is parked.
    parked = np.zeros_like(plan.charger, dtype=bool)
    for s in d.sessions:
        parked[s.charger, s.arrival:s.departure + 1] = True
    assert np.all(plan.charger[~parked[:, :plan.charger.shape[1]]] <= tol)

    # Replayed in the env: every appliance cycle served, the appliance's load where the planner expected it, and
    # every departing car at an acceptable charge.
    result = run_episode(env, PlannerPolicy(planner, env), name="planner")
    assert result.service["appliance_service_level"] == 1.0
    served = np.asarray(env.buildings[0].deferrable_appliances[0].electricity_consumption)[: d.decision_steps]
    assert served.sum() > 0
    np.testing.assert_allclose(served, d.appliance_load[0, : d.decision_steps], atol=1e-4)
    assert result.service["ev_departures_acceptable"] == 1.0


def test_replaying_the_planner_scores_better_than_the_self_consumption_rule(week_spec):
    env = week_spec.build()
    planner = Planner(env, ev=False)
    planned = run_episode(env, PlannerPolicy(planner, env), name="planner")
    rule_env = week_spec.build()
    rule = run_episode(rule_env, SelfConsumptionPolicy(rule_env), name="self-consumption")
    # Balanced trades a little of one KPI for more of another: the bar is the mean, and the peaks, which no rule
    # that sees only its own building can flatten.
    assert headline_score(planned.kpis) < headline_score(rule.kpis) - 0.05, (planned.kpis, rule.kpis)
    for kpi in ("daily_peak_average", "all_time_peak_average"):
        assert planned.kpis[kpi] < rule.kpis[kpi], kpi
    assert planner.timing.calls == planned.steps


def test_the_planner_acts_from_whatever_state_another_controller_left(two_days):
    env = two_days.build()
    observations, _ = env.reset()
    layout = layout_from_env(env)
    rule = ChargeOnArrivalPolicy(env)
    from maddpg_evaluation.citylearn_env import CityLearnAdapter

    adapter = CityLearnAdapter(layout, env)
    for _ in range(10):  # someone else drives the env for a while: batteries and cars are wherever it left them
        observations, *_ = env.step(adapter.actions_to_lists(rule.act(adapter.observations_to_array(observations))))
    planner = Planner(env, horizon=24, ev=True)
    state = read_state(env, planner.district, 24)
    assert state.step == 10
    np.testing.assert_allclose(state.battery_energy, [b.electrical_storage.energy_init for b in env.buildings])
    parked = {s.ev: state.ev_energy[k] for k, s in enumerate(planner.district.sessions) if k in state.ev_energy}
    assert parked, "cars are parked at step 10 of this window"
    for ev in env.electric_vehicles:
        if ev.name in parked:
            assert parked[ev.name] == pytest.approx(float(ev.battery.energy_init))
    actions = planner.actions(env)
    low, high = layout.action_bounds()
    assert actions.dtype == np.float32 and actions.shape == layout.action_shape
    assert np.all(actions >= low) and np.all(actions <= high)
    assert np.all(actions[~layout.action_mask()] == 0.0)
    assert np.any(actions[:, 0] != 0.0)


def test_charge_on_arrival_charges_a_parked_car_at_full_power_and_stops_at_the_target(two_days):
    env = two_days.build()
    observations, _ = env.reset()
    policy = ChargeOnArrivalPolicy(env)
    from maddpg_evaluation.citylearn_env import CityLearnAdapter

    adapter = CityLearnAdapter(policy.layout, env)
    charger = env.buildings[0].electric_vehicle_chargers[0]   # charger_1_1: a car parked from step 0 to 12
    sim = charger.charger_simulation
    required = float(sim.electric_vehicle_required_soc_departure[0])
    drawn, soc = [], []
    while env.time_step <= 12:
        t = env.time_step
        car = charger.connected_electric_vehicle
        observations, *_ = env.step(adapter.actions_to_lists(policy.act(adapter.observations_to_array(observations))))
        drawn.append(float(charger.electricity_consumption[t]))
        soc.append(float(car.battery.soc[t]))
    reached = next(k for k, value in enumerate(soc) if value >= required - 1e-6)
    assert drawn[0] == pytest.approx(charger.max_charging_power)              # full power from arrival
    assert all(x == pytest.approx(charger.max_charging_power) for x in drawn[:reached])
    assert soc[-1] >= required - 1e-6                                         # at the target by departure
    assert all(x == 0.0 for x in drawn[reached + 1:])                         # and nothing after it
    assert soc[-1] <= required + 0.05                                         # it stopped near the target


@pytest.mark.parametrize("args, message", [
    (["--objective", "cheapest"], "Invalid value for '--objective'"),
    (["--horizon", "0"], "Invalid value for '--horizon'"),
    (["--mode", "closed"], "Invalid value for '--mode'"),
    (["--forecast", "tomorrow"], "Invalid value for '--forecast'"),
    (["--peak-weight", "0"], "Invalid value for '--peak-weight'"),
    (["--forecast", "yesterday", "--mode", "open-loop"], "needs --mode receding"),
    (["--start", "50", "--end", "10"], "need 0 <= --start <= --end"),
    (["--start", "8000", "--end", "9000"], "ends outside the episode"),
    (["--schema", "/nonexistent/schema.json"], "does not exist"),
    (["--schema", "/nonexistent/schema.json", "--dataset", "x"], "not both"),
])
def test_bad_options_fail_with_one_line_before_any_solve(args, message, monkeypatch, tmp_path):
    solves = []
    monkeypatch.setattr(LinearProgram, "solve", lambda self, **_: solves.append(1))
    result = CliRunner().invoke(cli, ["plan", *args, "--no-progress", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert solves == [] and not (tmp_path / "out").exists()


def test_the_planner_refuses_unknown_options_in_one_line(two_days):
    env = two_days.build()
    with pytest.raises(PlannerError, match="unknown objective 'cheapest': use one of balanced, cost, carbon, peak"):
        Planner(env, objective="cheapest")
    with pytest.raises(PlannerError, match="--horizon must be at least 1"):
        Planner(env, horizon=0)


def test_plan_writes_the_evaluate_report_with_the_planner_and_charge_on_arrival(schema_path, tmp_path):
    """Run as a user runs it (its own process): stdout is the table, with no solver banner in it."""
    out = tmp_path / "plan"
    result = subprocess.run([sys.executable, "-m", "maddpg_ops.cli", "plan", "--schema", str(schema_path), "--start",
                             "0", "--end", "23", "--horizon", "12", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HiGHS" not in result.stdout.replace("+ HiGHS", "") and "Copyright" not in result.stdout + result.stderr
    header = result.stdout.splitlines()[0]
    assert header.split()[7:9] == ["better)", "planner"] and "policy" not in header, header
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"policy", "zero_actions", "basic_battery_rbc", "charge_on_arrival"}
    planner, reference = report["results"]["policy"], report["results"]["charge_on_arrival"]
    assert planner["service"]["ev_departures_acceptable"] == 1.0
    assert reference["relative_to_charge_on_arrival"] == {"cost_total": 1.0, "carbon_emissions_total": 1.0}
    # Both serve the cars; the planner does it for less.
    assert planner["relative_to_charge_on_arrival"]["cost_total"] < 1.0
    timing = report["throughput"]["planner"]
    assert timing["solves"] == 23 and timing["ms_per_solve_mean"] > 0
    assert report["model"]["name"] == "planner"
    assert report["model"]["source"]["objective"] == "balanced" and report["model"]["source"]["horizon_hours"] == 12
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for words in ("charge on arrival", "relative to charge on arrival", "LP solve", "EV departures"):
        assert words in result.stdout


def test_the_planner_is_called_planner_in_tables_and_legends():
    from maddpg_evaluation.evaluation import EvaluationReport, ModelIdentity
    from maddpg_evaluation.report import column_names

    report = EvaluationReport(policy_name="planner (receding 48 h, balanced, cars charged)", env={}, policy=None,
                              baselines={"zero_actions": None}, model=ModelIdentity(name="planner"))
    assert column_names(report) == {"policy": "planner", "zero_actions": "zero actions"}


def test_each_objective_buys_its_own_kpi(week_spec):
    kpis = {}
    for objective in ("cost", "carbon", "peak"):
        env = week_spec.build()
        kpis[objective] = run_episode(env, PlannerPolicy(Planner(env, objective=objective, ev=False), env)).kpis
    assert kpis["cost"]["cost_total"] < min(kpis["carbon"]["cost_total"], kpis["peak"]["cost_total"])
    assert kpis["carbon"]["carbon_emissions_total"] < min(kpis["cost"]["carbon_emissions_total"],
                                                          kpis["peak"]["carbon_emissions_total"])
    for peak in ("daily_peak_average", "all_time_peak_average"):
        assert kpis["peak"][peak] < min(kpis["cost"][peak], kpis["carbon"][peak]), peak


def test_a_car_that_stays_on_past_a_scored_departure_keeps_its_energy_in_the_plan(schema_path):
    # charger_10_1's first stay has no departure countdown for its first 48 hours; evaluate_v2 scores a departure
    # where the countdown appears, and the same car goes on charging as a new session.
    env = EnvSpec(schema=str(schema_path), start=0, end=71).build()
    env.reset()
    planner = Planner(env, ev=True, mode="open-loop")
    d = planner.district
    stays = [s for s in d.sessions if s.continues_previous]
    assert stays, "this window holds a stay across a scored departure"
    plan = planner.solve(read_state(env, d), d.decision_steps)
    for s in stays:
        before, after = plan.car[s.charger, s.arrival - 1], plan.car[s.charger, s.arrival]
        assert after == pytest.approx(before + s.gain * plan.charger[s.charger, s.arrival], abs=1e-4), s


def _floor_excess(spec: EnvSpec, rule, reference=None) -> list[float]:
    """How far the EV rule's floor (``reference``, else ``rule``, else the default rule) lies above the charger
    actions of a planner kept inside ``rule`` at every parked step of ``spec``."""
    from maddpg_evaluation.citylearn_env import CityLearnAdapter
    from maddpg_evaluation.ev_service import EvServiceRule

    env = spec.build()
    layout = layout_from_env(env)
    adapter = CityLearnAdapter(layout, env)
    planner = Planner(env, horizon=48, ev=True, ev_rule=rule)
    reference = reference or rule or EvServiceRule()
    slots = []
    for i, agent in enumerate(layout.agents):
        names = list(agent.observation_names)
        for building_charger in env.buildings[i].electric_vehicle_chargers or []:
            cid = building_charger.charger_id
            car = f"connected_electric_vehicle_at_charger_{cid}_"
            slots.append((i, list(agent.action_names).index(f"electric_vehicle_storage_{cid}"),
                          [names.index(n) for n in (f"electric_vehicle_charger_{cid}_connected_state",
                                                    car + "departure_time", car + "required_soc_departure",
                                                    car + "soc", car + "battery_capacity")],
                          building_charger.max_charging_power, building_charger.min_charging_power))
    excess = []
    observations, _ = env.reset()
    while not env.terminated:
        raw = adapter.observations_to_array(observations)
        actions = planner.actions(env)
        for i, j, (c, d, r, s, cap), power, minimum in slots:
            if raw[i, c] >= 0.5:
                floor = float(reference.floor(connected=raw[i, c], departure_time=raw[i, d], required_soc=raw[i, r],
                                              soc=raw[i, s], capacity=raw[i, cap], max_power_kw=power,
                                              min_power_kw=minimum))
                excess.append(floor - float(actions[i, j]))
                actions[i, j] = max(actions[i, j], floor)  # what the deployed policy's safety layer would do
        observations, *_ = env.step(adapter.actions_to_lists(actions))
    return excess


def test_given_the_policys_ev_rule_the_planner_plans_what_the_safety_layer_allows(schema_path):
    """A teacher must demonstrate what its student can do: plans inside the rule are rarely overruled by it."""
    from maddpg_evaluation.ev_service import EvServiceRule

    window = EnvSpec(schema=str(schema_path), start=150, end=197)  # holds stays without a departure time
    inside = np.asarray(_floor_excess(window, EvServiceRule()))
    unaware = np.asarray(_floor_excess(window, None))
    assert (unaware > 0.3).sum() >= 5                   # unaware plans leave cars the rule must charge at once
    assert (inside > 0.2).sum() == 0                    # aware ones: at most the deadband's rounding
    assert (inside > 1e-3).mean() < 0.5 * (unaware > 1e-3).mean()


def test_a_planner_inside_a_paced_rule_charges_as_early_as_the_rule_asks(schema_path):
    """A paced floor (``pace`` 0.5) asks for charging hours before the unpaced one: the planner must plan it, or its
    demonstrations are overruled where the peaks are."""
    from maddpg_evaluation.ev_service import EvServiceRule

    window = EnvSpec(schema=str(schema_path), start=6552, end=6599)  # 1-2 May: cars charged late when the rule allows
    paced = EvServiceRule(pace=0.5)
    unpaced_plans = np.asarray(_floor_excess(window, EvServiceRule(), reference=paced))
    paced_plans = np.asarray(_floor_excess(window, paced))
    assert (unpaced_plans > 0.2).sum() >= 5             # 13 measured: the paced floor would overrule them
    assert (paced_plans > 0.2).sum() == 0


def test_the_peak_weight_scales_the_peak_and_ramping_terms_and_nothing_else():
    from maddpg_evaluation.planner.objective import objective_weights

    balanced, light = objective_weights("balanced"), objective_weights("balanced", 0.3)
    assert (light.cost, light.carbon) == (balanced.cost, balanced.carbon)
    assert light.daily_peak == pytest.approx(0.3 * balanced.daily_peak)
    assert light.all_time_peak == pytest.approx(0.3 * balanced.all_time_peak)
    assert light.ramping == pytest.approx(0.3 * balanced.ramping)


def test_the_seasonal_naive_forecast_reads_the_same_hour_of_the_last_day_seen():
    series = np.arange(100, dtype=np.float64)[None, :] * np.array([[1.0], [10.0]])
    out = seasonal_naive(series, 30)
    np.testing.assert_array_equal(out[:, :31], series[:, :31])           # what has been observed stays
    assert out[0, 31] == 7 and out[0, 54] == 30 and out[0, 55] == 7 and out[1, 78] == 300
    assert out[0, 99] == 27                                                 # 99 - 3 days, the same hour
    early = seasonal_naive(series, 5)
    assert early[0, 10] == 5 and early[0, 29] == 5 and early[0, 30] == 5   # no day seen yet: the current hour


def test_the_hour_profile_forecast_is_the_mean_day_shifted_by_the_current_hours_departure_from_it():
    day = np.arange(24, dtype=np.float64)
    series = np.concatenate([day, day + 2.0, day + 4.0])[None, :]      # three days, each 2 above the last
    out = hour_profile(series, 30)                                         # hour 6 of day 2: 8, its hour's mean 8
    np.testing.assert_array_equal(out[:, :31], series[:, :31])
    np.testing.assert_allclose(out[0, 31:], (np.arange(31, 72) % 24) + 2.0)
    out = hour_profile(series, 60)                                         # hour 12 of day 3: 16, 2 above its mean
    np.testing.assert_allclose(out[0, 61:], (np.arange(61, 72) % 24) + 4.0)


def test_planning_on_yesterdays_loads_uses_nothing_a_controller_could_not_know(two_days):
    """The plan from step 30 is the same whatever the future holds; with foresight it is not."""
    env = two_days.build()
    env.reset()
    step = 30
    for _ in range(step):
        env.step([[0.0] * len(names) for names in env.action_names])
    plans = {}
    for forecast in ("yesterday", "exact"):
        for changed in (False, True):
            planner = Planner(env, horizon=24, ev=True, forecast=forecast)
            d = planner.district
            if changed:   # another future: loads and carbon after this step, and the cars still to come
                d.base_load[:, step + 1:] *= 1.7
                d.carbon[:, step + 1:] *= 0.5
                coming = [k for k, s in enumerate(d.sessions) if s.arrival > step and not s.continues_previous
                          and s.arrival < step + 24]
                assert coming, "cars arrive within the horizon of this test"
                for k in coming:
                    d.sessions[k] = dataclasses.replace(d.sessions[k], arrival_energy=d.sessions[k].min_energy,
                                                        required_energy=d.sessions[k].capacity)
            state = read_state(env, d, 24)
            assert state.step == step and state.ev_energy, "cars are parked now"
            plan = planner.solve(state, 24)
            plans[forecast, changed] = np.concatenate([plan.battery[:, 0], plan.charger[:, 0]])
    np.testing.assert_allclose(plans["yesterday", True], plans["yesterday", False], atol=1e-7)
    assert np.abs(plans["exact", True] - plans["exact", False]).max() > 1e-3
