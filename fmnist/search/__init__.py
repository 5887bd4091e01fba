"""Hyperparameter search: the spaces, the Optuna coordination and one driver for every family.

The rule of this package: the spaces (``dense_space``, ``cnn_space``) and the plain types
(``spec``, ``family``) import neither Optuna nor MLflow; the Optuna coordination (``study``,
``points``, ``summary``, ``workers``) is the only code of the project that imports Optuna, and
imports no MLflow; the driver (``driver``) runs a family's study as MLflow runs and imports
MLflow, never Optuna. Nothing here imports ``fmnist.flows`` or ``fmnist.cli``.
"""
