"""The package's layer rules, read from the source: every module of ``fmnist/`` is parsed (never
imported) and each of its imports is checked against the rules below, written here as data. A
violation names the file, the line and the rule. One test feeds the checker a small synthetic
module, so a checker that silently finds nothing cannot pass.

The layers, lowest first: config/errors/definitions/published/liveness < data/augment/inputs/
models < train < tracking/analysis < search < flows < cli. A module may import its own layer and
the layers below it, never one above, not even inside a function. MLflow is imported by tracking
and the flows only, Optuna by the search only, Ray inside a function of ``fmnist.search.cluster``
only (a search loads it with ``--ray`` alone).
The modules of ``fmnist predict`` import nothing that loads torch at module level, followed
through every module and package an import runs (``TORCH_LOADERS``).
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "fmnist"

LAYER_ORDER = ("foundation", "core", "training", "services", "search", "flows", "cli")
SEARCH = ("fmnist.search", "fmnist.search.*")
# (module pattern, layer): the first matching pattern decides.
LAYERS: tuple[tuple[str, str], ...] = (
    ("fmnist", "foundation"),
    ("fmnist.config", "foundation"),
    ("fmnist.errors", "foundation"),
    ("fmnist.definitions", "foundation"),
    ("fmnist.published", "foundation"),
    ("fmnist.liveness", "foundation"),  # standard library only: which process runs, if it lives
    ("fmnist.data", "core"),
    ("fmnist.dataset_format", "core"),  # what fmnist.data defines that needs no torch
    ("fmnist.augment", "core"),
    ("fmnist.inputs", "core"),  # the files `fmnist predict` reads, as image arrays
    ("fmnist.models", "core"),
    ("fmnist.models.*", "core"),
    ("fmnist.train", "training"),
    ("fmnist.train.*", "training"),
    *((pattern, "search") for pattern in SEARCH),
    ("fmnist.tracking", "services"),
    ("fmnist.tracking.*", "services"),
    ("fmnist.analysis", "services"),
    ("fmnist.analysis.*", "services"),
    ("fmnist.flows", "flows"),
    ("fmnist.flows.*", "flows"),
    ("fmnist.cli", "cli"),
    ("fmnist.cli.*", "cli"),
    ("fmnist.__main__", "cli"),
)
CLI = ("fmnist.cli", "fmnist.cli.*", "fmnist.__main__")
RAY_MODULE = "fmnist.search.cluster"  # the only one, and inside its functions
MLFLOW_ALLOWED = ("fmnist.tracking", "fmnist.tracking.*", "fmnist.flows", "fmnist.flows.*")
# What ``train``, ``models``, ``data`` and ``augment`` must import without (the GPU scripts run
# them on a machine without the tracking stack): no module-level import of these, and a
# function-local one only with a comment saying why.
LEAN = ("fmnist.train", "fmnist.train.*", "fmnist.models", "fmnist.models.*")
LEAN += ("fmnist.data", "fmnist.dataset_format", "fmnist.augment")
LEAN_FORBIDS = ("mlflow", "optuna", "click", "sklearn")
ENGINE = "fmnist.train.engine"
# `fmnist predict` of a model with an ONNX copy never imports torch (seconds of a cold one-image
# prediction): these modules, and every package above them, load without it.
TORCH_FREE = ("fmnist.dataset_format", "fmnist.inputs", "fmnist.tracking.onnx_model")
TORCH_FREE += ("fmnist.flows.predict", "fmnist.cli.inspection")
TORCH = ("torch", "torchvision")


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute dotted name."""

    target: str
    line: int
    module_level: bool  # executed when the module is imported (not inside a function)
    commented: bool  # a comment on its line or the line above says why it is there


def matches(module: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)


def layer_of(module: str) -> str | None:
    return next((layer for pattern, layer in LAYERS if fnmatch.fnmatchcase(module, pattern)), None)


def top(target: str) -> str:
    return target.split(".")[0]


def module_name(path: Path) -> tuple[str, bool]:
    """``fmnist/tracking/runs.py`` -> ("fmnist.tracking.runs", False); a package's
    ``__init__.py`` -> (the package, True)."""
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_modules() -> dict[str, Path]:
    return {module_name(path)[0]: path for path in sorted(PACKAGE.rglob("*.py"))}


