"""The command-line surface: commands listed in the order of the work, one convention for every
option (boolean options are flags that also take a value, metavars that say what an option
takes, help for each, an example for each command), `python -m fmnist`, and the exit codes a
shell expects: 0, 1 unexpected, 2 usage/data/config, 130 on SIGINT and 143 on SIGTERM, sent to
a real process in the middle of a command."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from fmnist.cli import COMMANDS, cli
from fmnist.cli.options import Switch

WORK_ORDER = ["info", "eda", "dnn-search", "cnn", "cnn-search", "evaluate", "compare"]
WORK_ORDER += ["predict", "pipeline", "runs"]
SWITCHES = {"quick", "prune", "finalize", "retrain_best", "robustness", "include_quick", "quiet"}
SWITCHES |= {"fresh", "clean"}
# Commands that read no dataset and train nothing take no data/seed options.
WITHOUT_SHARED_OPTIONS = {"predict", "runs"}


def command(name: str) -> click.Command:
    return cli.get_command(None, name)


def options(name: str) -> list[click.Option]:
    return [p for p in command(name).params if isinstance(p, click.Option)]


def test_help_lists_every_command_in_the_order_of_the_work():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listing = result.output.split("Commands:")[1].split("Examples:")[0]
    assert [line.split()[0] for line in listing.strip().splitlines()] == WORK_ORDER
    assert list(COMMANDS) == WORK_ORDER
    assert "--x=true|false" in result.output and "143" in result.output


def test_every_command_has_help_and_the_shared_options():
    for name in sorted(set(COMMANDS) - WITHOUT_SHARED_OPTIONS):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        for option in ("--data-dir", "--seed", "--split-seed", "--device", "--experiment-name"):
            assert option in result.output, (name, option)


def test_every_option_has_help_and_a_metavar_that_says_what_it_takes():
    for name in COMMANDS:
        context = click.Context(command(name), info_name=name)
        for option in options(name):
            if option.hidden:
                continue
            spec, text = option.get_help_record(context)
            assert option.help, f"{name} {spec}: no help"
            assert "TEXT" not in spec and "BOOLEAN" not in spec, f"{name} {spec}"


def test_every_command_shows_an_example_in_its_help():
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        examples = result.output.split("Examples:")[1]
        assert f"fmnist {name}" in examples, name


def test_every_boolean_option_is_a_flag_that_also_takes_a_value():
    forms = [
        ([], None),
        (["--{}"], True),
        (["--no-{}"], False),
        (["--{}=true"], True),
        (["--{}=false"], False),
        (["--{}", "false"], False),
        (["--{}", "--no-{}"], False),
    ]
    seen = set()
    for name in COMMANDS:
        for option in options(name):
            if option.is_flag or option.hidden:
                # click's own flags: --invert/--no-invert (PATHS follow it) and the negations
                assert option.is_flag and (option.secondary_opts or option.hidden), option.opts
                continue
            if not isinstance(option, Switch):
                assert not isinstance(option.type, click.types.BoolParamType), option.opts
                continue
            seen.add(option.name)
            flag = option.opts[0][2:]
            for args, expected in forms:
                args = [a.format(flag) for a in args]
                value = command(name).make_context(name, args).params[option.name]
                assert value is (option.default if expected is None else expected), (name, args)
    assert seen == SWITCHES
    # the example: `fmnist pipeline --quick` alone
    assert command("pipeline").make_context("pipeline", ["--quick"]).params["quick"] is True


def test_help_loads_neither_torch_nor_mlflow():
    code = (
        "import json, sys\n"
        "from fmnist.cli import COMMANDS, cli\n"
        "for name in ['', *COMMANDS]:\n"
        "    try:\n"
        "        cli.main([name, '--help'] if name else ['--help'], standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps([m for m in ('torch', 'mlflow', 'sklearn') if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


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


@pytest.mark.parametrize(
    "args", [["cnn", "--epochs", "1.5"], ["pipeline", "--quick", "maybe"], ["nope"]]
)
def test_a_usage_error_exits_2(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Error:" in result.stderr, result.output


def test_a_usage_error_under_mlflow_run_ends_the_run_failed(tracking_store, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("usage"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = CliRunner().invoke(cli, ["cnn", "--epochs", "abc"])
    assert result.exit_code == 2
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and "--epochs" in ended.data.tags["error"]


def test_a_keyboard_interrupt_in_a_command_exits_130(synthetic_data_dir, monkeypatch):
    import fmnist.data

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmnist.data, "make_splits", interrupt)
    result = CliRunner().invoke(cli, ["info", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 130
    assert result.stderr.strip() == "Interrupted (SIGINT)."


@pytest.fixture()
def silent_server():
    """A tracking server that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(120)
        yield server


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_command_exits_with_the_shells_code(silent_server, tmp_path, signum, code):
    """`fmnist predict` waiting on the tracking server (it has connected: the command is under
    way) gets SIGINT or SIGTERM: it exits 128 + the signal's number, with one line."""
    uri = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "fmnist", "predict", "--model", "models:/m@champion", "x.png"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test runner may ignore SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        connection, _ = silent_server.accept()
        with connection:
            time.sleep(0.2)  # the request is sent; the command waits for its answer
            process.send_signal(signum)
            _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == f"Interrupted ({signal.Signals(signum).name}).", err
    assert "Traceback" not in err


# Slows every epoch down, after logging it, so a signal lands in the middle of a training.
SLOW_EPOCHS = """\
import sys, time
from fmnist.train import engine
real_fit = engine.fit
def slow_fit(*args, on_epoch_end, **kwargs):
    def hook(epoch, metrics):
        on_epoch_end(epoch, metrics)
        print("EPOCH", epoch, file=sys.stderr, flush=True)
        time.sleep(60)
    return real_fit(*args, on_epoch_end=hook, **kwargs)
engine.fit = slow_fit
from fmnist.cli import main
sys.argv = ["fmnist", *sys.argv[1:]]
main()
"""


# ~15 s; the default test above covers the exit codes, tests/test_cnn_resume.py the KILLED run
@pytest.mark.slow
def test_sigterm_mid_training_ends_the_run_killed_and_exits_143(synthetic_data_dir, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FMNIST_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    args = ["cnn", "--epochs", "3", "--device", "cpu", "--quiet", "--experiment-name", "tests"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_EPOCHS, *args, "--data-dir", str(synthetic_data_dir)],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = iter(process.stderr.readline, "")
        assert any(re.match(r"EPOCH \d", line) for line in lines)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-3000:]
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("tests").experiment_id]
    )
    assert run.info.status == "KILLED"
