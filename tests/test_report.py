"""Report rendering and the comparison report, without a tracking store: ``markdown_table`` (the
one table renderer), ``markdown_to_html`` and ``fmnist.analysis.comparison`` on hand-made
candidates.
"""

from __future__ import annotations

import numpy as np
import pytest

from fmnist import published
from fmnist.analysis import comparison as compare
from fmnist.analysis.metrics import metric_key
from fmnist.analysis.report import markdown_table, markdown_to_html
from fmnist.data import CLASS_NAMES


def test_markdown_table_formats_numbers_and_leaves_strings_and_none():
    rows = [{"name": "a", "acc": 0.91234, "n": 3}, {"name": "b", "acc": "0.90", "n": None}]
    assert markdown_table(rows, {"acc": "{:.2f}"}) == (
        "| name | acc | n |\n|---|---|---|\n| a | 0.91 | 3 |\n| b | 0.90 |  |\n"
    )
    assert markdown_table([]) == ""
    assert markdown_table([{"x": 0.5}]) == "| x |\n|---|\n| 0.5 |\n"


def test_markdown_to_html_renders_headings_tables_lists_and_escapes():
    text = "# Title\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n- one & two\n- three\nplain"
    page = markdown_to_html(text, "my report")
    assert "<title>my report</title>" in page
    lines = page.splitlines()
    body = lines[lines.index("<h1>Title</h1>") :]
    assert body == [
        "<h1>Title</h1>",
        "<table>",
        "<tr><th>a</th><th>b</th></tr>",
        "<tr><td>1</td><td>&lt;2&gt;</td></tr>",
        "</table>",
        "<ul>",
        "<li>one &amp; two</li>",
        "<li>three</li>",
        "</ul>",
        "<p>plain</p>",
        "",
        "</body></html>",
    ]


def candidate(
    name: str, family: str, recipe: str, f1: float | None, **metrics
) -> compare.Candidate:
    if f1 is not None:
        metrics |= {f"test_f1_{metric_key(c)}": f1 for c in CLASS_NAMES}
    return compare.Candidate(f"id-{name}", name, family, recipe, metrics)


def candidates() -> list[compare.Candidate]:
    dense = candidate(
        "dense", "dnn", "grid-best", 0.8, test_accuracy=0.88, val_accuracy=0.87, param_count=50890
    )
    dense.inference = {"inference_images_per_second": 12345.6, "latency_p50_ms": 0.456}
    dense.confusion = np.eye(10) * 90 + 1
    cnn = candidate(
        "cnn", "cnn", "paper", None, test_accuracy=0.91, best_val_accuracy=0.9, train_seconds=61.25
    )
    cnn.confusion = np.eye(10) * 80 + 2
    return [dense, cnn]


def test_macro_f1_prefers_the_logged_value_and_falls_back_to_the_mean():
    assert compare.macro_f1({"test_f1_macro": 0.7, "test_f1_Bag": 0.1}) == 0.7
    assert compare.macro_f1({"test_macro_avg_f1": 0.6}) == 0.6
    assert compare.macro_f1({"test_f1_Bag": 0.5, "test_f1_Shirt": 0.7}) == pytest.approx(0.6)
    assert compare.macro_f1({}) is None
    f1 = compare.per_class_f1({"test_f1_T-shirt_top": 0.3, "test_f1_Ankle_boot": 0.9})
    assert f1 == [0.3] + [None] * 8 + [0.9]
    assert compare.validation_accuracy({"best_val_accuracy": 0.9, "val_accuracy": 0.8}) == 0.9
    assert compare.validation_accuracy({}) is None


def test_summary_rows_and_columns():
    rows = compare.summary_rows(candidates())
    dense, cnn = rows
    assert dense["val_accuracy"] == 0.87 and cnn["val_accuracy"] == 0.9
    assert dense["test_f1_macro"] == pytest.approx(0.8) and cnn["test_f1_macro"] is None
    assert dense["f1_Shirt"] == 0.8 and cnn["f1_Shirt"] is None
    assert dense["inference_images_per_second"] == 12345.6
    assert cnn["model_uri"] == "" and cnn["train_seconds"] == 61.25
    columns = compare.summary_columns(rows)
    assert list(columns)[:4] == ["model", "family", "recipe", "run_id"]
    assert columns["test_accuracy"] == [0.88, 0.91]
    assert columns["latency_p50_ms"] == [0.456, None]


def test_report_sets_ours_beside_the_study():
    models = candidates()
    report = compare.build_report(compare.summary_rows(models), models, {"pca_components_90": 84})
    lines = report.splitlines()
    assert (
        "| dense | dnn:grid-best | 0.8700 | 0.8800 | 0.8000 | 50890 |  | 12346 | 0.46 |" in lines
    )
    assert "| cnn | cnn:paper | 0.9000 | 0.9100 |  |  | 61.2 |  |  |" in lines
    study_dnn = published.HEADLINE["dnn_val_accuracy"]
    assert f"| study DNN (published) | dnn | {study_dnn:.4f} | 0.89 | 0.89 |  |  |  |  |" in lines
    assert "| class | dnn:grid-best | cnn:paper | study DNN | study CNN |" in lines
    assert "| Shirt | 0.800 |  | 0.70 | 0.73 |" in lines
    assert "| PCA components for 90% variance | 84 | 87 |" in lines
    assert "| PCA components for 95% variance |  | 187 |" in lines
    assert "- Measured here: 84 components reach 90% variance, not 87." in lines
    assert all(f"- {item}" in lines for item in published.DISCREPANCIES)
    assert report.endswith("`dnn_search` run's artifacts.\n")


def test_figures_show_every_model_and_the_difference():
    models = candidates()
    bars = compare.plot_f1_bars(models)
    legend = [t.get_text() for t in bars.axes[0].get_legend().get_texts()]
    assert legend == ["dnn:grid-best", "cnn:paper", "study DNN", "study CNN"]
    heights = [p.get_height() for p in bars.axes[0].patches]
    assert heights[:10] == [0.8] * 10 and heights[10:20] == [0.0] * 10
    assert heights[20:30] == list(published.DNN_F1)
    confusions = compare.plot_confusions(models)
    titles = [ax.get_title() for ax in confusions.axes if ax.get_title()]
    assert titles == ["dnn:grid-best", "cnn:paper", "cnn:paper minus dnn:grid-best"]
    difference = confusions.axes[2].images[0].get_array()
    expected = (np.eye(10) * 80 + 2) / 100 - (np.eye(10) * 90 + 1) / 100  # rows sum to 100
    assert np.allclose(difference, expected)
    for model in models:
        model.confusion = None
    assert compare.plot_confusions(models) is None
