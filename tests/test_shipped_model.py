"""The model this repository ships (`model_repository/maddpg_ctde`) is whole, fits the env, and controls the district.

The full-year figures are in docs/model-card.md; this guards the committed files against a broken re-export or an
untrained policy slipping in, on a short window.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maddpg_export.triton_config import parse_config

SHIPPED = Path(__file__).resolve().parents[1] / "model_repository"
MODEL = SHIPPED / "maddpg_ctde"


def test_the_shipped_configs_parse_and_serve_the_newest_version():
    versions = sorted(int(p.name) for p in MODEL.iterdir() if p.name.isdigit())
    assert versions, "model_repository/maddpg_ctde has no version: export the trained checkpoint into it"
    for path in (MODEL / "config.pbtxt", MODEL / "configs" / "cpu.pbtxt", MODEL / "configs" / "local.pbtxt"):
        config = parse_config(path.read_text())
        assert config.name == "maddpg_ctde"
        assert [t.name for t in config.input] == ["observations"] and [t.name for t in config.output] == ["actions"]
    newest = MODEL / str(versions[-1])
    assert {p.name for p in newest.iterdir()} >= {"model.onnx", "layout.json"}
    assert json.loads((newest / "layout.json").read_text())["agents"], "the layout names the buildings"


def test_the_shipped_configs_are_what_the_served_settings_render():
    """The committed configs come from the project's one writer with ServingSettings() (re-render them with
    `python -m maddpg_export.triton_config model_repository/maddpg_ctde` after changing the settings)."""
    from maddpg_core.layout import PolicyLayout
    from maddpg_export.triton_config import ServingSettings, render_configs

    layout_text = parse_config((MODEL / "config.pbtxt").read_text()).parameters["layout"].string_value
    rendered = render_configs(PolicyLayout.from_json(layout_text), "maddpg_ctde", ServingSettings())
    for relative, text in rendered.items():
        assert (MODEL / relative).read_text() == text, f"{relative} is not what ServingSettings() renders"


@pytest.mark.citylearn
def test_the_shipped_policy_charges_the_cars_for_less_than_charge_on_arrival(week_spec):
    from maddpg_client.local_policy import LocalPolicy
    from maddpg_evaluation.episode import run_episode
    from maddpg_evaluation.reference_controllers import ChargeOnArrivalPolicy

    policy = LocalPolicy(SHIPPED)
    result = run_episode(week_spec.build(), policy)  # refuses an env whose names differ from the shipped layout
    env = week_spec.build()
    charge_on_arrival = run_episode(env, ChargeOnArrivalPolicy(env, policy.layout))
    assert result.service["ev_departures_acceptable"] >= 0.95, "the safety layer sends every car away charged"
    assert result.service["appliance_service_level"] == 1.0
    # Against the reference that serves the cars too (no control never charges them), as the held-out bars judge.
    for kpi in ("cost_total", "carbon_emissions_total", "daily_peak_average", "all_time_peak_average"):
        assert result.kpis[kpi] < charge_on_arrival.kpis[kpi], \
            f"{kpi}: {result.kpis[kpi]:.3f} vs {charge_on_arrival.kpis[kpi]:.3f} charging on arrival"
