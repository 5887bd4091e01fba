"""fmnist: the Fashion-MNIST study (PCA + dense network, CNN) reproduced and improved on MLflow.

The package is built in layers that import one way only (README, "Layout"): ``cli`` (click) ->
``flows`` (one per entry point) -> ``tracking`` (mlflow), ``search`` and ``analysis`` -> ``train``
-> ``models``, ``data``, ``augment`` -> ``config``, ``errors``, ``definitions``, ``published``.
``tests/test_layers.py`` fails on an import that runs back up.
"""

__version__ = "0.1.0"
