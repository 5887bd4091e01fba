"""The command-line surface: the group lists its commands, `python -m fmnist` works."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from fmnist.cli import COMMANDS, cli
from tests.helpers import run_python


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


def test_the_fast_exit_still_joins_threads_runs_atexit_and_flushes():
    done = run_python(
        "import atexit, threading, time\n"
        "from fmnist.cli import exit_now\n"
        "atexit.register(lambda: print('atexit ran', flush=False))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "print('last line', end='')\n"
        "exit_now(3)\n"
    )
    assert done.returncode == 3
    # the thread was joined before the handlers ran, and nothing printed was lost
    assert done.stdout == "last linethread done\natexit ran\n"


def test_the_fast_exit_prints_a_message_exit_code_as_sys_exit_does():
    done = run_python("from fmnist.cli import exit_now\nexit_now('bad thing')\n")
    assert (done.returncode, done.stderr) == (1, "bad thing\n")


def test_a_failing_command_keeps_its_exit_code_through_the_fast_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", "info", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: ")
