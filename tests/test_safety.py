"""The safety layer at the end of the exported graph: every car leaves charged, every appliance cycle runs, whatever
the actors learned and whatever the observations hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maddpg_core.layout import layout_from_names
from maddpg_evaluation.ev_service import EvServiceRule
from maddpg_training.networks import ActorSpec, PolicyNetwork
from maddpg_training.safety import ApplianceSlot, ChargerSlot, SafetyLayer, SafetySpec

CAR = ["electric_vehicle_charger_c_connected_state", "connected_electric_vehicle_at_charger_c_departure_time",
       "connected_electric_vehicle_at_charger_c_required_soc_departure", "connected_electric_vehicle_at_charger_c_soc",
       "connected_electric_vehicle_at_charger_c_battery_capacity"]
APPLIANCE = ["deferrable_appliance_d_pending", "deferrable_appliance_d_can_start",
             "deferrable_appliance_d_hours_until_latest_start"]


def guarded_layout(pace: float = 1.0):
    layout = layout_from_names(
        ["A", "B"], [["hour", *CAR, *APPLIANCE], ["hour"]],
        [["electrical_storage", "electric_vehicle_storage_c", "deferrable_appliance_d"], ["electrical_storage"]],
        [[-1, 0, 0], [-1]], [[1, 1, 1], [1]])
    spec = SafetySpec(chargers=(ChargerSlot(agent=0, action=1, connected=1, departure_time=2, required_soc=3, soc=4,
                                            battery_capacity=5, max_power_kw=11.0, min_power_kw=1.4),),
                      appliances=(ApplianceSlot(agent=0, action=2, pending=6, can_start=7,
                                                hours_until_latest_start=8),),
                      ev_rule=EvServiceRule(margin=0.02, efficiency=0.8, pace=pace))
    return layout, spec


def row(connected=1.0, departure=10.0, required=0.9, soc=0.9, capacity=60.0, pending=0.0, can_start=0.0, latest=5.0):
    x = np.zeros((1, 2, 9), dtype=np.float32)
    x[0, 0, 1:9] = [connected, departure, required, soc, capacity, pending, can_start, latest]
    return torch.from_numpy(x)


def guard(observations, actions=None, pace: float = 1.0):
    layout, spec = guarded_layout(pace)
    layer = SafetyLayer(layout, spec)
    actions = torch.zeros((len(observations), 2, 3)) if actions is None else actions
    return layer(observations, actions)


def test_a_car_about_to_leave_half_empty_is_charged_at_full_power():
    out = guard(row(departure=0.0, soc=0.5, required=0.9))
    assert out[0, 0, 1] == pytest.approx(1.0)


def test_a_car_with_time_to_spare_is_left_to_the_actor():
    assert guard(row(departure=20.0, soc=0.5, required=0.9))[0, 0, 1] == 0.0
    actions = torch.zeros((1, 2, 3))
    actions[0, 0, 1] = 0.4
    assert guard(row(departure=20.0, soc=0.5, required=0.9), actions)[0, 0, 1] == pytest.approx(0.4)


def test_the_floor_charges_exactly_what_can_no_longer_wait():
    # 0.87 - 0.05 + 0.02 = 0.84 of 60 kWh is the target; from 0.5 that is 20.4 kWh; 2 more steps after this one at
    # 11 kW * 0.8 = 8.8 kWh each deliver 17.6 kWh: 2.8 kWh must go in now, 2.8 / 8.8 of full power.
    out = guard(row(departure=2.0, soc=0.5, required=0.87))
    assert out[0, 0, 1] == pytest.approx(2.8 / 8.8, rel=1e-4)


def test_a_floor_below_the_chargers_minimum_power_is_raised_to_it():
    # 0.1 kWh short with nothing after this step: 0.1 / 8.8 of full power is below 1.4 kW, which would charge nothing.
    out = guard(row(departure=0.0, soc=0.84 - 0.1 / 60, required=0.87))
    assert out[0, 0, 1] == pytest.approx(1.4 / 11 + 0.01, rel=1e-4)


def test_no_car_no_floor_and_batteries_are_never_touched():
    actions = torch.full((1, 2, 3), -0.7)
    actions[0, 0, 1:] = 0.0
    out = guard(row(connected=0.0, departure=0.0, soc=0.0), actions)
    assert out[0, 0, 1] == 0.0 and out[0, 0, 0] == pytest.approx(-0.7) and out[0, 1, 0] == pytest.approx(-0.7)


def test_a_pending_cycle_at_its_latest_start_starts_and_not_before():
    assert guard(row(pending=1.0, can_start=1.0, latest=0.0))[0, 0, 2] == 1.0
    assert guard(row(pending=1.0, can_start=1.0, latest=3.0))[0, 0, 2] == 0.0
    assert guard(row(pending=1.0, can_start=0.0, latest=0.0))[0, 0, 2] == 0.0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e30, -1e30])
def test_hostile_observations_give_finite_actions_inside_their_bounds(value):
    layout, spec = guarded_layout()
    policy = PolicyNetwork(layout, ActorSpec((8,), ("hour_cycle", "ev_slack")), spec).eval()
    with torch.no_grad():
        policy.actors.mlp.layers[-1].weight.mul_(1e4)  # saturated actors: every slot pinned at a bound
        out = policy(torch.full((3, 2, 9), value)).numpy()
    low, high = layout.action_bounds()
    assert np.isfinite(out).all()
    assert ((out >= low - 1e-7) & (out <= high + 1e-7)).all()


@pytest.mark.citylearn
def test_actors_that_never_charge_still_send_every_car_away_charged(week_spec):
    """On the real env for a week: the actors ask for nothing (every slot at its lower bound); the safety layer
    alone charges the cars and runs the appliance."""
    from maddpg_evaluation.citylearn_env import layout_from_env
    from maddpg_evaluation.episode import run_episode
    from maddpg_training.bootstrap import without_ev_discharge
    from maddpg_training.safety import safety_spec_from_env
    from maddpg_training.torch_policy import TorchPolicy

    env = week_spec.build()
    layout = without_ev_discharge(layout_from_env(env))
    policy = PolicyNetwork(layout, ActorSpec((8,)), safety_spec_from_env(env, layout))
    with torch.no_grad():
        for parameter in policy.actors.parameters():
            parameter.zero_()
        policy.actors.mlp.layers[-1].bias.fill_(-20.0)  # tanh -> -1: discharge batteries, chargers and appliance off
    result = run_episode(env, TorchPolicy(policy))
    assert result.service["ev_departure_count"] > 20
    assert result.service["ev_departures_acceptable"] == 1.0
    assert result.service["appliance_service_level"] == 1.0


def test_a_stay_without_a_departure_time_is_charged_steadily_within_a_day():
    # 0.84 * 60 - 0.5 * 60 = 20.4 kWh short: a sixth of it per step, at 8.8 kWh per full-power step.
    out = guard(row(departure=-1.0, soc=0.5, required=0.87))
    assert out[0, 0, 1] == pytest.approx(20.4 / (6 * 8.8), rel=1e-4)
    assert guard(row(departure=-1.0, soc=0.9, required=0.87))[0, 0, 1] == 0.0


@pytest.mark.parametrize("pace", [1.0, 0.5])
def test_the_graphs_floor_is_the_reference_rule(pace):
    layout, spec = guarded_layout(pace)
    rng = np.random.default_rng(0)
    x = np.zeros((4000, 2, 9), dtype=np.float32)
    x[:, 0, 1] = rng.integers(0, 2, 4000)
    x[:, 0, 2] = rng.choice([-1.0, 0.0, 1.0, 3.0, 12.0, 30.0], 4000)
    x[:, 0, 3:5] = rng.uniform(0, 1, (4000, 2))
    x[:, 0, 5] = rng.choice([40.0, 60.0, 100.0], 4000)
    x[:, 0, 4][rng.uniform(size=4000) < 0.05] = np.nan
    out = guard(torch.from_numpy(x), pace=pace)[:, 0, 1].numpy()
    slot = spec.chargers[0]
    expected = spec.ev_rule.floor(connected=x[:, 0, 1], departure_time=x[:, 0, 2], required_soc=x[:, 0, 3],
                                  soc=x[:, 0, 4], capacity=x[:, 0, 5], max_power_kw=slot.max_power_kw,
                                  min_power_kw=slot.min_power_kw)
    assert np.abs(out - expected).max() < 1e-5
    assert (expected > 0).mean() > 0.1  # the comparison covers binding floors (13% here), not just zeros


def test_a_paced_floor_starts_earlier_at_its_pace_and_delivers_the_same_energy():
    # 0.87 * 60 - 0.5 * 60 = 22.2 kWh short, 8.8 kWh per full-power step, departure in 5 h (6 steps left).
    late, paced = [], []
    for pace, out in ((1.0, late), (0.5, paced)):
        soc = 0.5
        for hours_left in range(5, -1, -1):
            fraction = float(guard(row(departure=float(hours_left), soc=soc, required=0.92), pace=pace)[0, 0, 1])
            out.append(fraction)
            soc += fraction * 8.8 / 60.0
        assert soc >= 0.87 - 1e-6, (pace, out)     # both reach the rule's target by the departure
    assert late[:3] == [0.0, 0.0, 0.0] and late[-1] == pytest.approx(1.0)   # at 1, full power at the last moment
    assert paced[0] > 0 and max(paced) < 0.6                                # at 0.5, from now, at about half


def test_a_rule_at_full_pace_writes_what_it_wrote_before_pacing_existed():
    """Checkpoints and cached teacher passes are keyed by the rule's dict: an unpaced rule must keep its old key."""
    assert "pace" not in EvServiceRule().to_dict()
    paced = SafetySpec(ev_rule=EvServiceRule(pace=0.5))
    assert SafetySpec.from_dict(paced.to_dict()).ev_rule.pace == 0.5
    assert SafetySpec.from_dict(SafetySpec().to_dict()).ev_rule == EvServiceRule()
