"""The README's commands exist: every ``fmnist`` command and option, ``mlflow run`` entry point
and parameter, and ``make`` target in its code blocks is one the project has (read from the
CLI, MLproject and Makefile themselves), and it names no path that exists only on our machines.
"""

from __future__ import annotations

import re
import shlex

import click
import yaml

from fmnist.cli import cli
from tests.helpers import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    """Every line of the README's fenced code blocks, continuation lines joined, no comments."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def inline_commands() -> list[str]:
    """The README's inline ``fmnist ...`` spans, placeholders (``COMMAND``, ``NAME``) left out."""
    return [s for s in re.findall(r"`(fmnist [^`]*)`", README) if not re.search(r"[A-Z]{4}", s)]


def options_of(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_every_fmnist_command_and_option_in_the_readme_exists():
    context = click.Context(cli)
    checked = 0
    for line in code_lines() + inline_commands():
        words = shlex.split(line.split("|")[0].split("&&")[-1])
        if "fmnist" not in words[:3]:
            continue
        words = words[words.index("fmnist") + 1 :]
        if not words or words[0].startswith("-"):
            continue
        command = cli.get_command(context, words[0])
        assert command is not None, f"README: no command {words[0]!r} in `{line}`"
        known = options_of(command) | {"--help", "-h"}
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"README: {word} is no option of `{line}`"
        checked += 1
    assert checked >= 20


def test_every_mlflow_run_entry_point_parameter_and_make_target_in_the_readme_exists():
    entry_points = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
    targets = set(re.findall(r"^([a-z-]+):", (PROJECT_ROOT / "Makefile").read_text(), re.M))
    runs = makes = 0
    for line in code_lines():
        words = shlex.split(line)
        if words[:2] == ["mlflow", "run"]:
            entry = words[words.index("-e") + 1] if "-e" in words else "main"
            assert entry in entry_points, f"README: no entry point {entry!r} in `{line}`"
            for i, word in enumerate(words):
                if word == "-P":
                    name = words[i + 1].split("=")[0]
                    assert name in entry_points[entry]["parameters"], f"README: -P {name}"
            runs += 1
        if words[0] == "make":
            assert words[1].split("=")[0] in targets | {"test", "FMNIST_DATA_DIR"}, line
            makes += 1
    assert runs >= 1 and makes >= 3


def test_the_readme_names_no_path_of_our_machines():
    for private in ("../shared", "/work/", "/root/", "/tmp/x"):
        assert private not in README, f"README mentions {private}"
    assert len(README.splitlines()) <= 250


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_names_every_key_of_recipes_grids_and_spaces():
    """The key reference is written by hand; it lists exactly the keys the loaders accept."""
    import dataclasses

    from fmnist.train.recipes import PER_POINT, CnnRecipe, DnnGrid, SpaceFile
    from fmnist.train.settings import HYPERPARAMETERS, RUN_FIELDS, TrainConfig

    text = section("Extending")
    settings, rest = text.split("Training settings (`TrainConfig`):", 1)[1], text
    named = set(re.findall(r"`([a-z_0-9]+)`", settings.split("[experiments")[0]))
    assert named == set(HYPERPARAMETERS)
    own = {f.name for f in dataclasses.fields(TrainConfig)}

    def listed(bullet: str) -> set[str]:
        part = rest.split(f"**{bullet}**", 1)[1].split("\n- ", 1)[0]
        return set(re.findall(r"`([a-z_]+)`", part))

    recipe = {f.name for f in dataclasses.fields(CnnRecipe)} - own
    assert recipe <= listed("A CNN recipe")
    grid = {f.name for f in dataclasses.fields(DnnGrid)} - own
    assert grid <= listed("A dense grid") and set(PER_POINT) <= listed("A dense grid")
    assert {f.name for f in dataclasses.fields(SpaceFile)} <= listed("A CNN search space")
    assert not set(RUN_FIELDS) & named


def test_experiments_readme_states_each_recipes_own_epochs():
    """experiments/README.md once said 16 epochs for a recipe that trains 20."""
    from fmnist.train.recipes import load_recipe

    text = (PROJECT_ROOT / "experiments" / "README.md").read_text()
    rows = re.findall(r"^\| `cnn/([a-z0-9_]+)\.yaml` \|(.*)$", text, flags=re.M)
    assert len(rows) >= 3
    for name, row in rows:
        stated = re.findall(r"(\d+) epochs", row)
        assert stated and {int(n) for n in stated} == {load_recipe(name).epochs}, name