KNOWN_MODULES = frozenset(package_modules())


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names one ``from ... import ...`` reaches: ``from fmnist import cli`` reaches
    the module ``fmnist.cli``, ``from fmnist.data import Split`` reaches ``fmnist.data``."""
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    targets = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        target = candidate if candidate in KNOWN_MODULES else base
        if target not in targets:
            targets.append(target)
    return targets


def imports_of(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    """Every import of a module's source, function-local ones included."""
    lines = source.splitlines()

    def commented(line: int) -> bool:
        here = lines[line - 1]
        above = lines[line - 2].strip() if line >= 2 else ""
        return "#" in here or above.startswith("#")

    def walk(node: ast.AST, module_level: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name, child.lineno, module_level, commented(child.lineno))
            elif isinstance(child, ast.ImportFrom):
                for target in resolve(child, module, is_package):
                    yield Import(target, child.lineno, module_level, commented(child.lineno))
            else:
                inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, module_level and not inside)

    yield from walk(ast.parse(source), True)


# --- the rules: each takes (importing module, one import) and returns a message or None -------


def click_only_in_the_cli(module: str, imp: Import) -> str | None:
    if top(imp.target) == "click" and not matches(module, CLI):
        return "imports click: only fmnist/cli may"
    return None


def nothing_imports_the_cli(module: str, imp: Import) -> str | None:
    if matches(imp.target, CLI) and not matches(module, CLI):
        return f"imports {imp.target}: no library module imports the CLI"
    return None


def mlflow_only_in_tracking_and_flows(module: str, imp: Import) -> str | None:
    if top(imp.target) == "mlflow" and not matches(module, MLFLOW_ALLOWED):
        return f"imports {imp.target}: only tracking and the flows may"
    return None


def optuna_only_in_the_search(module: str, imp: Import) -> str | None:
    if top(imp.target) == "optuna" and not matches(module, SEARCH):
        return f"imports {imp.target}: only fmnist/search may"
    return None


def ray_only_when_a_search_asks_for_it(module: str, imp: Import) -> str | None:
    if top(imp.target) == "ray" and (module != RAY_MODULE or imp.module_level):
        return f"imports {imp.target}: only a function of {RAY_MODULE} may"
    return None


def lean_layers_import_without_the_tracking_stack(module: str, imp: Import) -> str | None:
    if not matches(module, LEAN) or top(imp.target) not in LEAN_FORBIDS:
        return None
    if imp.module_level:
        return (
            f"imports {imp.target} at module level: train, models, data, augment import without it"
        )
    if not imp.commented:
        return f"imports {imp.target} inside a function without a comment saying why"
    return None


def the_engine_imports_no_concrete_model(module: str, imp: Import) -> str | None:
    if module == ENGINE and matches(imp.target, ("fmnist.models", "fmnist.models.*")):
        return f"imports {imp.target}: the engine imports no concrete model"
    return None


def analysis_keeps_no_pyplot_state(module: str, imp: Import) -> str | None:
    if matches(module, ("fmnist.analysis", "fmnist.analysis.*")) and (
        imp.target == "matplotlib.pyplot"
    ):
        return "imports matplotlib.pyplot: analysis builds Figure objects, no pyplot state"
    return None


