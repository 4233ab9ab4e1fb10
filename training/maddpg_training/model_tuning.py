"""Fine-tuning the clone on the district's KPIs through the district model (district_model.py).

Each update: ``batch`` start steps drawn from a training window; the district starts where the actors' own
deterministic pass was at those steps; the actors drive the model for ``horizon`` hours; the loss is the headline
KPIs of those hours (the team's objective, as env.evaluate() computes them on the window, scaled to the horizon),
plus what the end state owes (the energy the batteries hold less than the own pass's at the same step, and what the
cars lack against it, at the window's mean price and carbon), plus the cloning loss on the teacher's labels, which keeps the actors where the
teacher's data can still correct them. The gradient flows through every step back to every actor: the battery's
evening discharge pays for the 06:00 peak it leaves uncovered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .district_model import DAY, DistrictModel, replay


@dataclass
class Imagined:
    steps: torch.Tensor       # [B, H] the window's steps driven
    net: torch.Tensor         # [B, H, buildings] kWh
    end: dict                 # the model's state after the last step
    outside: torch.Tensor | None = None   # [B] how far the actors' outputs went beyond their bounds (through_bounds)


def imagine(model: DistrictModel, policy, starts: torch.Tensor, rows: torch.Tensor, horizon: int, *,
            through_bounds: bool = False, scale: torch.Tensor | None = None) -> Imagined:
    """The policy drives the model from ``starts`` ``[B]``, starting from ``rows`` ``[B, agents, width]``.

    ``through_bounds``: the applied actions are the deployed ones, but their gradient reaches an actor's output
    through the clip to its bounds and a charger's minimum power (straight through); the safety floor's max stays
    exact, so a charger the floor overrides still learns only through the charge the floor reads. Without it a
    charger output below 0 is flat: the district's KPIs cannot teach it to charge earlier. The squared distance of
    the outputs beyond their bounds is returned (``outside``, per valid slot and step) to pull them back inside.
    ``scale``: see ``DistrictModel.start``."""
    state = model.start(starts, rows, scale)
    steps, nets, outside = [], [], []
    for _ in range(horizon):
        observations = model.observe(state)
        if through_bounds:
            unit = policy.actors(policy.actor_inputs(observations))
            clipped = policy.scaler(unit)
            actions = policy.guard(observations, unit + (clipped - unit).detach())
            outside.append((unit - clipped).pow(2).sum((1, 2)))
        else:
            actions = policy(observations)
        steps.append(state["t"])
        state, net = model.step(state, actions, straight_through=through_bounds)
        nets.append(net)
    slots = policy.actors.action_mask.sum() if through_bounds else None
    return Imagined(steps=torch.stack(steps, 1), net=torch.stack(nets, 1), end=state,
                    outside=torch.stack(outside, 1).mean(1) / slots if through_bounds else None)


class DistrictObjective:
    """The headline KPIs of imagined hours, each on env.evaluate()'s scale for the window (1 = no storage)."""

    def __init__(self, model: DistrictModel):
        baseline = model.baseline
        decisions = model.steps - 1
        building = torch.as_tensor(baseline.cost, dtype=torch.float32)
        self.counted = building > 0
        self.cost_per_step = building.clamp_min(1e-9) / decisions
        self.carbon_per_step = torch.as_tensor(baseline.carbon, dtype=torch.float32).clamp_min(1e-9) / decisions
        self.daily_peak = float(baseline.daily_peak)
        self.all_time_peak = float(baseline.all_time_peak)
        self.model = model
        # What a kWh left in storage at the end is worth: the window's mean price and carbon, per building.
        self.price_mean = model.price[:decisions].mean(0)
        self.carbon_mean = model.carbon[:decisions].mean(0)

    def terms(self, run: Imagined, reference_end: dict) -> dict[str, torch.Tensor]:
        """Per start ``[B]``: cost, carbon, daily peak, all-time peak, and the end state's debt."""
        m, t, net = self.model, run.steps, run.net
        horizon = t.shape[1]
        imports = net.clamp_min(0.0)
        per_building = lambda series, per_step: (imports * series[t]).sum(1) / (per_step * horizon)  # noqa: E731
        cost = per_building(m.price, self.cost_per_step)[:, self.counted].mean(1)
        carbon = per_building(m.carbon, self.carbon_per_step)[:, self.counted].mean(1)
        district = net.sum(-1)
        day = torch.div(t, DAY, rounding_mode="floor")
        day = day - day[:, :1]
        maxima, present = [], []
        for k in range(int(day.max()) + 1):
            inside = day == k
            maxima.append(torch.where(inside, district, torch.full_like(district, -1e9)).max(1).values)
            present.append(inside.any(1).float())
        maxima, present = torch.stack(maxima, 1), torch.stack(present, 1)
        daily = (maxima * present).sum(1) / present.sum(1) / self.daily_peak
        peak = district.max(1).values / self.all_time_peak
        # Energy the run leaves short against the reference (the own pass at the same step), bought later: a
        # battery's either way (what it holds serves the next hours), a car's only where it is short (a car leaves
        # with its surplus, which no KPI pays back).
        short = reference_end["battery"] - run.end["battery"]
        cars = (reference_end["car"] - run.end["car"]).clamp_min(0.0)
        short = short.index_add(1, m.charger_agent, cars)
        debt = ((short * self.price_mean / (self.cost_per_step * horizon))[:, self.counted].mean(1)
                + (short * self.carbon_mean / (self.carbon_per_step * horizon))[:, self.counted].mean(1))
        return {"cost": cost, "carbon": carbon, "daily_peak": daily, "all_time_peak": peak, "debt": debt}


PEAK_DAYS = 0.1   # a peak-aimed run aims at the peak hour of one of the window's highest tenth of days (own pass)


