"""Analysis: evaluation metrics and figures, EDA computations, the comparison, report rendering.

The rule of this layer: pure functions over numpy arrays, metric dicts and plain rows; it imports
numpy, scikit-learn, matplotlib's ``Figure`` (never pyplot, so no global figure state) and the
layers below it (``data``, ``config``, ``published``), and never mlflow, optuna, click or
``fmnist.flows``/``fmnist.cli``. The flows log what it returns. Modules: ``evaluation`` (test-set
metrics and figures), ``calibration`` (NLL, Brier, ECE, temperature scaling), ``robustness`` (the
seeded corruption suite, in torch), ``eda`` / ``eda_figures`` / ``eda_report`` (the exploratory
analysis), ``compare`` (the comparison of tracked models) and ``report`` (markdown tables, HTML).
"""
