"""Hyperparameter search: the spaces, the Optuna coordination and one driver for every family.

The spaces (``spaces``) and plain types (``spec``) import neither Optuna nor MLflow; ``study`` and
``workers`` coordinate the trials through Optuna; ``driver`` runs a family's study as MLflow runs
(through ``fmnist.tracking``); ``cluster`` runs the workers as Ray tasks and is the only module
that imports Ray. Nothing here imports ``fmnist.flows`` or ``fmnist.cli``.
"""
