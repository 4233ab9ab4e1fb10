"""``maddpg-citylearn train``: learn the cooperative MADDPG policy and write checkpoints."""

from __future__ import annotations

import json

import click


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings over the shipped defaults (configs/smoke.toml, configs/version-2.toml). "
                   "Options below override it.")
@click.option("--episodes", type=click.IntRange(min=0), default=None,
              help="MADDPG fine-tuning passes over the training window. 0: the teacher phases only (the clone).")
@click.option("--model-episodes", type=click.IntRange(min=0), default=None,
              help="Fine-tuning episodes through the differentiable model of the district after the teacher "
                   "phases (each kept only if the training window's score in the env drops). 0: none.")
@click.option("--model-district", type=click.Choice(["district", "district_ev", "none"]), default=None,
              help="District feature every actor starts reading when the tuning through the model begins (its "
                   "weights from 0; the shipped recipe: district). none: each actor reads its own row only "
                   "(decentralised; needed for MADDPG episodes after that tuning).")
@click.option("--start", type=click.IntRange(min=0), default=None, help="First time step of the training window.")
@click.option("--end", type=click.IntRange(min=0), default=None, help="Last time step of the training window (inclusive).")
@click.option("--dataset", metavar="NAME|PATH", default=None,
              help="CityLearn dataset name or schema.json path (default: the config's, else the 2022 EV dataset).")
@click.option("--seed", type=int, default=None, help="Random seed (networks, exploration, replay sampling).")
@click.option("--teacher", type=click.Choice(["planner", "rule"]), default=None,
              help="Who the actors learn from first: the perfect-foresight planner (default) or the "
                   "self-consumption rule (instant; smoke runs).")
@click.option("--bc-alpha", type=click.FloatRange(min=0), default=None,
              help="Weight of the critic's Q against cloning the teacher in fine-tuning (TD3+BC); 0 = the actors "
                   "only go on cloning (the ablation's control arm).")
@click.option("--device", type=click.Choice(["cpu"]), default=None, help="Where the networks learn (CPU).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/ctde", show_default=True,
              help="Output folder: last.pt every episode, best.pt, final.pt, summary.json.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue from a checkpoint written by train (last.pt): networks, optimisers, counters.")
@click.option("--eval-start", type=click.IntRange(min=0), default=None,
              help="Window of the deterministic evaluations that pick best.pt (default: the config's eval_start/"
                   "eval_end, else the training window when there is one, else the whole dataset: a full year is "
                   "~3 minutes a pass here).")
@click.option("--eval-end", type=click.IntRange(min=0), default=None)
@click.option("--evaluate-every", type=click.IntRange(min=0), default=1, show_default=True,
              help="Evaluate deterministically every N fine-tuning episodes (0: only at the end); the teacher-taught "
                   "policy is always evaluated; the best is kept as best.pt.")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def train(config_file, episodes, model_episodes, model_district, start, end, dataset, seed, teacher, bc_alpha, device, out_dir, resume, eval_start, eval_end,
          evaluate_every, progress):
    """Train one actor per building with a centralised twin critic on the cooperative team reward.

    \b
    A teacher (the perfect-foresight planner, every car charged) drives first and labels what it sees; the actors
    are cloned from it and refined by DAgger (the clone drives, the teacher labels); with --model-episodes N they
    are tuned on the headline KPIs of two-day runs through a differentiable model of the district; with
    --episodes N the critic
    is warmed up on that data and MADDPG fine-tunes the actors against the team reward (the headline KPIs, per
    step), kept near the teacher by TD3+BC. Each actor sees its own building's row (and, with the `district`
    feature, six district aggregates computed in the graph); the centralised critic sees every building's
    observation and action and the district's running peaks. The exported graph ends with a safety layer: every
    car leaves charged, every appliance cycle runs.

    \b
    Writes OUT/metrics.jsonl (every update, pass, critic check and evaluation), last.pt, best.pt, final.pt,
    summary.json. `maddpg-citylearn plot-training OUT` draws the trace.

    \b
    Example (the shipped model, see docs/model-card.md):
      maddpg-citylearn train --out runs/ctde
      maddpg-citylearn export runs/ctde/best.pt
    """
    from maddpg_training.config import TrainConfig
    from maddpg_training.trainer import train as run_training

    config = TrainConfig.load(config_file) if config_file else TrainConfig()
    config = config.override(episodes=episodes, model_episodes=model_episodes,
                             model_district={"none": ""}.get(model_district, model_district),
                             start=start, end=end, dataset=dataset, seed=seed, teacher=teacher,
                             bc_alpha=bc_alpha, device=device, eval_start=eval_start, eval_end=eval_end)
    result = run_training(config, out_dir, resume=resume, progress=progress, evaluate_every=evaluate_every)
    (result.out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2))
    kpis, service = result.summary["evaluation"], result.summary["evaluation_service"]
    click.echo(f"final policy: {result.final_checkpoint}" + (f"  (best: {result.best_checkpoint})" if result.best_checkpoint else ""))
    click.echo("deterministic evaluation (ratio to no control, lower is better): " +
               ", ".join(f"{k} {v:.3f}" for k, v in kpis.items()))
    click.echo(f"EV departures at acceptable charge: {service['ev_departures_acceptable']:.3f}")
