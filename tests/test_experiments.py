"""Experiment definitions: found from anywhere, validated key by key; every training setting
declared once (``TrainConfig``) and reaching recipes, the engine, the CNN search and the runs."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fmnist.definitions import experiments_dir, load_definition
from fmnist.errors import ConfigError
from fmnist.search.spaces import CnnSpace
from fmnist.train.recipes import key_types, load_recipe, load_space
from fmnist.train.settings import (
    HYPERPARAMETERS,
    OPTIMIZERS,
    RUN_FIELDS,
    SCHEDULES,
    TrainConfig,
    hyperparameters,
    train_config,
)


@dataclass(frozen=True)
class Example:
    name: str
    epochs: int
    lr: float = 0.001
    hidden: tuple[tuple[int, ...], ...] = ()
    flag: bool = False


def write(tmp_path, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return str(path)


def test_valid_definition_loads_with_types(tmp_path):
    cfg = load_definition(
        write(tmp_path, "name: x\nepochs: 3\nlr: 1\nhidden: [[64], [64, 32]]\n"), Example
    )
    assert cfg == Example("x", 3, 1.0, ((64,), (64, 32)), False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nepochs: 3\nbogus: 1\n", "unknown key 'bogus'"),
        ("name: x\nepochs: three\n", "key 'epochs'"),
        ("name: x\n", "missing required key 'epochs'"),
        ("name: x\nepochs: 1\nflag: 1\n", "key 'flag'"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_malformed_definition_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_definition(path, Example)
    assert "example.yaml" in str(info.value)


def test_experiments_folder_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (experiments_dir() / "README.md").is_file()


# --- one place for each training setting -------------------------------------------------------


def other_value(name: str):
    """A valid value of training setting ``name`` other than its default."""
    default = getattr(TrainConfig, name)
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}
    if name in choices:
        return next(c for c in choices[name] if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    return default * 2 if default else 0.1


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_each_training_setting_reaches_the_recipe_the_engine_the_search_and_the_run(
    tmp_path, name
):
    """A field of ``TrainConfig`` (a new one too: the test runs over all of them) is a key of
    a recipe file, reaches the engine's settings, is a key a CNN search may sample, and is
    logged among a run's params."""
    value = other_value(name)
    recipe_file = tmp_path / "recipe.yaml"
    text = "model: {arch: resnet, width: 4, blocks: 0, stages: 1}\n"
    recipe_file.write_text(text + yaml.safe_dump({name: value}))
    recipe = load_recipe(str(recipe_file))
    assert getattr(train_config(recipe, seed=3), name) == value  # what engine.fit gets
    assert hyperparameters(train_config(recipe))[name] == value  # a run logs it
    if name == "epochs":
        assert name not in key_types(recipe)  # a trial trains the search's --epochs
        return
    assert key_types(recipe)[name][0] == "recipe"  # a CNN search may sample it
    space = tmp_path / "space.yaml"
    space.write_text(f"recipe: {recipe_file}\nparams:\n  {name}: [{json.dumps(value)}]\n")
    _, (dimension,), base, _ = load_space(str(space))
    assert getattr(CnnSpace((dimension,), base, "r", 5).recipe_for({name: value}), name) == value


def test_a_recipe_refuses_where_to_run():
    for name in RUN_FIELDS:
        assert name not in HYPERPARAMETERS
    with pytest.raises(ConfigError, match="key 'device' is an option of the command"):
        load_recipe(str(write_recipe("model: {arch: paper}\ndevice: cuda\n")))


def write_recipe(text: str):
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(text)
    return path
