"""The command-line surface: the group lists its commands, `python -m fmnist` works."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from fmnist.cli import COMMANDS, cli


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


# Commands that read no dataset and train nothing take no data/seed options.
WITHOUT_SHARED_OPTIONS = {"predict"}


def test_every_command_has_help_and_the_shared_options():
    for name in sorted(set(COMMANDS) - WITHOUT_SHARED_OPTIONS):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        for option in ("--data-dir", "--seed", "--split-seed", "--device", "--experiment-name"):
            assert option in result.output, (name, option)


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "pipeline" in done.stdout


def test_info_prints_counts_of_the_synthetic_data(synthetic_data_dir):
    result = CliRunner().invoke(cli, ["info", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 0, result.output
    assert "160 / 40 / 50" in result.output


def test_a_failing_command_exits_with_its_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", "info", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: ")