def packages_run_by(target: str) -> list[str]:
    """What importing ``target`` executes: ``fmnist.a.b`` runs ``fmnist``, ``fmnist.a`` and
    ``fmnist.a.b``."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def torch_loaders(sources: dict[str, tuple[str, bool]]) -> frozenset[str]:
    """The modules (name -> (source, is_package)) whose import loads torch: a module-level import
    of torch, or of a module (or a package above it) that loads torch, followed to a fixpoint."""
    targets = {
        module: [imp.target for imp in imports_of(source, module, is_package) if imp.module_level]
        for module, (source, is_package) in sources.items()
    }
    loaders: set[str] = set()
    grew = True
    while grew:
        grew = False
        for module, imported in targets.items():
            if module not in loaders and any(
                top(target) in TORCH or loaders.intersection(packages_run_by(target))
                for target in imported
            ):
                loaders.add(module)
                grew = True
    return frozenset(loaders)


TORCH_LOADERS = torch_loaders(
    {
        name: (path.read_text(), path.name == "__init__.py")
        for name, path in package_modules().items()
    }
)


def the_predict_path_imports_no_torch(module: str, imp: Import) -> str | None:
    torch_free = matches(module, TORCH_FREE) or any(
        matches(inner, TORCH_FREE) for inner in KNOWN_MODULES if inner.startswith(module + ".")
    )
    if not torch_free or not imp.module_level:
        return None
    if top(imp.target) in TORCH:
        return (
            f"imports {imp.target} at module level: `fmnist predict` of an ONNX model needs none"
        )
    loader = next((p for p in packages_run_by(imp.target) if p in TORCH_LOADERS), None)
    if loader is not None:
        return f"imports {imp.target} at module level, which loads torch (through {loader})"
    return None


def imports_point_down_the_layers(module: str, imp: Import) -> str | None:
    if top(imp.target) != "fmnist":
        return None
    own, other = layer_of(module), layer_of(imp.target)
    if own is None or other is None:
        return None  # reported by test_every_module_has_a_layer
    if LAYER_ORDER.index(other) > LAYER_ORDER.index(own):
        return f"imports {imp.target} (layer {other}) from layer {own}: imports point down only"
    return None


Rule = Callable[[str, Import], str | None]
RULES: dict[str, Rule] = {
    rule.__name__: rule
    for rule in (
        click_only_in_the_cli,
        nothing_imports_the_cli,
        mlflow_only_in_tracking_and_flows,
        optuna_only_in_the_search,
        ray_only_when_a_search_asks_for_it,
        lean_layers_import_without_the_tracking_stack,
        the_engine_imports_no_concrete_model,
        analysis_keeps_no_pyplot_state,
        the_predict_path_imports_no_torch,
        imports_point_down_the_layers,
    )
}


def violations(rule: Rule, source: str, module: str, is_package: bool, where: str) -> list[str]:
    found = []
    for imp in imports_of(source, module, is_package):
        message = rule(module, imp)
        if message:
            found.append(f"{where}:{imp.line}: {message}")
    return found


def package_violations(rule: Rule) -> list[str]:
    found = []
    for module, path in package_modules().items():
        is_package = path.name == "__init__.py"
        where = str(path.relative_to(PROJECT_ROOT))
        found += violations(rule, path.read_text(), module, is_package, where)
    return found


@pytest.mark.parametrize("rule", list(RULES))
def test_the_package_keeps_the_rule(rule):
    found = package_violations(RULES[rule])
    assert not found, f"{rule}: {len(found)} violation(s)\n" + "\n".join(found)


def test_every_module_has_a_layer():
    missing = [name for name in KNOWN_MODULES if layer_of(name) is None]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60  # so that a newcomer can read one at a sitting


def oversized(source: str, where: str) -> list[str]:
    """``where`` if over ``MAX_MODULE_LINES``, and each function of it over ``MAX_FUNCTION_LINES``
    (decorators and docstring included)."""
    n = len(source.splitlines())
    found = [f"{where}: module of {n} lines"] if n > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno}: {node.name} has {n} lines")
    return found


def test_no_module_or_function_is_too_long_to_read():
    found = [
        line
        for path in package_modules().values()
        for line in oversized(path.read_text(), str(path.relative_to(PROJECT_ROOT)))
    ]
    assert not found, "\n".join(found)
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized(long_function, "m.py") == ["m.py:1: f has 61 lines"]
    assert oversized("x = 1\n" * 401, "m.py") == ["m.py: module of 401 lines"]


SYNTHETIC_ENGINE = '''\
"""A module that breaks every rule it can."""
import click
import mlflow.pyfunc
from fmnist.models.dense import MLP
from fmnist import cli
from ..flows import cnn
from . import recipes


def late():
    import optuna
    from sklearn.model_selection import train_test_split
    import ray
'''


def test_the_checker_catches_each_kind_of_violation():
    def check(rule: Rule, source: str = SYNTHETIC_ENGINE, module: str = ENGINE) -> list[str]:
        return violations(rule, source, module, False, "engine.py")

    assert check(click_only_in_the_cli) == ["engine.py:2: imports click: only fmnist/cli may"]
    assert [v.split(":")[1] for v in check(nothing_imports_the_cli)] == ["5"]
    assert [v.split(":")[1] for v in check(mlflow_only_in_tracking_and_flows)] == ["3"]
    assert [v.split(":")[1] for v in check(optuna_only_in_the_search)] == ["11"]
    assert [v.split(":")[1] for v in check(ray_only_when_a_search_asks_for_it)] == ["13"]
    ray_rule = ray_only_when_a_search_asks_for_it
    assert not check(ray_rule, "def tasks():\n    import ray\n", "fmnist.search.cluster")
    assert check(ray_rule, "import ray\n", "fmnist.search.cluster")
    lean = check(lean_layers_import_without_the_tracking_stack)
    assert [v.split(":")[1] for v in lean] == ["2", "3", "11", "12"]
    assert "inside a function without a comment" in lean[-1]
    assert [v.split(":")[1] for v in check(the_engine_imports_no_concrete_model)] == ["4"]
    # fmnist.cli (cli) and the relative ..flows.cnn (flows) point up; ``from . import recipes``
    # resolves to fmnist.train.recipes, the engine's own layer
    upward = check(imports_point_down_the_layers)
    assert [v.split(":")[1] for v in upward] == ["5", "6"]
    assert "fmnist.flows.cnn (layer flows) from layer training" in upward[1]
    # the allowed cases stay quiet: a commented local import in data.py, optuna in the
    # search, mlflow in tracking, pyplot outside analysis
    data = "def split():\n    # why: only the split needs it\n    import sklearn\n"
    assert check(lean_layers_import_without_the_tracking_stack, data, "fmnist.data") == []
    assert check(lean_layers_import_without_the_tracking_stack, "import sklearn\n", "fmnist.data")
    for search in ("fmnist.search", "fmnist.search.study", "fmnist.search.driver"):
        assert not check(optuna_only_in_the_search, "import optuna\n", search)
        assert check(mlflow_only_in_tracking_and_flows, "import mlflow\n", search)
    assert check(optuna_only_in_the_search, "import optuna\n", "fmnist.tracking.runs")
    assert not check(mlflow_only_in_tracking_and_flows, "import mlflow\n", "fmnist.tracking")
    pyplot = "import matplotlib.pyplot as plt\n"
    assert check(analysis_keeps_no_pyplot_state, pyplot, "fmnist.analysis.evaluation")
    assert not check(analysis_keeps_no_pyplot_state, pyplot, "fmnist.flows.eda")
    # the predict path: torch directly, or through a module that loads it, only inside a function
    predict = "import torch\nfrom fmnist.data import CLASS_NAMES\nfrom fmnist import errors\n"
    predict += "def late():\n    import torch\n"
    found = check(the_predict_path_imports_no_torch, predict, "fmnist.inputs")
    assert [v.split(":")[1] for v in found] == ["1", "2"]
    assert "through fmnist.data" in found[1]
    assert check(the_predict_path_imports_no_torch, "import fmnist.tracking.registry\n", "fmnist")
    assert not check(the_predict_path_imports_no_torch, predict, "fmnist.flows.evaluate")


def test_torch_loaders_follow_imports_through_modules_and_packages():
    sources = {
        "pkg": ("", True),
        "pkg.a": ("import torch.nn\n", False),
        "pkg.b": ("import pkg.a\n", False),
        "pkg.sub": ("from pkg.b import x\n", True),
        "pkg.sub.c": ("import numpy\n", False),
        "pkg.d": ("def late():\n    import torch\n", False),
    }
    assert torch_loaders(sources) == {"pkg.a", "pkg.b", "pkg.sub"}
    assert "fmnist.data" in TORCH_LOADERS and "fmnist.tracking.registry" in TORCH_LOADERS
    assert "fmnist.tracking.onnx_model" not in TORCH_LOADERS
