"""Compare the tracked models: the study's results section regenerated from MLflow runs.

``run_compare`` reads the tracking store and the registry: the best dense network (the dnn search
run with the highest validation accuracy) and the latest run of each CNN recipe. It logs one
``compare`` run with a table of both families (test accuracy, macro F1, per-class F1, parameter
count, training time, inference images/s and one-image latency of the registered pyfunc model),
per-class F1 bars, the confusion matrices side by side with their difference, and a markdown and
HTML report that puts the study's published numbers beside ours and lists where the study's text
and its own numbers disagree.
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist import study, tracking
from fmnist.data import CLASS_NAMES
from fmnist.errors import FmnistError
from fmnist.evaluation import metric_key, normalise_rows

SKIP_F1 = ("macro", "weighted", "micro")


@dataclass(frozen=True)
class CompareConfig:
    experiment_name: str = tracking.DEFAULT_EXPERIMENT
    include_quick: bool = False
    inference_images: int = 10000
    data_dir: str = ""
    split_seed: int = 42


@dataclass
class Candidate:
    """One model to compare: its run, family, recipe, metrics and registered model URI."""

    run_id: str
    name: str
    family: str
    recipe: str
    metrics: dict[str, float]
    params: dict[str, str]
    model_uri: str | None = None
    confusion: np.ndarray | None = None
    inference: dict[str, float] = field(default_factory=dict)


def per_class_f1(metrics: dict[str, float]) -> list[float | None]:
    return [metrics.get(f"test_f1_{metric_key(name)}") for name in CLASS_NAMES]


def macro_f1(metrics: dict[str, float]) -> float | None:
    for key in ("test_f1_macro", "test_macro_f1", "test_macro_avg_f1"):
        if key in metrics:
            return metrics[key]
    values = [v for v in per_class_f1(metrics) if v is not None]
    return float(np.mean(values)) if values else None


def is_quick(run) -> bool:
    return run.data.tags.get("quick", "false").lower() == "true"


def find_runs(experiment_ids: list[str], include_quick: bool) -> list:
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string="attributes.status = 'FINISHED' and metrics.test_accuracy >= 0",
        output_format="list",
        max_results=5000,
    )
    return [r for r in runs if include_quick or not is_quick(r)]


def select_candidates(runs: list) -> list[Candidate]:
    """The best dense network by validation accuracy and the latest run of each CNN recipe."""
    dense = [r for r in runs if r.data.tags.get("model_family") == "dnn"]
    cnn = [r for r in runs if r.data.tags.get("model_family") == "cnn"]
    chosen = []
    if dense:
        best = max(dense, key=lambda r: (validation_accuracy(r), r.info.start_time))
        chosen.append(to_candidate(best, "dnn", "grid-best"))
    by_recipe: dict[str, object] = {}
    for run in sorted(cnn, key=lambda r: r.info.start_time):
        recipe = run.data.tags.get("recipe") or run.data.params.get("recipe") or "cnn"
        by_recipe[recipe] = run
    chosen += [to_candidate(run, "cnn", recipe) for recipe, run in sorted(by_recipe.items())]
    return chosen


def validation_accuracy(run) -> float:
    metrics = run.data.metrics
    return metrics.get("best_val_accuracy", metrics.get("val_accuracy", 0.0))


def to_candidate(run, family: str, recipe: str) -> Candidate:
    name = run.info.run_name or run.info.run_id[:8]
    return Candidate(
        run.info.run_id, name, family, recipe, dict(run.data.metrics), dict(run.data.params)
    )


def find_model_uri(run_id: str) -> str | None:
    """The registered version trained by this run (or one of its trials), else None."""
    import mlflow

    client = mlflow.MlflowClient()
    tagged = client.get_run(run_id).data.tags.get("registered_model_uri")
    if tagged:
        return tagged
    run_ids = [run_id] + [
        r.info.run_id
        for r in client.search_runs(
            [client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
    ]
    for candidate in run_ids:
        versions = client.search_model_versions(f"run_id = '{candidate}'")
        if versions:
            latest = max(versions, key=lambda v: int(v.version))
            return f"models:/{latest.name}/{latest.version}"
    return None


def load_confusion(run_id: str) -> np.ndarray | None:
    """The run's confusion matrix (counts) from its evaluation artifacts, if logged."""
    import mlflow

    client = mlflow.MlflowClient()
    for path in walk_artifacts(client, run_id, ""):
        if path.endswith(".json") and "confusion" in path and "normal" not in path:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, path, tmp)
                content = json.loads(Path(local).read_text())
            matrix = (
                content.get("matrix", content.get("counts"))
                if isinstance(content, dict)
                else content
            )
            array = np.asarray(matrix, dtype=float)
            if array.shape == (10, 10):
                return array
    return None


def walk_artifacts(client, run_id: str, path: str):
    for item in client.list_artifacts(run_id, path or None):
        if item.is_dir:
            yield from walk_artifacts(client, run_id, item.path)
        else:
            yield item.path


