"""No private name of another package in ``fmnist/``: read from the source (never imported).

A private name (``torch._fused_adam_``, ``threading._shutdown``, ``trial._trial_id``, an import
from ``optuna.storages._heartbeat``) can change or vanish in any release of its package. Every
attribute read whose name starts with one underscore (``self``'s and ``cls``'s excepted) and
every import of a module path or name with one is reported, but for ``os._exit``, which Python
documents as public. A synthetic module proves the checker finds each kind.
"""

from __future__ import annotations

import ast

from tests.helpers import PROJECT_ROOT

ALLOWED = {"os._exit"}  # documented in the standard library's reference


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls") and f"{owner}.{node.attr}" not in ALLOWED:
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [*node.module.split("."), *(alias.name for alias in node.names)]
            if any(private(part) for part in names):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(private(part) for part in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}"))
    return found


def test_the_package_uses_no_private_name_of_another_package():
    found = []
    for path in sorted((PROJECT_ROOT / "fmnist").rglob("*.py")):
        where = path.relative_to(PROJECT_ROOT)
        found += [f"{where}:{line}: {name}" for line, name in private_names(path.read_text())]
    assert not found, "private names in use:\n" + "\n".join(found)


def test_the_checker_finds_each_kind():
    source = (
        "import threading, os\n"
        "from optuna.storages._heartbeat import x\n"
        "from torch.optim.optimizer import _get_scalar_dtype\n"
        "import torch._dynamo\n"
        "threading._shutdown()\n"
        "trial._trial_id\n"
        "self._mine, os._exit(0), obj.__class__\n"
    )
    assert sorted(line for line, _ in private_names(source)) == [2, 3, 4, 5, 6]
