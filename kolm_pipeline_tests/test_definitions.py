"""The Definitions object loads, in process and through `dagster definitions validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

from kolm_pipeline.definitions import defs

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load_in_process():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {"captures", "triaged_captures", "corpus", "recipe", "adapter", "evaluation", "deployment"}
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {"k_gate", "collapse_tripwire", "corpus_enough_pairs", "corpus_no_pii_in_answers",
                      "recipe_label_balance", "recipe_decontamination"}
    for check in defs.asset_checks or []:
        for spec in check.check_specs:
            # The gate and every check that can fail a run block what comes after; label balance only warns.
            assert spec.blocking == (spec.name != "recipe_label_balance"), spec.name
            # Each result belongs to its namespace (issue 22: "Partition —" mixed them).
            assert spec.partitions_def == defs.resolve_assets_def("corpus").partitions_def, spec.name
    partitions = defs.resolve_assets_def("corpus").partitions_def
    assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "kolm_namespace"


def test_adapter_config_offers_every_training_setting():
    """Each TrainConfig setting can be set for a run in the Dagster UI, with TrainConfig's default (null where a
    default is not a plain value) and description: a setting missing here can only be changed by editing code."""
    from kolm_pipeline.corpus.train_config import TrainConfig
    from kolm_pipeline.defs.assets import AdapterConfig

    offered = AdapterConfig.model_fields
    assert set(offered) == {*TrainConfig.model_fields, "continue_from_champion"}
    for name, setting in TrainConfig.model_fields.items():
        assert offered[name].description == setting.description, name
        plain = isinstance(setting.default, bool | int | float)
        assert offered[name].default == (setting.default if plain else None), name


def test_automation_ships_stopped():
    for sensor in defs.sensors or []:
        assert sensor.default_status == dg.DefaultSensorStatus.STOPPED, sensor.name
    for schedule in defs.schedules or []:
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED, schedule.name
        assert schedule.cron_schedule == "0 2 * * *"


def test_dagster_cli_validates_workspace(kolm_settings):
    kolm_settings.dagster_home.mkdir(parents=True)
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
