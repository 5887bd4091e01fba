"""fmnist: the Fashion-MNIST study (PCA + dense network, CNN) reproduced and improved on MLflow.

The package is the library behind the ``fmnist`` command and the MLproject entry points: data,
models, the training engine, tracking, EDA, searches, evaluation and the model registry.
"""

__version__ = "0.1.0"
