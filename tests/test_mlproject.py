"""MLproject: every parameter maps onto a CLI option with the same default; `main` runs and fails
cleanly through `mlflow run`."""

from __future__ import annotations

import shlex

import mlflow
import yaml

from fmnist.cli import cli
from tests.helpers import PROJECT_ROOT, mlflow_run


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


def test_mlproject_parameters_match_cli_options_and_defaults():
    for name, entry in load_entry_points().items():
        tokens = shlex.split(entry["command"].replace("{", "").replace("}", ""))
        assert tokens[0] == "fmnist", name
        command = cli.get_command(None, tokens[1])
        assert command is not None, f"{name}: no fmnist command {tokens[1]!r}"
        options = {p.name: p for p in command.params}
        for param, spec in entry.get("parameters", {}).items():
            assert param in options, f"{name}: parameter {param} is not an option of {tokens[1]}"
            assert "{" + param + "}" in entry["command"], f"{name}: {param} unused in command"
            assert normalise(spec.get("default")) == normalise(options[param].default), (
                f"{name}: default of {param}: MLproject {spec.get('default')!r} "
                f"vs CLI {options[param].default!r}"
            )


def test_main_entry_point_runs_through_mlflow_run(synthetic_data_dir, tracking_store):
    done = mlflow_run(
        "main", {"quick": "true", "data_dir": str(synthetic_data_dir)}, tracking_store
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("entry_point") == "main"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert {r.data.tags["entry_point"] for r in children} >= {"data"}
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
