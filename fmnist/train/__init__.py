"""Training: the one engine (``fit``, ``evaluate``), its ``TrainConfig``, and CNN recipes.

The rule of this layer: it imports torch, numpy and the layers below it (``models`` only through
``recipes``; the engine itself never imports a concrete model), and never mlflow, optuna, click or
scikit-learn, so the GPU scripts and any other caller can train without the tracking stack.
Metrics leave the engine through callbacks.
"""
