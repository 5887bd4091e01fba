"""Defaults agree in all three places (``fmnist.config``, the CLI options, the MLproject
parameters), and every MLproject parameter drives the CLI option of its name: each entry point's
command is formatted as `mlflow run` formats it (every value shell-quoted into the string) and
parsed by the CLI, with the defaults and with each parameter changed in turn. `main` runs and
fails cleanly through `mlflow run`."""

from __future__ import annotations

import shlex

import click
import mlflow
import pytest
import yaml

from fmnist import config
from fmnist.cli import COMMANDS, cli
from fmnist.cli.options import COMMON_KEYS, SEARCH_KEYS, AutoNumber, Switch
from tests.helpers import PROJECT_ROOT, mlflow_run

# command -> the config its options build (info takes the shared options only)
CONFIGS = {
    "info": config.CommonConfig,
    "eda": config.EdaConfig,
    "dnn-search": config.DnnSearchConfig,
    "cnn": config.CnnConfig,
    "cnn-search": config.CnnSearchConfig,
    "evaluate": config.EvaluateConfig,
    "compare": config.CompareConfig,
    "predict": config.PredictConfig,
    "pipeline": config.PipelineConfig,
    "runs": config.RunsConfig,
}
# the pipeline's child runs, one per step, each tagged with its entry point
PIPELINE_STEPS = {"data", "eda", "dnn_search", "cnn", "compare"}
ENTRY_POINTS = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]


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


def options_of(command: str) -> dict[str, click.Option]:
    found = cli.get_command(None, command)
    assert found is not None, f"no fmnist command {command!r}"
    return {p.name: p for p in found.params if isinstance(p, click.Option) and p.expose_value}


def parse(command: str, args: list[str], resilient: bool = False) -> dict:
    """The values ``fmnist COMMAND ARGS`` hands its options, as click converts them."""
    context = cli.get_command(None, command).make_context(
        command, list(args), resilient_parsing=resilient
    )
    return {name: context.params[name] for name in options_of(command)}


def as_mlflow_runs_it(entry: dict, values: dict[str, str]) -> tuple[str, list[str]]:
    """The fmnist command and arguments `mlflow run` runs for ``entry`` given ``values``: the
    defaults overridden, every value shell-quoted into the command string, then split by the
    shell."""
    params = {name: spec.get("default") for name, spec in entry["parameters"].items()}
    params.update(values)
    line = entry["command"].format(**{k: shlex.quote(str(v)) for k, v in params.items()})
    tokens = shlex.split(line)
    assert tokens[0] == "fmnist", line
    return tokens[1], tokens[2:]


def other_values(option: click.Option, default) -> list[tuple[str, object]]:
    """Values other than ``default`` for ``option``: as MLproject text and as click gives them
    (both ways for a boolean)."""
    if isinstance(option, Switch):
        return [("true", True), ("false", False)]
    if isinstance(option.type, click.Choice):
        choice = next(c for c in option.type.choices if c != default)
        return [(choice, choice)]
    if isinstance(option.type, AutoNumber):
        return [("3", option.type.kind(3))]
    if isinstance(default, int):
        return [(str(default + 1), default + 1)]
    if isinstance(default, float):
        return [(repr(default / 2 or 1.5), default / 2 or 1.5)]
    return [("changed-value", "changed-value")]


def test_the_configs_cover_every_command():
    assert list(CONFIGS) == list(COMMANDS)


@pytest.mark.parametrize("command", list(CONFIGS))
def test_cli_defaults_equal_the_config_defaults(command):
    defaults = parse(command, [], resilient=True)  # predict's PATHS are left out
    assert defaults, command
    for name, default in defaults.items():
        expected = config_default(command, name)
        # one type too: 42 is not 42.0, 0 is not False
        assert default == expected and type(default) is type(expected), (
            f"{command} --{name}: CLI default {default!r} vs config {expected!r}"
        )


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_the_mlproject_defaults_are_the_cli_defaults(entry_point):
    entry = ENTRY_POINTS[entry_point]
    command, args = as_mlflow_runs_it(entry, {})
    options = options_of(command)
    for param in entry["parameters"]:
        assert param in options, f"{entry_point}: parameter {param} is no option of {command}"
        assert "{" + param + "}" in entry["command"], f"{entry_point}: {param} unused"
    assert parse(command, args) == parse(command, [])


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_each_mlproject_parameter_drives_its_option(entry_point):
    entry = ENTRY_POINTS[entry_point]
    command, _ = as_mlflow_runs_it(entry, {})
    options, defaults = options_of(command), parse(command, [])
    for param in entry["parameters"]:
        for text, expected in other_values(options[param], defaults[param]):
            _, args = as_mlflow_runs_it(entry, {param: text})
            assert parse(command, args) == {**defaults, param: expected}, (
                entry_point,
                param,
                text,
            )


def test_the_boolean_parameters_are_passed_as_flag_values():
    """``-P quick=true`` becomes ``--quick=true``: a form the switches take (a bare
    ``--quick true`` would too, but ``=`` keeps the value on its flag)."""
    for name, entry in ENTRY_POINTS.items():
        command, _ = as_mlflow_runs_it(entry, {})
        switches = [n for n, o in options_of(command).items() if isinstance(o, Switch)]
        for param in set(entry["parameters"]) & set(switches):
            flag = "--" + param.replace("_", "-")
            assert f"{flag}={{{param}}}" in entry["command"], (name, param)


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
