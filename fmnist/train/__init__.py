"""Training: the engine (``fit``, ``evaluate``), ``TrainConfig``, recipes and grids. The rule of
this layer: torch, numpy and the layers below (``models`` only through ``recipes``), never mlflow,
optuna, click or scikit-learn, so the GPU scripts train without the tracking stack.
"""