def measure_inference(model_uri: str, images: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Images per second on the whole batch and the median latency of one image (pyfunc)."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(images[:2])
    start = time.perf_counter()
    model.predict(images)
    batch_seconds = time.perf_counter() - start
    latencies = []
    for i in range(repeats):
        start = time.perf_counter()
        model.predict(images[i % len(images)][None])
        latencies.append(time.perf_counter() - start)
    return {
        "inference_images_per_second": len(images) / batch_seconds,
        "latency_p50_ms": float(np.median(latencies)) * 1000,
    }


def test_images(cfg: CompareConfig) -> np.ndarray:
    from fmnist.data import load_fashion_mnist

    data = load_fashion_mnist(cfg.data_dir or None)
    count = min(cfg.inference_images, data.test_images.shape[0])
    return data.test_images[:count].numpy().astype(np.float32) / 255.0


def fmt(value, pattern: str = "{:.4f}") -> str:
    return "" if value is None else pattern.format(value)


def summary_rows(candidates: list[Candidate]) -> list[dict]:
    rows = []
    for c in candidates:
        row = {
            "model": c.name,
            "family": c.family,
            "recipe": c.recipe,
            "run_id": c.run_id,
            "val_accuracy": validation_of(c),
            "test_accuracy": c.metrics.get("test_accuracy"),
            "test_f1_macro": macro_f1(c.metrics),
            "param_count": c.metrics.get("param_count", c.metrics.get("parameter_count")),
            "train_seconds": c.metrics.get("train_seconds", c.metrics.get("fit_seconds")),
            **c.inference,
            "model_uri": c.model_uri or "",
        }
        for name, value in zip(CLASS_NAMES, per_class_f1(c.metrics), strict=True):
            row[f"f1_{metric_key(name)}"] = value
        rows.append(row)
    return rows


def validation_of(c: Candidate) -> float | None:
    return c.metrics.get("best_val_accuracy", c.metrics.get("val_accuracy"))


def plot_f1_bars(candidates: list[Candidate]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{c.family}:{c.recipe}", per_class_f1(c.metrics)) for c in candidates]
    series += [("study DNN", list(study.DNN_F1)), ("study CNN", list(study.CNN_F1))]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(series)
    x = np.arange(len(CLASS_NAMES))
    for i, (label, values) in enumerate(series):
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=label)
    ax.set_xticks(x, CLASS_NAMES, rotation=30, ha="right")
    ax.set_ylabel("test F1")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("Per-class F1 on the test set: our models and the study's")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_confusions(candidates: list[Candidate]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_matrix = [c for c in candidates if c.confusion is not None]
    if not with_matrix:
        return None
    panels = len(with_matrix) + (1 if len(with_matrix) >= 2 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5.5), squeeze=False)
    for ax, c in zip(axes[0], with_matrix, strict=False):
        draw_matrix(ax, normalise_rows(c.confusion), f"{c.family}:{c.recipe}", "Blues", 0, 1)
    if len(with_matrix) >= 2:
        first, last = with_matrix[0], with_matrix[-1]
        diff = normalise_rows(last.confusion) - normalise_rows(first.confusion)
        bound = max(float(np.abs(diff).max()), 1e-6)
        draw_matrix(
            axes[0][-1],
            diff,
            f"{last.family}:{last.recipe} minus {first.family}:{first.recipe}",
            "RdBu_r",
            -bound,
            bound,
        )
    fig.suptitle("Row-normalised test confusion matrices (rows: true class)")
    fig.tight_layout()
    return fig


def draw_matrix(ax, matrix, title, cmap, vmin, vmax) -> None:
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(10), CLASS_NAMES, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def latest_metric(experiment_ids: list[str], entry_point: str, key: str) -> float | None:
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string=f"tags.entry_point = '{entry_point}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    for run in runs:
        if key in run.data.metrics:
            return run.data.metrics[key]
    return None


def build_report(rows: list[dict], candidates: list[Candidate], eda: dict) -> str:
    """Markdown report: headline table, per-class F1, Table I pointer, discrepancies."""
    lines = ["# Fashion-MNIST: our tracked results beside the study's", ""]
    lines += [
        "## Headline",
        "",
        "| model | family | val acc | test acc | macro F1 | params | train s | "
        "inference img/s | p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['family']}:{r['recipe']} | {fmt(r['val_accuracy'])} | "
            f"{fmt(r['test_accuracy'])} | {fmt(r['test_f1_macro'])} | "
            f"{fmt(r['param_count'], '{:.0f}')} | {fmt(r['train_seconds'], '{:.1f}')} | "
            f"{fmt(r.get('inference_images_per_second'), '{:.0f}')} | "
            f"{fmt(r.get('latency_p50_ms'), '{:.2f}')} |"
        )
    h = study.HEADLINE
    lines.append(
        f"| study DNN (published) | dnn | {h['dnn_val_accuracy']:.4f} | "
        f"{h['dnn_test_accuracy']:.2f} | 0.89 | | | | |"
    )
    lines.append(
        f"| study CNN (published) | cnn | {h['cnn_val_accuracy']:.4f} | "
        f"{h['cnn_test_accuracy']:.2f} | 0.90 | | | | |"
    )
    lines += [
        "",
        "## Per-class test F1",
        "",
        "| class | "
        + " | ".join(f"{c.family}:{c.recipe}" for c in candidates)
        + " | study DNN | study CNN |",
        "|---|" + "---|" * (len(candidates) + 2),
    ]
    for i, name in enumerate(CLASS_NAMES):
        ours = " | ".join(fmt(per_class_f1(c.metrics)[i], "{:.3f}") for c in candidates)
        lines.append(f"| {name} | {ours} | {study.DNN_F1[i]:.2f} | {study.CNN_F1[i]:.2f} |")
    lines += [
        "",
        "## Exploratory numbers",
        "",
        "| quantity | ours | study |",
        "|---|---|---|",
        f"| PCA components for 90% variance | {fmt(eda.get('pca_components_90'), '{:.0f}')}"
        f" | {h['pca_components_90']} |",
        f"| PCA components for 95% variance | {fmt(eda.get('pca_components_95'), '{:.0f}')}"
        f" | {h['pca_components_95']} |",
        "",
    ]
    lines += ["## Where the study's text and its own numbers disagree", ""]
    lines += [f"- {item}" for item in study.DISCREPANCIES]
    ours90 = eda.get("pca_components_90")
    if ours90 is not None and int(ours90) != h["pca_components_90"]:
        lines.append(
            f"- Measured here: {int(ours90)} components reach 90% variance, not "
            f"{h['pca_components_90']}."
        )
    lines += [
        "",
        "The study's Table I is regenerated from the dense-grid trials in the "
        "`dnn_search` run's artifacts.",
    ]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str) -> str:
    """A small converter for the report's headings, tables and bullet lists."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fmnist comparison</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "</style></head><body>"
    ]
    in_table = in_list = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    out.append("</table>" if in_table else "")
    out.append("</ul>" if in_list else "")
    out.append("</body></html>")
    return "\n".join(out)


def run_compare(cfg: CompareConfig, parent_run_id: str | None = None) -> dict:
    """Collect, measure and report; everything is logged into one ``compare`` run."""
    import mlflow

    tracking.configure()
    with tracking.start_run(
        "compare",
        "comparison",
        cfg.experiment_name,
        run_name="compare",
        parent_run_id=parent_run_id,
    ) as run:
        experiment_ids = [run.info.experiment_id]
        candidates = select_candidates(find_runs(experiment_ids, cfg.include_quick))
        if not candidates:
            raise FmnistError(
                "No finished dense-network or CNN run with test metrics was found "
                f"in experiment {cfg.experiment_name!r}: train models first "
                "(fmnist dnn-search, fmnist cnn)."
            )
        images = test_images(cfg) if cfg.inference_images > 0 else None
        for c in candidates:
            c.model_uri = find_model_uri(c.run_id)
            c.confusion = load_confusion(c.run_id)
            if c.model_uri and images is not None:
                c.inference = measure_inference(c.model_uri, images)
        rows = summary_rows(candidates)
        eda = {
            key: latest_metric(experiment_ids, "eda", key)
            for key in ("pca_components_90", "pca_components_95")
        }
        report = build_report(rows, candidates, eda)
        log_outputs(rows, candidates, report)
        tracking.log_params_safe(
            {
                "include_quick": cfg.include_quick,
                "compared_runs": ",".join(c.run_id for c in candidates),
            }
        )
        best = max(rows, key=lambda r: r["test_accuracy"] or 0.0)
        mlflow.log_metrics(
            {"best_test_accuracy": best["test_accuracy"] or 0.0, "models_compared": len(rows)}
        )
    return {
        "models": len(rows),
        "best": best["model"],
        "best_test_accuracy": best["test_accuracy"],
        "run_id": run.info.run_id,
    }


def log_outputs(rows: list[dict], candidates: list[Candidate], report: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    columns = sorted(
        {key for row in rows for key in row},
        key=lambda k: list(rows[0]).index(k) if k in rows[0] else 999,
    )
    mlflow.log_table(
        {key: [row.get(key) for row in rows] for key in columns}, "comparison/summary.json"
    )
    mlflow.log_text(report, "comparison/report.md")
    mlflow.log_text(markdown_to_html(report), "comparison/report.html")
    fig = plot_f1_bars(candidates)
    mlflow.log_figure(fig, "comparison/per_class_f1.png")
    plt.close(fig)
    fig = plot_confusions(candidates)
    if fig is not None:
        mlflow.log_figure(fig, "comparison/confusion_matrices.png")
        plt.close(fig)


def run_compare_step(cfg, parent_run_id: str) -> dict:
    """Pipeline step: compare what this experiment holds (quick runs only in a quick pipeline)."""
    compare_cfg = CompareConfig(
        experiment_name=cfg.common.experiment_name,
        include_quick=cfg.quick,
        inference_images=1000 if cfg.quick else 10000,
        data_dir=cfg.common.data_dir,
        split_seed=cfg.common.split_seed,
    )
    return run_compare(compare_cfg, parent_run_id)
