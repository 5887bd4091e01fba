"""Training: the engine (``fit``, ``evaluate``), ``TrainConfig``, recipes and grids, with torch
and numpy only, so the GPU scripts train without the tracking stack (``tests/test_layers.py``).
"""
