"""``fmnist evaluate`` on the models of the quick pipeline: the training runs' calibration, an
evaluation run linked to the model version with the same numbers the training logged, the
robustness suite, the CLI and its bad-URI error, and ``compare`` reading the evaluation back
(and finding runs by their tags in any experiment, on a store of hand-made runs).

The pipeline tests share one quick pipeline store (``use_pipeline_store``) and only add runs to
it; each test finds its own run by id, so none depends on another having run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from fmnist.cli import cli
from fmnist.config import CommonConfig, CompareConfig, EvaluateConfig
from fmnist.flows.compare import run_compare
from fmnist.flows.evaluate import run_evaluate

CALIBRATION = ("test_nll", "test_brier", "test_ece", "temperature")
UNCALIBRATED = ("test_nll_uncalibrated", "test_brier_uncalibrated", "test_ece_uncalibrated")


def common(data_dir) -> CommonConfig:
    return CommonConfig(data_dir=str(data_dir), experiment_name="pipeline", quiet=True)


def artifact_names(run_id: str, path: str) -> set[str]:
    client = mlflow.MlflowClient()
    return {Path(item.path).name for item in client.list_artifacts(run_id, path)}


@pytest.mark.parametrize("name", ["fmnist-dnn", "fmnist-cnn"])
def test_training_runs_log_calibration_and_registered_model_carries_temperature(
    use_pipeline_store, name
):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(name, "champion")
    metrics = client.get_run(version.run_id).data.metrics
    for key in CALIBRATION + UNCALIBRATED:
        assert key in metrics, key
    assert 0.05 <= metrics["temperature"] <= 20
    assert float(version.tags["temperature"]) == pytest.approx(metrics["temperature"], rel=1e-5)
    # temperature scaling never changes a prediction; the logged loss is the tempered model's NLL
    assert metrics["test_accuracy"] == metrics["test_accuracy_uncalibrated"]
    assert metrics["test_loss"] == pytest.approx(metrics["test_nll"], rel=1e-9)
    assert "reliability_diagram.png" in artifact_names(version.run_id, "evaluation/test")


def test_evaluate_a_registered_model_end_to_end(use_pipeline_store, synthetic_data_dir):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fmnist-dnn", "champion")
    cfg = EvaluateConfig(
        common=common(synthetic_data_dir),
        model="models:/fmnist-dnn@champion",
        robustness_images=30,
    )
    result = run_evaluate(cfg)
    run = client.get_run(result["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["entry_point"] == "evaluate" and tags["model_family"] == "dnn"
    assert tags["model_uri"] == "models:/fmnist-dnn@champion"
    assert tags["registered_model_name"] == "fmnist-dnn"
    assert tags["registered_model_version"] == str(version.version)
    assert tags["source_run_id"] == version.run_id
    # the registered model scores exactly what its training run evaluated
    trained = client.get_run(version.run_id).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-12)
    for key in CALIBRATION + UNCALIBRATED:
        assert metrics[key] == pytest.approx(trained[key], abs=2e-4), key
    assert metrics["temperature"] == pytest.approx(float(version.tags["temperature"]), rel=1e-5)
    # robustness: 14 corruptions x 3 severities on the 30-image stratified subset
    cells = [key for key in metrics if key.startswith("robust_") and key.endswith("_accuracy")]
    assert len(cells) == 14 * 3
    assert metrics["robustness_images"] == 30
    mean = sum(metrics[key] for key in cells) / len(cells)
    assert metrics["robustness_mean_accuracy"] == pytest.approx(mean, abs=1e-9)
    assert 0.0 <= metrics["robustness_mean_accuracy"] <= 1.0
    assert result["robustness_mean_accuracy"] == round(metrics["robustness_mean_accuracy"], 4)
    assert {"accuracy_grid.png", "samples.png", "accuracy.json"} <= artifact_names(
        run.info.run_id, "evaluation/robustness"
    )
    assert {"reliability_diagram.png", "metrics.json", "confusion_matrix.png"} <= artifact_names(
        run.info.run_id, "evaluation/test"
    )
    assert run.data.params["robustness_images"] == "30"


def test_evaluate_command_on_a_run_uri_without_robustness(use_pipeline_store, synthetic_data_dir):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fmnist-cnn", "champion")
    name = client.get_logged_model(version.source.removeprefix("models:/")).name
    assert name == "fmnist-cnn-fast"  # a logged model is named after what it is
    uri = f"runs:/{version.run_id}/{name}"
    args = ["evaluate", "--model", uri, "--no-robustness", "--data-dir", str(synthetic_data_dir)]
    result = CliRunner().invoke(cli, [*args, "--experiment-name", "pipeline", "--quiet"])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1].rsplit("run_id=", 1)[1]
    run = client.get_run(run_id)
    assert run.data.tags["source_run_id"] == version.run_id
    assert run.data.tags["model_family"] == "cnn"  # from the model's spec file
    assert "registered_model_name" not in run.data.tags
    assert "robustness_mean_accuracy" not in run.data.metrics
    trained = client.get_run(version.run_id).data.metrics
    assert run.data.metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert run.data.metrics["test_ece"] == pytest.approx(trained["test_ece"], abs=2e-4)


def test_evaluate_unknown_model_is_one_line_and_exit_2(use_pipeline_store, synthetic_data_dir):
    before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    result = CliRunner().invoke(
        cli,
        ["evaluate", "--model", "models:/no-such-model@champion", "--data-dir", "x"],
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: Could not load model 'models:/no-such-model@champion'")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == before


def test_compare_shows_calibration_and_robustness_from_the_evaluate_run(
    use_pipeline_store, synthetic_data_dir
):
    evaluated = run_evaluate(
        EvaluateConfig(
            common=common(synthetic_data_dir),
            model="models:/fmnist-dnn@champion",
            robustness_images=20,
        )
    )
    robust = mlflow.get_run(evaluated["run_id"]).data.metrics["robustness_mean_accuracy"]
    cfg = CompareConfig(common=common(synthetic_data_dir), include_quick=True, inference_images=0)
    compared = run_compare(cfg)
    client = mlflow.MlflowClient()
    folder = Path(client.download_artifacts(compared["run_id"], "comparison"))
    table = json.loads((folder / "summary.json").read_text())
    rows = {
        values[table["columns"].index("family")]: dict(zip(table["columns"], values, strict=True))
        for values in table["data"]
    }
    assert set(rows) == {"dnn", "cnn"}  # evaluate runs are never candidates themselves
    assert rows["dnn"]["robustness_mean_accuracy"] == pytest.approx(robust)
    for row in rows.values():
        logged = client.get_run(row["run_id"]).data.metrics
        for key in CALIBRATION:
            assert row[key] == pytest.approx(logged[key], abs=1e-9), key
    report = (folder / "report.md").read_text()
    assert "## Calibration and robustness" in report
    for term in ("**ECE**", "**NLL**", "**Brier**", "**T**", "**mean corruption acc**"):
        assert term in report


def test_negative_robustness_images_is_refused_before_loading(tracking_store):
    result = CliRunner().invoke(
        cli, ["evaluate", "--model", "models:/nothing@champion", "--robustness-images", "-1"]
    )
    assert result.exit_code == 2
    assert "robustness_images must be >= 0" in result.output
    assert "Could not load model" not in result.output


def test_pipeline_evaluate_step_evaluates_both_registered_models(
    use_pipeline_store, synthetic_data_dir, tmp_path
):
    """The full pipeline's evaluate step (quick skips it), on the quick pipeline's models: on a
    copy of its store, since the step adds child runs to the pipeline run other tests count."""
    from fmnist.config import PipelineConfig
    from fmnist.flows.pipeline import run_evaluate_step
    from tests.helpers import store_copy

    uri, results = use_pipeline_store
    parent = results["pipeline"]["run_id"]
    cfg = PipelineConfig(common=common(synthetic_data_dir))
    with store_copy(Path(uri.removeprefix("sqlite:///")).parent, tmp_path / "copy"):
        evaluated = run_evaluate_step(cfg, parent)  # reads the models from the run's steps
        assert set(evaluated) == {"dnn_search", "cnn"}
        for step, family in (("dnn_search", "dnn"), ("cnn", "cnn")):
            run = mlflow.get_run(evaluated[step]["run_id"])
            assert run.data.tags["mlflow.parentRunId"] == parent
            assert run.data.tags["model_uri"] == results[step]["model_uri"]
            assert run.data.tags["model_family"] == family
            assert "robustness_mean_accuracy" in run.data.metrics


def finished_run(client, experiment_id: str, tags: dict, metrics: dict, name: str) -> str:
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_compare_finds_project_runs_by_tag_in_every_experiment(tracking_store):
    """``mlflow run .`` without ``--experiment-name`` puts a run in ``Default``: compare, logging
    into its own experiment, still finds it, and the evaluate and EDA runs of other experiments;
    runs without the project's tags, unfinished runs and evaluate runs are never candidates."""
    client = mlflow.MlflowClient()
    other = client.create_experiment("elsewhere")
    scores = {"test_accuracy": 0.8, "val_accuracy": 0.79}
    dense = finished_run(
        client, "0", {"entry_point": "dnn_search", "model_family": "dnn"}, scores, "d"
    )
    cnn_tags = {"entry_point": "cnn", "model_family": "cnn", "recipe": "fast"}
    cnn = finished_run(client, other, cnn_tags, {"test_accuracy": 0.9}, "c")
    finished_run(client, other, {}, {"test_accuracy": 0.99}, "untagged")
    client.create_run("0", tags=cnn_tags | {"recipe": "paper"})  # still RUNNING
    evaluate_tags = {"entry_point": "evaluate", "model_family": "cnn", "source_run_id": cnn}
    finished_run(
        client, other, evaluate_tags, {"test_accuracy": 0.9, "robustness_mean_accuracy": 0.6}, "e"
    )
    eda_tags = {"entry_point": "eda", "model_family": "none"}
    finished_run(client, "0", eda_tags, {"pca_components_90": 84, "pca_components_95": 187}, "x")

    cfg = CompareConfig(
        common=CommonConfig(experiment_name="reports", quiet=True), inference_images=0
    )
    compared = run_compare(cfg)
    assert compared["models"] == 2 and compared["best_test_accuracy"] == 0.9
    run = client.get_run(compared["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "reports"
    assert run.data.params["compared_runs"] == f"{dense},{cnn}"
    folder = Path(client.download_artifacts(compared["run_id"], "comparison"))
    table = json.loads((folder / "summary.json").read_text())
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    assert [(r["family"], r["recipe"], r["run_id"]) for r in rows] == [
        ("dnn", "grid-best", dense),
        ("cnn", "fast", cnn),
    ]
    assert (
        rows[1]["robustness_mean_accuracy"] == 0.6 and rows[0]["robustness_mean_accuracy"] is None
    )
    assert "| PCA components for 90% variance | 84 | 87 |" in (folder / "report.md").read_text()


def test_an_evaluate_runs_metrics_are_listed_on_the_model_it_evaluated(
    use_pipeline_store, synthetic_data_dir, tmp_path
):
    """The Models page of the evaluated model lists the evaluate run's test metrics (MLflow 3's
    Logged Model metrics), not only the training run's."""
    from tests.helpers import store_copy

    uri, results = use_pipeline_store
    model_uri = results["cnn"]["model_uri"]
    with store_copy(Path(uri.removeprefix("sqlite:///")).parent, tmp_path / "copy"):
        cfg = EvaluateConfig(common=common(synthetic_data_dir), model=model_uri, robustness=False)
        run_id = run_evaluate(cfg)["run_id"]
        model_id = mlflow.models.get_model_info(model_uri).model_id
        logged = mlflow.MlflowClient().get_logged_model(model_id).metrics
        from_run = {m.key for m in logged if m.run_id == run_id}
        assert {"test_accuracy", "test_ece"} <= from_run
