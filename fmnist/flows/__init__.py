"""Flows, one module per entry point: each takes its config, loads the data, calls the library
and logs through ``fmnist.tracking``; nothing below imports a flow, and no flow imports the CLI.
"""
