"""Flows: one module per entry point (eda, dnn_search, cnn, cnn_search, compare, predict, main).

The rule of this layer: a flow is thin. It takes its typed config from ``fmnist.config``, loads
the data, calls the library (train, search, analysis) and logs through ``fmnist.tracking``; the
decisions live below it. Flows may import mlflow; nothing below imports a flow, and a flow never
imports the CLI (``fmnist.cli`` turns options into configs and calls the flows).
"""
