"""Defaults agree in all three places (``fmnist.config``, the CLI options, the MLproject
parameters); every MLproject parameter maps onto a CLI option; `main` runs and fails cleanly
through `mlflow run`."""

from __future__ import annotations

import shlex

import click
import mlflow
import pytest
import yaml

from fmnist import config
from fmnist.cli import COMMANDS, cli
from fmnist.cli.options import AUTO, COMMON_KEYS
from tests.helpers import PROJECT_ROOT, mlflow_run

# command -> the config its options build (info takes the shared options only)
CONFIGS = {
    "cnn": config.CnnConfig,
    "cnn-search": config.CnnSearchConfig,
    "compare": config.CompareConfig,
    "dnn-search": config.DnnSearchConfig,
    "eda": config.EdaConfig,
    "evaluate": config.EvaluateConfig,
    "info": config.CommonConfig,
    "pipeline": config.PipelineConfig,
    "predict": config.PredictConfig,
}
SEARCH_KEYS = ("storage", "study_name", "n_jobs")
# options that only negate another one: no config field of their own
NEGATIONS = {"no_prune", "no_retrain_best", "no_robustness"}
# the pipeline's child runs, one per step, each tagged with its entry point
PIPELINE_STEPS = {"data", "eda", "dnn_search", "cnn", "compare"}


def load_entry_points() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]


def normalise(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def config_default(command: str, option: str):
    """The default ``fmnist.config`` gives the option (an ``auto`` override is None there)."""
    defaults = CONFIGS[command]()
    if command == "info":
        return getattr(defaults, option)
    if option in COMMON_KEYS:
        return getattr(defaults.common, option)
    if option in SEARCH_KEYS:
        return getattr(defaults.search, option)
    assert hasattr(defaults, option), f"{command}: option {option} has no config field"
    return getattr(defaults, option)


def same_default(cli_default, config_value) -> bool:
    """Equal values of one type; an ``auto`` override of the CLI is None in the config."""
    if cli_default == AUTO and config_value is None:
        return True
    return cli_default == config_value and type(cli_default) is type(config_value)


def cli_defaults(command: str) -> dict:
    """Each option's value when the command is called without it, as click resolves it."""
    found = cli.get_command(None, command)
    assert found is not None, f"no fmnist command {command!r}"
    values = found.make_context(command, [], resilient_parsing=True).params
    options = {p.name for p in found.params if isinstance(p, click.Option)}
    return {name: value for name, value in values.items() if name in options}


def test_the_configs_cover_every_command():
    assert set(CONFIGS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_equal_the_config_defaults(command):
    defaults = cli_defaults(command)
    assert defaults, command
    for name, default in defaults.items():
        if name in NEGATIONS:
            assert default is False, (command, name)
            continue
        expected = config_default(command, name)
        assert same_default(default, expected), (
            f"{command} --{name}: CLI default {default!r} vs config {expected!r}"
        )


def test_mlproject_parameters_match_cli_options_and_config_defaults():
    for name, entry in load_entry_points().items():
        tokens = shlex.split(entry["command"].replace("{", "").replace("}", ""))
        assert tokens[0] == "fmnist", name
        defaults = cli_defaults(tokens[1])
        for param, spec in entry.get("parameters", {}).items():
            assert param in defaults, f"{name}: parameter {param} is not an option of {tokens[1]}"
            assert "{" + param + "}" in entry["command"], f"{name}: {param} unused in command"
            cli_default = defaults[param]
            from_config = config_default(tokens[1], param)
            from_config = AUTO if from_config is None else from_config
            assert (
                normalise(spec.get("default")) == normalise(cli_default) == normalise(from_config)
            ), (
                f"{name}: default of {param}: MLproject {spec.get('default')!r}, "
                f"CLI {cli_default!r}, config {from_config!r}"
            )


def test_the_check_tells_auto_from_a_value():
    assert same_default(AUTO, None) and same_default(AUTO, AUTO) and same_default(42, 42)
    assert not same_default(AUTO, 3) and not same_default(42, 42.0) and not same_default(0, False)
    assert not same_default("", None)
    assert normalise(42) == normalise("42") == normalise(42.0) != normalise(43)
    assert normalise(False) == "false" != normalise(True)


# ~37 s; by default the same pipeline runs in-process (quick_pipeline) and `mlflow run -e main`
# runs in the test below
@pytest.mark.slow
def test_main_entry_point_runs_through_mlflow_run(synthetic_data_dir, tracking_store):
    done = mlflow_run(
        "main", {"quick": "true", "data_dir": str(synthetic_data_dir)}, tracking_store
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("entry_point") == "main"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert {r.data.tags["entry_point"] for r in children} == PIPELINE_STEPS
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parent[0].data.params["quick"] == "true"


def test_missing_data_under_mlflow_run_ends_failed_with_message(tmp_path, tracking_store):
    done = mlflow_run("main", {"data_dir": str(tmp_path / "nowhere")}, tracking_store)
    assert done.returncode != 0
    assert "train-images-idx3-ubyte" in done.stderr
    assert "Traceback" not in done.stderr.split("=== Run")[0]
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    parent = [r for r in runs if r.data.tags.get("entry_point") == "main"]
    assert len(parent) == 1
    assert "FMNIST_DATA_DIR" in parent[0].data.tags["error"]
