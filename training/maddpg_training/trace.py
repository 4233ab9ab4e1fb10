"""What a training run computed, written as it goes to ``metrics.jsonl`` in the run directory: one JSON object a line.

Kinds of record (``"kind"``):

* ``update``: one gradient step (``phase`` clone | critic_warmup | finetune): critic loss, TD error, Q, target, and
  on actor steps the actor loss, its Q term, its behaviour-cloning term and the Q scale;
* ``clone``: one behaviour-cloning step (loss);
* ``rollout``: one pass over a window (who drove, team return, the reward's terms, KPIs, EV and appliance service);
* ``critic_check``: the critic against data it was not trained on: TD error on held-out transitions, Q against the
  Monte-Carlo return of the same policy;
* ``evaluation``: a deterministic evaluation of the current policy (KPIs, service, headline score).

A resumed run appends to the same file. :func:`read_trace` reads it back; ``maddpg-citylearn plot-training RUN``
draws it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

TRACE_FILE = "metrics.jsonl"


class TrainingTrace:
    def __init__(self, out_dir: str | Path, *, flush_every: int = 200):
        self.path = Path(out_dir) / TRACE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._pending = 0
        self.flush_every = flush_every

    def write(self, kind: str, **fields: Any) -> None:
        self._handle.write(json.dumps({"kind": kind, **_plain(fields)}, separators=(",", ":")) + "\n")
        self._pending += 1
        if kind != "update" or self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self._handle.flush()
        self._pending = 0

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "TrainingTrace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(run_dir: str | Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` (or of that file itself), in order."""
    path = Path(run_dir)
    path = path / TRACE_FILE if path.is_dir() else path
    return list(_records(path))


def _records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                yield json.loads(line)


def _plain(value):
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def plot_trace(records: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Four panels: the critic's loss and TD error per update, Q against its target, the actor's terms, and the
    deterministic evaluations (headline score per episode) beside the team return of every pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r for r in records if r["kind"] == "update"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (loss_ax, q_ax), (actor_ax, eval_ax) = axes
    for phase, colour in (("critic_warmup", "tab:gray"), ("finetune", "tab:blue")):
        rows = [r for r in updates if r.get("phase") == phase]
        if rows:
            x = [r["update"] for r in rows]
            loss_ax.plot(x, [r["td_error"] for r in rows], ".", ms=1, color=colour, label=f"|TD error| ({phase})")
            q_ax.plot(x, [r["q"] for r in rows], ".", ms=1, color=colour, label=f"Q ({phase})")
            q_ax.plot(x, [r["target"] for r in rows], ".", ms=1, color="tab:orange" if phase == "finetune" else "0.7",
                      label=f"target ({phase})")
    actors = [r for r in updates if "actor_loss" in r]
    if actors:
        x = [r["update"] for r in actors]
        actor_ax.plot(x, [r["cloning_loss"] for r in actors], ".", ms=1, color="tab:green", label="cloning term")
        actor_ax.plot(x, [r["q_scale"] * r["actor_q"] for r in actors], ".", ms=1, color="tab:purple",
                      label="alpha * Q / |Q| (ascended)")
    clones = [r for r in records if r["kind"] == "clone"]
    if clones:
        actor_ax.plot(range(len(clones)), [r["loss"] for r in clones], color="tab:red", lw=0.8,
                      label="behaviour cloning loss (per 50 steps)")
    evaluations = [r for r in records if r["kind"] == "evaluation"]
    if evaluations:
        eval_ax.plot([r["episode"] for r in evaluations], [r["headline_score"] for r in evaluations], "o-",
                     color="tab:blue", label="mean of the 4 headline KPIs (deterministic)")
        eval_ax.set_xlabel("fine-tuning episode (0 = the teacher-taught clone)")
    for ax, label in ((loss_ax, "critic"), (q_ax, "team Q"), (actor_ax, "actor loss terms"), (eval_ax, "KPI score")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize=8)
            ax.ticklabel_format(axis="y", useOffset=False)
    loss_ax.set_yscale("symlog")
    for ax in (loss_ax, q_ax, actor_ax):
        ax.set_xlabel("update")
    fig.suptitle(title or "training trace")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
