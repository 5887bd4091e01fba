"""Analysis: pure functions from arrays and metric dicts to metrics, reports and ``Figure``s
(``metrics``, ``calibration``, ``robustness``, ``eda_stats``, ``eda_figures``, ``comparison``,
``report``); no mlflow, optuna or pyplot here, the flows log the results."""