@dataclass
class Rollouts:
    """Where imagined runs start: one window's model, its own pass's rows, and that pass's state at every step."""

    model: DistrictModel
    objective: DistrictObjective
    rows: torch.Tensor        # [T, agents, width] the actors' own deterministic pass over the window

    @cached_property
    def peak_steps(self) -> torch.Tensor:
        """The steps where the own pass's highest daily peaks fall: the peak hour of each of the window's highest
        tenth of days (consecutive 24-step blocks from its first step; at least one). Read once per pass: a kept
        episode's new pass comes as a new ``Rollouts`` (``dataclasses.replace``)."""
        m = self.model
        # Row t + 1 holds the net consumption of step t (CityLearn observes the hour just stepped).
        district = torch.nan_to_num(self.rows[1:m.steps, m.net_agents, m.net_slots], nan=0.0).sum(-1)
        days = max(1, len(district) // DAY)
        blocks = district[:days * DAY].reshape(days, -1)
        top = blocks.max(1).values.topk(max(1, round(days * PEAK_DAYS))).indices
        return top * blocks.shape[1] + blocks[top].argmax(1)

    def sample(self, batch: int, horizon: int, generator: torch.Generator, peak_share: float = 0.0
               ) -> tuple[torch.Tensor, dict]:
        """``batch`` start steps, and the own pass's state ``horizon`` hours after each (what the debt is
        measured against). A ``peak_share`` of them start so that one of the own pass's highest daily peaks
        (``peak_steps``) falls inside the run, at a uniform lead: the all-time peak is one hour of the window,
        which runs drawn uniformly rarely hold."""
        last = max(1, self.model.steps - 1 - horizon)
        starts = torch.randint(0, last, (batch,), generator=generator)
        aimed = round(batch * peak_share)
        if aimed:
            peaks = self.peak_steps
            chosen = peaks[torch.randint(0, len(peaks), (aimed,), generator=generator)]
            lead = torch.randint(0, horizon, (aimed,), generator=generator)
            starts[:aimed] = (chosen - lead).clamp(0, last - 1)
        reference = self.model.start(starts + horizon, self.rows[starts + horizon])
        return starts, reference


def loss(policy, rollouts: Rollouts, *, batch: int, horizon: int, generator: torch.Generator,
         through_bounds: bool = False, peak_share: float = 0.0, load_spread: float = 0.0
         ) -> tuple[torch.Tensor, dict[str, float]]:
    """The imagined runs' objective (the sum of its terms' means, to minimise) and each term's mean. A window
    shorter than ``horizon`` is run whole. ``through_bounds``: see ``imagine``; adds the ``outside`` term.
    ``peak_share``: see ``Rollouts.sample``. ``load_spread``: each run's loads and solar generation scaled by
    factors drawn uniformly from [1 - spread, 1 + spread] (one each per run, the whole district alike): days the
    training months do not hold, as held-out months bring them."""
    horizon = min(horizon, rollouts.model.steps - 1)
    starts, reference = rollouts.sample(batch, horizon, generator, peak_share)
    scale = None
    if load_spread > 0:
        scale = 1.0 + load_spread * (2.0 * torch.rand(len(starts), 2, generator=generator) - 1.0)
    run = imagine(rollouts.model, policy, starts, rollouts.rows[starts], horizon, through_bounds=through_bounds,
                  scale=scale)
    terms = rollouts.objective.terms(run, reference)
    if run.outside is not None:
        terms["outside"] = run.outside
    total = sum(v.mean() for v in terms.values())
    return total, {k: float(v.detach().mean()) for k, v in terms.items()}


class DistrictStep:
    """Adam's step on the first-layer weights that read the district feature, times ``factor``.

    Widened actors read the district from weights that start at 0 (``networks.widened``): at the rate that suits a
    clone's weights they barely move in a few hundred updates. Adam's step is a per-weight rate, so scaling the
    step of those columns once ``optimizer.step()`` has taken it is the same as giving them their own rate; the
    moments stay Adam's."""

    def __init__(self, policy, factor: float):
        self.weight = policy.actors.mlp.layers[0].weight       # [members, inputs, hidden]: inputs on dim 1
        self.columns = len(policy.features.district_signals_read)   # the district's columns come last
        self.factor = factor

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, the district columns' part of it scaled by ``factor``."""
        if self.columns == 0 or self.factor == 1.0:
            optimizer.step()
            return
        before = self.weight.detach()[:, -self.columns:].clone()
        optimizer.step()
        with torch.no_grad():
            block = self.weight[:, -self.columns:]
            block.copy_(before + self.factor * (block - before))


def pass_rows(record: dict[str, np.ndarray]) -> torch.Tensor:
    """``[T + 1, agents, width]``: a recorded pass's observations of every step and the last next one."""
    return torch.as_tensor(np.concatenate([record["observations"], record["next_observations"][-1:]]),
                           dtype=torch.float32)


def window_rollouts(env, teacher_record: dict[str, np.ndarray], own_record: dict[str, np.ndarray], policy
                    ) -> Rollouts:
    """A window's model (its data from the teacher's pass) with runs starting on the actors' own pass."""
    rows = pass_rows(teacher_record)
    model = DistrictModel.from_env(env, rows.numpy(), teacher_record["actions"], policy.layout, policy.safety_spec)
    return Rollouts(model=model, objective=DistrictObjective(model), rows=pass_rows(own_record))


def replayed_terms(model: DistrictModel, record: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The objective's terms over a whole recorded pass replayed through the model (``replay``): what it says of a
    pass env.evaluate() has scored."""
    out = replay(model, record)
    whole = Imagined(steps=torch.arange(len(out["net"]))[None], net=out["net"][None], end=out["end"])
    return DistrictObjective(model).terms(whole, out["end"])
