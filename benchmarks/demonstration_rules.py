"""Why the demonstrator discharges whenever the building imports, not only in the evening: both rules over the
same window, with CityLearn's KPIs.

    python benchmarks/demonstration_rules.py                 # the whole year (about 4 minutes)
    python benchmarks/demonstration_rules.py --end 1439      # two months
"""

from __future__ import annotations

import argparse
import json

from maddpg_evaluation.citylearn_env import EnvSpec, layout_from_env
from maddpg_evaluation.episode import run_episode
from maddpg_training.demonstration import EVENING_HOURS, SelfConsumptionRule
from maddpg_training.team_reward import BaselineSeries


class _RulePolicy:
    def __init__(self, rule: SelfConsumptionRule):
        self.rule, self.layout = rule, rule.layout

    def act(self, observations):
        return self.rule.act(observations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="citylearn_challenge_2022_phase_all_plus_evs")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    args = parser.parse_args()
    spec = EnvSpec(schema=args.dataset, start=args.start, end=args.end)
    results = {}
    for name, hours in (("self-consumption, discharge whenever importing", None),
                        (f"self-consumption, discharge {EVENING_HOURS[0]}:00-{EVENING_HOURS[1]}:00", EVENING_HOURS)):
        env = spec.build()
        capacity = BaselineSeries.from_env(env).battery_capacity
        rule = SelfConsumptionRule(layout_from_env(env), capacity, discharge_hours=hours)
        result = run_episode(env, _RulePolicy(rule), name=name, progress=True)
        results[name] = {"kpis": result.kpis, "service": result.service}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
