"""The district model used for training against CityLearn itself: the same actions, the same charges and loads; its
objective over a whole pass is env.evaluate()'s KPIs; its gradient reaches the actors through the state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maddpg_evaluation.citylearn_env import EnvSpec, layout_from_env
from maddpg_training.bootstrap import fresh_policy, without_ev_discharge
from maddpg_training.district_model import DistrictModel, fidelity, record_pass, with_appliances_started
from maddpg_training.model_tuning import DistrictObjective, DistrictStep, Rollouts, imagine, pass_rows, replayed_terms
from maddpg_training.networks import DISTRICT_FEATURES, ActorSpec, widened
from maddpg_training.safety import safety_spec_from_env

# Three days in November with cars arriving, charging and leaving at several chargers.
WINDOW = (3990, 4062)


@pytest.fixture(scope="module")
def recorded(schema_path):
    """The model reads its data off one pass (batteries and chargers idle) and is checked against another, driven by
    varied actions: batteries both ways, chargers at random power. Both start every appliance cycle at its earliest
    start, as the planner does, whose appliance schedule the model assumes."""
    spec = EnvSpec(schema=str(schema_path), start=WINDOW[0], end=WINDOW[1])
    env = spec.build()
    layout = without_ev_discharge(layout_from_env(env))
    safety = safety_spec_from_env(env, layout)
    low, high = layout.action_bounds()
    rng = np.random.default_rng(3)
    varied = [np.clip(rng.uniform(-1.0, 1.0, layout.action_shape), low, high) for _ in range(WINDOW[1] - WINDOW[0])]
    idle, _ = record_pass(spec, layout, lambda t, raw: with_appliances_started(np.zeros(layout.action_shape), safety))
    driven, kpis = record_pass(spec, layout, lambda t, raw: with_appliances_started(varied[t], safety))
    model = DistrictModel.from_env(env, pass_rows(idle).numpy(), idle["actions"], layout, safety)
    return {"record": driven, "model": model, "kpis": kpis, "layout": layout, "safety": safety}


def test_the_same_actions_give_the_envs_charges_and_net_loads(recorded):
    found = fidelity(recorded["model"], recorded["record"])
    assert found["parked_car_steps"] > 50, "the window must hold parked cars for the check to mean anything"
    assert found["battery_soc_max"] < 1e-3, found
    assert found["net_kwh_max"] < 0.05, found
    assert found["car_soc_max"] < 1e-3, found


def test_the_objective_over_a_whole_pass_is_the_envs_evaluation(recorded):
    model, record, kpis = recorded["model"], recorded["record"], recorded["kpis"]
    terms = replayed_terms(model, record)
    for term, kpi in (("cost", "cost_total"), ("carbon", "carbon_emissions_total"),
                      ("daily_peak", "daily_peak_average"), ("all_time_peak", "all_time_peak_average")):
        assert float(terms[term][0]) == pytest.approx(kpis[kpi], abs=0.01), term
    assert float(terms["debt"][0]) == 0.0


def test_an_early_battery_action_reaches_later_inputs_and_the_actors_get_a_gradient(recorded):
    model, layout, safety = recorded["model"], recorded["layout"], recorded["safety"]
    policy = fresh_policy(layout, recorded["record"]["observations"], ActorSpec(hidden_sizes=(16,)), seed=0,
                          safety=safety)
    # Start one run from a half-full battery: what the first step does shows in the state of charge read later.
    state = model.start(torch.tensor([10]), model.observations[10:11])
    state["battery"] = state["battery"] * 0 + model.batteries.capacity * 0.5
    first = torch.zeros(1, *layout.action_shape, requires_grad=True)
    state, _ = model.step(state, first)
    later = model.observe(state)[0, model.soc_agents, model.soc_slots].sum()
    later.backward()
    assert first.grad[0, model.battery_agents, model.battery_action].abs().min() > 0

    run = imagine(model, policy, torch.tensor([0, 20]), model.observations[[0, 20]], horizon=24)
    objective = DistrictObjective(model)
    loss = sum(v.mean() for v in objective.terms(run, model.start(torch.tensor([24, 44]),
                                                                  model.observations[[24, 44]])).values())
    loss.backward()
    grads = [p.grad for p in policy.actors.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


class _FixedOutputs(torch.nn.Module):
    """Actors that output the same unit actions ``[agents, action_width]`` at every state (a parameter)."""

    def __init__(self, unit: torch.Tensor, action_mask: torch.Tensor):
        super().__init__()
        self.unit = torch.nn.Parameter(unit)
        self.register_buffer("action_mask", action_mask)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.unit * self.action_mask).expand(inputs.shape[0], *self.unit.shape)


@pytest.mark.parametrize("held", ["below the clip", "under the minimum power"])
def test_a_charger_the_bounds_hold_learns_from_the_districts_kpis_only_through_them(recorded, held):
    model, layout, safety = recorded["model"], recorded["layout"], recorded["safety"]
    policy = fresh_policy(layout, recorded["record"]["observations"], ActorSpec(hidden_sizes=(16,)), seed=0,
                          safety=safety)
    # Every charger's output below 0, or the chargers with a minimum power just above 0 (a request under it gives
    # nothing) and the others below 0.
    below = held == "below the clip"
    watched = torch.ones(len(model.max_power), dtype=torch.bool) if below else model.min_power > 0
    output = torch.full(watched.shape, -0.3)
    if not below:
        output[watched] = 0.05
    assert watched.any() and (output[watched] * model.max_power[watched] < model.min_power[watched]).all()
    unit = torch.zeros(layout.action_shape)
    unit[model.charger_agent, model.charger_action] = output
    policy.actors = _FixedOutputs(unit, policy.actors.action_mask)
    starts = torch.tensor([0, 24])
    reference = model.start(starts + 24, model.observations[starts + 24])
    found = {}
    for through in (False, True):
        policy.actors.unit.grad = None
        run = imagine(model, policy, starts, model.observations[starts], horizon=24, through_bounds=through)
        sum(v.mean() for v in DistrictObjective(model).terms(run, reference).values()).backward()
        found[through] = (run, policy.actors.unit.grad[model.charger_agent, model.charger_action].clone())
    (flat_run, flat), (through_run, through) = found[False], found[True]
    assert torch.equal(flat_run.net, through_run.net), "passing the gradient through must not change what is applied"
    assert float(flat.abs().sum()) == 0.0
    assert float(through[watched].abs().sum()) > 0.0
    assert (through_run.outside > 0).all(), "outputs below 0 are pulled back by the outside term"


def test_peak_aimed_runs_hold_the_own_pass_highest_hour(recorded):
    model = recorded["model"]
    rows = model.observations.clone()
    # The own pass's district draws far more at step 40 than anywhere else (row 41 holds step 40's net load).
    rows[41, model.net_agents[0], model.net_slots[0]] = 1e3
    rollouts = Rollouts(model=model, objective=DistrictObjective(model), rows=rows)
    assert rollouts.peak_steps.tolist() == [40]
    horizon = 24
    for share, aimed in ((1.0, 64), (0.5, 32)):
        starts, _ = rollouts.sample(64, horizon, torch.Generator().manual_seed(0), peak_share=share)
        holds = (starts <= 40) & (40 < starts + horizon)
        assert holds[:aimed].all(), starts
        assert len(set(starts[:aimed].tolist())) > 5, "the lead before the peak varies"
    uniform, _ = rollouts.sample(64, horizon, torch.Generator().manual_seed(0))
    assert not ((uniform <= 40) & (40 < uniform + horizon)).all()


def test_a_run_on_scaled_loads_and_solar_sees_and_draws_them(recorded):
    model, layout, safety = recorded["model"], recorded["layout"], recorded["safety"]
    policy = fresh_policy(layout, recorded["record"]["observations"], ActorSpec(hidden_sizes=(16,)), seed=0,
                          safety=safety)
    starts = torch.tensor([5, 30])
    same = imagine(model, policy, starts, model.observations[starts], horizon=12)
    ones = imagine(model, policy, starts, model.observations[starts], horizon=12, scale=torch.ones(2, 2))
    assert torch.equal(same.net, ones.net), "a scale of 1 is the data"
    # The first step's actions depend only on the first rows: scale those and the first net load moves by exactly
    # the scaled loads and solar, with the actors' own reaction to the rows they saw.
    scale = torch.tensor([[1.3, 0.6], [0.8, 1.2]])
    state = model.start(starts, model.observations[starts], scale)
    rows = model.observe(state)
    seen = model.observations[starts]
    assert torch.allclose(rows[:, model.load_agents, model.load_slots],
                          torch.nan_to_num(seen[:, model.load_agents, model.load_slots]) * scale[:, :1])
    assert torch.allclose(rows[:, model.solar_agents, model.solar_slots],
                          torch.nan_to_num(seen[:, model.solar_agents, model.solar_slots]) * scale[:, 1:])
    actions = policy(rows).detach()
    _, scaled = model.step(state, actions)
    _, plain = model.step(model.start(starts, seen), actions)
    expected = plain + (scale[:, :1] - 1) * model.load[starts] - (scale[:, 1:] - 1) * model.solar[starts]
    assert torch.allclose(scaled, expected, atol=1e-4)
    assert (scaled - plain).abs().sum() > 1.0, "the window's loads and solar are not zero: the scale must show"


def backward_through_two_days(model, policy) -> None:
    """The district objective's gradient, into ``policy``'s weights, of two imagined 24-hour runs (steps 0 and 20)."""
    run = imagine(model, policy, torch.tensor([0, 20]), model.observations[[0, 20]], horizon=24)
    reference = model.start(torch.tensor([24, 44]), model.observations[[24, 44]])
    sum(v.mean() for v in DistrictObjective(model).terms(run, reference).values()).backward()


@pytest.mark.parametrize("district", ["district", "district_ev"])
def test_a_widened_clone_acts_as_before_and_its_district_inputs_learn_from_the_model(recorded, district):
    model, layout, safety = recorded["model"], recorded["layout"], recorded["safety"]
    observations = recorded["record"]["observations"]
    clone = fresh_policy(layout, observations, ActorSpec(hidden_sizes=(16,), features=("hour_cycle", "ev_slack"),
                                                         ensemble=2), seed=0, safety=safety)
    wide = widened(clone, district, observations)
    assert wide.spec.features == ("hour_cycle", "ev_slack", district) and not wide.spec.decentralised
    rows = torch.as_tensor(observations, dtype=torch.float32)
    read = wide.features(rows)[..., -len(DISTRICT_FEATURES[district]):]
    assert read.std(dim=0).max() > 0.1, "the district signals must vary over the window for the check to mean anything"
    assert torch.equal(wide(rows), clone(rows)), "the new inputs start at weight 0: the clone's actions unchanged"
    backward_through_two_days(model, wide)
    first = wide.actors.mlp.layers[0].weight.grad
    assert first[:, -len(DISTRICT_FEATURES[district]):].abs().sum() > 0, "the district columns must get a gradient"


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_the_district_step_scales_adams_step_on_the_district_columns_only(recorded, factor):
    """model_district_step: the first-layer weights reading the district move ``factor`` times as far as Adam moves
    them, every other weight exactly as far (compared with the same update unscaled)."""
    model, layout, safety = recorded["model"], recorded["layout"], recorded["safety"]
    observations = recorded["record"]["observations"]
    clone = fresh_policy(layout, observations, ActorSpec(hidden_sizes=(16,), features=("hour_cycle", "ev_slack")),
                         seed=0, safety=safety)
    columns = len(DISTRICT_FEATURES["district"])

    def one_update(scale: float):
        wide = widened(clone, "district", observations)
        start = {k: v.clone() for k, v in wide.actors.state_dict().items()}
        optimizer = torch.optim.Adam(wide.actors.parameters(), lr=1e-3)
        backward_through_two_days(model, wide)
        DistrictStep(wide, scale).step(optimizer)
        return {k: v - start[k] for k, v in wide.actors.state_dict().items()}

    plain, scaled = one_update(1.0), one_update(factor)
    first = "mlp.layers.0.weight"
    assert plain[first][:, -columns:].abs().max() > 1e-4, "the district columns must move for the check to mean anything"
    assert torch.allclose(scaled[first][:, -columns:], factor * plain[first][:, -columns:], rtol=1e-4, atol=1e-8)
    assert torch.equal(scaled[first][:, :-columns], plain[first][:, :-columns])
    assert all(torch.equal(scaled[k], plain[k]) for k in plain if k != first)
