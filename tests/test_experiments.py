"""Experiment definitions: found from anywhere, validated key by key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fmnist.definitions import experiments_dir, load_definition
from fmnist.errors import ConfigError


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
