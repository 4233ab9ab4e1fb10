"""``maddpg-citylearn plan``: the perfect-foresight planner replayed in the real env, reported like ``evaluate``."""

from __future__ import annotations

import click

from maddpg_evaluation.planner.forecast import FORECASTS

from ..options import env_options, env_spec_from


@click.command("plan")
@click.option("--objective", type=click.Choice(["balanced", "cost", "carbon", "peak"]), default="balanced",
              show_default=True, help="What the LP minimises: the mean of the four headline KPIs (plus a little "
                                      "ramping), or one of them.")
@click.option("--peak-weight", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="Scale the objective's peak and ramping terms: below 1 the plan buys cheaper, cleaner energy at "
                   "higher peaks, above 1 the opposite.")
@click.option("--horizon", type=click.IntRange(min=1), default=48, show_default=True, metavar="HOURS",
              help="Hours of perfect foresight per solve (receding mode).")
@click.option("--forecast", type=click.Choice(list(FORECASTS)), default="exact", show_default=True,
              help="What each solve knows of the future. exact: everything (the upper bound). yesterday: only what a "
                   "deployed controller could know: loads, solar and carbon as the same hour of the last day seen, "
                   "the tariff, and only the cars parked now. yesterday-loads: yesterday's loads, every car known "
                   "ahead. parked-cars: the loads exactly, only the cars parked now. hour-profile: what a controller "
                   "without memory could know: the window's mean load at each hour of the day, shifted by the "
                   "current hour's departure from it; the cars parked now.")
@click.option("--mode", type=click.Choice(["receding", "open-loop"]), default="receding", show_default=True,
              help="receding: re-solve from the env's true state every step and apply the first hour; open-loop: "
                   "one solve for the whole window, replayed.")
@click.option("--ev/--no-ev", default=True, show_default=True,
              help="Charge every parked car to its required SOC by departure (--ev), or leave the cars alone.")
@env_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/plan", show_default=True,
              help="Where report.json and report.png go.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also run zero actions, BasicBatteryRBC and charge on arrival on the same window.")
@click.option("--progress/--no-progress", default=True)
def plan(objective, peak_weight, horizon, forecast, mode, ev, schema, dataset, start, end, out_dir, baselines, progress):
    """Replay the perfect-foresight LP planner in the CityLearn env and report its KPIs.

    \b
    The planner knows the dataset's whole future (loads, solar, prices, carbon, every car's arrival, departure
    and required SOC, the appliance's cycles) and solves a linear program (HiGHS) whose objective is
    env.evaluate()'s own: per-building cost and carbon relative to no control, daily and all-time peaks, ramping.
    It is an upper bound on what a controller could reach, not a deployable controller. With --forecast yesterday
    it knows only what a deployed controller could (its history, the tariff, the cars parked now): what is left
    of the upper bound without foresight. The report has the same table, report.json and report.png as
    `evaluate`, with the planner as the controller and its solve time.

    \b
    Examples:
      maddpg-citylearn plan --start 0 --end 167                          # a week, cars charged
      maddpg-citylearn plan --objective balanced --no-ev --out reports/plan-no-ev    # the full year
      maddpg-citylearn plan --mode open-loop --start 0 --end 719
      maddpg-citylearn plan --forecast yesterday --no-baselines --out reports/plan-yesterday   # deployable knowledge
      maddpg-citylearn plan --forecast yesterday --peak-weight 0.3 --no-baselines    # cheaper energy, higher peaks
    """
    from maddpg_evaluation.episode import run_episode
    from maddpg_evaluation.evaluation import EvaluationReport, ModelIdentity, run_baselines
    from maddpg_evaluation.planner import Planner, PlannerPolicy
    from maddpg_evaluation.planner.objective import objective_weights
    from maddpg_evaluation.planner.planner import check_options
    from maddpg_evaluation.report import format_table, write_evaluation_report

    check_options(objective=objective, horizon=horizon, mode=mode, forecast=forecast)
    spec = env_spec_from(schema, dataset, start, end)
    spec.check_window()  # before building anything
    env = spec.build()
    planner = Planner(env, objective=objective, horizon=horizon, ev=ev, mode=mode, forecast=forecast,
                      weights=objective_weights(objective, peak_weight))
    cars = "cars charged" if ev else "cars left alone"
    known = "" if forecast == "exact" else f", forecast {forecast}"
    weighted = "" if peak_weight == 1.0 else f" x{peak_weight:g} on peaks"
    name = f"planner ({mode}{f' {horizon} h' if mode == 'receding' else ''}{known}, {objective}{weighted}, {cars})"
    click.echo(f"... {name}", err=True)
    result = run_episode(env, PlannerPolicy(planner, env), name="planner", progress=progress)
    results = run_baselines(spec, progress=progress) if baselines else {}
    layout = planner.layout
    report = EvaluationReport(
        policy_name=name,
        env={"dataset": spec.dataset_name, "schema": str(spec.resolve_schema()), "start": spec.start, "end": spec.end,
             "steps": result.steps, "citylearn_version": layout.citylearn_version},
        policy=result,
        baselines=results,
        throughput={"planner": planner.timing.as_dict()},
        layout_source={"controller": "perfect-foresight LP planner" if forecast == "exact" else
                       f"LP planner, forecast {forecast}", "objective": objective, "mode": mode,
                       "horizon_hours": horizon if mode == "receding" else None, "forecast": forecast, "ev": ev,
                       "weights": vars(planner.weights)},
        model=ModelIdentity(name="planner", backend="HiGHS (linear program)"),
    )
    paths = write_evaluation_report(report, out_dir)
    click.echo(format_table(report))
    click.echo(f"\nreport: {paths['json']}\nplot:   {paths['plot']}")
