"""Flows: one module per entry point (eda, dnn_search, cnn, cnn_search, compare, predict, main)
and ``shared``, what several use. A flow is thin: it takes its config from ``fmnist.config``,
loads the data, calls the library (train, search, analysis) and logs through ``fmnist.tracking``.
Flows may import mlflow; nothing below imports a flow, and a flow never imports the CLI.
"""
