"""Where one ``fmnist`` command spends its time (issue 29's "lean finish" profile): runs the
command in this process with a timer around each named part (data, whitening or PCA fit, the
training epochs, each epoch's validation, the test predictions, figures, pt2 and ONNX export,
registration) and prints each part's seconds and calls, the start-up and the total. Run it on a
fresh store; a search's forked workers are one part, their wall time. Usage: ``python
bench/parts.py [--json FILE] cnn --epochs 1`` (any command and its options).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

# (label, module, attribute): a function, timed there and in every fmnist module that imported it
# by name; indented labels run inside the part above them
PARTS = (
    ("data", "fmnist.flows.shared", "load_data"),
    ("network built, whitening fitted", "fmnist.flows.cnn", "build_classifier"),
    ("PCA fit", "fmnist.flows.dnn_search", "fit_pca"),
    ("fit", "fmnist.train.engine", "fit"),
    ("  training epochs", "fmnist.train.engine", "train_one_epoch"),
    ("  validation (each epoch)", "fmnist.train.engine", "evaluate"),
    ("search: workers' training", "fmnist.search.workers", "LocalWorkers.join"),
    ("search: Table I and Optuna's figures", "fmnist.tracking.search_runs", "log_search_summary"),
    ("calibrated test", "fmnist.flows.shared", "calibrated_test"),
    ("  predictions (validation, test)", "fmnist.flows.shared", "predict_logits"),
    ("  figures, metrics and their upload", "fmnist.tracking.eval_logging", "log_results"),
    ("export and registration", "fmnist.tracking.registry", "log_and_register"),
    ("  torch.export", "torch.export", "export"),
    ("  ONNX", "fmnist.tracking.registry", "write_onnx_model"),
    ("  MLflow's Model.log (the two exports included)", "mlflow.models", "Model.log"),
)


def wrap(module: str, attribute: str, label: str, seconds: dict, calls: Counter) -> None:
    owner, *path = [importlib.import_module(module), *attribute.split(".")]
    for name in path[:-1]:
        owner = getattr(owner, name)
    function = getattr(owner, path[-1])

    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, path[-1], timed)
    # and wherever a module imported it by name, but not in its own module when ``module`` is
    # another (``predict_logits`` in a flow predicts the test, in the engine it validates)
    for name, loaded in list(sys.modules.items()):
        if name.startswith("fmnist.") and name not in {module, function.__module__}:
            if getattr(loaded, path[-1], None) is function:
                setattr(loaded, path[-1], timed)


def report(seconds: dict, calls: Counter, total: float) -> list[dict]:
    rows = [{"part": "start-up and imports", "seconds": seconds["start-up"], "calls": 1}]
    rows += [
        {"part": label, "seconds": seconds[label], "calls": calls[label]}
        for label, _, _ in PARTS
        if calls[label]
    ]
    rows.append({"part": "total", "seconds": total, "calls": 1})
    for row in rows:
        print(f"{row['part']:<50} {row['seconds']:8.2f} s  {row['calls']:>4} calls")
    return rows


def main(argv: list[str]) -> None:
    out = argv[1] if argv[:1] == ["--json"] else None
    argv = argv[2:] if out else argv
    from fmnist import cli

    seconds, calls = defaultdict(float), Counter()
    for label, module, attribute in PARTS:
        wrap(module, attribute, label, seconds, calls)
    seconds["start-up"] = time.perf_counter() - STARTED
    sys.argv = ["fmnist", *argv]
    try:
        cli.main()  # the command's own exit codes, signal handling and error lines
    finally:
        rows = report(seconds, calls, time.perf_counter() - STARTED)
        if out:
            with open(out, "w") as handle:
                json.dump({"command": argv, "parts": rows}, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
